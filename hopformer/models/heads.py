"""Heads on the encoder: sequence classification (mean or CLS pooling), the LRA Retrieval dual encoder,
and the masked-token model.

CLS pooling follows the LRA reference: a learned CLS *vector* (not a token id, so the vocabulary is
untouched) is prepended to the embedded tokens and takes position 0; the real tokens take positions
1..L, so the encoder's ``max_len`` must be at least ``L + 1``. ``"first"`` pools the output at the first
token itself (BERT and RoBERTa, whose inputs start with a ``[CLS]`` / ``<s>`` token). Pooled outputs never
look at padding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hopformer.checks import check_int
from hopformer.models.encoder import EncoderConfig, TransformerEncoder, _init_weights
from hopformer.models.pretrained import PretrainedModel

POOLINGS = ("mean", "cls", "first")
ACTIVATIONS = {"gelu": nn.GELU, "tanh": nn.Tanh}  # the classifier head's (BERT and RoBERTa heads use tanh)


@dataclass
class SequenceClassifierConfig:
    """Hyperparameters of :class:`SequenceClassifier`; ``head_dim`` None = the encoder's ``mlp_dim``."""

    encoder: EncoderConfig
    num_classes: int
    pooling: str = "mean"
    head_dim: int | None = None
    head_activation: str = "gelu"


@dataclass
class DualEncoderClassifierConfig:
    """Hyperparameters of :class:`DualEncoderClassifier`; ``head_dim`` None = the encoder's ``mlp_dim``."""

    encoder: EncoderConfig
    num_classes: int = 2
    pooling: str = "mean"
    head_dim: int | None = None


