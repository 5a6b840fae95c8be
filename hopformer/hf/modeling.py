"""The ``transformers`` classes of hopformer's models: ``HopformerModel`` (the encoder),
``HopformerForSequenceClassification``, ``HopformerForMaskedLM`` and ``HopformerForCausalLM``.

Each holds hopformer's own modules under hopformer's own names (``encoder``, ``head``, ``cls``): the modules of
:class:`~hopformer.models.TransformerEncoder`, :class:`~hopformer.models.SequenceClassifier`,
:class:`~hopformer.models.MaskedTokenModel` and :class:`~hopformer.models.CausalLM`, built by those classes. So
the weights of a ``transformers`` folder and of a hopformer checkpoint are the same tensors under the same names,
and either library loads the other's folders (:mod:`hopformer.models.hf_format`). :meth:`to_hopformer` and
:meth:`from_hopformer` convert a model in memory.

``HopformerForCausalLM`` works with ``generate()``: every step recomputes the whole prefix (no key/value cache
yet; :meth:`HopformerForCausalLM.prepare_inputs_for_generation` is where a hopformer decoding cache plugs in).
Auxiliary losses (Routing's commitment loss) are added to ``loss`` whenever labels are given, as hopformer's
trainer adds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutput,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutput,
)

from hopformer.attention.decoding import reorder_caches
from hopformer.graphs.tracing import exporting
from hopformer.hf.configuration import HopformerConfig
from hopformer.models import (
    CausalLM,
    MaskedTokenModel,
    SequenceClassifier,
    TransformerEncoder,
    aux_loss,
    pool,
)
from hopformer.models.causal_lm import decoding_step
from hopformer.models.encoder import sinusoidal_positions
from hopformer.models.pretrained import MODEL_TYPES, PretrainedModel, load_weights_into


class HopformerPreTrainedModel(PreTrainedModel):
    """What the four classes share: the config class, weight initialisation (hopformer's schemes, ``config.init``),
    the input embeddings, and conversion to and from hopformer's own model classes."""

    config_class = HopformerConfig
    config: HopformerConfig
    # a bare encoder's folder (no prefix) loads into any class, a head's into HopformerModel
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    hopformer_class: ClassVar[str]  # hopformer's model_type of the same weights

    # --------------------------------------------------------------------------------------- init
    def _init_weights(self, module: nn.Module) -> None:
        """hopformer's initialisation (``config.init``: ``normal``, ``torch`` or ``lra``) of whatever ``module``
        holds that was not loaded: ``transformers`` builds the model on the meta device and calls this for the
        tensors a checkpoint does not provide, and for a new model on all of them."""
        from hopformer.attention.routing import RoutingAttention
        from hopformer.attention.sparse import DiffuserAttention
        from hopformer.ops.routing_attention import normalise

        scheme = self.config.init
        if isinstance(module, nn.Linear):
            if scheme == "torch":  # nn.Linear.reset_parameters
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                if module.bias is not None:
                    bound = 1 / math.sqrt(module.weight.shape[1]) if module.weight.shape[1] > 0 else 0
                    init.uniform_(module.bias, -bound, bound)
                return
            if scheme == "lra":
                init.xavier_uniform_(module.weight)
            else:
                init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0 if scheme == "lra" else 0.02)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # IntensityEmbedding's stem: He init (see there)
            init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, TransformerEncoder):
            config = module.config
            if config.positions == "learned":
                init.normal_(module.positions, std=0.02)
            elif config.positions == "sinusoidal":  # a buffer not saved: rebuilt
                init.copy_(module.positions, sinusoidal_positions(config.max_len, config.dim))
        elif isinstance(module, DiffuserAttention):
            start = torch.tensor(module.fixed_coefficients)
            if module.hop_logits is not None:
                init.copy_(module.hop_logits, start.clamp_min(1e-6).log().repeat(module.heads, 1))
            if module.hop_weights is not None:
                init.copy_(module.hop_weights, start.repeat(module.heads, 1))
        elif isinstance(module, RoutingAttention):
            init.copy_(module.centroids, normalise(torch.randn(module.centroids.shape), module.qk_norm))
            init.zeros_(module.ema_counts)
            init.zeros_(module.ema_sums)
            init.zeros_(module.initialised)
        if module is self and isinstance(getattr(module, "cls", None), nn.Parameter):  # the classifier's CLS vector
            init.normal_(module.cls, std=0.02)

    # --------------------------------------------------------------------------------- embeddings
    def _encoder(self) -> TransformerEncoder:
        return self.encoder

    def get_input_embeddings(self) -> nn.Module:
        return self._encoder().embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._encoder().embed = value

    # --------------------------------------------------------------------------------- conversion
    def to_hopformer(self) -> PretrainedModel:
        """A hopformer model (its own class: ``TransformerEncoder``, ``SequenceClassifier``...) with a copy of
        these weights: for hopformer's trainer, ``generate`` or analysis tools."""
        cls = MODEL_TYPES[self.hopformer_class]
        model = cls.from_config(self.config.hopformer_config(self.hopformer_class))
        state = self.state_dict()
        if self.hopformer_class == "transformer_encoder":
            state = {name.removeprefix("encoder."): tensor for name, tensor in state.items()}
        load_weights_into(model, state)
        return model.to(self.device)

    @classmethod
    def from_hopformer(cls, model: PretrainedModel, **config_changes: Any) -> HopformerPreTrainedModel:
        """The ``transformers`` model of a hopformer model, with a copy of its weights. ``config_changes`` set
        ``transformers``-side settings (``id2label``, ``bos_token_id``...)."""
        target = _HF_CLASSES.get(model.model_type)
        if target is None:
            raise TypeError(
                f"a {type(model).__name__} has no transformers class (hopformer.hf has {sorted(_HF_CLASSES)})"
            )
        if cls is not HopformerPreTrainedModel and not issubclass(target, cls):
            raise TypeError(f"a {type(model).__name__} converts to {target.__name__}, not {cls.__name__}")
        config = HopformerConfig.from_hopformer(model.model_type, model.config, **config_changes)
        converted = target(config)
        state = model.state_dict()
        if model.model_type == "transformer_encoder":
            state = {f"encoder.{name}": tensor for name, tensor in state.items()}
        load_weights_into(converted, state)
        return converted.to(next(model.parameters()).device)


