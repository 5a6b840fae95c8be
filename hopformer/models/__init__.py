"""Models: a transformer encoder on any registered attention, and classification heads.

Each model has a dataclass ``config`` and HF-like ``save_pretrained(dir)`` / ``from_pretrained(dir)``
(``config.json`` + ``model.safetensors``).
"""

from hopformer.models.transformer import (
    DualEncoderClassifier,
    DualEncoderClassifierConfig,
    EncoderConfig,
    IntensityEmbedding,
    MaskedTokenModel,
    MaskedTokenModelConfig,
    PretrainedModel,
    SequenceClassifier,
    SequenceClassifierConfig,
    TransformerEncoder,
    aux_loss,
    count_parameters,
    from_pretrained,
    pool,
)

__all__ = [
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
