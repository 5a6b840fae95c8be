"""Combiner attention module (``build("combiner", dim, heads, variant=..., causal=...)``)."""

from __future__ import annotations

from typing import Any

import torch

from hopformer.attention.base import AttentionModule
from hopformer.attention.registry import register
from hopformer.checks import check_int
from hopformer.ops import dispatch
from hopformer.ops.combiner_attention import VARIANTS, combiner


@register("combiner")
class CombinerAttention(AttentionModule):
    """Full-support attention factorised into direct keys plus region summaries.

    See :mod:`hopformer.ops.combiner_attention` for the variants and their partitions.

    Args:
        dim, heads, dropout, bias: as :class:`~hopformer.attention.base.AttentionModule`.
        variant: ``"fixed"``, ``"logsparse"``, ``"axial"`` (= ``"axial_vertical"``),
            ``"axial_horizontal"`` or ``"mixture"`` (average of the vertical and horizontal plans).
        block_size: block size (``fixed``, ``logsparse``) or row length (axial forms, ``mixture``);
            ``None`` picks ``ceil(sqrt(seq))`` per input (``logsparse``: 2); a fixed value larger
            than an input's length raises ``ValueError`` in ``forward``.
        causal: every query sees only positions up to itself.
        backend: ``"auto"``, ``"eager"`` or ``"flex"`` (see :func:`hopformer.ops.combiner`); :meth:`explain`
            says which runs and why.
    """

    op = "combiner"

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        variant: str = "fixed",
        block_size: int | None = None,
        causal: bool = False,
        backend: str = "auto",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__(dim, heads, dropout=dropout, bias=bias)
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not known; choose one of {list(VARIANTS)}")
        dispatch.check_backend_name("combiner", backend)
        if block_size is not None:
            check_int("block_size", block_size, 1, allowed="a positive integer or None")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        self.variant, self.block_size, self.causal, self.backend = variant, block_size, causal, backend
        self._check_backend()

    def _request_facts(self) -> dict[str, Any]:
        return {"variant": self.variant}

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        return combiner(
            q, k, v, self.variant, self.block_size, self.causal, key_padding_mask,
            dropout_p=dropout, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, variant={self.variant!r}, block_size={self.block_size}, "
            f"causal={self.causal}, backend={self.backend!r}"
        )
