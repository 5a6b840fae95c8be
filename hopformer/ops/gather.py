"""The ``gather`` backend: block-sparse attention and diffusion in pure PyTorch, any device; the CPU path.

Each query block ("row") gathers its key blocks into one small dense problem: its ``block`` queries against the
``degree * block`` keys of its key blocks side by side, so every step is one batched matrix product over rows with a
long inner or outer dimension. Rows whose degree is close to the number of blocks (global rows) would make that
gather as large as dense attention; they are split out and computed against all keys ("wide" rows). Memory is
``O(seq * keys_per_query)``, never ``O(seq^2)`` for sparse graphs.

The attention ``A`` is computed once and applied ``hops`` times (one application is sparse attention), a few
(batch, head) pairs at a time. The whole computation is one op, ``hopformer::gather_diffusion`` (a
``torch.library`` custom op: one opaque node under ``torch.compile``), with a written-out backward
(``hopformer::gather_diffusion_backward``): it recomputes a chunk's ``A`` and hop states, runs the adjoint recurrence
``u <- A^T w`` and forms the score gradient of all hops at once, so nothing of the size of ``A`` and no state per hop
is kept between forward and backward (edge-dropout masks, one byte per edge, are). Each call works in one set of
buffers (:class:`_Workspace`): backward's peak is the gradients plus one chunk's ``A``, hop states and adjoint terms,
and a little scratch.

Rows whose mask is the same for every query (no causal diagonal; "uniform" rows) take their few missing keys (slots
past a row's degree, keys past the sequence) as an additive bias inside the score product, so they need no mask
pass; the others (causal diagonals, or any row under key padding) are masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph
from hopformer.graphs.tracing import exporting
from hopformer.ops.backend import NO_OPTIONS, HopOptions, Support

# A narrow row costs about this much more per key than a wide (dense) row, for the gather copies.
_GATHER_OVERHEAD = 1.5
# Attention probabilities kept alive at once (elements): (batch, head) pairs are processed in chunks of about this
# size, and each chunk's attention and hop states are recomputed in backward, not stored.
CHUNK_ELEMENTS = 1 << 22
# Elements of the temporaries of one row chunk (gathered keys or states and a product of their size): rows are
# visited a few at a time so that these stay small beside the attention; in the score gradient (every step's states
# of the key blocks, and dP) a few more.
ROW_CHUNK_ELEMENTS = 1 << 18
SCORE_CHUNK_ELEMENTS = 1 << 19


# ----------------------------------------------------------------------------------------- plan
@dataclass
class GatherPlan:
    """Device-side layout of a graph for the gather backend (built once per graph and device).

    Narrow rows come in two groups: the first ``num_uniform`` have one key mask for all their queries
    (``key_ok``: not a padded slot, not a key past the sequence), the others need a token mask (``token_mask``:
    causal diagonals, or rows without any key, which must come out zero). ``uniform_first`` / ``masked_first``:
    the first block row of a group whose rows are consecutive (-1 otherwise), so that it is read and written as a
    slice.
    """

    narrow_rows: torch.Tensor  # (n,) query blocks computed by gathering: uniform rows, then masked rows
    narrow_keys: torch.Tensor  # (n, d) key blocks per narrow row (padded slots point at block 0)
    key_ok: torch.Tensor  # (n, d * block) keys of each narrow row that exist
    token_mask: torch.Tensor  # (n - num_uniform, block, d * block) edges of the masked rows
    wide_rows: torch.Tensor  # (w,) query blocks computed against all keys
    wide_mask: torch.Tensor  # (w, block, padded_len) token-level edges of the wide rows
    num_uniform: int
    uniform_first: int
    masked_first: int
    uniform_bias: bool  # some uniform row has a missing key: its scores get a bias
    wide_full: bool  # every wide row sees every key: no mask without key padding

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The index and mask tensors, in the order the op takes them."""
        return self.narrow_rows, self.narrow_keys, self.key_ok, self.token_mask, self.wide_rows, self.wide_mask

    def statics(self) -> tuple[int, int, int, bool, bool]:
        """The plan's Python facts, in the order the op takes them."""
        return self.num_uniform, self.uniform_first, self.masked_first, self.uniform_bias, self.wide_full


def gather_plan(graph: BlockGraph, device: torch.device) -> GatherPlan:
    """The :class:`GatherPlan` of ``graph`` on ``device``, cached on the graph."""
    return graph.view(_build_plan, str(device))


def _first_of_range(rows: torch.Tensor) -> int:
    if not len(rows):
        return 0
    first = int(rows[0])
    return first if torch.equal(rows, torch.arange(first, first + len(rows))) else -1


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
    group = torch.argsort((~uniform).to(torch.int8), stable=True)  # uniform rows first, each group in row order
    narrow_rows, narrow_keys, key_ok, token_mask = (x[group] for x in (narrow_rows, narrow_keys, key_ok, token_mask))
    num_uniform = int(uniform.sum())

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
        _first_of_range(narrow_rows[:num_uniform]),
        _first_of_range(narrow_rows[num_uniform:]),
        not bool(key_ok[:num_uniform].all()),
        bool(wide_mask.all()),
    )


