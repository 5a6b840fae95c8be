"""The ``gather`` backend: block-sparse attention in pure PyTorch, autograd, any device.

Each query block gathers its key blocks into a small dense problem ``(block, degree * block)``.
Rows whose degree is close to the number of blocks (global rows) would make that gather as large as
dense attention, so they are split out and computed against all keys with a block mask ("wide"
rows). Memory is ``O(seq * keys_per_query)``, never ``O(seq^2)`` for sparse graphs.

The normalised attention ``A`` is computed once and applied ``hops`` times (one application is
sparse attention). The whole computation is one autograd function (:func:`gather_diffusion`) over
chunks of heads. Its backward recomputes a chunk's ``A`` and hop states, runs the adjoint recurrence
``u <- A^T u`` and forms the score gradient slot by slot, so it never stores gathered key/value
copies nor the gradient of ``A``, and (without edge dropout) nothing per hop between forward and
backward: memory is the output plus one chunk's ``A`` and hop states. Attention is laid out ``(batch, heads, rows, slot,
query, key)``, one ``block x block`` tile per (row, key-block slot), so every step is a batched
matmul over tiles and the softmax runs in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph
from hopformer.ops.backend import NO_OPTIONS, HopOptions, Support
from hopformer.ops.common import diffusion_steps, eager_constants, masked_softmax

# A narrow row costs about this much more per key than a wide (dense) row, for the gather copies.
_GATHER_OVERHEAD = 1.5


@dataclass
class GatherPlan:
    """Device-side layout of a graph for the gather backend (built once per graph and device)."""

    narrow_rows: torch.Tensor  # (n,) query blocks computed by gathering
    narrow_keys: torch.Tensor  # (n, d) key blocks per narrow row (padded slots point at block 0)
    narrow_mask: torch.Tensor  # (n, d, block, block) token-level edges of each gathered tile
    wide_rows: torch.Tensor  # (w,) query blocks computed against all keys
    wide_mask: torch.Tensor  # (w, block, padded_len) token-level edges of the wide rows


def gather_plan(graph: BlockGraph, device: torch.device) -> GatherPlan:
    """The cached :class:`GatherPlan` of ``graph`` on ``device``."""
    key = ("gather_plan", str(device))
    if key not in graph.cache:
        with eager_constants():
            graph.cache[key] = _build_plan(graph, device)
    return graph.cache[key]


def _build_plan(graph: BlockGraph, device: torch.device) -> GatherPlan:
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

    # narrow rows: gather the key-block lists into a padded (n, d) table
    width = max(int(degrees[narrow_rows].max()) if len(narrow_rows) else 1, 1)
    slots = torch.arange(width)
    starts = graph.indptr[narrow_rows]
    counts = degrees[narrow_rows]
    slot_valid = slots[None, :] < counts[:, None]
    flat = (starts[:, None] + slots[None, :]).clamp(max=max(graph.num_block_edges - 1, 0))
    narrow_keys = torch.where(slot_valid, graph.indices[flat] if graph.num_block_edges else 0, 0)
    key_pos = positions[narrow_keys].reshape(len(narrow_rows), width * bs)  # (n, d*bs)
    key_ok = slot_valid.repeat_interleave(bs, dim=1) & key_real[key_pos]
    narrow_mask = key_ok[:, None, :].expand(-1, bs, -1)
    if graph.is_causal:
        narrow_mask = narrow_mask & (key_pos[:, None, :] <= positions[narrow_rows][:, :, None])
    narrow_mask = narrow_mask.reshape(len(narrow_rows), bs, width, bs).transpose(1, 2)

    # wide rows: a token mask over all keys
    adjacency = torch.zeros(len(wide_rows), nb, dtype=torch.bool)
    for i, row in enumerate(wide_rows.tolist()):
        adjacency[i, graph.indices[graph.indptr[row] : graph.indptr[row + 1]]] = True
    wide_mask = (adjacency.repeat_interleave(bs, dim=1) & key_real)[:, None, :].expand(-1, bs, -1)
    if graph.is_causal:
        wide_mask = wide_mask & (torch.arange(graph.padded_len)[None, None, :] <= positions[wide_rows][:, :, None])

    return GatherPlan(
        narrow_rows.to(device),
        narrow_keys.to(device),
        narrow_mask.contiguous().to(device),
        wide_rows.to(device),
        wide_mask.contiguous().to(device),
    )


class _Attention:
    """The attention ``A`` of one call, split into gathered (narrow) and dense (wide) rows.

    ``narrow``: probabilities ``(B, H, n, d, bs, bs)``; ``wide``: ``(B, H, w * bs, padded_len)``.
    ``edge_masks`` (optional, per application) hold dropout keep-masks of the same shapes.
    """

    def __init__(self, plan: GatherPlan, graph: BlockGraph, q_blocks, k_blocks, real, scale: float) -> None:
        self.plan, self.graph = plan, graph
        self.narrow = self.wide = None
        self.q_narrow = self.q_wide = None
        self.narrow_mask = self.wide_mask = None
        if len(plan.narrow_rows):
            keys = plan.narrow_keys
            mask = plan.narrow_mask[None, None]
            q_rows = (
                q_blocks if len(plan.narrow_rows) == graph.num_blocks else q_blocks.index_select(2, plan.narrow_rows)
            )
            if real is not None:
                keys_real = real[:, keys]  # (B, n, d, bs)
                rows_real = real[:, plan.narrow_rows]  # (B, n, bs)
                mask = mask & keys_real[:, None, :, :, None, :] & rows_real[:, None, :, None, :, None]
            batch, heads, n, bs, _ = q_rows.shape
            scores = q_rows.new_empty(batch, heads, n, keys.shape[1], bs, bs)
            for slot in range(keys.shape[1]):
                scores[:, :, :, slot] = torch.matmul(q_rows, k_blocks.index_select(2, keys[:, slot]).transpose(-1, -2))
            self.narrow = masked_softmax(scores.mul_(scale), mask, (3, 5), inplace=True)
            self.q_narrow, self.narrow_mask = q_rows, mask
        if len(plan.wide_rows):
            q_rows = q_blocks[:, :, plan.wide_rows].flatten(2, 3)  # (B, H, w*bs, D)
            k_all = k_blocks.flatten(2, 3)
            mask = plan.wide_mask.flatten(0, 1)[None, None]
            if real is not None:
                mask = mask & real.flatten(1)[:, None, None, :] & real[:, plan.wide_rows].flatten(1)[:, None, :, None]
            scores = torch.matmul(q_rows, k_all.transpose(-1, -2)).mul_(scale)
            self.wide = masked_softmax(scores, mask, (3,), inplace=True)
            self.q_wide, self.wide_mask = q_rows, mask

    def dropout_masks(self, p: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Fresh keep-masks for edge dropout."""
        narrow = None if self.narrow is None else torch.rand_like(self.narrow) >= p
        wide = None if self.wide is None else torch.rand_like(self.wide) >= p
        return narrow, wide

    @staticmethod
    def _effective(probs, keep, p):
        return probs if keep is None else probs * keep / (1 - p)

    def apply(self, z_blocks: torch.Tensor, keep=(None, None), p: float = 0.0) -> torch.Tensor:
        """``A @ z`` on blocks ``(B, H, nb, bs, D)`` -> ``(B, H, nb, bs, D)``."""
        plan = self.plan
        out = torch.empty_like(z_blocks)  # every block row is either narrow or wide
        if self.narrow is not None:
            probs = self._effective(self.narrow, keep[0], p)
            keys, rows = plan.narrow_keys, None
            for slot in range(keys.shape[1]):
                term = torch.matmul(probs[:, :, :, slot], z_blocks.index_select(2, keys[:, slot]))
                rows = term if rows is None else rows.add_(term)
            out.index_copy_(2, plan.narrow_rows, rows)
        if self.wide is not None:
            probs = self._effective(self.wide, keep[1], p)
            wide = torch.matmul(probs, z_blocks.flatten(2, 3))
            out.index_copy_(2, plan.wide_rows, wide.unflatten(2, (len(plan.wide_rows), z_blocks.shape[3])))
        return out

    def apply_transposed(self, w_blocks: torch.Tensor, keep=(None, None), p: float = 0.0) -> torch.Tensor:
        """``A^T @ w`` on blocks."""
        plan = self.plan
        out = torch.zeros_like(w_blocks)
        if self.narrow is not None:
            probs = self._effective(self.narrow, keep[0], p)
            keys, w_rows = plan.narrow_keys, w_blocks.index_select(2, plan.narrow_rows)
            for slot in range(keys.shape[1]):
                out.index_add_(2, keys[:, slot], torch.matmul(probs[:, :, :, slot].transpose(-1, -2), w_rows))
        if self.wide is not None:
            probs = self._effective(self.wide, keep[1], p)
            w_rows = w_blocks[:, :, plan.wide_rows].flatten(2, 3)
            out += torch.matmul(probs.transpose(-1, -2), w_rows).view_as(out)
        return out