@dataclass
class MaskedTokenModelConfig:
    """Hyperparameters of :class:`MaskedTokenModel`; ``transform``: a dense layer, GELU and LayerNorm before the
    output layer (BERT's and RoBERTa's masked-LM head)."""

    encoder: EncoderConfig
    vocab_size: int
    transform: bool = False


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """``(batch, seq, dim) -> (batch, dim)``: position 0 (``"cls"``, ``"first"``) or the mean over real tokens."""
    if pooling in ("cls", "first"):
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class _PoolingEncoder(PretrainedModel):
    """Shared part of the classifiers: the encoder, a CLS vector when ``pooling="cls"``, and pooling."""

    def _setup(self, encoder: TransformerEncoder, pooling: str) -> None:
        if not isinstance(encoder, TransformerEncoder):
            raise TypeError(f"encoder must be a TransformerEncoder, got {type(encoder).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not known; choose one of {list(POOLINGS)}")
        if pooling == "cls" and encoder.config.positions == "rope2d":
            raise ValueError(
                "pooling='cls' adds a position before the image, which positions='rope2d' cannot place; use 'mean'"
            )
        self.encoder = encoder
        self.pooling = pooling
        self.cls = nn.Parameter(torch.randn(encoder.config.dim) * 0.02) if pooling == "cls" else None

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled ``(batch, dim)`` representation of each sequence."""
        prefix = None if self.cls is None else self.cls.expand(input_ids.shape[0], 1, -1)
        hidden = self.encoder(input_ids, attention_mask, prefix=prefix)
        return pool(hidden, attention_mask, self.pooling)


class SequenceClassifier(_PoolingEncoder):
    """Encoder, pooling and a two-layer GELU MLP head giving ``num_classes`` logits.

    Args:
        encoder: a :class:`TransformerEncoder`.
        num_classes: number of labels.
        pooling: ``"mean"`` (over real tokens only, by ``attention_mask``), ``"cls"`` (a learned
            vector prepended at position 0, as LRA does; its output is the pooled feature) or ``"first"``
            (the output at the first token: BERT's ``[CLS]``, RoBERTa's ``<s>``).
        head_dim: hidden width of the head; default the encoder's ``mlp_dim``.
        head_activation: between the head's two layers, ``"gelu"`` or ``"tanh"`` (BERT's pooler, RoBERTa's head).

    ``forward(input_ids, attention_mask=None) -> logits (batch, num_classes)``.
    """

    config_class = SequenceClassifierConfig
    model_type = "sequence_classifier"

    def __init__(
        self,
        encoder: TransformerEncoder,
        num_classes: int,
        pooling: str = "mean",
        head_dim: int | None = None,
        head_activation: str = "gelu",
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 1)
        if head_activation not in ACTIVATIONS:
            raise ValueError(f"head_activation={head_activation!r} is not known; choose one of {list(ACTIVATIONS)}")
        self._setup(encoder, pooling)
        self.config = SequenceClassifierConfig(encoder.config, num_classes, pooling, head_dim, head_activation)
        hidden = head_dim or encoder.config.mlp_dim
        self.head = nn.Sequential(
            nn.Linear(encoder.config.dim, hidden), ACTIVATIONS[head_activation](), nn.Linear(hidden, num_classes)
        )
        self.head.apply(functools.partial(_init_weights, scheme=encoder.config.init))

    @classmethod
    def from_config(cls, config: SequenceClassifierConfig) -> SequenceClassifier:
        encoder = TransformerEncoder.from_config(config.encoder)
        return cls(encoder, config.num_classes, config.pooling, config.head_dim, config.head_activation)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))


class DualEncoderClassifier(_PoolingEncoder):
    """LRA Retrieval: one shared encoder reads both documents; ``[u, v, u*v, u-v]`` -> MLP -> logits.

    The head is ``4 dim -> head_dim -> head_dim / 2 -> num_classes`` with GELU (specs/lra.md §2).
    Both documents run through the encoder as one batch, so auxiliary losses cover both.

    ``forward(input_ids, attention_mask=None, input_ids_2=..., attention_mask_2=None) -> logits``.
    """

    config_class = DualEncoderClassifierConfig
    model_type = "dual_encoder_classifier"

    def __init__(
        self, encoder: TransformerEncoder, num_classes: int = 2, pooling: str = "mean", head_dim: int | None = None
    ) -> None:
        super().__init__()
        self._setup(encoder, pooling)
        self.config = DualEncoderClassifierConfig(encoder.config, num_classes, pooling, head_dim)
        hidden = head_dim or encoder.config.mlp_dim
        self.head = nn.Sequential(
            nn.Linear(4 * encoder.config.dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, max(hidden // 2, 1)),
            nn.GELU(),
            nn.Linear(max(hidden // 2, 1), num_classes),
        )
        self.head.apply(functools.partial(_init_weights, scheme=encoder.config.init))

    @classmethod
    def from_config(cls, config: DualEncoderClassifierConfig) -> DualEncoderClassifier:
        encoder = TransformerEncoder.from_config(config.encoder)
        return cls(encoder, config.num_classes, config.pooling, config.head_dim)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_ids_2: torch.Tensor | None = None,
        attention_mask_2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids_2 is None:
            raise ValueError("DualEncoderClassifier needs input_ids_2 (the second document)")
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask_2 is None:
            attention_mask_2 = torch.ones_like(input_ids_2, dtype=torch.bool)
        # One encoder call on both documents, padded to a common width.
        width = max(input_ids.shape[1], input_ids_2.shape[1])
        ids = torch.cat([F.pad(input_ids, (0, width - input_ids.shape[1])),
                         F.pad(input_ids_2, (0, width - input_ids_2.shape[1]))])  # fmt: skip
        mask = torch.cat([F.pad(attention_mask.bool(), (0, width - attention_mask.shape[1])),
                          F.pad(attention_mask_2.bool(), (0, width - attention_mask_2.shape[1]))])  # fmt: skip
        u, v = self.features(ids, mask).split(batch)
        return self.head(torch.cat([u, v, u * v, u - v], dim=-1))


class MaskedTokenModel(PretrainedModel):
    """Encoder and a linear token head: ``(batch, seq) -> (batch, seq, vocab_size)`` logits.

    For masked-token pretraining on a task's own inputs ("self-pretraining", Amos et al. 2023): the
    trainer hides some tokens and trains the model to name them; a classifier then starts from the
    encoder (``train.init_from``).

    ``forward(input_ids, attention_mask=None, select=None) -> logits (batch, seq, vocab_size)``, or
    with a boolean ``select`` of shape ``(batch, seq)``, ``(N, vocab_size)`` logits at its N True
    positions only (the head and the loss then cost a fraction of the full table).
    """

    config_class = MaskedTokenModelConfig
    model_type = "masked_token_model"

    def __init__(self, encoder: TransformerEncoder, vocab_size: int, transform: bool = False) -> None:
        super().__init__()
        if not isinstance(encoder, TransformerEncoder):
            raise TypeError(f"encoder must be a TransformerEncoder, got {type(encoder).__name__}")
        self.encoder = encoder
        self.config = MaskedTokenModelConfig(encoder.config, vocab_size, transform)
        dim = encoder.config.dim
        if transform:  # BERT's prediction head: dense, GELU, LayerNorm, then the output layer
            norm = nn.LayerNorm(dim, eps=encoder.config.layer_norm_eps)
            self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), norm, nn.Linear(dim, vocab_size))
        else:
            self.head = nn.Linear(dim, vocab_size)
        self.head.apply(functools.partial(_init_weights, scheme=encoder.config.init))

    @classmethod
    def from_config(cls, config: MaskedTokenModelConfig) -> MaskedTokenModel:
        return cls(TransformerEncoder.from_config(config.encoder), config.vocab_size, config.transform)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask)
        return self.head(hidden if select is None else hidden[select])


# ------------------------------------------------------------------------------------------ helpers
def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor once); ``trainable_only`` counts ``requires_grad`` ones."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of every submodule's ``aux_loss`` tensor (e.g. routing's commitment loss), or None if none is set."""
    losses = [
        module.aux_loss for module in model.modules() if isinstance(getattr(module, "aux_loss", None), torch.Tensor)
    ]
    return torch.stack([loss.float().sum() for loss in losses]).sum() if losses else None
