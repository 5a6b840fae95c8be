"""The transformer encoder: token (or pixel) embeddings, positions and ``depth`` blocks of attention and a
GELU MLP on any registered attention, pre-norm (GPT-2 / ViT style, the default) or post-norm (BERT /
RoBERTa style, the Diffuser reference). Built from its config: ``TransformerEncoder(EncoderConfig(...))``.

Padding: ``attention_mask`` is HF-style (1 / True = real token) and reaches every attention module.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hopformer.attention import build as build_attention
from hopformer.attention.decoding import shared_step_indices
from hopformer.attention.rotary import RotaryEmbedding
from hopformer.checks import check_int
from hopformer.models.pretrained import PretrainedModel

NORMS = ("pre", "post")
POSITIONS = ("learned", "sinusoidal", "rope", "rope2d", "image", "none")
INITS = ("normal", "torch", "lra")
EMBEDDINGS = ("table", "intensity", "conv")


@dataclass
class EncoderConfig:
    """Hyperparameters of :class:`TransformerEncoder`.

    Attributes:
        vocab_size: embedding table size (ids ``0 .. vocab_size - 1``).
        dim, depth, heads, mlp_dim: width, layers, attention heads, MLP hidden width (GELU).
        max_len: most positions (including a prepended CLS vector, see :class:`SequenceClassifier`).
        attention: a name from ``hopformer.attention.available()``; ``attention_options`` are its
            keyword arguments (``hops``, ``alpha``, ``block_size``, ``window``...).
        norm: ``"pre"`` (LayerNorm before each sub-layer and once at the end) or ``"post"``
            (RoBERTa: LayerNorm after each residual, and on the embeddings).
        positions: ``"learned"`` or ``"sinusoidal"`` (added to the embeddings), ``"rope"`` (rotary:
            every attention rotates its queries and keys by position, so scores see relative
            offsets; needs an even head dim), ``"rope2d"`` (axial 2-D rotary for square images in raster
            order, Pathfinder and Image: scores see the (row, column) offset; needs a head dim divisible
            by 4 and a square sequence, so mean pooling), ``"image"`` (learned row, column and channel
            embeddings, summed, for images flattened in raster order with the channels of a pixel consecutive;
            needs ``image_shape``) or ``"none"``.
        image_shape: ``(height, width, channels)`` of the images for ``positions="image"``: position ``p`` is
            row ``p // (width * channels) % height``, column ``p // channels % width``, channel ``p % channels``.
        dropout: on embeddings and after attention and MLP (before the residual add).
        attention_dropout: passed to the attention module as ``dropout`` when > 0.
        pad_id: the embedding's ``padding_idx`` (0 for tokens). ``None`` for pixel tasks, where 0
            is a black pixel and must get a trained embedding.
        pad_to_multiple: pad the hidden sequence internally to a multiple of this (masked, trimmed
            from the output), e.g. 128 for FlexAttention tiles when a CLS vector adds one position.
        layer_norm_eps: epsilon of every LayerNorm.
        gradient_checkpointing: recompute each block in backward to save activation memory.
        init: ``"normal"`` (BERT: every weight N(0, 0.02), zero biases), ``"torch"`` (PyTorch's
            default Linear init, embeddings N(0, 0.02): the Nystromformer LRA code's) or ``"lra"``
            (the official JAX LRA encoder's: token embeddings N(0, 1), Linear weights Glorot-uniform,
            zero biases). At width 64, N(0, 0.02) starts attention near uniform, and models leave the
            majority-class plateau much later (measured on ListOps at lr 1e-4). Beside sinusoidal
            positions (amplitude ~0.7), N(0, 0.02) token embeddings start ~35 times weaker than the
            positions; the LRA encoder's N(0, 1) do not.
        embedding: ``"table"`` (one learned vector per id), ``"intensity"`` (pixel tasks: ids 0-255 are
            grey levels, scaled to [-1, 1] and mapped by one ``Linear(1, dim)``, as a convolution or the S4
            pipeline reads pixels; a table starts a faint anti-aliased pixel as far from black as a lit
            one), or ``"conv"`` (the same, of the 3 x 3 pixels around each one: a convolutional stem, for square
            images in raster order). The last two need ``pad_id=None``.
        stem_depth: with ``embedding="conv"``, the number of 3 x 3 convolutions in the stem (the first
            ``stem_depth - 1`` with 16 channels and GELU), so each token sees a (2 stem_depth + 1)-pixel square.
        causal: every attention layer is built with ``causal=True``: the output at a position depends on
            the inputs at and before it only (a decoder, :class:`~hopformer.models.CausalLM`).

    In a training config (``hopformer.train.Config.model``) ``vocab_size``, ``max_len``, ``pad_id`` and
    ``pad_to_multiple`` start as None, meaning "from the task": the trainer fills them before it builds the
    model. A model's own config always holds the resolved values.
    """

    vocab_size: int | None
    dim: int = 64
    depth: int = 2
    heads: int = 2
    mlp_dim: int = 128
    max_len: int | None = 512
    attention: str = "full"
    attention_options: dict[str, Any] = field(default_factory=dict)
    norm: str = "pre"
    positions: str = "learned"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pad_id: int | None = 0
    pad_to_multiple: int | None = 1
    layer_norm_eps: float = 1e-5
    gradient_checkpointing: bool = False
    init: str = "normal"
    embedding: str = "table"
    stem_depth: int = 1
    causal: bool = False
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.image_shape, list):  # from YAML or JSON
            self.image_shape = tuple(self.image_shape)


class ImagePositions(nn.Module):
    """Learned row, column and channel embeddings of an image in raster order, summed: a pixel model knows
    where in the image each position is with ``height + width + channels`` vectors instead of one per token."""

    def __init__(self, shape: tuple[int, int, int], dim: int) -> None:
        super().__init__()
        self.shape = shape
        height, width, channels = shape
        self.row = nn.Parameter(torch.randn(height, dim) * 0.02)
        self.column = nn.Parameter(torch.randn(width, dim) * 0.02)
        self.channel = nn.Parameter(torch.randn(channels, dim) * 0.02)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Embeddings of the positions ``index`` (any shape) -> ``(*index.shape, dim)``."""
        height, width, channels = self.shape
        row = index // (width * channels) % height
        return self.row[row] + self.column[index // channels % width] + self.channel[index % channels]


class Block(nn.Module):
    """One transformer layer: attention then a GELU MLP, each with dropout, residual and LayerNorm."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        options = dict(config.attention_options)
        if config.attention_dropout > 0:
            options.setdefault("dropout", config.attention_dropout)
        if config.causal:
            options["causal"] = True
        self.attention = build_attention(config.attention, config.dim, config.heads, **options)
        if config.positions == "rope":
            self.attention.rotary = RotaryEmbedding(config.dim // config.heads)
        elif config.positions == "rope2d":
            self.attention.rotary = RotaryEmbedding(config.dim // config.heads, base=100.0, grid=True)
        self.norm1 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, config.mlp_dim), nn.GELU(), nn.Linear(config.mlp_dim, config.dim)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.pre_norm = config.norm == "pre"

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any = None) -> torch.Tensor:
        return self._around(x, lambda h: self.attention(h, attention_mask, cache=cache))

    def step(self, x: torch.Tensor, cache: Any, positions: torch.Tensor) -> torch.Tensor:
        """One new token per sequence (incremental decoding; see :meth:`TransformerEncoder.step`)."""
        return self._around(x, lambda h: self.attention.step(h, cache, positions))

    def _around(self, x: torch.Tensor, attend: Any) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout(attend(self.norm1(x)))
            return x + self.dropout(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.dropout(attend(x)))
        return self.norm2(x + self.dropout(self.mlp(x)))


class IntensityEmbedding(nn.Module):
    """Pixel ids as grey levels (0-255 scaled to [-1, 1]) through one linear map.

    ``kernel_size`` 1: each pixel alone, ``Linear(1, dim)``. 3: the 3 x 3 pixels around it (a square image
    in raster order, padded with black), i.e. one 3 x 3 convolution, the convolutional stem of
    Xiao et al. (2021). ``depth`` > 1 (with ``kernel_size`` 3) puts ``depth - 1`` 3 x 3 convolutions of
    ``STEM_CHANNELS`` channels with GELU before that map, so each token sees the (2 depth + 1)-pixel
    square around it (He-initialised, so the pixel signal keeps its scale). Ids from 256 up (the masked
    objective's mask token) are not intensities: the pixel reads as black to its neighbours and its own
    vector is a learned row.
    """

    GREY_LEVELS = 256
    STEM_CHANNELS = 16  # enough for a small CNN to solve generated Pathfinder-32

    def __init__(self, vocab_size: int, dim: int, kernel_size: int = 1, depth: int = 1) -> None:
        super().__init__()
        if depth > 1 and kernel_size != 3:
            raise ValueError(
                f"a stem of depth={depth} needs kernel_size=3 (embedding='conv'), got kernel_size={kernel_size}"
            )
        self.kernel_size = kernel_size
        width = self.STEM_CHANNELS
        self.hidden = nn.ModuleList(nn.Conv2d(1 if i == 0 else width, width, 3) for i in range(depth - 1))
        for conv in self.hidden:  # He init: PyTorch's default shrinks the signal ~3x a layer, drowning the pixels
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.proj = nn.Linear((width if depth > 1 else 1) * kernel_size * kernel_size, dim)
        extra = vocab_size - self.GREY_LEVELS
        self.special = nn.Embedding(extra, dim) if extra > 0 else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        special = input_ids >= self.GREY_LEVELS
        grey = input_ids.masked_fill(special, 0).to(self.proj.weight.dtype) * (2.0 / 255.0) - 1.0  # black = -1
        if self.kernel_size == 1:
            patches = grey.unsqueeze(-1)
        else:
            batch, seq = grey.shape
            side = math.isqrt(seq)
            if side * side != seq:
                raise ValueError(
                    f"embedding='conv' reads a square image in raster order; a sequence of {seq} tokens is not "
                    "square (use embedding='intensity')"
                )
            image, border = grey.view(batch, 1, side, side), -1.0  # pixels outside the image are black
            for conv in self.hidden:
                image, border = F.gelu(conv(F.pad(image, (1, 1, 1, 1), value=border))), 0.0
            size = self.kernel_size
            image = F.pad(image, (size // 2,) * 4, value=border)
            patches = F.unfold(image, size).transpose(1, 2)  # (batch, seq, channels * size * size)
        x = self.proj(patches)
        if self.special is None:
            return x
        rows = self.special((input_ids - self.GREY_LEVELS).clamp(min=0))
        return torch.where(special.unsqueeze(-1), rows, x)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The fixed sin / cos position table of "Attention is all you need", ``(length, dim)``."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return table


class TransformerEncoder(PretrainedModel):
    """Token embeddings, positions and ``depth`` transformer blocks on a registered attention.

    Built from its config, ``TransformerEncoder(EncoderConfig(vocab_size=..., dim=..., ...))``; the
    settings are described on :class:`EncoderConfig`.

    ``forward(input_ids, attention_mask=None, prefix=None) -> (batch, P + seq, dim)`` where
    ``prefix`` is an optional ``(batch, P, dim)`` of vectors placed before the embedded tokens.
    """

    config_class = EncoderConfig
    model_type = "transformer_encoder"

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(
                f"TransformerEncoder takes an EncoderConfig, got {type(config).__name__}: "
                "TransformerEncoder(EncoderConfig(vocab_size=..., dim=..., ...))"
            )
        _check_encoder_config(config)
        config = replace(config, attention_options=dict(config.attention_options))  # the model's own copy
        self.config = config
        dim = config.dim
        if config.embedding == "table":
            self.embed = nn.Embedding(config.vocab_size, dim, padding_idx=config.pad_id)
        else:
            kernel_size = 3 if config.embedding == "conv" else 1
            self.embed = IntensityEmbedding(config.vocab_size, dim, kernel_size, config.stem_depth)
        if config.positions == "learned":
            self.positions = nn.Parameter(torch.zeros(config.max_len, dim))
        elif config.positions == "sinusoidal":
            self.register_buffer("positions", sinusoidal_positions(config.max_len, dim), persistent=False)
        else:  # "rope" and "rope2d" live in the attention modules; "none" has no positions
            self.positions = None
        self.image_positions = ImagePositions(config.image_shape, dim) if config.positions == "image" else None
        post, eps = config.norm == "post", config.layer_norm_eps
        self.embed_norm = nn.LayerNorm(dim, eps=eps) if post else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = nn.Identity() if post else nn.LayerNorm(dim, eps=eps)
        self.apply(functools.partial(_init_weights, scheme=config.init))
        if config.positions == "learned":
            nn.init.normal_(self.positions, std=0.02)

    @classmethod
    def from_config(cls, config: EncoderConfig) -> TransformerEncoder:
        return cls(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        caches: list[Any] | None = None,
    ) -> torch.Tensor:
        """``(batch, seq)`` ids -> ``(batch, P + seq, dim)``; with ``caches`` (:meth:`new_caches`, causal
        encoders) the same, and the caches filled for decoding what follows (prompts right-padded)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {(batch, seq)}")
        x = self.embed(input_ids)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
            mask = torch.cat([mask.new_ones(batch, prefix.shape[1]), mask], dim=1)
        length = x.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"sequence of {length} positions is longer than max_len={self.config.max_len}")
        x = self.dropout(self.embed_norm(self._add_positions(x, torch.arange(length, device=x.device))))

        # Pad after the positions so the table only needs the real width; the mask hides the rest.
        extra = -length % self.config.pad_to_multiple
        if extra:
            x = F.pad(x, (0, 0, 0, extra))
            mask = F.pad(mask, (0, extra), value=False)
        for index, block in enumerate(self.blocks):
            if caches is not None:
                x = block(x, mask, caches[index])
            elif self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.final_norm(x)[:, :length]

    def _add_positions(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x`` plus the absolute position embeddings of ``index`` (none for rotary or no positions)."""
        if self.positions is not None:
            return x + self.positions[index].to(x.dtype)
        if self.image_positions is not None:
            return x + self.image_positions(index).to(x.dtype)
        return x

    def new_caches(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> list[Any]:
        """One decoding cache per layer (:mod:`hopformer.attention.decoding`) for ``batch`` sequences of up to
        ``max_len`` tokens; causal encoders only."""
        if not self.config.causal:
            raise ValueError("incremental decoding needs a causal encoder (EncoderConfig(causal=True))")
        if max_len > self.config.max_len:
            raise ValueError(f"max_len={max_len} is longer than the encoder's positions, max_len={self.config.max_len}")
        return [block.attention.new_cache(batch, max_len, device, dtype) for block in self.blocks]

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[Any]) -> torch.Tensor:
        """The hidden state of one new token per sequence: ``input_ids (batch, 1)`` at ``positions (batch,)``,
        each attending to its own past through ``caches`` (filled by a forward pass with them): exactly what a
        full forward pass over the whole sequences gives at those positions. With graph-safe caches
        (:func:`~hopformer.attention.decoding.graph_safe`) the step makes no host sync and keeps its shapes, so
        it can be captured in a CUDA graph."""
        x = self.dropout(self.embed_norm(self._add_positions(self.embed(input_ids), positions[:, None])))
        with shared_step_indices():  # layers on one graph derive the new tokens' neighbours once
            for block, cache in zip(self.blocks, caches, strict=True):
                x = block.step(x, cache, positions)
        return self.final_norm(x)


def _check_encoder_config(config: EncoderConfig) -> None:
    for name in ("vocab_size", "dim", "depth", "heads", "mlp_dim", "max_len", "pad_to_multiple", "stem_depth"):
        check_int(name, getattr(config, name), 1)
    if config.dim % config.heads:
        raise ValueError(f"heads={config.heads} must divide dim={config.dim}")
    if not isinstance(config.causal, bool):
        raise TypeError(f"causal must be true or false, got {config.causal!r}")
    if config.attention_options.get("causal") is False and config.causal:
        raise ValueError("attention_options sets causal=False but the encoder is causal=True; drop the option")
    if config.norm not in NORMS:
        raise ValueError(f"norm={config.norm!r} is not known; choose one of {list(NORMS)}")
    if config.positions not in POSITIONS:
        raise ValueError(f"positions={config.positions!r} is not known; choose one of {list(POSITIONS)}")
    if config.init not in INITS:
        raise ValueError(f"init={config.init!r} is not known; choose one of {list(INITS)}")
    if config.embedding not in EMBEDDINGS:
        raise ValueError(f"embedding={config.embedding!r} is not known; choose one of {list(EMBEDDINGS)}")
    if config.embedding != "table" and config.pad_id is not None:
        raise ValueError(
            f"embedding={config.embedding!r} reads ids as pixel grey levels and has no padding id, got "
            f"pad_id={config.pad_id}; use it on pixel tasks (Pathfinder, Image), or embedding='table'"
        )
    if config.embedding != "table" and config.vocab_size < IntensityEmbedding.GREY_LEVELS:
        raise ValueError(
            f"embedding={config.embedding!r} needs vocab_size >= 256 (the grey levels), got {config.vocab_size}"
        )
    if config.stem_depth > 1 and config.embedding != "conv":
        raise ValueError(
            f"stem_depth={config.stem_depth} stacks 3 x 3 convolutions before the token embedding; it needs "
            f"embedding='conv', got embedding={config.embedding!r}"
        )
    if (config.positions == "image") != (config.image_shape is not None):
        raise ValueError(
            f"positions='image' and image_shape=(height, width, channels) go together; got positions="
            f"{config.positions!r}, image_shape={config.image_shape!r}"
        )
    if config.image_shape is not None:
        shape = config.image_shape
        if not isinstance(shape, (tuple, list)) or len(shape) != 3:
            raise ValueError(f"image_shape must be (height, width, channels), got {shape!r}")
        for name, value in zip(("height", "width", "channels"), shape, strict=True):
            check_int(f"image_shape {name}", value, 1)
    if config.positions == "sinusoidal" and config.dim % 2:
        raise ValueError(f"positions='sinusoidal' needs an even dim, got {config.dim}")
    multiple = {"rope": 2, "rope2d": 4}.get(config.positions)  # channel pairs; 2-D splits them in two
    if multiple and (config.dim // config.heads) % multiple:
        raise ValueError(
            f"positions={config.positions!r} needs a head dim divisible by {multiple}, got dim={config.dim} / "
            f"heads={config.heads} = {config.dim // config.heads}"
        )
    for name in ("dropout", "attention_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)!r}")
    if config.pad_id is not None and not 0 <= config.pad_id < config.vocab_size:
        raise ValueError(f"pad_id must be None or in [0, vocab_size={config.vocab_size}), got {config.pad_id!r}")
    if not isinstance(config.attention_options, dict):
        raise TypeError(f"attention_options must be a dict, got {config.attention_options!r}")


def _init_weights(module: nn.Module, scheme: str = "normal") -> None:
    # "normal" (BERT): N(0, 0.02) weights, zero biases; "torch": Linear keeps PyTorch's default
    # (uniform, scaled by 1 / sqrt(fan_in)); "lra" (lra_benchmarks' encoder): Glorot-uniform Linear
    # weights, zero biases, N(0, 1) token embeddings. Embeddings are N(0, 0.02) otherwise; the padding
    # embedding is zero in all three.
    if isinstance(module, nn.Linear):
        if scheme == "torch":
            module.reset_parameters()
            return
        if scheme == "lra":  # (on the fused qkv projection: over all three, where Flax inits each)
            nn.init.xavier_uniform_(module.weight)
        else:
            nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=1.0 if scheme == "lra" else 0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
