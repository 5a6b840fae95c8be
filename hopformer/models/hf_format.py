"""The folder format hopformer shares with Hugging Face ``transformers``: one ``config.json`` and one
``model.safetensors``, read and written by both :func:`hopformer.models.from_pretrained` and
``transformers.AutoModel*.from_pretrained`` (with :mod:`hopformer.hf` imported).

``config.json`` is a ``transformers`` config of ``model_type: "hopformer"``: the encoder's settings flat, under
:class:`~hopformer.models.EncoderConfig`'s own names (``dim``, ``depth``, ``heads``, ``attention``,
``attention_options``...), the head's settings beside them, ``architectures`` naming the ``transformers`` class
and ``hopformer_class`` the hopformer one. The weights keep hopformer's parameter names, which the ``transformers``
classes share (``encoder.blocks.0.attention.qkv.weight``...), so no tensor is renamed either way; only a bare
encoder's weights sit under ``encoder.`` in the folder, as in ``HopformerModel``. Tied weights (a causal LM's
output layer) are stored once.

This module is pure Python: hopformer writes and reads the format without ``transformers`` installed. Folders
written before this format (``model_type`` the hopformer class, the config nested) are still read.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from hopformer.models.encoder import EncoderConfig

HF_MODEL_TYPE = "hopformer"
"""``model_type`` of the ``transformers`` config (``AutoConfig`` finds :class:`hopformer.hf.HopformerConfig` by it)."""
ARCHITECTURES = {
    "transformer_encoder": "HopformerModel",
    "sequence_classifier": "HopformerForSequenceClassification",
    "masked_token_model": "HopformerForMaskedLM",
    "causal_lm": "HopformerForCausalLM",
}
"""hopformer's ``model_type`` -> the ``transformers`` class that holds the same weights."""
ENCODER_PREFIX = "encoder."
"""Where a bare encoder's weights sit in a folder (``HopformerModel`` holds the encoder as ``encoder``)."""

ENCODER_DEFAULTS: dict[str, Any] = {
    f.name: {} if f.name == "attention_options" else f.default for f in fields(EncoderConfig) if f.name != "vocab_size"
}
ENCODER_DEFAULTS = {"vocab_size": 256, **ENCODER_DEFAULTS}  # EncoderConfig has none; 256: bytes
HEAD_DEFAULTS: dict[str, Any] = {
    "pooling": "mean",
    "head_dim": None,
    "head_activation": "gelu",
    "mlm_transform": False,
    "masked_vocab_size": None,
    "tie_word_embeddings": True,
}
"""The settings a ``config.json`` may leave out (``transformers`` writes only those that differ from the defaults
of :class:`hopformer.hf.HopformerConfig`, which are these)."""


def is_hf_config(values: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is in this format (not the earlier hopformer one)."""
    return values.get("model_type") == HF_MODEL_TYPE


def to_hf_config(model_type: str, config: Any) -> dict[str, Any]:
    """The ``config.json`` of a hopformer model: its ``model_type`` and dataclass config, flattened."""
    encoder = config if model_type == "transformer_encoder" else config.encoder
    values: dict[str, Any] = {"model_type": HF_MODEL_TYPE}
    if model_type in ARCHITECTURES:
        values["architectures"] = [ARCHITECTURES[model_type]]
    values["hopformer_class"] = model_type
    values.update(asdict(encoder))
    if model_type in ("sequence_classifier", "dual_encoder_classifier"):
        values["pooling"], values["head_dim"] = config.pooling, config.head_dim
        values["head_activation"] = getattr(config, "head_activation", "gelu")
        values["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_classes)}
        values["label2id"] = {f"LABEL_{i}": i for i in range(config.num_classes)}
    elif model_type == "masked_token_model":
        values["mlm_transform"] = config.transform
        if config.vocab_size != encoder.vocab_size:
            values["masked_vocab_size"] = config.vocab_size
    elif model_type == "causal_lm":
        values["tie_word_embeddings"] = config.tie_embeddings
    return values


def hopformer_class(values: dict[str, Any]) -> str:
    """The hopformer ``model_type`` a ``config.json`` of this format describes."""
    if values.get("hopformer_class"):
        return values["hopformer_class"]
    by_architecture = {name: model_type for model_type, name in ARCHITECTURES.items()}
    for name in values.get("architectures") or []:
        if name in by_architecture:
            return by_architecture[name]
    return "transformer_encoder"


def encoder_config(values: dict[str, Any]) -> EncoderConfig:
    """The :class:`EncoderConfig` in a flat ``config.json`` (or ``transformers`` config dict)."""
    settings = {name: values.get(name, default) for name, default in ENCODER_DEFAULTS.items()}
    settings["attention_options"] = dict(settings["attention_options"] or {})
    return EncoderConfig(**settings)


def num_labels(values: dict[str, Any]) -> int:
    """The number of classes in a ``transformers`` config dict (``id2label``, else ``num_labels``, else 2)."""
    if values.get("id2label"):
        return len(values["id2label"])
    return int(values.get("num_labels") or 2)


def from_hf_config(values: dict[str, Any]) -> tuple[str, Any]:
    """hopformer's ``(model_type, dataclass config)`` of a ``config.json`` in this format."""
    from hopformer.models.causal_lm import CausalLMConfig
    from hopformer.models.heads import DualEncoderClassifierConfig, MaskedTokenModelConfig, SequenceClassifierConfig

    model_type = hopformer_class(values)
    head = {name: values.get(name, default) for name, default in HEAD_DEFAULTS.items()}
    encoder = encoder_config(values)
    if model_type == "transformer_encoder":
        return model_type, encoder
    if model_type == "sequence_classifier":
        config = SequenceClassifierConfig(
            encoder, num_labels(values), head["pooling"], head["head_dim"], head["head_activation"]
        )
    elif model_type == "dual_encoder_classifier":
        config = DualEncoderClassifierConfig(encoder, num_labels(values), head["pooling"], head["head_dim"])
    elif model_type == "masked_token_model":
        vocab = head["masked_vocab_size"] or encoder.vocab_size
        config = MaskedTokenModelConfig(encoder, vocab, bool(head["mlm_transform"]))
    elif model_type == "causal_lm":
        config = CausalLMConfig(encoder, tie_embeddings=bool(head["tie_word_embeddings"]))
    else:
        raise ValueError(f"hopformer_class={model_type!r} is not known; known: {sorted(ARCHITECTURES)}")
    return model_type, config


def weights_to_folder(model_type: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """A model's state dict under the names the folder uses (a bare encoder's under ``encoder.``)."""
    if model_type != "transformer_encoder":
        return tensors
    return {ENCODER_PREFIX + name: tensor for name, tensor in tensors.items()}


def weights_from_folder(model_type: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """The folder's tensors under the model's names (a bare encoder's without ``encoder.``; a folder written
    before this format has no prefix, and one written from a head has the head's tensors, which are left out)."""
    if model_type != "transformer_encoder" or not any(name.startswith(ENCODER_PREFIX) for name in tensors):
        return tensors
    return {name.removeprefix(ENCODER_PREFIX): t for name, t in tensors.items() if name.startswith(ENCODER_PREFIX)}
