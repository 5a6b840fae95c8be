"""hopformer in Hugging Face ``transformers`` (the optional extra ``hf``: ``pip install "hopformer[hf]"``).

Importing this module registers :class:`HopformerConfig` (``model_type="hopformer"``) and the model classes with
the ``transformers`` Auto classes, so ``AutoConfig``, ``AutoModel``, ``AutoModelForSequenceClassification``,
``AutoModelForMaskedLM`` and ``AutoModelForCausalLM`` load hopformer folders, whichever library saved them, on any
hopformer attention named in the config::

    import hopformer.hf  # registers the classes
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained("runs/listops-diffuser-.../best")

- :class:`HopformerConfig`, :class:`HopformerModel`, :class:`HopformerForSequenceClassification`,
  :class:`HopformerForMaskedLM`, :class:`HopformerForCausalLM` (:mod:`hopformer.hf.modeling`);
- :func:`convert_roberta` and :func:`convert_bert`: a pretrained RoBERTa or BERT as a long-sequence hopformer
  model on any attention (:mod:`hopformer.hf.convert`).
"""

from __future__ import annotations

from hopformer.hf.configuration import HopformerConfig
from hopformer.hf.convert import convert_bert, convert_roberta
from hopformer.hf.modeling import (
    HopformerForCausalLM,
    HopformerForMaskedLM,
    HopformerForSequenceClassification,
    HopformerModel,
    HopformerPreTrainedModel,
)


def register() -> None:
    """Register hopformer with the ``transformers`` Auto classes (done on import; safe to repeat)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    AutoConfig.register(HopformerConfig.model_type, HopformerConfig, exist_ok=True)
    for auto, model in (
        (AutoModel, HopformerModel),
        (AutoModelForSequenceClassification, HopformerForSequenceClassification),
        (AutoModelForMaskedLM, HopformerForMaskedLM),
        (AutoModelForCausalLM, HopformerForCausalLM),
    ):
        auto.register(HopformerConfig, model, exist_ok=True)


register()

__all__ = [
    "HopformerConfig",
    "HopformerForCausalLM",
    "HopformerForMaskedLM",
    "HopformerForSequenceClassification",
    "HopformerModel",
    "HopformerPreTrainedModel",
    "convert_bert",
    "convert_roberta",
    "register",
]
