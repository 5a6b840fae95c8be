"""A causal language model: a causal :class:`~hopformer.models.TransformerEncoder` (every attention built with
``causal=True``) and a linear head over the vocabulary, its weights tied to the token embedding or not.

``forward(input_ids, attention_mask=None) -> logits (batch, seq, vocab)``: the logits at position ``t``
predict token ``t + 1`` from tokens ``0..t``. Bytes are tokens ``0..255`` (``vocab_size=256``, no padding
id: byte 0 is real text), so a byte LM needs no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from hopformer.models.encoder import EncoderConfig, TransformerEncoder
from hopformer.models.pretrained import PretrainedModel


@dataclass
class CausalLMConfig:
    """Hyperparameters of :class:`CausalLM`: its encoder (made causal) and whether the output layer shares
    the token embedding's weights (``tie_embeddings``, as GPT-2 does)."""

    encoder: EncoderConfig
    tie_embeddings: bool = True


class CausalLM(PretrainedModel):
    """Next-token prediction on any registered attention (see the module docstring)."""

    config_class = CausalLMConfig
    model_type = "causal_lm"

    def __init__(self, config: CausalLMConfig) -> None:
        super().__init__()
        if not isinstance(config, CausalLMConfig):
            raise TypeError(f"CausalLM takes a CausalLMConfig, got {type(config).__name__}")
        if config.encoder.embedding != "table":
            raise ValueError(
                f"a causal LM reads tokens through an embedding table; embedding={config.encoder.embedding!r} "
                "reads pixel intensities, which a next-token head cannot tie to"
            )
        config = replace(config, encoder=replace(config.encoder, causal=True))
        self.config = config
        self.encoder = TransformerEncoder(config.encoder)
        self.head = nn.Linear(config.encoder.dim, config.encoder.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.encoder.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)

    @classmethod
    def from_config(cls, config: CausalLMConfig) -> CausalLM:
        return cls(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))
