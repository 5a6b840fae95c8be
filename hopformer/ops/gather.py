"""The ``gather`` backend: block-sparse attention in pure PyTorch, autograd, any device.

Each query block gathers its key blocks into a small dense problem ``(block, degree * block)``.
Rows whose degree is close to the number of blocks (global rows) would make that gather as large as
dense attention, so they are split out and computed against all keys with a block mask ("wide"
rows). Memory is ``O(seq * keys_per_query)``, never ``O(seq^2)`` for sparse graphs.

The normalised attention ``A`` is computed once and applied ``hops`` times (one application is
sparse attention). The whole computation is one autograd function (:func:`gather_diffusion`) whose
backward runs the adjoint recurrence ``u <- A^T u`` and forms the score gradient slot by slot, so
it never stores gathered key/value copies nor the gradient of ``A``: memory is ``A`` once plus one
``(batch, heads, seq, dim)`` state per hop. Attention is laid out ``(batch, heads, rows, slot,
query, key)``, one ``block x block`` tile per (row, key-block slot), so every step is a batched
matmul over tiles and the softmax runs in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph

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


def _fill_softmax_(scores: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """In-place masked softmax over ``dims``; rows with no allowed key become zero (never NaN)."""
    scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    scores.sub_(scores.amax(dim=dims, keepdim=True)).exp_()
    scores.div_(scores.sum(dim=dims, keepdim=True))
    return scores.mul_(mask)


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
            q_rows = q_blocks if len(plan.narrow_rows) == graph.num_blocks else q_blocks[:, :, plan.narrow_rows]
            if real is not None:
                keys_real = real[:, keys]  # (B, n, d, bs)
                rows_real = real[:, plan.narrow_rows]  # (B, n, bs)
                mask = mask & keys_real[:, None, :, :, None, :] & rows_real[:, None, :, None, :, None]
            batch, heads, n, bs, _ = q_rows.shape
            scores = q_rows.new_empty(batch, heads, n, keys.shape[1], bs, bs)
            for slot in range(keys.shape[1]):
                scores[:, :, :, slot] = torch.matmul(q_rows, k_blocks[:, :, keys[:, slot]].transpose(-1, -2))
            self.narrow = _fill_softmax_(scores.mul_(scale), mask, (3, 5))
            self.q_narrow, self.narrow_mask = q_rows, mask
        if len(plan.wide_rows):
            q_rows = q_blocks[:, :, plan.wide_rows].flatten(2, 3)  # (B, H, w*bs, D)
            k_all = k_blocks.flatten(2, 3)
            mask = plan.wide_mask.flatten(0, 1)[None, None]
            if real is not None:
                mask = mask & real.flatten(1)[:, None, None, :] & real[:, plan.wide_rows].flatten(1)[:, None, :, None]
            scores = torch.matmul(q_rows, k_all.transpose(-1, -2)).mul_(scale)
            self.wide = _fill_softmax_(scores, mask, (3,))
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
        out = torch.zeros_like(z_blocks)
        if self.narrow is not None:
            probs = self._effective(self.narrow, keep[0], p)
            keys = plan.narrow_keys
            rows = torch.zeros_like(z_blocks[:, :, : len(plan.narrow_rows)])
            for slot in range(keys.shape[1]):
                rows += torch.matmul(probs[:, :, :, slot], z_blocks[:, :, keys[:, slot]])
            out[:, :, plan.narrow_rows] = rows
        if self.wide is not None:
            probs = self._effective(self.wide, keep[1], p)
            wide = torch.matmul(probs, z_blocks.flatten(2, 3))
            out[:, :, plan.wide_rows] = wide.unflatten(2, (len(plan.wide_rows), z_blocks.shape[3]))
        return out

    def apply_transposed(self, w_blocks: torch.Tensor, keep=(None, None), p: float = 0.0) -> torch.Tensor:
        """``A^T @ w`` on blocks."""
        plan = self.plan
        out = torch.zeros_like(w_blocks)
        if self.narrow is not None:
            probs = self._effective(self.narrow, keep[0], p)
            keys, w_rows = plan.narrow_keys, w_blocks[:, :, plan.narrow_rows]
            for slot in range(keys.shape[1]):
                out.index_add_(2, keys[:, slot], torch.matmul(probs[:, :, :, slot].transpose(-1, -2), w_rows))
        if self.wide is not None:
            probs = self._effective(self.wide, keep[1], p)
            w_rows = w_blocks[:, :, plan.wide_rows].flatten(2, 3)
            out += torch.matmul(probs.transpose(-1, -2), w_rows).view_as(out)
        return out


# Attention probabilities kept alive at once (elements): heads are processed in chunks of about this
# size, and each chunk's attention is recomputed in backward instead of stored.
CHUNK_ELEMENTS = 1 << 22


def _pad_seq(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad the sequence axis (dim 2) with zeros; no copy when nothing is padded."""
    return F.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()