def _check_inputs(input_ids: torch.Tensor | None, inputs_embeds: Any, token_type_ids: Any, position_ids: Any) -> None:
    if inputs_embeds is not None:
        raise ValueError("hopformer models read input_ids (token ids), not inputs_embeds")
    if input_ids is None:
        raise ValueError("input_ids is required")
    if position_ids is not None:
        raise ValueError("hopformer models place tokens by their index; position_ids is not supported")
    # Converted BERT/RoBERTa models carry the embedding of token type 0 inside their positions (conversion folds
    # it in); other token types have no embedding here. (Not checked while torch.export traces: a data guard.)
    if token_type_ids is not None and not exporting() and bool((token_type_ids != 0).any()):
        raise ValueError(
            "token_type_ids other than 0 are not supported: a converted model keeps the embedding of token type 0 "
            "only (folded into its position embeddings)"
        )


class HopformerModel(HopformerPreTrainedModel):
    """The encoder: ``forward(input_ids, attention_mask=None) -> BaseModelOutput(last_hidden_state)``,
    ``last_hidden_state`` of shape ``(batch, seq, dim)``."""

    hopformer_class = "transformer_encoder"

    def __init__(self, config: HopformerConfig) -> None:
        super().__init__(config)
        self.encoder = TransformerEncoder(config.encoder_config())
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput | tuple:
        _check_inputs(input_ids, inputs_embeds, token_type_ids, position_ids)
        hidden = self.encoder(input_ids, attention_mask)
        if return_dict is False:
            return (hidden,)
        return BaseModelOutput(last_hidden_state=hidden)


class HopformerForSequenceClassification(HopformerPreTrainedModel):
    """Encoder, pooling (``config.pooling``) and a two-layer head: ``logits (batch, num_labels)``; with ``labels``
    the loss by ``config.problem_type`` (``single_label_classification`` for integer labels and
    ``num_labels > 1``, ``regression`` for one label, ``multi_label_classification`` for float label vectors)."""

    hopformer_class = "sequence_classifier"

    def __init__(self, config: HopformerConfig) -> None:
        super().__init__(config)
        core = SequenceClassifier.from_config(config.hopformer_config(self.hopformer_class))
        self.encoder, self.head, self.cls, self.pooling = core.encoder, core.head, core.cls, core.pooling
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput | tuple:
        _check_inputs(input_ids, inputs_embeds, token_type_ids, position_ids)
        prefix = None if self.cls is None else self.cls.expand(input_ids.shape[0], 1, -1)
        hidden = self.encoder(input_ids, attention_mask, prefix=prefix)
        logits = self.head(pool(hidden, attention_mask, self.pooling))
        loss = None if labels is None else _with_aux(self, self._loss(logits, labels))
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kind = self.config.problem_type
        if kind is None:
            if self.config.num_labels == 1:
                kind = "regression"
            elif labels.dtype in (torch.long, torch.int):
                kind = "single_label_classification"
            else:
                kind = "multi_label_classification"
        if kind == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
        if kind == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return F.cross_entropy(logits.float().view(-1, self.config.num_labels), labels.view(-1))


