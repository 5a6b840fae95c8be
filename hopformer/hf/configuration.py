"""``HopformerConfig``: the ``transformers`` config of every hopformer model.

Its fields are :class:`~hopformer.models.EncoderConfig`'s, flat and under the same names, and the heads' beside
them; ``transformers``' usual names read and write them too (``hidden_size`` is ``dim``, ``num_hidden_layers``
``depth``, ``num_attention_heads`` ``heads``, ``intermediate_size`` ``mlp_dim``, ``max_position_embeddings``
``max_len``, ``pad_token_id`` ``pad_id``). The defaults are those of :mod:`hopformer.models.hf_format`, which
hopformer's own loader uses for the settings a saved ``config.json`` leaves out.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from hopformer.models import hf_format
from hopformer.models.encoder import EncoderConfig

_E = hf_format.ENCODER_DEFAULTS
_H = hf_format.HEAD_DEFAULTS


class HopformerConfig(PreTrainedConfig):
    """A hopformer model in ``transformers``: the encoder on any registered attention, and its head.

    Encoder (see :class:`~hopformer.models.EncoderConfig`): ``vocab_size``, ``dim``, ``depth``, ``heads``,
    ``mlp_dim``, ``max_len``, ``attention`` (any name of ``hopformer.attention.available()``),
    ``attention_options``, ``norm``, ``positions``, ``dropout``, ``attention_dropout``, ``pad_id``,
    ``pad_to_multiple``, ``layer_norm_eps``, ``gradient_checkpointing``, ``init``, ``embedding``,
    ``stem_depth``, ``causal``, ``image_shape`` (``(height, width, channels)`` with ``positions="image"``).

    Heads: ``pooling`` (``"mean"``, ``"cls"`` or ``"first"``), ``head_dim``, ``head_activation`` and
    ``num_labels`` / ``id2label`` (sequence classification); ``mlm_transform`` and ``masked_vocab_size``
    (masked LM); ``tie_word_embeddings`` (causal LM); ``hopformer_class``: the hopformer model a folder holds.

    Example::

        config = HopformerConfig(vocab_size=1000, dim=128, depth=4, heads=4, mlp_dim=256, max_len=4096,
                                 attention="diffuser", attention_options={"hops": 3, "block_size": 64})
        model = HopformerForSequenceClassification(config)
    """

    model_type = hf_format.HF_MODEL_TYPE
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "depth",
        "num_attention_heads": "heads",
        "intermediate_size": "mlp_dim",
        "max_position_embeddings": "max_len",
        "pad_token_id": "pad_id",
    }

    vocab_size: int = _E["vocab_size"]
    dim: int = _E["dim"]
    depth: int = _E["depth"]
    heads: int = _E["heads"]
    mlp_dim: int = _E["mlp_dim"]
    max_len: int = _E["max_len"]
    attention: str = _E["attention"]
    attention_options: dict | None = None
    norm: str = _E["norm"]
    positions: str = _E["positions"]
    dropout: float | int = _E["dropout"]
    attention_dropout: float | int = _E["attention_dropout"]
    pad_id: int | None = _E["pad_id"]
    pad_to_multiple: int = _E["pad_to_multiple"]
    layer_norm_eps: float = _E["layer_norm_eps"]
    gradient_checkpointing: bool = _E["gradient_checkpointing"]
    init: str = _E["init"]
    embedding: str = _E["embedding"]
    stem_depth: int = _E["stem_depth"]
    causal: bool = _E["causal"]
    image_shape: list[int] | None = None
    pooling: str = _H["pooling"]
    head_dim: int | None = _H["head_dim"]
    head_activation: str = _H["head_activation"]
    mlm_transform: bool = _H["mlm_transform"]
    masked_vocab_size: int | None = _H["masked_vocab_size"]
    tie_word_embeddings: bool = _H["tie_word_embeddings"]
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    hopformer_class: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.attention_options is None:
            self.attention_options = {}
        super().__post_init__(**kwargs)

    def encoder_config(self) -> EncoderConfig:
        """The hopformer :class:`~hopformer.models.EncoderConfig` of these settings."""
        return hf_format.encoder_config({name: getattr(self, name) for name in hf_format.ENCODER_DEFAULTS})

    def hopformer_config(self, model_type: str) -> Any:
        """The hopformer dataclass config of the model ``model_type`` (``"transformer_encoder"``,
        ``"sequence_classifier"``, ``"masked_token_model"``, ``"causal_lm"``) with these settings."""
        values = self.to_dict()
        values.update({name: getattr(self, name) for name in hf_format.ENCODER_DEFAULTS})
        values.update({name: getattr(self, name) for name in hf_format.HEAD_DEFAULTS})
        values["hopformer_class"], values["id2label"] = model_type, self.id2label
        return hf_format.from_hf_config(values)[1]

    @classmethod
    def from_hopformer(cls, model_type: str, config: Any, **kwargs: Any) -> HopformerConfig:
        """The config of a hopformer model (its ``model_type`` and dataclass config); ``kwargs`` add to it."""
        values = hf_format.to_hf_config(model_type, config)
        values.pop("model_type")
        values["attention_options"] = dict(values["attention_options"])
        return cls(**{**values, **kwargs})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        # a folder saved by hopformer 0.1 (model_type the hopformer class, settings nested) reads too
        if config_dict.get("model_type") != cls.model_type and "encoder" in config_dict:
            from hopformer.models.pretrained import MODEL_TYPES, config_from_dict

            values = dict(config_dict)
            model_type = values.pop("model_type", None)
            if model_type in MODEL_TYPES:
                config = config_from_dict(MODEL_TYPES[model_type].config_class, values)
                config_dict = hf_format.to_hf_config(model_type, config)
        return super().from_dict(config_dict, **kwargs)


__all__ = ["HopformerConfig"]