def _head_chunks(graph: BlockGraph, plan: GatherPlan, batch: int, heads: int, store: bool) -> list[slice]:
    if store:  # dropout masks must meet the same values in backward: keep everything in one chunk
        return [slice(0, heads)]
    per_head = batch * (plan.narrow_mask.numel() + plan.wide_mask.numel())
    size = max(1, min(heads, CHUNK_ELEMENTS // max(per_head, 1)))
    return [slice(h, min(h + size, heads)) for h in range(0, heads, size)]


def _forward_chunk(attention, v_blocks, steps, edge_p, edge_mode, hop_p):
    """Run the steps for one head chunk; returns the final state and what backward needs."""
    keeps, hop_keeps, applied = [], [], []  # per step: edge keep-masks, hop keep-mask, A z
    shared = attention.dropout_masks(edge_p) if edge_p > 0 and edge_mode == "once" else (None, None)
    z = v_blocks
    for a in steps:
        keep = attention.dropout_masks(edge_p) if edge_p > 0 and edge_mode == "per_hop" else shared
        y = attention.apply(z, keep, edge_p) if a < 1.0 else None
        z = v_blocks if y is None else torch.lerp(y, v_blocks, a)
        hop_keep = None
        if hop_p > 0:
            hop_keep = torch.rand_like(z) >= hop_p
            z = z * hop_keep / (1 - hop_p)
        keeps.append(keep)
        hop_keeps.append(hop_keep)
        applied.append(y)
    return z, (keeps, hop_keeps, applied)


def _backward_chunk(attention, k_blocks, v_blocks, grad_blocks, steps, scale, saved, edge_p, hop_p):
    """Gradients of q, k, v blocks for one head chunk (adjoint recurrence, then the score gradient)."""
    keeps, hop_keeps, applied = saved
    plan = attention.plan
    batch, heads, nb, bs, _ = v_blocks.shape
    # inputs of each application: z_{t-1}, rebuilt from the stored outputs A z
    inputs, z = [], v_blocks
    for a, y, hop_keep in zip(steps, applied, hop_keeps):
        inputs.append(z)
        z = v_blocks if y is None else torch.lerp(y, v_blocks, a)
        if hop_keep is not None:
            z = z * hop_keep / (1 - hop_p)

    # adjoint sweep: u = dL/dz_t, w_t = dL/d(A z_{t-1})
    u, grad_v = grad_blocks, torch.zeros_like(v_blocks)
    adjoints = [None] * len(steps)
    for t in reversed(range(len(steps))):
        if hop_keeps[t] is not None:
            u = u * hop_keeps[t] / (1 - hop_p)
        a = steps[t]
        grad_v += a * u
        if a < 1.0:
            adjoints[t] = (1 - a) * u
            u = attention.apply_transposed(adjoints[t], keeps[t], edge_p)
        else:
            u = torch.zeros_like(u)
    grad_v += u

    # dS = P * (dP - r): dP = sum_t w_t z_{t-1}^T on the edges, r_i = sum_t w_t,i . (A z_{t-1})_i
    terms = [(w, z_in, y, keep) for w, z_in, y, keep in zip(adjoints, inputs, applied, keeps) if w is not None]
    r = sum((w * y).sum(-1) for w, _, y, _ in terms)  # (B, H, nb, bs)
    grad_q = k_blocks.new_zeros(batch, heads, nb, bs, k_blocks.shape[-1])
    grad_k = torch.zeros_like(k_blocks)
    if attention.narrow is not None:
        keys, rows = plan.narrow_keys, plan.narrow_rows
        q_rows, probs = attention.q_narrow, attention.narrow
        r_rows = r[:, :, rows][..., None]
        grad_q_rows = torch.zeros_like(q_rows)
        for slot in range(keys.shape[1]):
            p_slot = probs[:, :, :, slot]
            grad_slot = -p_slot * r_rows
            for w, z_in, _, keep in terms:
                weighted = torch.matmul(w[:, :, rows], z_in[:, :, keys[:, slot]].transpose(-1, -2))
                if keep[0] is not None:
                    weighted = weighted * keep[0][:, :, :, slot] / (1 - edge_p)
                grad_slot += p_slot * weighted
            grad_slot *= scale
            grad_q_rows += torch.matmul(grad_slot, k_blocks[:, :, keys[:, slot]])
            grad_k.index_add_(2, keys[:, slot], torch.matmul(grad_slot.transpose(-1, -2), q_rows))
        grad_q[:, :, rows] = grad_q_rows
    if attention.wide is not None:
        rows, probs, q_rows = plan.wide_rows, attention.wide, attention.q_wide
        grad_scores = -probs * r[:, :, rows].flatten(2)[..., None]
        for w, z_in, _, keep in terms:
            weighted = torch.matmul(w[:, :, rows].flatten(2, 3), z_in.flatten(2, 3).transpose(-1, -2))
            if keep[1] is not None:
                weighted = weighted * keep[1] / (1 - edge_p)
            grad_scores += probs * weighted
        grad_scores *= scale
        grad_q[:, :, rows] = torch.matmul(grad_scores, k_blocks.flatten(2, 3)).unflatten(2, (len(rows), bs))
        grad_k += torch.matmul(grad_scores.transpose(-1, -2), q_rows).view_as(grad_k)
    return grad_q, grad_k, grad_v


class _GatherDiffusion(torch.autograd.Function):
    """``z <- lerp(A z, v, a_t)`` for each step weight ``a_t``, starting from ``z = v`` (see
    :func:`hopformer.ops.coefficients.mixing_weights`), with optional edge and hop dropout.

    Heads are independent, so they run in chunks; without edge dropout each chunk's attention is
    recomputed in backward (one extra score product) rather than stored, which keeps peak memory at
    one chunk's attention plus one state per hop."""

    @staticmethod
    def forward(ctx, q, k, v, graph, key_padding_mask, steps, scale, edge_p, edge_mode, hop_p):
        plan = gather_plan(graph, q.device)
        batch, heads, seq, dim = q.shape
        nb, bs, pad = graph.num_blocks, graph.block_size, graph.padded_len - seq
        q_blocks = _pad_seq(q, pad).view(batch, heads, nb, bs, dim)
        k_blocks = _pad_seq(k, pad).view(batch, heads, nb, bs, dim)
        v_blocks = _pad_seq(v, pad).view(batch, heads, nb, bs, v.shape[-1])
        real = None if key_padding_mask is None else F.pad(key_padding_mask, (0, pad)).view(batch, nb, bs)

        # Edge-dropout masks must meet the same probabilities in backward, so with edge dropout the
        # attention is stored; without, backward recomputes each chunk's attention (memory: one chunk).
        store = edge_p > 0
        chunks = _head_chunks(graph, plan, batch, heads, store)
        out = torch.empty_like(v_blocks)
        saved, attentions = [], []
        for h in chunks:
            attention = _Attention(plan, graph, q_blocks[:, h], k_blocks[:, h], real, scale)
            out[:, h], chunk_saved = _forward_chunk(attention, v_blocks[:, h], steps, edge_p, edge_mode, hop_p)
            saved.append(chunk_saved)
            attentions.append(attention if store else None)

        ctx.graph, ctx.plan, ctx.real, ctx.chunks, ctx.saved, ctx.attentions = (
            graph,
            plan,
            real,
            chunks,
            saved,
            attentions,
        )
        ctx.steps, ctx.scale, ctx.edge_p, ctx.hop_p, ctx.shape = steps, scale, edge_p, hop_p, (seq, pad)
        ctx.save_for_backward(q_blocks, k_blocks, v_blocks)
        return out.flatten(2, 3)[:, :, :seq]

    @staticmethod
    def backward(ctx, grad_out):
        q_blocks, k_blocks, v_blocks = ctx.saved_tensors
        seq, pad = ctx.shape
        grad_blocks = _pad_seq(grad_out, pad).view_as(v_blocks)
        grad_q, grad_k, grad_v = torch.zeros_like(q_blocks), torch.zeros_like(k_blocks), torch.zeros_like(v_blocks)
        for h, saved, attention in zip(ctx.chunks, ctx.saved, ctx.attentions):
            if attention is None:  # recompute this chunk's attention rather than having stored it
                attention = _Attention(ctx.plan, ctx.graph, q_blocks[:, h], k_blocks[:, h], ctx.real, ctx.scale)
            grad_q[:, h], grad_k[:, h], grad_v[:, h] = _backward_chunk(
                attention,
                k_blocks[:, h],
                v_blocks[:, h],
                grad_blocks[:, h],
                ctx.steps,
                ctx.scale,
                saved,
                ctx.edge_p,
                ctx.hop_p,
            )

        def unpad(blocks):
            return blocks.flatten(2, 3)[:, :, :seq]

        return unpad(grad_q), unpad(grad_k), unpad(grad_v), None, None, None, None, None, None, None


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
