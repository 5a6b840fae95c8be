"""Models: a transformer encoder on any registered attention, heads on it, and a causal language model.

Each model has a dataclass ``config`` and HF-like ``save_pretrained(dir)`` / ``from_pretrained(dir)``
(``config.json`` + ``model.safetensors``, the folder format of Hugging Face ``transformers``:
:mod:`hopformer.models.hf_format`); :func:`from_pretrained` loads any of them. :mod:`hopformer.models.export`
exports them with ``torch.export`` and to ONNX.
"""

from hopformer.models.causal_lm import CausalLM, CausalLMConfig
from hopformer.models.encoder import EncoderConfig, IntensityEmbedding, TransformerEncoder
from hopformer.models.heads import (
    DualEncoderClassifier,
    DualEncoderClassifierConfig,
    MaskedTokenModel,
    MaskedTokenModelConfig,
    SequenceClassifier,
    SequenceClassifierConfig,
    aux_loss,
    count_parameters,
    pool,
)
from hopformer.models.pretrained import PretrainedModel, from_pretrained

__all__ = [
    "CausalLM",
    "CausalLMConfig",
    "DualEncoderClassifier",
    "DualEncoderClassifierConfig",
    "EncoderConfig",
    "IntensityEmbedding",
    "MaskedTokenModel",
    "MaskedTokenModelConfig",
    "PretrainedModel",
    "SequenceClassifier",
    "SequenceClassifierConfig",
    "TransformerEncoder",
    "aux_loss",
    "count_parameters",
    "from_pretrained",
    "pool",
]