# --------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Steps:
    """What one call runs: the step weights and the settings every chunk shares."""

    weights: tuple[float, ...]  # a_t per step, in application order
    scale: float
    edge_p: float
    per_hop: bool  # edge dropout draws a mask per step (else one for all)
    hop_p: float


@dataclass
class _Group:
    """Narrow rows that share a way of masking: positions ``span`` of the narrow table, their block rows ``ids``
    (a slice where consecutive) and key blocks ``keys`` ``(n_g * d,)``."""

    span: slice
    rows: torch.Tensor
    ids: slice | torch.Tensor
    keys: torch.Tensor
    uniform: bool

    @property
    def count(self) -> int:
        return self.span.stop - self.span.start


def _take(x: torch.Tensor, ids: slice | torch.Tensor) -> torch.Tensor:
    """Block rows ``ids`` of ``x`` ``(G, nb, ...)``: a view where they are consecutive."""
    return x[:, ids] if isinstance(ids, slice) else x.index_select(1, ids)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(G, r, ...)`` -> ``(G * r, ...)`` (a view where possible)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _put(out: torch.Tensor, ids: slice | torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` ``(G, r, ...)`` into block rows ``ids`` of ``out``."""
    if isinstance(ids, slice):
        out[:, ids] = value
    else:
        out.index_copy_(1, ids, value)


def _rows_out(out: torch.Tensor, ids: slice | torch.Tensor) -> torch.Tensor | None:
    """``out``'s block rows ``ids`` as a ``(G * r, ...)`` view to write a product into, or None when they are not
    one contiguous stretch (then the product goes through :func:`_put`)."""
    if isinstance(ids, slice) and out.shape[0] == 1:
        return out[0, ids]
    return None


class _Layout:
    """One call's view of the plan: the row groups, sizes and the padding mask, shared by every chunk."""

    def __init__(self, plan, statics, real: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.narrow_rows, self.narrow_keys, self.key_ok, self.token_mask, self.wide_rows, self.wide_mask = plan
        num_uniform, uniform_first, masked_first, uniform_bias, self.wide_full = statics
        self.num_uniform = num_uniform
        self.real = real  # (pairs, padded_len) or None
        self.n, self.width = self.narrow_keys.shape
        self.block = self.wide_mask.shape[1]
        self.length = self.wide_mask.shape[2]
        self.wide = self.wide_rows.numel()
        self.groups = []
        for span, first, uniform in (
            (slice(0, num_uniform), uniform_first, True),
            (slice(num_uniform, self.n), masked_first, False),
        ):
            if span.stop > span.start:
                rows = self.narrow_rows[span]
                ids = slice(first, first + span.stop - span.start) if first >= 0 else rows
                self.groups.append(_Group(span, rows, ids, self.narrow_keys[span].flatten(), uniform))
        # Missing keys of uniform rows as an additive bias: exp underflows to exactly 0 there.
        self.bias = None
        if uniform_bias and real is None:
            ok = self.key_ok[:num_uniform]
            self.bias = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)
        if real is not None:  # token positions of each narrow row's queries and keys, for the padding mask
            offsets = torch.arange(self.block, device=real.device)
            self.key_pos = (self.narrow_keys[:, :, None] * self.block + offsets).flatten(1)
            self.row_pos = self.narrow_rows[:, None] * self.block + offsets

    def mask(self, group: _Group, real: torch.Tensor | None) -> torch.Tensor | None:
        """The edges of a group for pairs with padding ``real`` ``(G, padded_len)``, broadcastable to
        ``(G, n_g, block, d * block)``; None where the bias (or nothing) covers them."""
        span = group.span
        masked = slice(span.start - self.num_uniform, span.stop - self.num_uniform)
        if real is None:
            return None if group.uniform else self.token_mask[masked][None]
        base = self.key_ok[span][:, None, :] if group.uniform else self.token_mask[masked]
        keys_real = real[:, self.key_pos[span]]  # (G, n_g, d*bs)
        rows_real = real[:, self.row_pos[span]]  # (G, n_g, bs)
        return base & keys_real[:, :, None, :] & rows_real[:, :, :, None]

    def wide_allowed(self, real: torch.Tensor | None) -> torch.Tensor | None:
        """The wide rows' edges ``(G or 1, w * block, padded_len)``; None when they see every key."""
        if real is None:
            return None if self.wide_full else self.wide_mask.flatten(0, 1)[None]
        pairs = real.shape[0]
        rows_real = real.view(pairs, -1, self.block)[:, self.wide_rows].flatten(1)
        return self.wide_mask.flatten(0, 1)[None] & real[:, None, :] & rows_real[:, :, None]

    def row_chunk(self, pairs: int, per_row: int, budget: int) -> int:
        """Rows per chunk so that ``per_row`` elements a row for ``pairs`` pairs stay near ``budget``."""
        if exporting():  # an exported program takes any batch size: sizes must not depend on it
            return max(self.n, 1)
        return max(1, min(self.n, budget // max(pairs * per_row, 1)))


def _softmax_(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dimension in place, on the ``mask``'s entries (all where None); masked entries and
    rows with nothing allowed come out exactly 0."""
    if mask is not None:
        masked = ~mask
        scores.masked_fill_(masked, torch.finfo(scores.dtype).min)
    if scores.device.type == "cpu":  # the CPU kernel reads each row before writing it: in place is safe
        torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    else:
        scores.copy_(torch.softmax(scores, -1))
    if mask is not None:
        scores.masked_fill_(masked, 0.0)
    return scores


# ------------------------------------------------------------------------------------ workspace
def _row_slices(count: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _sub_ids(ids: slice | torch.Tensor, rows: slice) -> slice | torch.Tensor:
    """Rows ``rows`` of a group's block rows ``ids``."""
    return slice(ids.start + rows.start, ids.start + rows.stop) if isinstance(ids, slice) else ids[rows]


def _slab(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first elements of a flat ``buffer`` as a contiguous tensor of ``shape``."""
    count = 1
    for size in shape:
        count *= size
    return buffer[:count].view(shape)


class _Workspace:
    """The buffers of one call, sized for one chunk of ``pairs`` (batch, head) pairs and reused by every chunk: the
    attention, the hop states and one scratch area for the row-chunk temporaries. The hops, the adjoint and the
    score gradient of the wide rows take their temporaries (and the adjoint's state) from the front of the
    scratch area; the score gradient of the narrow rows, which comes last, from the wide rows' attention once
    they are done, where it is large enough. Each buffer is allocated once, so the memory a call touches is its
    live peak, not the sum of many short-lived tensors of varying sizes."""

    def __init__(self, layout: _Layout, pairs: int, like: torch.Tensor, dim_qk: int, dim_v: int, steps: int,
                 backward: bool) -> None:  # fmt: skip
        bs, width, nb, length = layout.block, layout.width * layout.block, layout.length // layout.block, layout.length
        dim = max(dim_qk, dim_v)

        def empty(*shape: int) -> torch.Tensor:
            return like.new_empty(shape)

        self.probs = [empty(pairs, group.count, bs, width) for group in layout.groups]
        self.wide = empty(pairs, layout.wide * bs, length) if layout.wide else None
        # gathered keys or states of a few rows (or their transposed product, in the adjoint), and the rows'
        # outputs where they cannot go straight into place. Several pairs in a chunk: a short sequence, whose
        # temporaries are small anyway; whole groups then write their products straight into place (a row chunk of
        # several pairs is not contiguous).
        self.rows = layout.row_chunk(pairs, width * dim, ROW_CHUNK_ELEMENTS) if pairs == 1 else max(layout.n, 1)
        gather = pairs * self.rows * width * max(dim, bs)
        term = pairs * self.rows * bs * (dim if pairs == 1 else max(dim, width))  # one pair: scores go in place
        hops = {"gather": gather, "term": term, "wide_term": pairs * layout.wide * bs * dim}
        if not backward:
            hops["z0"] = hops["z1"] = pairs * nb * bs * dim_v  # the forward's states, in turn
        elif dim_qk != dim_v:  # the adjoint's state (else it lives in dq's room until dq is written)
            hops["u"] = pairs * nb * bs * dim_v
        narrow, wide = {}, {}
        if backward:
            self.states = empty(pairs, nb, bs, max(steps - 1, 1), dim_v)  # z_1 .. z_{T-1} side by side (z_0 = v)
            self.w = empty(pairs, nb, bs, steps, dim_v)  # w_0 .. w_{T-1} side by side
            # the score gradient of a few rows: every step's states of their key blocks, dP, their keys, products
            per_row = width * (steps * dim_v + bs + dim_qk + max(dim_qk, bs))
            self.score_rows = layout.row_chunk(pairs, per_row, SCORE_CHUNK_ELEMENTS)
            narrow = {
                "score_keys": pairs * self.score_rows * width * max(steps - 1, 1) * dim_v,
                "keys": pairs * self.score_rows * width * dim,
                "score": pairs * self.score_rows * bs * width,
                "score_term": pairs * self.score_rows * width * max(dim_qk, bs),
            }
            self.wide_queries = max(1, min(layout.wide * bs, ROW_CHUNK_ELEMENTS // max(2 * pairs * length, 1)))
            if exporting():
                self.wide_queries = max(layout.wide * bs, 1)
            wide = {"wide_score": pairs * self.wide_queries * length, "wide_dq": pairs * self.wide_queries * dim_qk}
        in_wide = self.wide is not None and sum(narrow.values()) <= self.wide.numel()
        scratch = empty(max(sum(hops.values()) + sum(wide.values()), 0 if in_wide else sum(narrow.values())))
        self._views(scratch, hops)
        self._views(scratch[sum(hops.values()) :], wide)
        self._views(self.wide.view(-1) if in_wide else scratch, narrow)

    def _views(self, buffer: torch.Tensor, sizes: dict[str, int]) -> None:
        start = 0
        for name, size in sizes.items():
            setattr(self, name, buffer[start : start + size])
            start += size


# ------------------------------------------------------------------------------------ attention
class _Attention:
    """The attention ``A`` of one chunk of ``G`` (batch, head) pairs, in the workspace: per narrow group the
    probabilities ``(G, n_g, block, d * block)`` (queries against all their key blocks side by side), and the wide
    rows' ``(G, w * block, padded_len)``. Every pass visits the narrow rows a few at a time
    (:meth:`_Layout.row_chunk`), so the gathered keys or states of a row chunk stay small beside ``A``."""

    def __init__(self, layout: _Layout, work: _Workspace, q: torch.Tensor, k: torch.Tensor, real, scale: float):
        self.layout, self.work = layout, work
        pairs, _, bs, dim = q.shape
        width = layout.width * bs
        self.narrow = [probs[:pairs] for probs in work.probs]
        for group, probs in zip(layout.groups, self.narrow):
            mask = layout.mask(group, real)
            for rows in _row_slices(group.count, work.rows):
                count = rows.stop - rows.start
                q_rows = _flat(_take(q, _sub_ids(group.ids, rows)))  # (G * r, bs, D)
                keys = group.keys[rows.start * layout.width : rows.stop * layout.width]
                k_keys = _slab(work.gather, pairs, count * layout.width, bs, dim)
                torch.index_select(k, 1, keys, out=k_keys)
                k_keys = k_keys.view(pairs * count, width, dim).transpose(1, 2)
                direct = pairs == 1 or count == group.count  # probs[:, rows] is one contiguous stretch
                target = _flat(probs[:, rows]) if direct else _slab(work.term, pairs * count, bs, width)
                if group.uniform and layout.bias is not None:  # scores = bias + scale q k^T in one product
                    bias = layout.bias[group.span][rows][:, None, :]  # (r, 1, d*bs): broadcast over the queries
                    bias = bias if pairs == 1 else bias.repeat(pairs, 1, 1)
                    torch.baddbmm(bias, q_rows, k_keys, alpha=scale, out=target)
                else:
                    torch.baddbmm(q_rows.new_empty(()), q_rows, k_keys, beta=0, alpha=scale, out=target)
                _softmax_(target.view(pairs, count, bs, width), None if mask is None else mask[:, rows])
                if not direct:
                    probs[:, rows] = target.view(pairs, count, bs, width)
        self.wide = None
        if layout.wide:
            q_rows = q[:, layout.wide_rows].flatten(1, 2)  # (G, w*bs, D)
            self.wide = work.wide[:pairs]
            torch.baddbmm(q_rows.new_empty(()), q_rows, k.flatten(1, 2).transpose(1, 2), beta=0, alpha=scale,
                          out=self.wide)  # fmt: skip
            _softmax_(self.wide, layout.wide_allowed(real))

    @staticmethod
    def _dropped(probs: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
        return probs if keep is None else probs * keep.view(probs.shape) / (1 - p)

    def narrow_rows(self, index: int, rows: slice, keeps=None, p: float = 0.0) -> torch.Tensor:
        """Probabilities of rows ``rows`` of narrow group ``index``, ``(G * r, bs, d * bs)`` (through the edge
        dropout of ``keeps``)."""
        probs = _flat(self.narrow[index][:, rows])
        return probs if keeps is None else self._dropped(probs, _flat(keeps[0][index][:, rows]), p)

    def apply(self, z: torch.Tensor, v: torch.Tensor, a: float, out: torch.Tensor, keeps=None, p: float = 0.0):
        """``out = lerp(A z, v, a)`` on blocks ``(G, nb, bs, D)`` (every block row is narrow or wide); ``keeps``:
        the edge keep-masks ``(narrow per group, wide)``."""
        layout, work = self.layout, self.work
        pairs, _, bs, dim = z.shape
        for index, group in enumerate(layout.groups):
            for rows in _row_slices(group.count, work.rows):
                count, ids = rows.stop - rows.start, _sub_ids(group.ids, rows)
                keys = group.keys[rows.start * layout.width : rows.stop * layout.width]
                z_keys = _slab(work.gather, pairs, count * layout.width, bs, dim)
                torch.index_select(z, 1, keys, out=z_keys)
                z_keys = z_keys.view(pairs * count, -1, dim)
                v_rows = _flat(_take(v, ids))
                probs = self.narrow_rows(index, rows, keeps, p)
                target = _rows_out(out, ids)
                if target is not None:  # straight into the output rows
                    torch.baddbmm(v_rows, probs, z_keys, beta=a, alpha=1 - a, out=target)
                else:
                    term = _slab(work.term, pairs * count, bs, dim)
                    torch.baddbmm(v_rows, probs, z_keys, beta=a, alpha=1 - a, out=term)
                    _put(out, ids, term.view(pairs, count, bs, dim))
        if self.wide is not None:
            probs = self._dropped(self.wide, None if keeps is None else keeps[1], p)
            v_rows = v[:, layout.wide_rows].flatten(1, 2)
            term = _slab(work.wide_term, pairs, layout.wide * bs, dim)
            torch.baddbmm(v_rows, probs, z.flatten(1, 2), beta=a, alpha=1 - a, out=term)
            out.index_copy_(1, layout.wide_rows, term.view(pairs, layout.wide, bs, dim))
        return out

    def apply_transposed(self, w: torch.Tensor, out: torch.Tensor, keeps=None, p: float = 0.0) -> torch.Tensor:
        """``out += A^T w`` on blocks (``out`` contiguous)."""
        layout, work = self.layout, self.work
        pairs, _, bs, dim = w.shape
        if self.wide is not None:  # the wide rows reach every key: one product over all of them
            probs = self._dropped(self.wide, None if keeps is None else keeps[1], p)
            out.view(pairs, -1, dim).baddbmm_(probs.transpose(1, 2), w[:, layout.wide_rows].flatten(1, 2))
        for index, group in enumerate(layout.groups):
            w_rows = _take(w, group.ids)
            for rows in _row_slices(group.count, work.rows):
                count = rows.stop - rows.start
                probs = self.narrow_rows(index, rows, keeps, p)
                term = _slab(work.gather, pairs * count, layout.width * bs, dim)
                torch.bmm(probs.transpose(1, 2), _flat(w_rows[:, rows]), out=term)  # (G * r, d * bs, D)
                keys = group.keys[rows.start * layout.width : rows.stop * layout.width]
                out.index_add_(1, keys, term.view(pairs, -1, bs, dim))
        return out


# ---------------------------------------------------------------------------------------- steps
def _pair_chunks(layout: _Layout, pairs: int) -> list[slice]:
    if exporting():  # an exported program takes any batch size: one chunk
        return [slice(0, pairs)]
    per_pair = layout.n * layout.block * layout.width * layout.block + layout.wide_mask.numel()
    size = max(1, min(pairs, CHUNK_ELEMENTS // max(per_pair, 1)))
    return [slice(g, min(g + size, pairs)) for g in range(0, pairs, size)]


def _draw_masks(layout: _Layout, pairs: int, v_blocks: torch.Tensor, run: _Steps):
    """The dropout keep-masks of the whole call, drawn once in forward (backward meets the same ones): edge
    masks ``(E, pairs, n, bs, d*bs)`` and ``(E, pairs, w*bs, padded_len)`` with ``E`` = 1, or the number of steps
    when drawn per step, and hop masks ``(T, *v_blocks)``; a kind not drawn is an empty ``(0,)`` tensor."""
    return _mask_shapes(layout.n, layout.width, layout.wide, layout.block, layout.length, pairs, v_blocks.shape[-1],
                        run.weights, run.edge_p, run.per_hop, run.hop_p, v_blocks.device, draw=True)  # fmt: skip


def _mask_shapes(n, width, wide, block, length, pairs, dim, steps, edge_p, per_hop, hop_p, device, draw: bool):
    """The op's dropout keep-mask outputs (see :func:`_draw_masks`): drawn, or left uninitialised (the fake op's)."""
    draws = (len(steps) if per_hop else 1) if edge_p > 0 else 0
    hops = len(steps) if hop_p > 0 else 0

    def masks(count: int, p: float, *shape: int) -> torch.Tensor:
        if not count:
            return torch.empty(0, dtype=torch.bool, device=device)
        out = torch.empty(count, *shape, dtype=torch.bool, device=device)
        if draw:
            for index in range(count):
                out[index] = torch.rand(shape, device=device) >= p
        return out

    return (
        masks(draws, edge_p, pairs, n, block, width * block),
        masks(draws, edge_p, pairs, wide * block, length),
        masks(hops, hop_p, pairs, length // block, block, dim),
    )


def _chunk_masks(layout: _Layout, masks, h: slice, run: _Steps):
    """Per step: the edge keep-masks ``([narrow per group], wide)`` of pairs ``h`` (None without edge dropout) and
    the hop keep-mask (None without hop dropout)."""
    narrow, wide, hop = masks
    edge = [None] * len(run.weights)
    if narrow.shape[0]:
        for t in range(len(edge)):
            draw = t if run.per_hop else 0
            groups = [narrow[draw, h, group.span] for group in layout.groups]
            edge[t] = (groups, wide[draw, h])
    hops = [hop[t, h] if hop.shape[0] else None for t in range(len(run.weights))]
    return edge, hops


def _hop_dropout_(z: torch.Tensor, keep: torch.Tensor | None, run: _Steps) -> torch.Tensor:
    return z if keep is None else z.mul_(keep).div_(1 - run.hop_p)


def _forward_chunk(layout: _Layout, work: _Workspace, q, k, v, real, masks, run: _Steps, out: torch.Tensor):
    """The steps ``z_t = drop(lerp(A z_{t-1}, v, a_t))`` from ``z_0 = v`` for one chunk of pairs (``a_t = 1``
    resets the state to ``v`` without attending), ``z_T`` into ``out``."""
    keeps, hop_keeps = masks
    attention = _Attention(layout, work, q, k, real, run.scale)
    pairs, nb, bs, dim = v.shape
    steps = len(run.weights)
    buffers = [_slab(work.z0, pairs, nb, bs, dim), _slab(work.z1, pairs, nb, bs, dim)]
    z = v
    for t, a in enumerate(run.weights):
        target = out if t == steps - 1 else buffers[t % 2]
        if a >= 1.0:
            target.copy_(v)
        else:
            attention.apply(z, v, a, target, keeps[t], run.edge_p)
        z = _hop_dropout_(target, hop_keeps[t], run)


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x * y).sum(-1)`` without the full-size product (a batched product: no temporary of ``x``'s size)."""
    return torch.einsum("gnbd,gnbd->gnb", x, y)


def _backward_chunk(layout: _Layout, work: _Workspace, q, k, v, grad, final, real, masks, run: _Steps, grads):
    """Write the gradients of one chunk of pairs' q, k, v blocks into ``grads`` (views of the full ones).

    Adjoint sweep: ``u = dL/dz_{t+1}`` (``z_{t+1}`` the output of step ``t``), ``u'`` = u through the hop dropout,
    ``w_t = dL/d(A z_t) = (1 - a_t) u'`` (kept side by side for the score gradient) and ``u <- A^T w_t``. The
    softmax needs ``r_i = sum_t w_t,i . (A z_t)_i``; solving the mix for ``A z_t`` gives
    ``r_i = sum_t u'_t,i . ((1 - hop_p) z_{t+1} - a_t v)_i`` (u' is zero where hop dropout zeroed ``z_{t+1}``),
    so ``A z_t`` is never needed; the v terms add up to ``(sum_t a_t u'_t) . v``. Then per row chunk the score
    gradient ``dS = scale * P * (dP - r)`` with ``dP = sum_t w_t z_t^T`` as one product over the steps after the
    first (their states side by side) and one for ``z_0 = v``."""
    keeps, hop_keeps = masks
    grad_q, grad_k, grad_v = grads
    steps = len(run.weights)
    pairs, nb, bs, dim = v.shape

    # Rebuild A and the states z_1 .. z_{T-1} (side by side: a gather of key blocks brings every step's at once)
    attention = _Attention(layout, work, q, k, real, run.scale)
    states, w_all = work.states[:pairs], work.w[:pairs]
    # the adjoint's state: in the room of this chunk's dq, which the score gradient writes only at the end
    u_buffer = grad_q if grad_q.shape == v.shape else _slab(work.u, pairs, nb, bs, dim)

    def state(t: int) -> torch.Tensor:  # z_t, for t < T
        return v if t == 0 else states[..., t - 1, :]

    # Each hop reads the last state from a contiguous buffer (a strided slot would be copied by every gather) and
    # writes into the other; w's room, idle until the adjoint, is the second buffer.
    buffers, z = [u_buffer, _slab(w_all.view(-1), pairs, nb, bs, dim)], v
    for t in range(steps - 1):
        a, target = run.weights[t], buffers[t % 2]
        if a >= 1.0:
            target.copy_(v)
        else:
            attention.apply(z, v, a, target, keeps[t], run.edge_p)
        if hop_keeps[t] is not None:
            target.mul_(hop_keeps[t]).div_(1 - run.hop_p)
        states[..., t, :] = z = target

    w_all.zero_()  # zero for skipped (a == 1) steps
    r = None
    grad_v.zero_()
    resets = None  # gradient of states that a step of weight 1 reset to v
    u = grad
    for t in reversed(range(steps)):
        if hop_keeps[t] is not None:
            u = u * hop_keeps[t] / (1 - run.hop_p)
        a = run.weights[t]
        if a >= 1.0:
            resets = u.clone() if resets is None else resets.add_(u)
            u = u_buffer.zero_()
            continue
        if a > 0:
            grad_v.add_(u, alpha=a)
        z_next = state(t + 1) if t + 1 < steps else final
        dot = _rowdot(u, z_next)
        r = dot.mul_(1 - run.hop_p) if r is None else r.add_(dot, alpha=1 - run.hop_p)
        w = torch.mul(u, 1 - a, out=w_all[..., t, :])
        if t > 0:  # (u is spent: its buffer takes A^T w)
            u = attention.apply_transposed(w, u_buffer.zero_(), keeps[t], run.edge_p)
    if r is not None:
        r.sub_(_rowdot(grad_v, v))  # the v terms: grad_v holds sum_t a_t u'_t so far
        attention.apply_transposed(w_all[..., 0, :], grad_v, keeps[0], run.edge_p)  # dv += A^T w_0
    if resets is not None:
        grad_v.add_(resets)
    if r is None:  # every step reset the state: no attention was applied
        grad_q.zero_()
        grad_k.zero_()
        return
    del u, resets
    _score_gradient(layout, work, attention, q, k, v, states, w_all, r, keeps, run, grad_q, grad_k)


def _score_gradient(layout: _Layout, work: _Workspace, attention: _Attention, q, k, v, states, w_all, r, keeps, run,
                    grad_q, grad_k):  # fmt: skip
    """``dS = P * (dP - r)``, ``dP = sum_t w_t z_t^T`` on the edges, then ``dq = scale dS k`` and
    ``dk += scale dS^T q``: the wide rows a few queries at a time, then the narrow rows a few rows at a time (their
    temporaries in the wide rows' attention, which is then spent)."""
    pairs, nb, bs, steps, dim = w_all.shape
    dim_qk = q.shape[-1]
    width = layout.width * bs
    used = [t for t in range(steps) if run.weights[t] < 1.0]
    per_step = run.edge_p > 0 and run.per_hop

    def dp(w_rows, v_keys, z_keys, keep_of, out):
        """``sum_t w_t z_t^T`` ``(rows, queries, keys)`` into ``out`` from ``w_rows`` ``(rows, queries, T, D)``,
        ``v_keys`` ``(rows, keys, D)`` (z_0) and ``z_keys`` ``(rows, keys, T - 1, D)``; each step's term scaled by
        its edge mask where masks are drawn per step."""
        if not per_step:
            torch.bmm(w_rows[..., 0, :], v_keys.transpose(1, 2), out=out)
            if steps > 1:
                out.baddbmm_(w_rows[..., 1:, :].flatten(-2), z_keys.flatten(-2).transpose(1, 2))
            keep = keep_of(used[0]) if run.edge_p > 0 else None
            return out if keep is None else out.mul_(keep).div_(1 - run.edge_p)
        out.zero_()
        for t in used:
            keys = v_keys if t == 0 else z_keys[..., t - 1, :]
            term = torch.bmm(w_rows[..., t, :], keys.transpose(1, 2))
            out.add_(term.mul_(keep_of(t)), alpha=1 / (1 - run.edge_p))
        return out

    if attention.wide is not None:
        w_rows_all = w_all[:, layout.wide_rows].flatten(1, 2)  # (G, w*bs, T, D)
        q_rows_all, r_rows = q[:, layout.wide_rows].flatten(1, 2), r[:, layout.wide_rows].flatten(1)
        dq_all = torch.empty_like(q_rows_all)
        for queries in _row_slices(layout.wide * bs, work.wide_queries):
            count = queries.stop - queries.start

            def wide_keep(t, queries=queries):
                return keeps[t][1][:, queries]

            grad_scores = _slab(work.wide_score, pairs, count, layout.length)
            dp(w_rows_all[:, queries], v.flatten(1, 2), states.flatten(1, 2), wide_keep, grad_scores)
            grad_scores.sub_(r_rows[:, queries, None]).mul_(attention.wide[:, queries])
            torch.bmm(grad_scores, k.flatten(1, 2), out=_slab(work.wide_dq, pairs, count, dim_qk))
            dq_all[:, queries] = _slab(work.wide_dq, pairs, count, dim_qk)
            grad_k.view(pairs, -1, dim_qk).baddbmm_(
                grad_scores.transpose(1, 2), q_rows_all[:, queries], alpha=run.scale
            )
        dq_all.mul_(run.scale)
        grad_q.index_copy_(1, layout.wide_rows, dq_all.view(pairs, layout.wide, bs, dim_qk))
        attention.wide = None  # spent: the narrow rows' temporaries may take its room
    for index, group in enumerate(layout.groups):
        probs = attention.narrow[index]
        w_rows_all, q_rows_all, r_rows = _take(w_all, group.ids), _take(q, group.ids), _take(r, group.ids)
        for rows in _row_slices(group.count, work.score_rows):
            count = rows.stop - rows.start
            keys = group.keys[rows.start * layout.width : rows.stop * layout.width]
            z_keys = _slab(work.score_keys, pairs, count * layout.width, bs, max(steps - 1, 1), dim)
            if steps > 1:
                torch.index_select(states, 1, keys, out=z_keys)
            v_keys = _slab(work.keys, pairs, count * layout.width, bs, dim)
            torch.index_select(v, 1, keys, out=v_keys)

            def narrow_keep(t, index=index, rows=rows):
                return _flat(keeps[t][0][index][:, rows]).view(-1, bs, width)

            grad_scores = _slab(work.score, pairs * count, bs, width)
            w_rows = _flat(w_rows_all[:, rows])
            dp(w_rows, v_keys.view(pairs * count, width, dim), z_keys.view(pairs * count, width, -1, dim),
               narrow_keep, grad_scores)  # fmt: skip
            grad_scores.sub_(_flat(r_rows[:, rows])[..., None]).mul_(_flat(probs[:, rows]))
            k_keys = _slab(work.keys, pairs, count * layout.width, bs, dim_qk)
            torch.index_select(k, 1, keys, out=k_keys)
            dq_rows = _slab(work.score_term, pairs * count, bs, dim_qk)
            torch.bmm(grad_scores, k_keys.view(pairs * count, width, dim_qk), out=dq_rows)
            _put(grad_q, _sub_ids(group.ids, rows), dq_rows.mul_(run.scale).view(pairs, count, bs, dim_qk))
            term = _slab(work.score_term, pairs * count, width, dim_qk)
            torch.bmm(grad_scores.transpose(1, 2), _flat(q_rows_all[:, rows]), out=term)  # (G*r, d*bs, D)
            grad_k.index_add_(1, keys, term.view(pairs, -1, bs, dim_qk), alpha=run.scale)


# ------------------------------------------------------------------------------------------- op
def _as_pairs(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, padded_len, D)`` -> ``(B * H, blocks, block, D)``."""
    batch, heads, length, dim = x.shape
    return x.contiguous().view(batch * heads, length // block, block, dim)


def _forward(q, k, v, plan, real, steps, scale, statics, edge_p, per_hop, hop_p):
    """The forward of ``hopformer::gather_diffusion`` (see :func:`gather_diffusion`): the output and the dropout
    masks drawn."""
    batch, heads, length, _ = q.shape
    pairs = batch * heads
    real_pairs = None if real is None else real.repeat_interleave(heads, 0)  # (B*H, padded_len)
    layout = _Layout(plan, statics, real_pairs, q.dtype)
    q_blocks, k_blocks, v_blocks = (_as_pairs(x, layout.block) for x in (q, k, v))
    run = _Steps(tuple(steps), scale, edge_p, per_hop, hop_p)
    masks = _draw_masks(layout, pairs, v_blocks, run)
    out = torch.empty_like(v_blocks)
    chunks = _pair_chunks(layout, pairs)
    work = _Workspace(layout, chunks[0].stop, v, q.shape[-1], v.shape[-1], len(steps), backward=False)
    for h in chunks:
        chunk_real = None if real_pairs is None else real_pairs[h]
        chunk_masks = _chunk_masks(layout, masks, h, run)
        _forward_chunk(layout, work, q_blocks[h], k_blocks[h], v_blocks[h], chunk_real, chunk_masks, run, out[h])
    return out.view(batch, heads, length, -1), *masks


def _backward(grad, q, k, v, out, plan, real, keeps, steps, scale, statics, edge_p, per_hop, hop_p):
    """The backward of ``hopformer::gather_diffusion``: ``(dq, dk, dv)``."""
    batch, heads, length, _ = q.shape
    real_pairs = None if real is None else real.repeat_interleave(heads, 0)
    layout = _Layout(plan, statics, real_pairs, q.dtype)
    blocks = [_as_pairs(x, layout.block) for x in (q, k, v, out, grad)]
    run = _Steps(tuple(steps), scale, edge_p, per_hop, hop_p)
    # dq: every row is written once (narrow or wide); dk adds up over the rows that read a key block.
    grads = torch.empty_like(blocks[0]), torch.zeros_like(blocks[1]), torch.empty_like(blocks[2])
    chunks = _pair_chunks(layout, batch * heads)
    work = _Workspace(layout, chunks[0].stop, v, q.shape[-1], v.shape[-1], len(steps), backward=True)
    for h in chunks:
        chunk_real = None if real_pairs is None else real_pairs[h]
        q_h, k_h, v_h, out_h, grad_h = (x[h] for x in blocks)
        chunk_masks = _chunk_masks(layout, keeps, h, run)
        _backward_chunk(layout, work, q_h, k_h, v_h, grad_h, out_h, chunk_real, chunk_masks, run, [g[h] for g in grads])
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
    uniform_first: int,
    masked_first: int,
    uniform_bias: bool,
    wide_full: bool,
    edge_p: float,
    per_hop: bool,
    hop_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, narrow edge keep-masks, wide edge keep-masks, hop keep-masks)`` of ``(B, H, padded_len, D)``
    inputs; see :func:`gather_diffusion` and :class:`GatherPlan`."""
    plan = (narrow_rows, narrow_keys, key_ok, token_mask, wide_rows, wide_mask)
    statics = (num_uniform, uniform_first, masked_first, uniform_bias, wide_full)
    with torch.no_grad():
        return _forward(q, k, v, plan, real, steps, scale, statics, edge_p, per_hop, hop_p)


@_gather_diffusion_op.register_fake
def _(q, k, v, narrow_rows, narrow_keys, key_ok, token_mask, wide_rows, wide_mask, real, steps, scale,
      num_uniform, uniform_first, masked_first, uniform_bias, wide_full, edge_p, per_hop, hop_p):  # fmt: skip
    batch, heads, length, _ = q.shape
    n, width = narrow_keys.shape
    masks = _mask_shapes(n, width, wide_rows.shape[0], wide_mask.shape[1], length, batch * heads, v.shape[3], steps,
                         edge_p, per_hop, hop_p, q.device, draw=False)  # fmt: skip
    return v.new_empty(v.shape), *masks


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
    uniform_first: int,
    masked_first: int,
    uniform_bias: bool,
    wide_full: bool,
    edge_p: float,
    per_hop: bool,
    hop_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``hopformer::gather_diffusion`` given the gradient of its output."""
    plan = (narrow_rows, narrow_keys, key_ok, token_mask, wide_rows, wide_mask)
    keeps = (narrow_keep, wide_keep, hop_keep)
    statics = (num_uniform, uniform_first, masked_first, uniform_bias, wide_full)
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
    ctx.mark_non_differentiable(narrow_keep, wide_keep, hop_keep)  # no zero gradients made for the masks
    ctx.set_materialize_grads(False)
    ctx.has_real = real is not None
    real = real if real is not None else q.new_empty(0, dtype=torch.bool)
    ctx.save_for_backward(q, k, v, out, *plan, real, narrow_keep, wide_keep, hop_keep)
    ctx.settings = (list(settings[0]), *settings[1:])  # steps, scale, the plan's facts, dropout


def _backward_formula(ctx, grad, *_):
    if grad is None:  # the output was not used
        return (None,) * len(ctx.needs_input_grad)
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
    steps, scale = [float(a) for a in steps], float(scale)
    if exporting():  # plain operators in the program (inference: no dropout there)
        out = _forward(q, k, v, plan.tensors(), real, steps, scale, plan.statics(), 0.0, False, 0.0)[0]
    else:
        out, *_ = torch.ops.hopformer.gather_diffusion(
            q, k, v, *plan.tensors(), real, steps, scale, *plan.statics(),
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