class HopformerForMaskedLM(HopformerPreTrainedModel):
    """Encoder and a token head: ``logits (batch, seq, vocab)``; with ``labels`` (``-100`` = not scored) the
    cross-entropy of the scored positions."""

    hopformer_class = "masked_token_model"

    def __init__(self, config: HopformerConfig) -> None:
        super().__init__(config)
        core = MaskedTokenModel.from_config(config.hopformer_config(self.hopformer_class))
        self.encoder, self.head = core.encoder, core.head
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.head if isinstance(self.head, nn.Linear) else self.head[-1]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput | tuple:
        _check_inputs(input_ids, inputs_embeds, token_type_ids, position_ids)
        logits = self.head(self.encoder(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            loss = _with_aux(self, loss)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return MaskedLMOutput(loss=loss, logits=logits)


@dataclass
class HopformerDecodingCache:
    """hopformer's decoding caches carried through ``transformers``' ``generate`` (as state-space models carry
    theirs): one per layer, filled by the prompt pass (:mod:`hopformer.attention.decoding`), the decoding step
    (replayed from a CUDA graph where it can be) and each sequence's next position."""

    caches: list[Any]
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    positions: torch.Tensor
    max_len: int

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens each sequence has seen."""
        return int(self.positions.max())

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row ``b`` continues sequence ``beam_idx[b]``."""
        reorder_caches(self.caches, beam_idx)
        self.positions.copy_(self.positions.index_select(0, beam_idx.to(self.positions.device)))


class HopformerForCausalLM(HopformerPreTrainedModel, GenerationMixin):
    """A causal LM (every attention built with ``causal=True``): ``logits (batch, seq, vocab)``, those at position
    ``t`` predicting token ``t + 1``; with ``labels`` (usually ``input_ids``; ``-100`` = not scored) the
    next-token cross-entropy, shifted inside as ``transformers`` does.

    ``generate()`` decodes with hopformer's caches: with ``use_cache=True`` (``generate``'s default) the prompt
    pass fills a :class:`HopformerDecodingCache`, returned as the output's ``cache``, and every later call takes
    only the new tokens against it, each step the cost of its own row. Prompts with padding (an attention mask
    with zeros) recompute the prefix at every step instead; :meth:`hopformer.models.CausalLM.generate` decodes
    prompts of different lengths with caches."""

    hopformer_class = "causal_lm"
    _tied_weights_keys = {"head.weight": "encoder.embed.weight"}

    def __init__(self, config: HopformerConfig) -> None:
        config.causal = True  # the encoder of a causal LM is causal, whatever the config said
        super().__init__(config)
        core = CausalLM(config.hopformer_config(self.hopformer_class))
        self.encoder, self.head = core.encoder, core.head
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.head and not self.config.tie_word_embeddings:  # as hopformer's CausalLM
            init.normal_(module.weight, std=0.02)
            return
        super()._init_weights(module)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # not a transformers Cache: the model makes its own (HopformerDecodingCache) in forward

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: HopformerDecodingCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The prompt (and ``use_cache``) first; then, against the cache the prompt pass returned, only the newest
        token of each sequence. Without a cache, the whole sequence at every step."""
        if cache is not None:
            return {"input_ids": input_ids[:, -1:], "cache": cache}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        cache: HopformerDecodingCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (and the loss with ``labels``). ``use_cache=True`` on unpadded inputs also returns a
        :class:`HopformerDecodingCache` (``cache``); given one, ``input_ids`` is each sequence's one new token."""
        _check_inputs(input_ids, inputs_embeds, token_type_ids, position_ids)
        if cache is not None:
            logits, state = self._decode_step(input_ids, cache), cache
        else:
            state = None
            unpadded = attention_mask is None or bool(attention_mask.all())
            if use_cache and labels is None and unpadded and not self.training:
                state = self._new_cache(input_ids)
            caches = None if state is None else state.caches
            logits = self.head(self.encoder(input_ids, attention_mask, caches=caches))
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().flatten(0, 1)
            loss = _with_aux(self, F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=-100))
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=state)

    def _new_cache(self, input_ids: torch.Tensor) -> HopformerDecodingCache:
        """Empty caches for the whole ``max_len``, which the prompt pass fills."""
        batch, length = input_ids.shape
        caches = self.encoder.new_caches(batch, self.config.max_len, input_ids.device, self.head.weight.dtype)
        step = decoding_step(self.encoder, self.head, caches)
        positions = torch.full((batch,), length, dtype=torch.long, device=input_ids.device)
        return HopformerDecodingCache(caches, step, positions, self.config.max_len)

    def _decode_step(self, input_ids: torch.Tensor, cache: HopformerDecodingCache) -> torch.Tensor:
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape != (cache.positions.shape[0], 1):
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(
                f"with a decoding cache, input_ids must be each sequence's one new token, shape "
                f"({cache.positions.shape[0]}, 1); got {shape}"
            )
        if cache.get_seq_length() >= cache.max_len:
            raise ValueError(f"generation reached the model's max_len={cache.max_len} tokens; generate fewer")
        logits = cache.step(input_ids[:, 0], cache.positions).clone()  # a CUDA graph's output is reused
        cache.positions += 1
        return logits[:, None]


def _with_aux(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    extra = aux_loss(model)
    return loss if extra is None else loss + extra


_HF_CLASSES: dict[str, type[HopformerPreTrainedModel]] = {
    cls.hopformer_class: cls
    for cls in (HopformerModel, HopformerForSequenceClassification, HopformerForMaskedLM, HopformerForCausalLM)
}
"""hopformer's model_type -> its ``transformers`` class."""

__all__ = [
    "HopformerForCausalLM",
    "HopformerForMaskedLM",
    "HopformerForSequenceClassification",
    "HopformerModel",
    "HopformerPreTrainedModel",
]
