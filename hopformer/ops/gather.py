"""The ``gather`` backend: block-sparse attention in pure PyTorch, autograd, any device.

Each query block gathers its key blocks into a small dense problem: its ``block`` queries against the
``degree * block`` keys of its ``degree`` key blocks. Rows whose degree is close to the number of
blocks (global rows) would make that gather as large as dense attention, so they are split out and
computed against all keys with a token mask ("wide" rows). Memory is ``O(seq * keys_per_query)``,
never ``O(seq^2)`` for sparse graphs.

The normalised attention ``A`` is computed once and applied ``hops`` times (one application is sparse
attention). The whole computation is one op, ``hopformer::gather_diffusion`` (a ``torch.library``
custom op, so ``torch.compile`` sees one node), over chunks of (batch, head) pairs. Its backward
(``hopformer::gather_diffusion_backward``) recomputes a chunk's ``A`` and hop states, runs the adjoint
recurrence ``u <- A^T u`` and forms the score gradient, so nothing of the size of ``A`` nor a state
per hop is kept between forward and backward (edge-dropout masks, one byte per edge, are): memory is
the output plus one chunk's ``A``, hop states and adjoint terms.

Layout. A narrow row's attention is one ``(block, degree * block)`` matrix: query-major, all its key
blocks side by side. Rows are processed a few at a time ("row chunks"), so every step is one batched
matrix product per chunk with a long inner or outer dimension (all key blocks at once), and the
softmax is PyTorch's, over one contiguous dimension, on data that is still in cache. Rows whose mask
is the same for every query (no causal diagonal) get their masked keys as an additive bias folded
into the score product: no mask pass at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph
from hopformer.ops.backend import NO_OPTIONS, HopOptions, Support

# A narrow row costs about this much more per key than a wide (dense) row, for the gather copies.
_GATHER_OVERHEAD = 1.5
# Attention probabilities kept alive at once (elements): (batch, head) pairs are processed in chunks of
# about this size, and each chunk's attention and hop states are recomputed in backward, not stored.
CHUNK_ELEMENTS = 1 << 22
# Elements of the score tiles of one row chunk: rows are processed a few at a time, so each chunk's
# scores, softmax and products stay in a core's cache (float32: 512 KiB).
ROW_CHUNK_ELEMENTS = 1 << 16


# ----------------------------------------------------------------------------------------- plan
@dataclass
class GatherPlan:
    """Device-side layout of a graph for the gather backend (built once per graph and device).

    Narrow rows come in two groups: the first ``num_uniform`` have one key mask for all their queries
    (``key_ok``: a padded slot, keys past the sequence), the others need a token mask (``token_mask``:
    causal diagonals, or rows without any key, which must come out zero).
    """

    narrow_rows: torch.Tensor  # (n,) query blocks computed by gathering
    narrow_keys: torch.Tensor  # (n, d) key blocks per narrow row (padded slots point at block 0)
    key_ok: torch.Tensor  # (n, d * block) keys of each narrow row that exist (not a padded slot or token)
    token_mask: torch.Tensor  # (n - num_uniform, block, d * block) edges of the other narrow rows
    wide_rows: torch.Tensor  # (w,) query blocks computed against all keys
    wide_mask: torch.Tensor  # (w, block, padded_len) token-level edges of the wide rows
    num_uniform: int
    first_row: int  # narrow_rows is first_row, first_row + 1, ...; -1 when it is not such a range
    uniform_bias: bool  # some uniform row has a missing key: its scores get a bias
    wide_full: bool  # every wide row sees every key: no mask needed without key padding

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The index and mask tensors, in the order the op takes them."""
        return self.narrow_rows, self.narrow_keys, self.key_ok, self.token_mask, self.wide_rows, self.wide_mask

    def statics(self) -> tuple[int, int, bool, bool]:
        """The plan's Python facts, in the order the op takes them."""
        return self.num_uniform, self.first_row, self.uniform_bias, self.wide_full


def gather_plan(graph: BlockGraph, device: torch.device) -> GatherPlan:
    """The :class:`GatherPlan` of ``graph`` on ``device``, cached on the graph."""
    return graph.view(_build_plan, str(device))


