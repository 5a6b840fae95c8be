"""Combiner as FlexAttention calls (the ``flex`` backend of :func:`hopformer.ops.combiner`, CUDA).

**Fixed.** The keys are ``[tokens ; one summary per block]``: a query attends to the tokens of its own block
(causal: up to itself) and to the summaries of the other (causal: earlier) blocks, under one softmax: exactly
the eager ``fixed`` variant, without its per-block copies of the summaries, its mask tensor or any score tensor.
The summaries and their gradients are :class:`_FixedSummaryAttention`'s, whose hand-written backward adds them
in place: less memory than eager at up to twice the time, which is what long sequences run out of.

**Axial** (vertical, horizontal) **and mixture.** A query ``(r, c)`` of the grid reads its row, its column and
one summary per region. Its row and column are far apart in any one token order, so no one tile layout makes both
sparse. Each key set gets its own call over contiguous groups, and the calls are merged by their log-sum-exps into
the eager variant's one softmax:

- the *row call* (row-major queries): the row's tokens, causal: up to ``c``;
- the *column call* (column-major copies of q, k, v): the column's tokens above the query (bidirectional: the
  other rows);
- the *summary call*: the vertical form's column summaries ``(r, e)``, ``e != c``, read by row (row-major), or the
  horizontal form's row summaries ``(t, c)`` of the same rows as the column call, read by column (column-major).

Each call reads its keys where they lie (no concatenated copies) and touches a few tiles per query tile, so the cost
is ``O(L sqrt(L))`` with no score tensor; mixture shares the row and column calls between its two forms. The
summaries' keys and queries are the eager variant's exclusive max-pools; their values are one more call each (a
column call for the vertical form, a row call for the horizontal one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from hopformer.graphs.tracing import trace_constant
from hopformer.ops import flex
from hopformer.ops.backend import Support
from hopformer.ops.combiner_attention import AXIAL_FORMS, _masked_max, axial_region_pools
from hopformer.ops.common import masked_softmax, pad_seq

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, keys, values) -> out
# Query tiles (of 128 tokens) per copy of the block summaries.
SUMMARY_GROUP = 16


class FlexCombiner:
    """``flex``: Combiner-Fixed as one FlexAttention call over ``[tokens ; block summaries]``, the axial forms
    and mixture as row, column and summary calls merged by log-sum-exp (CUDA)."""

    name = "flex"
    summary = "FlexAttention calls over tokens and summaries, no score tensor: less memory"
    support = Support(
        ops=("combiner",),
        devices=("cuda",),
        exportable=False,
        attention_dropout=False,
        min_head_dim=flex.MIN_HEAD_DIM,
        same_value_dim=True,
        variants=("fixed", *AXIAL_FORMS),
    )

    def combine(self, q, k, v, variant, block_size, causal, real, scale, dropout_p):
        if variant == "fixed":
            return _fixed_flex(q, k, v, block_size, causal, real, scale)
        return _axial_flex(q, k, v, block_size, causal, real, scale, AXIAL_FORMS[variant])


FLEX = FlexCombiner()


def _fixed_flex(q, k, v, block, causal, real, scale, *, dense: bool = False):
    """Combiner-Fixed as one FlexAttention call: the keys are ``[tokens ; one summary per block]``.

    A query attends to the tokens of its own block (causal: up to itself) and to the summaries of the
    other (causal: earlier) blocks, one softmax over both: exactly ``_fixed``, without its per-block
    copies of the summaries, its ``(blocks, block, block + blocks)`` mask or any score tensor. The
    summaries and their gradients are :class:`_FixedSummaryAttention`'s. ``real=None``: no padding
    anywhere. ``dense``: run the same masked attention densely instead (eager, any device; tests).
    """
    batch, _, seq, _ = q.shape
    blocks = seq // block
    tile = flex.TILE
    tokens = -(-seq // tile) * tile  # the summaries start on a tile boundary
    summaries = -(-blocks // tile) * tile  # one copy of the summaries, padded to whole tiles
    # Every query tile reads the summaries. With one copy, the backward's program for a summary tile
    # would walk all query tiles in series; a copy per SUMMARY_GROUP query tiles keeps those chains
    # short (the copies are small: blocks x head_dim each; their gradients are summed).
    token_tiles = tokens // tile
    copies = -(-token_tiles // SUMMARY_GROUP)
    token_real = torch.ones(batch, seq, dtype=torch.bool, device=q.device) if real is None else real
    summary_real = token_real.view(batch, blocks, block).any(-1)  # empty regions get no weight
    key_real = torch.cat(
        [F.pad(token_real, (0, tokens - seq)), F.pad(summary_real, (0, summaries - blocks)).repeat(1, copies)], dim=1
    )  # fmt: skip

    def mask_mod(b, h, q_idx, kv_idx):
        own = q_idx // block
        is_token = kv_idx < tokens
        direct = is_token & (kv_idx // block == own)
        if causal:
            direct = direct & (kv_idx <= q_idx)
        copy = (kv_idx - tokens) // summaries
        region = kv_idx - tokens - copy * summaries
        summary = ~is_token & (copy == q_idx // (SUMMARY_GROUP * tile))
        summary = summary & ((region < own) if causal else (region != own))
        return key_real[b, kv_idx] & (direct | summary)

    if dense:

        def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return _dense_attention_lse(queries, keys, values, mask_mod, scale)[0]

    else:
        full = real is None and tokens == seq
        codes = trace_constant(
            _fixed_tile_codes, token_tiles, summaries // tile, copies, block, causal, full, str(q.device)
        )
        kv_len = tokens + copies * summaries
        mask = flex.block_mask_from_codes(codes[None].expand(batch, -1, -1), mask_mod, tokens, kv_len)
        attend = functools.partial(flex.run_flex, mask=mask, scale=scale)
    keep_graph = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out = _FixedSummaryAttention.apply(q, k, v, real, block, scale, (tokens, summaries, copies), attend, keep_graph)
    return out[:, :, :seq]


class _FixedSummaryAttention(torch.autograd.Function):
    """Combiner-Fixed's block summaries and the attention over ``[tokens ; summary copies]``, with the
    summaries' backward written by hand to save memory.

    Under plain autograd the max-pools of q and k (AmaxBackward) and the summary einsums (BmmBackward)
    each allocate full-size gradients of q, k or v, which autograd then sums with the attention's: at
    64K tokens they were most of the peak memory. Here the summaries are computed without a graph, the
    attention (``attend(q, keys, values)``: compiled FlexAttention on CUDA, :func:`_dense_attention_lse`
    in tests) keeps its own graph on detached inputs, and the backward adds the summaries' small
    gradients in place into the attention's token gradients: no full-size temporaries.

    ``q, k, v (B, H, seq, d)`` with ``seq`` a multiple of ``block``; ``real (B, seq)`` or None;
    ``layout = (tokens, summaries, copies)``: keys are the tokens padded to ``tokens``, then
    ``copies`` copies of the block summaries padded to ``summaries``. Returns ``(B, H, tokens, d)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        real: torch.Tensor | None,
        block: int,
        scale: float,
        layout: tuple[int, int, int],
        attend: Attend,
        keep_graph: bool,
    ) -> torch.Tensor:
        batch, _, seq, _ = q.shape
        tokens, summaries, copies = layout
        qb, kb, vb = (x.unflatten(2, (seq // block, block)) for x in (q, k, v))
        rb = None if real is None else real.view(batch, 1, -1, block)  # (B, 1, blocks, block)
        nonempty = None if rb is None else rb.any(-1)  # (B, 1, blocks)
        query_s, query_arg = _masked_max(qb, rb, nonempty)
        key_s, key_arg = _masked_max(kb, rb, nonempty)
        # Within-region distribution p(n | region) = softmax_n(scale * k_n . query_s); value_s = sum_n p v_n.
        logits = torch.einsum("...nd,...d->...n", kb, query_s).to(torch.promote_types(q.dtype, torch.float32)) * scale
        weights = logits.softmax(-1) if rb is None else masked_softmax(logits, rb, empty_rows="any")
        weights = weights if rb is None else weights * nonempty[..., None]
        value_s = torch.einsum("...n,...nd->...d", weights.to(v.dtype), vb)

        def extend(x: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
            summary = F.pad(summary, (0, 0, 0, summaries - summary.shape[2])).repeat(1, 1, copies, 1)
            return torch.cat([pad_seq(x, tokens), summary], dim=2)

        q_, keys, values = pad_seq(q, tokens), extend(k, key_s), extend(v, value_s)
        if not keep_graph:  # no gradient wanted: nothing to keep
            return attend(q_, keys, values)
        with torch.enable_grad():
            q_ = q_.detach().requires_grad_()
            out = attend(q_, keys.requires_grad_(), values.requires_grad_())
        ctx.graph = (out, q_, keys, values)
        ctx.save_for_backward(q, k, v, query_s, query_arg, key_arg, weights, nonempty)
        ctx.scale, ctx.layout = scale, layout
        return out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not hasattr(ctx, "graph"):
            raise RuntimeError(
                "Combiner-Fixed's flex path frees its graph in the first backward (to save memory): "
                "retain_graph=True and a second backward are not supported; use backend='eager'"
            )
        out, q_, keys, values = ctx.graph
        del ctx.graph  # the attention's saved keys and values go with its graph
        dq, dkeys, dvalues = torch.autograd.grad(out, (q_, keys, values), grad)
        del out, q_, keys, values
        q, k, v, *pooled = ctx.saved_tensors
        _add_summary_grads(dq, dkeys, dvalues, k, v, *pooled, ctx.scale, ctx.layout)
        # Token parts in the inputs' layout, one at a time: each big buffer goes before the next copy.
        dq = _token_grad(dq, q)
        dk = _token_grad(dkeys, k)
        del dkeys
        dv = _token_grad(dvalues, v)
        return dq, dk, dv, None, None, None, None, None, None


def _add_summary_grads(
    dq: torch.Tensor,
    dkeys: torch.Tensor,
    dvalues: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_s: torch.Tensor,
    query_arg: torch.Tensor,
    key_arg: torch.Tensor,
    weights: torch.Tensor,
    nonempty: torch.Tensor | None,
    scale: float,
    layout: tuple[int, int, int],
) -> None:
    """Adds, in place into the token rows of the attention's gradients ``dq (B, H, tokens, d)``,
    ``dkeys``, ``dvalues (B, H, tokens + copies * summaries, d)``, what flows through the summaries
    (their gradients are the summary rows, summed over the copies)."""
    seq, (blocks, block) = k.shape[2], weights.shape[2:]
    tokens, summaries, copies = layout

    def split(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # token rows by block, summary grads
        summary = grad[:, :, tokens:].unflatten(2, (copies, summaries)).sum(2)[:, :, :blocks]
        if nonempty is not None:
            summary = summary * nonempty[..., None]  # empty regions: zero summaries, no gradient
        return grad[:, :, :seq].unflatten(2, (blocks, block)), summary

    dqb = dq[:, :, :seq].unflatten(2, (blocks, block))
    dkb, dkey_s = split(dkeys)
    dvb, dvalue_s = split(dvalues)
    kb, vb = (x.unflatten(2, (blocks, block)) for x in (k, v))
    # value_s = sum_n w_n v_n
    dvb.addcmul_(weights[..., None].to(dvb.dtype), dvalue_s[..., None, :])
    # w = softmax_n(logits), logits_n = scale * k_n . query_s
    dw = torch.einsum("...nd,...d->...n", vb, dvalue_s).to(weights.dtype)
    dlogits = (weights * (dw - (weights * dw).sum(-1, keepdim=True))).to(k.dtype)
    dkb.addcmul_(dlogits[..., None], query_s[..., None, :], value=scale)
    dquery_s = torch.einsum("...n,...nd->...d", dlogits, kb) * scale
    if nonempty is not None:
        dquery_s = dquery_s * nonempty[..., None]
    # Max-pools: the gradient goes to the argmax. On ties it all goes to one index, where autograd's
    # amax splits it evenly; both are valid subgradients (random float inputs have no ties).
    dkb.scatter_add_(3, key_arg[..., None, :], dkey_s[..., None, :])
    dqb.scatter_add_(3, query_arg[..., None, :], dquery_s[..., None, :])


def _token_grad(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The first ``like.shape[2]`` rows of ``grad``, in ``like``'s memory layout (copied if they are not)."""
    rows = grad[:, :, : like.shape[2]]
    if rows.stride() == like.stride():
        return rows
    return torch.empty_like(like).copy_(rows)


@functools.lru_cache(maxsize=8)  # (tiles, tiles) codes: 64 MiB at 1M tokens
def _fixed_tile_codes(
    token_tiles: int, summary_tiles: int, copies: int, block: int, causal: bool, full: bool, device: str = "cpu"
) -> torch.Tensor:
    """Tile codes of ``_fixed_flex``'s mask (0 skip, 1 partial, 2 full), ``(token_tiles, token_tiles +
    copies * summary_tiles)``: token tiles that share a block, then the summary tiles of the query
    tile's own copy (partial: the mask_mod drops the own block's summary and, causal, later ones).
    Cached on ``device``: a copy from the host each call would wait for the GPU's queue."""
    start = torch.arange(token_tiles) * 128
    first, last = start // block, (start + 127) // block  # the blocks each tile touches
    shared = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    codes = shared.to(torch.int8)
    if full and block >= 128:  # a tile lies inside one block: whole tiles of a block are full
        codes = codes * 2
    if causal:
        codes = flex.causal_tiles(codes)
    own_copy = torch.arange(token_tiles) // SUMMARY_GROUP
    summary_copy = torch.arange(copies * summary_tiles) // summary_tiles
    summary_codes = (own_copy[:, None] == summary_copy[None, :]).to(torch.int8)
    return torch.cat([codes, summary_codes], dim=1).to(device)


# ----------------------------------------------------------------------------------------------------- axial
# Which keys of its own group a query reads, by the two positions inside the group.
RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "all": lambda query, key: query >= 0,
    "up_to": lambda query, key: key <= query,
    "before": lambda query, key: key < query,
    "others": lambda query, key: key != query,
}


def _axial_flex(q, k, v, width, causal, real, scale, forms, *, dense: bool = False):
    """The axial forms (``forms``: ``("vertical",)``, ``("horizontal",)`` or both, averaged) on a grid of rows of
    ``width`` tokens; ``seq`` is a multiple of ``width``. ``dense``: each call as a dense masked attention
    instead of FlexAttention (eager, any device; tests).

    Every call reads its keys where they lie (no concatenated copies): the row's tokens, the column's tokens
    (column-major copies of q, k, v) and each form's summaries are three calls, merged by log-sum-exp. The
    row and column calls are the same for both forms, so mixture runs them once."""
    batch, heads, seq, dim = q.shape
    rows = seq // width
    # Without padding the row and column calls take no key mask, so their whole tiles skip the mask_mod.
    token_ok = real
    if real is None:
        real = torch.ones(batch, seq, dtype=torch.bool, device=q.device)
    grid = real.view(batch, rows, width)
    qg, kg = (x.view(batch, heads, rows, width, dim) for x in (q, k))

    def by_column(x: torch.Tensor) -> torch.Tensor:  # (B, H, rows, width, ...) -> column-major (B, H, seq, ...)
        return x.transpose(2, 3).reshape(batch, heads, seq, *x.shape[4:])

    def from_rows(x: torch.Tensor) -> torch.Tensor:  # row-major (B, H, seq, ...) -> grid view (B, H, rows, width, ...)
        return x.unflatten(2, (rows, width))

    def from_columns(x: torch.Tensor) -> torch.Tensor:  # column-major (B, H, seq, ...) -> grid view
        return x.unflatten(2, (width, rows)).transpose(2, 3)

    q_col, k_col, v_col = (by_column(x.view(batch, heads, rows, width, x.shape[-1])) for x in (q, k, v))
    real_col = None if token_ok is None else grid.transpose(1, 2).reshape(batch, seq)
    attend = functools.partial(_group_attention, scale=scale, dense=dense)
    column_rule = "before" if causal else "others"
    row_out, row_lse = attend(q, k, v, token_ok, width, "up_to" if causal else "all")
    column_out, column_lse = attend(q_col, k_col, v_col, real_col, rows, column_rule)
    parts = [(from_rows(row_out), from_rows(row_lse)), (from_columns(column_out), from_columns(column_lse))]
    out = 0.0
    for form in forms:
        if form == "vertical":  # summaries (r, e): column e over the rows above r (bidirectional: the others)
            key_s, query_s, nonempty = axial_region_pools(
                qg, kg, grid, along=2, both_sides=not causal, padded=token_ok is not None
            )
            # p(j | region) of each summary: its query on its column's keys in the region, a column call.
            value_s, _ = attend(by_column(query_s), k_col, v_col, real_col, rows, column_rule)
            value_s = from_columns(value_s).reshape(batch, heads, seq, -1)
            # read by row r's queries, one summary per other column
            summary_out, summary_lse = attend(q, key_s.flatten(2, 3), value_s, nonempty.flatten(1), width, "others")
            summary = from_rows(summary_out), from_rows(summary_lse)
        else:  # summaries (t, c): row t without column c
            key_s, query_s, nonempty = axial_region_pools(
                qg, kg, grid, along=3, both_sides=True, padded=token_ok is not None
            )
            value_s, _ = attend(query_s.flatten(2, 3), k, v, token_ok, width, "others")  # a row call
            # read by column c's queries, one summary per row above (bidirectional: per other row)
            value_s = by_column(from_rows(value_s))
            ok = nonempty.transpose(1, 2).reshape(batch, seq)
            summary_out, summary_lse = attend(q_col, by_column(key_s), value_s, ok, rows, column_rule)
            summary = from_columns(summary_out), from_columns(summary_lse)
        out = out + _merge([*parts, summary])
    return (out / len(forms)).reshape(batch, heads, seq, -1)


def _group_attention(q, k, v, key_ok, group, rule, *, scale, dense):
    """``(out, lse)`` of every query on the keys of its own group of ``group`` consecutive positions (keys laid out
    as the queries) that ``RULES[rule]`` allows and ``key_ok (B, seq)`` marks real (None: every key is real, and
    tiles whose every pair is allowed are full: the kernel skips their mask_mod). A query with no key gets zeros
    and ``lse = -inf``."""
    batch, _, seq, _ = q.shape
    tokens = -(-seq // flex.TILE) * flex.TILE
    queries, keys, values = (pad_seq(x, tokens) for x in (q, k, v))
    allowed = RULES[rule]
    if key_ok is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < seq) & (kv_idx // group == q_idx // group) & allowed(q_idx % group, kv_idx % group)

    else:
        key_ok = F.pad(key_ok, (0, tokens - seq))

        def mask_mod(b, h, q_idx, kv_idx):
            return key_ok[b, kv_idx] & (kv_idx // group == q_idx // group) & allowed(q_idx % group, kv_idx % group)

    if dense:
        out, lse = _dense_attention_lse(queries, keys, values, mask_mod, scale)
    else:
        tiles = tokens // flex.TILE
        codes = trace_constant(_group_tile_codes, tiles, group, seq, rule, key_ok is None, str(q.device))
        mask = flex.block_mask_from_codes(codes[None].expand(batch, -1, -1), mask_mod, tokens, tokens)
        out, lse = flex.run_flex(queries, keys, values, mask, scale, return_lse=True)
    return out[:, :, :seq], lse[:, :, :seq]


@functools.lru_cache(maxsize=8)  # (tiles, tiles) codes: 64 MiB at 1M tokens
def _group_tile_codes(tiles: int, group: int, seq: int, rule: str, full: bool, device: str = "cpu") -> torch.Tensor:
    """Tile codes ``(tiles, tiles)`` (0 skip, 1 partial, 2 full) of attention inside groups of ``group`` consecutive
    positions under ``RULES[rule]``: a query tile reads the key tiles that share a group with it (causal rules:
    none after its own). With ``full`` (no key padding), a pair of tiles inside one group, past which the
    sequence does not end, whose every pair ``RULES[rule]`` allows, is full. Cached on ``device``: a copy from
    the host each call would wait for the GPU's queue."""
    start = torch.arange(tiles) * flex.TILE
    last = torch.clamp(start + flex.TILE - 1, max=seq - 1)
    first, last = start // group, last // group
    codes = ((first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])).to(torch.int8)
    if full:
        whole = (first == last) & (start + flex.TILE <= seq)  # the tile lies in one group, before the end
        inside = whole[:, None] & whole[None, :] & (first[:, None] == first[None, :])
        tile = torch.arange(tiles)
        if rule == "all":
            every_pair = inside
        elif rule == "others":  # a tile beside itself holds the excluded diagonal
            every_pair = inside & (tile[:, None] != tile[None, :])
        else:  # up_to, before: key tiles wholly before the query tile
            every_pair = inside & (tile[None, :] < tile[:, None])
        codes = codes + every_pair.to(torch.int8)
    if rule in ("up_to", "before"):
        codes = flex.causal_tiles(codes)
    return codes.to(device)


def _dense_attention_lse(q, keys, values, mask_mod, scale):
    """Eager stand-in for a FlexAttention call with ``return_lse``: ``(out, lse)`` under the dense mask of
    ``mask_mod``; a row with no key gives zeros and ``-inf``."""
    batch, queries, kv = q.shape[0], q.shape[2], keys.shape[2]
    b, q_idx, kv_idx = (torch.arange(n, device=q.device) for n in (batch, queries, kv))
    allowed = mask_mod(b[:, None, None], None, q_idx[:, None], kv_idx).expand(batch, queries, kv)[:, None]
    scores = (q @ keys.transpose(-1, -2) * scale).masked_fill(~allowed, -torch.inf)
    lse = scores.logsumexp(-1)
    probs = torch.exp(scores - torch.where(lse.isfinite(), lse, 0.0)[..., None])
    return probs @ values, lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax over the keys of several attentions, from their normalised outputs and log-sum-exps (any
    layout, as long as the shapes agree). The shift is detached (the result does not depend on it), and rows
    where every part is empty give zeros, with finite gradients."""
    lses = torch.stack([lse for _, lse in parts])
    shift = lses.amax(0).detach()
    weights = torch.exp(lses - torch.where(shift.isfinite(), shift, 0.0))
    total = weights.sum(0)
    weights = (weights / torch.where(total > 0, total, 1.0))[..., None]
    out = parts[0][0] * weights[0].to(parts[0][0].dtype)
    for (part, _), weight in zip(parts[1:], weights[1:]):
        out = out.addcmul_(part, weight.to(part.dtype))  # in place: mul and addcmul keep their inputs, not outputs
    return out
