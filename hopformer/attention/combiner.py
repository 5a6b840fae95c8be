"""Combiner attention module (``build("combiner", dim, heads, variant=..., causal=...)``)."""

from __future__ import annotations

from typing import Any

import torch

from hopformer.attention.base import AttentionModule
from hopformer.attention.decoding import CombinerCache, scatter_positions
from hopformer.attention.registry import register
from hopformer.checks import check_int
from hopformer.ops import dispatch
from hopformer.ops.combiner_attention import VARIANTS, combiner, resolve_block_size


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
            than an input's length raises ``ValueError`` in ``forward`` (unless causal). A causal module
            keeps one size for every length, ``None`` meaning ``ceil(sqrt(max_seq_len))`` (``logsparse``: 2),
            so a position's output never depends on how long the sequence is.
        causal: every query sees only positions up to itself.
        max_seq_len: sets the causal default block size.
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
        max_seq_len: int = 4096,
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
        if causal and block_size is None:  # one size for every length: a causal past must not depend on it
            self.block_size = resolve_block_size(variant, None, check_int("max_seq_len", max_seq_len, 1))
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

    # Decoding (causal only; hopformer.attention.decoding)

    def new_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> CombinerCache:
        self._check_decoding()
        return CombinerCache.new(
            self.variant, self.block_size, batch, self.heads, self.head_dim, max_len, device, dtype
        )

    def prefill(self, q, k, v, key_padding_mask, cache: CombinerCache, lengths: torch.Tensor) -> torch.Tensor:
        out = self.attend(q, k, v, key_padding_mask)
        if cache.fixed:
            cache.fill_fixed(q, k, v, lengths, self.head_dim**-0.5)
        else:
            for buffer, x in ((cache.q, q), (cache.k, k), (cache.v, v)):
                buffer[:, :, : x.shape[2]] = x
        return out

    def attend_step(self, q, k, v, cache: CombinerCache, positions: torch.Tensor) -> torch.Tensor:
        if cache.fixed:
            return cache.step_fixed(q, k, v, positions, self.head_dim**-0.5)
        # other variants: the new row recomputed exactly from every past query, key and value
        for buffer, x in ((cache.q, q), (cache.k, k), (cache.v, v)):
            scatter_positions(buffer, positions, x)
        rows = []
        for b, position in enumerate(positions.tolist()):
            prefix = (x[b : b + 1, :, : position + 1] for x in (cache.q, cache.k, cache.v))
            out = combiner(*prefix, self.variant, self.block_size, True)
            rows.append(out[:, :, position : position + 1])
        return torch.cat(rows, 0)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, variant={self.variant!r}, block_size={self.block_size}, "
            f"causal={self.causal}, backend={self.backend!r}"
        )