def _build_plan(graph: BlockGraph, device: str) -> GatherPlan:
    nb, bs, seq = graph.num_blocks, graph.block_size, graph.seq_len
    degrees = graph.degrees
    # Split rows so that (rows gathered x widest gathered row) + (wide rows x all blocks) is smallest.
    order = torch.argsort(degrees, stable=True)
    sorted_degrees = degrees[order]
    costs = [(nb - t) * nb for t in range(nb + 1)]
    costs = [c + (t and _GATHER_OVERHEAD * t * int(sorted_degrees[t - 1])) for t, c in enumerate(costs)]
    split = min(range(nb + 1), key=lambda t: (costs[t], -t))
    narrow_rows, wide_rows = order[:split].sort().values, order[split:].sort().values

    positions = torch.arange(graph.padded_len).view(nb, bs)  # token positions of each block
    key_real = torch.arange(graph.padded_len) < seq

    # narrow rows: the key-block lists as a padded (n, d) table
    width = max(int(degrees[narrow_rows].max()) if len(narrow_rows) else 1, 1)
    slots = torch.arange(width)
    starts, counts = graph.indptr[narrow_rows], degrees[narrow_rows]
    slot_valid = slots[None, :] < counts[:, None]
    flat = (starts[:, None] + slots[None, :]).clamp(max=max(graph.num_block_edges - 1, 0))
    narrow_keys = torch.where(slot_valid, graph.indices[flat] if graph.num_block_edges else 0, 0)
    key_pos = positions[narrow_keys].reshape(len(narrow_rows), width * bs)  # (n, d*bs)
    key_ok = slot_valid.repeat_interleave(bs, dim=1) & key_real[key_pos]
    token_mask = key_ok[:, None, :].expand(-1, bs, -1)
    if graph.is_causal:
        token_mask = token_mask & (key_pos[:, None, :] <= positions[narrow_rows][:, :, None])
    # A row is uniform when every query sees the same keys, and at least one (else it must come out zero)
    uniform = (token_mask == key_ok[:, None, :]).all(dim=(1, 2)) & key_ok.any(dim=1)
    group = torch.argsort((~uniform).to(torch.int8), stable=True)  # uniform rows first, in row order
    narrow_rows, narrow_keys, key_ok, token_mask = (x[group] for x in (narrow_rows, narrow_keys, key_ok, token_mask))
    num_uniform = int(uniform.sum())
    first_row = int(narrow_rows[0]) if len(narrow_rows) else 0
    if not torch.equal(narrow_rows, torch.arange(first_row, first_row + len(narrow_rows))):
        first_row = -1

    # wide rows: a token mask over all keys
    adjacency = torch.zeros(len(wide_rows), nb, dtype=torch.bool)
    for i, row in enumerate(wide_rows.tolist()):
        adjacency[i, graph.indices[graph.indptr[row] : graph.indptr[row + 1]]] = True
    wide_mask = (adjacency.repeat_interleave(bs, dim=1) & key_real)[:, None, :].expand(-1, bs, -1)
    if graph.is_causal:
        wide_mask = wide_mask & (torch.arange(graph.padded_len)[None, None, :] <= positions[wide_rows][:, :, None])

    def put(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous().to(device)

    return GatherPlan(
        put(narrow_rows),
        put(narrow_keys),
        put(key_ok),
        put(token_mask[num_uniform:]),
        put(wide_rows),
        put(wide_mask),
        num_uniform,
        first_row,
        not bool(key_ok[:num_uniform].all()),
        bool(wide_mask.all()),
    )


# ------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Steps:
    """What one call runs: the step weights and the settings every chunk shares."""

    weights: tuple[float, ...]  # a_t per step, in application order
    scale: float
    edge_p: float
    per_hop: bool  # edge dropout draws a mask per step (else one for all)
    hop_p: float


@dataclass
class _Rows:
    """One row chunk: narrow rows ``index`` (positions ``span`` in the narrow table), their query blocks
    (``ids``: a slice of block rows where they are consecutive, else an index tensor) and their key blocks
    (``keys``, flat, ``count * d``)."""

    span: slice
    ids: slice | torch.Tensor
    keys: torch.Tensor
    count: int
    uniform: bool


def _take(x: torch.Tensor, ids: slice | torch.Tensor) -> torch.Tensor:
    """Block rows ``ids`` of ``x`` ``(G, nb, ...)``: a view where they are consecutive."""
    return x[:, ids] if isinstance(ids, slice) else x.index_select(1, ids)


def _put(out: torch.Tensor, ids: slice | torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(ids, slice):
        out[:, ids] = value
    else:
        out.index_copy_(1, ids, value)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(G, r, ...)`` -> ``(G * r, ...)`` (a view where possible)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


class _Layout:
    """One call's view of the plan: sizes, row chunks and the padding mask, shared by every chunk."""

    def __init__(self, plan, statics, real: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.narrow_rows, self.narrow_keys, self.key_ok, self.token_mask, self.wide_rows, self.wide_mask = plan
        self.num_uniform, self.first_row, uniform_bias, self.wide_full = statics
        self.real = real
        self.n, self.width = self.narrow_keys.shape
        self.block = self.wide_mask.shape[1]
        self.wide = self.wide_rows.numel()
        # Missing keys of uniform rows as an additive bias: exp underflows to exactly 0 there.
        self.bias = None
        if uniform_bias:
            self.bias = torch.zeros(self.key_ok.shape, dtype=dtype, device=self.key_ok.device)
            self.bias.masked_fill_(~self.key_ok, torch.finfo(dtype).min)
        if real is not None:  # token positions of each narrow row's queries and keys, for the padding mask
            offsets = torch.arange(self.block, device=real.device)
            self.key_pos = (self.narrow_keys[:, :, None] * self.block + offsets).flatten(1)
            self.row_pos = self.narrow_rows[:, None] * self.block + offsets

    def row_chunks(self, pairs: int) -> list[_Rows]:
        """Chunks of narrow rows whose score tiles hold about ``ROW_CHUNK_ELEMENTS`` for ``pairs`` pairs,
        never straddling the uniform and the masked group."""
        size = max(1, ROW_CHUNK_ELEMENTS // max(pairs * self.block * self.width * self.block, 1))
        chunks = []
        for begin, end in ((0, self.num_uniform), (self.num_uniform, self.n)):
            for start in range(begin, end, size):
                span = slice(start, min(start + size, end))
                ids = self.narrow_rows[span]
                if self.first_row >= 0:
                    ids = slice(self.first_row + span.start, self.first_row + span.stop)
                keys = self.narrow_keys[span].flatten()
                chunks.append(_Rows(span, ids, keys, span.stop - span.start, end == self.num_uniform))
        return chunks

    def mask(self, rows: _Rows, real: torch.Tensor | None) -> torch.Tensor | None:
        """Edges of a row chunk for pairs with padding ``real`` ``(G, padded_len)``, broadcastable to
        ``(G, r, block, d * block)``; None where the bias covers them."""
        masked = slice(rows.span.start - self.num_uniform, rows.span.stop - self.num_uniform)
        if real is None:
            return None if rows.uniform else self.token_mask[masked]
        base = self.key_ok[rows.span][:, None, :] if rows.uniform else self.token_mask[masked]
        keys_real = real[:, self.key_pos[rows.span]]  # (G, r, d*bs)
        rows_real = real[:, self.row_pos[rows.span]]  # (G, r, bs)
        return base & keys_real[:, :, None, :] & rows_real[:, :, :, None]


def _softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dimension on the ``mask``'s entries (all where None); masked entries and
    rows with nothing allowed come out exactly 0."""
    if mask is None:
        return torch.softmax(scores, -1)
    masked = ~mask
    probs = torch.softmax(scores.masked_fill_(masked, torch.finfo(scores.dtype).min), -1)
    return probs.masked_fill_(masked, 0.0)


def _dropped(probs: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    return probs if keep is None else probs * keep.reshape(probs.shape) / (1 - p)


# ---------------------------------------------------------------------------------- attention
def _keep_of(keep, rows: _Rows | None) -> torch.Tensor | None:
    """The edge keep-mask of a row chunk (None: the wide rows) out of a step's ``(narrow, wide)`` masks."""
    if rows is None:
        return keep[1]
    return None if keep[0] is None else keep[0][:, rows.span]


def _hop(layout: _Layout, rows: _Rows | None, probs, z, v, a: float, keep, p: float, out) -> None:
    """Rows of ``out = lerp(A z, v, a)`` from one chunk's probabilities (None: the wide rows); the mix is
    the matrix product's epilogue."""
    pairs, _, bs, dim = z.shape
    probs = _dropped(probs, _keep_of(keep, rows), p)
    if rows is None:
        term = torch.baddbmm(v[:, layout.wide_rows].flatten(1, 2), probs, z.flatten(1, 2), beta=a, alpha=1 - a)
        out.index_copy_(1, layout.wide_rows, term.view(pairs, -1, bs, dim))
        return
    z_keys = z.index_select(1, rows.keys).view(probs.shape[0], -1, dim)
    if isinstance(rows.ids, slice) and pairs == 1:  # straight into the output rows
        torch.baddbmm(v[0, rows.ids], probs, z_keys, beta=a, alpha=1 - a, out=out[0, rows.ids])
    else:
        term = torch.baddbmm(_flat(_take(v, rows.ids)), probs, z_keys, beta=a, alpha=1 - a)
        _put(out, rows.ids, term.view(pairs, -1, bs, dim))


def _adjoint(layout: _Layout, rows: _Rows | None, probs, w, keep, p: float, out, fresh: bool) -> None:
    """``out += A^T w`` over one chunk's rows (None: the wide rows, which reach every key: with ``fresh``
    their product is written, not added, so it must come first)."""
    pairs, _, bs, dim = w.shape
    probs = _dropped(probs, _keep_of(keep, rows), p).transpose(1, 2)
    if rows is None:
        w_rows = w[:, layout.wide_rows].flatten(1, 2)
        if fresh:
            torch.bmm(probs, w_rows, out=out.view(pairs, -1, dim))
        else:
            out.view(pairs, -1, dim).baddbmm_(probs, w_rows)
        return
    term = torch.bmm(probs, _flat(_take(w, rows.ids)))
    out.index_add_(1, rows.keys, term.view(pairs, -1, bs, dim))


def _adjoint_buffer(layout: _Layout, like: torch.Tensor) -> torch.Tensor:
    """Room for ``A^T w``: the wide rows' product fills it; without wide rows it starts at zero."""
    return torch.empty_like(like) if layout.wide else torch.zeros_like(like)


class _Attention:
    """The attention ``A`` of one chunk of ``G`` (batch, head) pairs: per row chunk the narrow rows'
    probabilities ``(G * r, block, d * block)`` (queries against all their key blocks side by side), and
    the wide rows' ``(G, w * block, padded_len)``.

    ``visit(rows, probs)`` (rows None: the wide rows, visited first) runs on each chunk as soon as its
    probabilities exist, while they are in cache: the passes that need nothing but ``A`` and known
    inputs share the pass that builds it. ``keep=False`` drops them after the visit (a single pass).
    Edge-dropout keep-masks are in the op's layout, ``(G, n, block, d * block)`` and
    ``(G, w * block, padded_len)``."""

    def __init__(self, layout: _Layout, q, k, real, scale: float, visit=None, keep: bool = True) -> None:
        self.layout = layout
        pairs, _, bs, _ = q.shape
        self.chunks = layout.row_chunks(pairs)
        self.wide = None
        if layout.wide:
            q_rows = q[:, layout.wide_rows].flatten(1, 2)  # (G, w*bs, D)
            scores = torch.baddbmm(q_rows.new_empty(()), q_rows, k.flatten(1, 2).transpose(1, 2), beta=0, alpha=scale)
            mask = None if layout.wide_full and real is None else layout.wide_mask.flatten(0, 1)[None]
            if real is not None:
                mask = mask & real[:, None, :] & real.view(pairs, -1, bs)[:, layout.wide_rows].flatten(1)[:, :, None]
            probs = _softmax(scores, mask)
            if visit is not None:
                visit(None, probs)
            self.wide = probs if keep else None
        self.narrow: list[torch.Tensor | None] = []
        for rows in self.chunks:
            probs = self._narrow(rows, q, k, real, scale)
            if visit is not None:
                visit(rows, probs)
            self.narrow.append(probs if keep else None)

    def _narrow(self, rows: _Rows, q, k, real, scale: float) -> torch.Tensor:
        layout = self.layout
        pairs, _, bs, dim = q.shape
        q_rows = _flat(_take(q, rows.ids))
        k_keys = k.index_select(1, rows.keys).view(pairs * rows.count, -1, dim).transpose(1, 2)
        if rows.uniform and layout.bias is not None:  # scores = bias + scale q k^T in one product
            scores = q.new_empty(pairs, rows.count, bs, layout.width * bs).copy_(layout.bias[rows.span][:, None])
            scores = _flat(scores).baddbmm_(q_rows, k_keys, alpha=scale)
        else:
            scores = torch.baddbmm(q.new_empty(()), q_rows, k_keys, beta=0, alpha=scale)
        mask = layout.mask(rows, real)
        return _softmax(scores.view(pairs, rows.count, bs, -1), mask).view(pairs * rows.count, bs, -1)

    def each(self):
        """``(rows, probs)`` of every chunk, the wide rows (rows None) first."""
        if self.wide is not None:
            yield None, self.wide
        yield from zip(self.chunks, self.narrow)

    def release(self):
        """``(rows, probs)`` of every chunk, the wide rows last, each dropped from the attention as it is
        handed out (the last pass: memory falls as it goes)."""
        for index, rows in enumerate(self.chunks):
            probs, self.narrow[index] = self.narrow[index], None
            yield rows, probs
        if self.wide is not None:
            probs, self.wide = self.wide, None
            yield None, probs

    def apply(self, z: torch.Tensor, v: torch.Tensor, a: float, keep=(None, None), p: float = 0.0) -> torch.Tensor:
        """``lerp(A z, v, a)`` on blocks ``(G, nb, bs, D)`` (every block row is narrow or wide)."""
        out = torch.empty_like(z)
        for rows, probs in self.each():
            _hop(self.layout, rows, probs, z, v, a, keep, p, out)
        return out

    def apply_transposed(self, w: torch.Tensor, keep=(None, None), p: float = 0.0) -> torch.Tensor:
        """``A^T @ w`` on blocks."""
        out = _adjoint_buffer(self.layout, w)
        for rows, probs in self.each():
            _adjoint(self.layout, rows, probs, w, keep, p, out, fresh=True)
        return out


# -------------------------------------------------------------------------------------- steps
def _pair_chunks(layout: _Layout, pairs: int) -> list[slice]:
    if torch.compiler.is_exporting():  # an exported program takes any batch size: one chunk
        return [slice(0, pairs)]
    per_pair = layout.n * layout.block * layout.width * layout.block + layout.wide_mask.numel()
    size = max(1, min(pairs, CHUNK_ELEMENTS // max(per_pair, 1)))
    return [slice(g, min(g + size, pairs)) for g in range(0, pairs, size)]


def _draw_masks(layout: _Layout, pairs: int, v_blocks: torch.Tensor, run: _Steps):
    """The dropout keep-masks of the whole call, drawn once in forward (backward meets the same ones):
    edge masks ``(E, pairs, n, bs, d*bs)`` and ``(E, pairs, w*bs, padded_len)`` with ``E`` = 1, or the
    number of steps when drawn per step (0 without edge dropout), and hop masks ``(T or 0, *v_blocks)``."""
    bs, length = layout.block, layout.wide_mask.shape[-1]
    draws = (len(run.weights) if run.per_hop else 1) if run.edge_p > 0 else 0
    device = v_blocks.device
    narrow = torch.empty(draws, pairs, layout.n, bs, layout.width * bs, dtype=torch.bool, device=device)
    wide = torch.empty(draws, pairs, layout.wide * bs, length, dtype=torch.bool, device=device)
    for e in range(draws):
        narrow[e] = torch.rand(narrow.shape[1:], device=device) >= run.edge_p
        wide[e] = torch.rand(wide.shape[1:], device=device) >= run.edge_p
    hop = torch.empty(len(run.weights) if run.hop_p > 0 else 0, *v_blocks.shape, dtype=torch.bool, device=device)
    for t in range(hop.shape[0]):
        hop[t] = torch.rand(v_blocks.shape, device=device) >= run.hop_p
    return narrow, wide, hop


def _chunk_masks(masks, h: slice, run: _Steps):
    """Per step: the edge keep-masks ``(narrow, wide)`` of pairs ``h`` and the hop keep-mask."""
    narrow, wide, hop = masks
    edge = [(None, None)] * len(run.weights)
    if narrow.shape[0]:
        edge = [(narrow[t if run.per_hop else 0, h], wide[t if run.per_hop else 0, h]) for t in range(len(edge))]
    hops = [hop[t, h] if hop.shape[0] else None for t in range(len(run.weights))]
    return edge, hops


def _hop_dropout(z: torch.Tensor, keep: torch.Tensor | None, run: _Steps) -> torch.Tensor:
    return z if keep is None else z * keep / (1 - run.hop_p)


def _forward_chunk(layout: _Layout, q, k, v, real, masks, run: _Steps, last: int | None = None):
    """The steps ``z_t = drop(lerp(A z_{t-1}, v, a_t))`` from ``z_0 = v`` for one chunk of pairs, the first
    in the pass that builds ``A`` (``a_t = 1`` resets the state to ``v`` without attending). Returns the
    attention and the states ``z_0 .. z_last`` (default: all, ``z_T`` last)."""
    keeps, hop_keeps = masks
    steps = len(run.weights)
    last = steps if last is None else last
    a = run.weights[0]
    first = torch.empty_like(v) if a < 1.0 and last >= 1 else None

    def visit(rows, probs):
        _hop(layout, rows, probs, v, v, a, keeps[0], run.edge_p, first)

    attention = _Attention(layout, q, k, real, run.scale, visit if first is not None else None)
    states = [v]
    for t in range(last):
        if t == 0:
            z = first if first is not None else v
        else:
            z = v if run.weights[t] >= 1.0 else attention.apply(states[-1], v, run.weights[t], keeps[t], run.edge_p)
        states.append(_hop_dropout(z, hop_keeps[t], run))
    return attention, states


def _backward_chunk(layout: _Layout, q, k, v, grad, final, real, masks, run: _Steps, grads) -> None:
    """Write the gradients of one chunk of pairs' q, k, v blocks into ``grads`` (views of the full ones).

    Adjoint sweep: ``u = dL/dz_{t+1}`` (``z_{t+1}`` the output of step ``t``), ``u'`` = u through the hop
    dropout, ``w_t = dL/d(A z_t) = (1 - a_t) u'`` (kept per step for the score gradient, in u's own memory;
    None for skipped ``a = 1`` steps), and ``u <- A^T w_t``. The softmax needs
    ``r_i = sum_t w_t,i . (A z_t)_i``; solving the mix for ``A z_t`` gives
    ``r_i = sum_t u'_t,i . ((1 - hop_p) z_{t+1} - a_t v)_i`` (u' is zero where hop dropout zeroed
    ``z_{t+1}``), so ``A z_t`` is never needed; the v terms add up to ``(sum_t a_t u'_t) . v``.

    Passes over ``A``: the one that rebuilds it also runs the first recomputed step and the last step's
    ``A^T w``; the first step's ``A^T w`` shares the pass of the score gradient. Sparse attention (one
    step) is a single pass: rebuild, ``A^T w`` and score gradient per chunk."""
    keeps, hop_keeps = masks
    grad_q, grad_k, grad_v = grads
    steps = len(run.weights)
    w_steps: list[torch.Tensor | None] = [None] * steps
    r, resets = None, None
    grad_v.zero_()

    def enter(t: int, u: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """Step t's share of dv and r, and w_t (None: a reset, whose u goes to v whole)."""
        nonlocal r, resets
        if hop_keeps[t] is not None:
            u = u * hop_keeps[t] / (1 - run.hop_p)
        a = run.weights[t]
        if a >= 1.0:
            resets = u.clone() if resets is None else resets.add_(u)
            return None
        grad_v.add_(u, alpha=a)
        dot = _rowdot(u, output)
        r = dot.mul_(1 - run.hop_p) if r is None else r.add_(dot, alpha=1 - run.hop_p)
        w_steps[t] = u * (1 - a) if u is grad else u.mul_(1 - a)
        return w_steps[t]

    def finish() -> None:  # r's v term: grad_v holds sum_t a_t u'_t until A^T w_0 (or resets) join it
        if r is not None:
            r.sub_(_rowdot(grad_v, v))

    w_last = enter(steps - 1, grad, final)
    if steps == 1:  # sparse attention: one pass does it all
        finish()
        if resets is not None:
            grad_v.add_(resets)
        scores = _ScoreGradient(layout, q, k, [v], w_steps, r, keeps, run, grad_q, grad_k, grad_v)
        _Attention(layout, q, k, real, run.scale, scores.visit, keep=False)
        return

    # The pass that rebuilds A also recomputes z_1 (see _forward_chunk) and runs u = A^T w_{T-1}.
    u = _adjoint_buffer(layout, v)
    first_hop = torch.empty_like(v) if run.weights[0] < 1.0 else None

    def visit(rows, probs):
        if first_hop is not None:
            _hop(layout, rows, probs, v, v, run.weights[0], keeps[0], run.edge_p, first_hop)
        if w_last is not None:
            _adjoint(layout, rows, probs, w_last, keeps[steps - 1], run.edge_p, u, fresh=True)

    attention = _Attention(layout, q, k, real, run.scale, visit)
    states = [v, _hop_dropout(first_hop if first_hop is not None else v, hop_keeps[0], run)]
    for t in range(1, steps - 1):  # the other states z_2 .. z_{T-1}
        a = run.weights[t]
        z = v if a >= 1.0 else attention.apply(states[-1], v, a, keeps[t], run.edge_p)
        states.append(_hop_dropout(z, hop_keeps[t], run))
    if w_last is None:
        u = torch.zeros_like(v)
    for t in reversed(range(steps - 1)):
        w = enter(t, u, states[t + 1])
        if w is None:
            u = torch.zeros_like(v)
        elif t > 0:
            u = attention.apply_transposed(w, keeps[t], run.edge_p)
        else:
            u = None
    finish()
    u = None  # (after a reset at step 0: zeros; that step's u went to resets)
    if resets is not None:
        grad_v.add_(resets)
        resets = None
    scores = _ScoreGradient(layout, q, k, states, w_steps, r, keeps, run, grad_q, grad_k, grad_v)
    for rows, probs in attention.release():  # dS (and A^T w_0 into dv), freeing each chunk once done
        scores.visit(rows, probs)
        del probs


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x * y).sum(-1)`` without the full-size product (a batched matrix product)."""
    return torch.einsum("gnbd,gnbd->gnb", x, y)


class _ScoreGradient:
    """Per chunk of the attention (a visitor of :class:`_Attention`): ``dv += A^T w_0`` when step 0
    attends, then ``dS = scale * P * (dP - r)`` with ``dP = sum_t w_t z_t^T`` on the chunk's edges (each
    step's product scaled by its edge-dropout mask), ``dq = dS k`` and ``dk += dS^T q``."""

    def __init__(self, layout, q, k, states, w_steps, r, keeps, run: _Steps, grad_q, grad_k, grad_v) -> None:
        self.layout, self.q, self.k, self.states, self.w_steps, self.r = layout, q, k, states, w_steps, r
        self.keeps, self.run, self.grads = keeps, run, (grad_q, grad_k, grad_v)
        self.used = [t for t, w in enumerate(w_steps) if w is not None]

    def visit(self, rows: _Rows | None, probs: torch.Tensor) -> None:
        layout, run, (grad_q, grad_k, grad_v) = self.layout, self.run, self.grads
        if self.w_steps[0] is not None:  # the first step's A^T w goes straight into dv
            _adjoint(layout, rows, probs, self.w_steps[0], self.keeps[0], run.edge_p, grad_v, fresh=False)
        if not self.used:
            return
        pairs, _, bs, dim = self.states[0].shape
        if rows is None:
            ids, count = layout.wide_rows, pairs

            def take(x):
                return x[:, ids].flatten(1, 2)

            def keys_of(z):
                return z.flatten(1, 2)
        else:
            ids, count = rows.ids, pairs * rows.count

            def take(x):
                return _flat(_take(x, ids))

            def keys_of(z):
                return z.index_select(1, rows.keys).view(count, -1, z.shape[-1])

        dp = None
        for t in self.used:  # dP = sum_t w_t z_t^T, added up in place
            w_rows, z_keys = take(self.w_steps[t]), keys_of(self.states[t]).transpose(1, 2)
            keep = _keep_of(self.keeps[t], rows) if run.per_hop else None
            if keep is not None:  # this step's own edge mask
                term = torch.bmm(w_rows, z_keys).mul_(keep.reshape(probs.shape)).div_(1 - run.edge_p)
                dp = term if dp is None else dp.add_(term)
            else:
                dp = torch.bmm(w_rows, z_keys) if dp is None else dp.baddbmm_(w_rows, z_keys)
        shared = _keep_of(self.keeps[self.used[0]], rows) if run.edge_p > 0 and not run.per_hop else None
        if shared is not None:
            dp.mul_(shared.reshape(probs.shape)).div_(1 - run.edge_p)
        r_rows = take(self.r[..., None])
        grad_scores = dp.sub_(r_rows).mul_(probs).mul_(run.scale)
        dim_qk = self.q.shape[-1]
        if rows is None:
            grad_q[:, ids] = torch.bmm(grad_scores, self.k.flatten(1, 2)).unflatten(1, (len(ids), bs))
            grad_k.view(pairs, -1, dim_qk).baddbmm_(grad_scores.transpose(1, 2), take(self.q))
            return
        _put(grad_q, ids, torch.bmm(grad_scores, keys_of(self.k)).view(pairs, -1, bs, dim_qk))
        term = torch.bmm(grad_scores.transpose(1, 2), take(self.q))
        grad_k.index_add_(1, rows.keys, term.view(pairs, -1, bs, dim_qk))


# ----------------------------------------------------------------------------------------- op
def _as_pairs(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, padded_len, D)`` -> ``(B * H, blocks, block, D)``."""
    batch, heads, length, dim = x.shape
    return x.contiguous().view(batch * heads, length // block, block, dim)


def _forward(q, k, v, plan, real, steps, scale, statics, edge_p, per_hop, hop_p):
    """The forward of ``hopformer::gather_diffusion`` (see :func:`gather_diffusion`)."""
    batch, heads, length, _ = q.shape
    pairs = batch * heads
    real_pairs = None if real is None else real.repeat_interleave(heads, 0)  # (B*H, padded_len)
    layout = _Layout(plan, statics, real_pairs, q.dtype)
    q_blocks, k_blocks, v_blocks = (_as_pairs(x, layout.block) for x in (q, k, v))
    run = _Steps(tuple(steps), scale, edge_p, per_hop, hop_p)
    masks = _draw_masks(layout, pairs, v_blocks, run)
    out = torch.empty_like(v_blocks)
    for h in _pair_chunks(layout, pairs):
        chunk_real = None if real_pairs is None else real_pairs[h]
        chunk_masks = _chunk_masks(masks, h, run)
        attention, states = _forward_chunk(layout, q_blocks[h], k_blocks[h], v_blocks[h], chunk_real, chunk_masks, run)
        out[h] = states[-1]
        del attention, states  # free before the next chunk's
    return out.view(batch, heads, length, -1), *masks


def _backward(grad, q, k, v, out, plan, real, keeps, steps, scale, statics, edge_p, per_hop, hop_p):
    """The backward of ``hopformer::gather_diffusion``: ``(dq, dk, dv)``."""
    batch, heads, length, _ = q.shape
    real_pairs = None if real is None else real.repeat_interleave(heads, 0)
    layout = _Layout(plan, statics, real_pairs, q.dtype)
    q_blocks, k_blocks, v_blocks, out_blocks, grad_blocks = (_as_pairs(x, layout.block) for x in (q, k, v, out, grad))
    run = _Steps(tuple(steps), scale, edge_p, per_hop, hop_p)
    # dq: every row is written once (narrow or wide); dk adds up over the rows that read a key block.
    grads = torch.empty_like(q_blocks), torch.zeros_like(k_blocks), torch.empty_like(v_blocks)
    for h in _pair_chunks(layout, batch * heads):
        chunk_real = None if real_pairs is None else real_pairs[h]
        chunk = (q_blocks[h], k_blocks[h], v_blocks[h], grad_blocks[h], out_blocks[h])
        _backward_chunk(layout, *chunk, chunk_real, _chunk_masks(keeps, h, run), run, [g[h] for g in grads])
    return tuple(g.view(batch, heads, length, -1) for g in grads)


@torch.library.custom_op("hopformer::gather_diffusion", mutates_args=())
def _gather_diffusion_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    narrow_rows: torch.Tensor,
    narrow_keys: torch.Tensor,
    key_ok: torch.Tensor,
    token_mask: torch.Tensor,
    wide_rows: torch.Tensor,
    wide_mask: torch.Tensor,
    real: torch.Tensor | None,
    steps: Sequence[float],
    scale: float,
    num_uniform: int,
    first_row: int,
    uniform_bias: bool,
    wide_full: bool,
    edge_p: float,
    per_hop: bool,
    hop_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, narrow edge keep-masks, wide edge keep-masks, hop keep-masks)`` of ``(B, H, padded_len, D)``
    inputs; see :func:`gather_diffusion` and :class:`GatherPlan`."""
    plan = (narrow_rows, narrow_keys, key_ok, token_mask, wide_rows, wide_mask)
    statics = (num_uniform, first_row, uniform_bias, wide_full)
    with torch.no_grad():
        return _forward(q, k, v, plan, real, steps, scale, statics, edge_p, per_hop, hop_p)


@_gather_diffusion_op.register_fake
def _(q, k, v, narrow_rows, narrow_keys, key_ok, token_mask, wide_rows, wide_mask, real, steps, scale,
      num_uniform, first_row, uniform_bias, wide_full, edge_p, per_hop, hop_p):  # fmt: skip
    batch, heads, length, _ = q.shape
    n, width = narrow_keys.shape
    block = wide_mask.shape[1]
    draws = (len(steps) if per_hop else 1) if edge_p > 0 else 0
    hops = len(steps) if hop_p > 0 else 0
    return (
        v.new_empty(v.shape),
        q.new_empty((draws, batch * heads, n, block, width * block), dtype=torch.bool),
        q.new_empty((draws, batch * heads, wide_rows.shape[0] * block, length), dtype=torch.bool),
        q.new_empty((hops, batch * heads, length // block, block, v.shape[3]), dtype=torch.bool),
    )


@torch.library.custom_op("hopformer::gather_diffusion_backward", mutates_args=())
def _gather_diffusion_backward_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    narrow_rows: torch.Tensor,
    narrow_keys: torch.Tensor,
    key_ok: torch.Tensor,
    token_mask: torch.Tensor,
    wide_rows: torch.Tensor,
    wide_mask: torch.Tensor,
    real: torch.Tensor | None,
    narrow_keep: torch.Tensor,
    wide_keep: torch.Tensor,
    hop_keep: torch.Tensor,
    steps: Sequence[float],
    scale: float,
    num_uniform: int,
    first_row: int,
    uniform_bias: bool,
    wide_full: bool,
    edge_p: float,
    per_hop: bool,
    hop_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``hopformer::gather_diffusion`` given the gradient of its output."""
    plan = (narrow_rows, narrow_keys, key_ok, token_mask, wide_rows, wide_mask)
    keeps = (narrow_keep, wide_keep, hop_keep)
    statics = (num_uniform, first_row, uniform_bias, wide_full)
    with torch.no_grad():
        return _backward(grad, q, k, v, out, plan, real, keeps, steps, scale, statics, edge_p, per_hop, hop_p)


@_gather_diffusion_backward_op.register_fake
def _(grad, q, k, v, out, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_PLAN_INPUTS = 6  # narrow_rows .. wide_mask


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *plan = inputs[: 3 + _PLAN_INPUTS]
    real, *settings = inputs[3 + _PLAN_INPUTS :]
    out, narrow_keep, wide_keep, hop_keep = output
    ctx.has_real = real is not None
    real = real if real is not None else q.new_empty(0, dtype=torch.bool)
    ctx.save_for_backward(q, k, v, out, *plan, real, narrow_keep, wide_keep, hop_keep)
    ctx.settings = (list(settings[0]), *settings[1:])  # steps, scale, the plan's facts, dropout


def _backward_formula(ctx, grad, *_):
    q, k, v, out, *rest = ctx.saved_tensors
    plan, (real, *keeps) = rest[:_PLAN_INPUTS], rest[_PLAN_INPUTS:]
    dq, dk, dv = torch.ops.hopformer.gather_diffusion_backward(
        grad.contiguous(), q, k, v, out, *plan, real if ctx.has_real else None, *keeps, *ctx.settings
    )
    return dq, dk, dv, *([None] * (len(ctx.needs_input_grad) - 3))


_gather_diffusion_op.register_autograd(_backward_formula, setup_context=_setup_context)


def gather_diffusion(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    graph: BlockGraph,
    key_padding_mask: torch.Tensor | None,
    steps: list[float],
    scale: float,
    edge_dropout_p: float = 0.0,
    edge_dropout: str = "once",
    hop_dropout_p: float = 0.0,
) -> torch.Tensor:
    """Apply ``z <- lerp(A z, v, a)`` for each ``a`` in ``steps`` from ``z = v`` on the gather backend.

    ``steps=[0.0]`` is sparse attention (``A v``). Edge dropout keep-masks are sampled once
    (``edge_dropout="once"``) or per application (``"per_hop"``); ``hop_dropout_p`` drops features of
    every state after the mix. ``q``/``k`` and ``v`` may differ in their last dimension. Outputs at
    padded queries are not zeroed here (the caller does).
    """
    plan = gather_plan(graph, q.device)
    seq, pad = q.shape[2], graph.padded_len - q.shape[2]
    q, k, v = (F.pad(x, (0, 0, 0, pad)) if pad else x.contiguous() for x in (q, k, v))
    real = None if key_padding_mask is None else F.pad(key_padding_mask, (0, pad))
    out, *_ = torch.ops.hopformer.gather_diffusion(
        q, k, v, *plan.tensors(), real, [float(a) for a in steps], float(scale), *plan.statics(),
        float(edge_dropout_p), edge_dropout == "per_hop", float(hop_dropout_p),
    )  # fmt: skip
    return out[:, :, :seq] if pad else out


class GatherBackend:
    """``gather``: block-sparse attention in pure PyTorch with a written-out backward; any device."""

    name = "gather"
    summary = "pure PyTorch, block tiles gathered per query block; any device, every kind of dropout"
    support = Support(ops=("sparse_attention", "diffuse", "diffuse_weighted"), devices=("cpu", "cuda"))

    def diffuse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        graph: BlockGraph,
        key_padding_mask: torch.Tensor | None,
        steps: Sequence[float],
        scale: float,
        options: HopOptions = NO_OPTIONS,
    ) -> torch.Tensor:
        o = options
        return gather_diffusion(
            q, k, v, graph, key_padding_mask, steps, scale, o.dropout_p, o.edge_dropout, o.hop_dropout_p
        )


GATHER = GatherBackend()