# Attention probabilities kept alive at once (elements): heads are processed in chunks of about this
# size, and each chunk's attention and hop states are recomputed in backward instead of stored.
CHUNK_ELEMENTS = 1 << 22


def _pad_blocks(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad the sequence axis (dim 2) with ``pad`` zeros; contiguous, so it views as blocks."""
    return F.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()


def _head_chunks(graph: BlockGraph, plan: GatherPlan, batch: int, heads: int, store: bool) -> list[slice]:
    if store or torch.compiler.is_exporting():  # dropout masks must meet the same values in backward; an
        return [slice(0, heads)]  # exported program takes any batch size: keep everything in one chunk
    per_head = batch * (plan.narrow_mask.numel() + plan.wide_mask.numel())
    size = max(1, min(heads, CHUNK_ELEMENTS // max(per_head, 1)))
    return [slice(h, min(h + size, heads)) for h in range(0, heads, size)]


@dataclass(frozen=True)
class _Steps:
    """What one call runs: the step weights and the settings every chunk shares."""

    weights: tuple[float, ...]  # a_t per step, in application order
    scale: float
    edge_p: float
    edge_mode: str  # "once" or "per_hop"
    hop_p: float


def _dropout_masks(attention, v_blocks, run: _Steps):
    """Per step: edge keep-masks ``(narrow, wide)`` and the hop keep-mask, drawn once in forward so
    that backward meets the same ones when it re-runs the steps."""
    per_hop = run.edge_p > 0 and run.edge_mode == "per_hop"
    shared = attention.dropout_masks(run.edge_p) if run.edge_p > 0 and not per_hop else (None, None)
    keeps = [attention.dropout_masks(run.edge_p) if per_hop else shared for _ in run.weights]
    hop_keeps = [torch.rand_like(v_blocks) >= run.hop_p if run.hop_p > 0 else None for _ in run.weights]
    return keeps, hop_keeps


def _run_steps(attention, v_blocks, masks, run: _Steps, states=None, final=None):
    """Run the steps for one head chunk and return the final state ``z_T``; with ``states`` (see
    :func:`_new_states`) also record the state entering each step, ``z_0 .. z_{T-1}``. A known
    ``final`` (backward has forward's output) saves the last application."""
    keeps, hop_keeps = masks

    def attend(z: torch.Tensor, t: int) -> torch.Tensor:
        return attention.apply(z, keeps[t], run.edge_p)

    def hop_dropout(z: torch.Tensor, t: int) -> torch.Tensor:
        return z if hop_keeps[t] is None else z * hop_keeps[t] / (1 - run.hop_p)

    hops = diffusion_steps(attend, v_blocks, run.weights, hop_dropout)
    z, last = v_blocks, len(run.weights) - 1
    for t in range(len(run.weights)):
        if states is not None:
            states[..., t, :] = z
        if final is not None and t == last:
            return final
        z = next(hops)
    return z


def _new_states(v_blocks: torch.Tensor, count: int) -> torch.Tensor:
    """Room for ``count`` states side by side, ``(B, H, nb, bs, count, dim)``: the layout in which
    the score gradient multiplies all hops in one product."""
    return v_blocks.new_empty(*v_blocks.shape[:-1], count, v_blocks.shape[-1])


def _score_grad(probs, w, z, r, groups, keeps, run: _Steps):
    """``dS = scale * P * (dP - r)`` with ``dP = sum_t w_t z_t^T`` on the edges of ``probs``.

    ``w`` ``(..., queries, T, dim)`` and ``z`` ``(..., keys, T, dim)`` hold the terms side by side, so
    a group of terms sharing one edge keep-mask (``keeps``, one per group) is a single product."""
    dp = None
    for group, keep in zip(groups, keeps):
        term = torch.matmul(w[..., group, :].flatten(-2), z[..., group, :].flatten(-2).transpose(-1, -2))
        if keep is not None:
            term.mul_(keep).div_(1 - run.edge_p)
        dp = term if dp is None else dp.add_(term)
    return dp.sub_(r).mul_(probs).mul_(run.scale)


def _backward_chunk(attention, k_blocks, v_blocks, grad_blocks, masks, states, final, run: _Steps, grads) -> None:
    """Add the gradients of one head chunk's q, k, v blocks to ``grads`` (views of the full ones):
    the adjoint recurrence, then the score gradient. ``states`` hold the chunk's ``z_0 .. z_{T-1}``
    (see :func:`_run_steps`), ``final`` is ``z_T``."""
    keeps, hop_keeps = masks
    grad_q, grad_k, grad_v = grads
    plan, steps = attention.plan, len(run.weights)

    # Adjoint sweep: u = dL/dz_t, then u' = u through the hop dropout and w_t = dL/d(A z_{t-1}) =
    # (1 - a_t) u'. The softmax needs r_i = sum_t w_t,i . (A z_{t-1})_i; solving the mix for A z_{t-1}
    # gives r_i = sum_t u'_t,i . ((1 - hop_p) z_t - a_t v)_i (u' is zero where hop dropout zeroed
    # z_t), so the outputs A z_{t-1} are never needed. Only the rows of w_t that the score gradient
    # reads are kept, side by side per row kind (zero for skipped a == 1 steps).
    batch, heads, _, bs, dim = v_blocks.shape
    w_narrow, w_wide = (
        v_blocks.new_zeros(batch, heads, len(rows), bs, steps, dim) for rows in (plan.narrow_rows, plan.wide_rows)
    )
    u, r = grad_blocks, v_blocks.new_zeros(v_blocks.shape[:-1])
    for t in reversed(range(steps)):
        if hop_keeps[t] is not None:
            u = u * hop_keeps[t] / (1 - run.hop_p)
        a = run.weights[t]
        grad_v += a * u
        if a < 1.0:
            z_t = states[..., t + 1, :] if t + 1 < steps else final
            r = r + (u * z_t).sum(-1).mul_(1 - run.hop_p) - a * (u * v_blocks).sum(-1)
            w = (1 - a) * u
            w_narrow[..., t, :], w_wide[..., t, :] = (
                w.index_select(2, rows) for rows in (plan.narrow_rows, plan.wide_rows)
            )
            u = attention.apply_transposed(w, keeps[t], run.edge_p)
        else:
            u = torch.zeros_like(u)
    grad_v += u
    u = w = None  # free before the score gradient

    # dS = P * (dP - r), dP = sum_t w_t z_{t-1}^T: one product over all terms, or one per term when
    # edge dropout draws a mask per hop.
    per_hop = run.edge_p > 0 and run.edge_mode == "per_hop"
    groups = [slice(t, t + 1) for t in range(steps) if run.weights[t] < 1.0] if per_hop else [slice(0, steps)]
    group_keeps = [keeps[g.start] for g in groups]
    if attention.narrow is not None:
        keys, rows, q_rows = plan.narrow_keys, plan.narrow_rows, attention.q_narrow
        r_rows = r[:, :, rows][..., None]
        z_slot = states.new_empty(w_narrow.shape)  # one buffer for every slot's gathered states
        for slot in range(keys.shape[1]):
            slot_keeps = [None if keep[0] is None else keep[0][:, :, :, slot] for keep in group_keeps]
            torch.index_select(states, 2, keys[:, slot], out=z_slot)
            grad_slot = _score_grad(attention.narrow[:, :, :, slot], w_narrow, z_slot, r_rows, groups, slot_keeps, run)
            grad_q.index_add_(2, rows, torch.matmul(grad_slot, k_blocks.index_select(2, keys[:, slot])))
            grad_k.index_add_(2, keys[:, slot], torch.matmul(grad_slot.transpose(-1, -2), q_rows))
        del z_slot
    if attention.wide is not None:
        rows, r_rows = plan.wide_rows, r[:, :, plan.wide_rows].flatten(2)[..., None]
        wide_keeps = [keep[1] for keep in group_keeps]
        grad_scores = _score_grad(
            attention.wide, w_wide.flatten(2, 3), states.flatten(2, 3), r_rows, groups, wide_keeps, run
        )
        grad_q[:, :, rows] = torch.matmul(grad_scores, k_blocks.flatten(2, 3)).unflatten(2, (len(rows), bs))
        grad_k += torch.matmul(grad_scores.transpose(-1, -2), attention.q_wide).view_as(grad_k)


class _GatherDiffusion(torch.autograd.Function):
    """``z <- lerp(A z, v, a_t)`` for each step weight ``a_t``, starting from ``z = v`` (see
    :func:`hopformer.ops.coefficients.mixing_weights`), with optional edge and hop dropout.

    Heads are independent, so they run in chunks. Without edge dropout nothing of size ``A`` or of
    one state per hop is kept between forward and backward: backward recomputes each chunk's
    attention and re-runs its steps (one score product and ``hops`` applications more), so peak
    memory is one chunk's attention and states, not a state per hop for every head."""

    @staticmethod
    def forward(ctx, q, k, v, graph, key_padding_mask, steps, scale, edge_p, edge_mode, hop_p):
        plan = gather_plan(graph, q.device)
        batch, heads, seq, dim = q.shape
        nb, bs, pad = graph.num_blocks, graph.block_size, graph.padded_len - seq
        q_blocks = _pad_blocks(q, pad).view(batch, heads, nb, bs, dim)
        k_blocks = _pad_blocks(k, pad).view(batch, heads, nb, bs, dim)
        v_blocks = _pad_blocks(v, pad).view(batch, heads, nb, bs, v.shape[-1])
        real = None if key_padding_mask is None else F.pad(key_padding_mask, (0, pad)).view(batch, nb, bs)
        run = _Steps(steps, scale, edge_p, edge_mode, hop_p)

        # Edge-dropout masks have the attention's size and must meet the same probabilities in
        # backward, so with edge dropout the attention and the states are stored (one chunk).
        store = edge_p > 0
        chunks = _head_chunks(graph, plan, batch, heads, store)
        out = torch.empty_like(v_blocks)
        saved = []  # per chunk: dropout masks, then attention, states and final state when stored
        for h in chunks:
            attention = _Attention(plan, graph, q_blocks[:, h], k_blocks[:, h], real, scale)
            masks = _dropout_masks(attention, v_blocks[:, h], run)
            states = _new_states(v_blocks[:, h], len(steps)) if store else None
            final = _run_steps(attention, v_blocks[:, h], masks, run, states)
            out[:, h] = final
            saved.append((masks, attention, states, final) if store else (masks, None, None, None))
            del attention, states, final  # unless stored: free before the next chunk's

        ctx.graph, ctx.plan, ctx.real, ctx.chunks, ctx.saved, ctx.run = graph, plan, real, chunks, saved, run
        ctx.shape = (seq, pad)
        ctx.save_for_backward(q_blocks, k_blocks, v_blocks, out)  # out: z_T, alive anyway as the output
        return out.flatten(2, 3)[:, :, :seq]

    @staticmethod
    def backward(ctx, grad_out):
        q_blocks, k_blocks, v_blocks, out = ctx.saved_tensors
        seq, pad = ctx.shape
        run = ctx.run
        grad_blocks = _pad_blocks(grad_out, pad).view_as(v_blocks)
        grads = torch.zeros_like(q_blocks), torch.zeros_like(k_blocks), torch.zeros_like(v_blocks)
        for h, (masks, attention, states, final) in zip(ctx.chunks, ctx.saved):
            if attention is None:  # recompute this chunk's attention and states (memory: one chunk)
                attention = _Attention(ctx.plan, ctx.graph, q_blocks[:, h], k_blocks[:, h], ctx.real, run.scale)
                states = _new_states(v_blocks[:, h], len(run.weights))
                final = _run_steps(attention, v_blocks[:, h], masks, run, states, final=out[:, h])
            chunk_grads = [grad[:, h] for grad in grads]
            _backward_chunk(
                attention, k_blocks[:, h], v_blocks[:, h], grad_blocks[:, h], masks, states, final, run, chunk_grads
            )
            del attention, states, final

        def unpad(blocks):
            return blocks.flatten(2, 3)[:, :, :seq]

        return (*(unpad(grad) for grad in grads), None, None, None, None, None, None, None)


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
    every state after the mix. ``q``/``k`` and ``v`` may differ in their last dimension.
    """
    return _GatherDiffusion.apply(
        q, k, v, graph, key_padding_mask, tuple(steps), scale, edge_dropout_p, edge_dropout, hop_dropout_p
    )


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
