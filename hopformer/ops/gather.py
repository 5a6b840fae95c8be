"""The ``gather`` backend: block-sparse attention in pure PyTorch, autograd, any device.

Each query block gathers its key blocks into a small dense problem ``(block, degree * block)``.
Rows whose degree is close to the number of blocks (global rows) would make that gather as large as
dense attention, so they are split out and computed against all keys with a block mask ("wide"
rows). Memory is ``O(seq * keys_per_query)``, never ``O(seq^2)`` for sparse graphs.

The normalised attention ``A`` is computed once (:func:`attention_operator`) and then applied to any
number of value tensors (:meth:`GatherOperator.apply`): one application is sparse attention, ``hops``
applications are diffusion. Two custom autograd functions keep the gathered key/value copies out of
the autograd graph (they are recomputed in backward), so a diffusion saves ``A`` once plus one
``(batch, heads, seq, dim)`` state per hop.
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
    narrow_mask: torch.Tensor  # (n, block, d * block) token-level edges inside the gathered problem
    wide_rows: torch.Tensor  # (w,) query blocks computed against all keys
    wide_mask: torch.Tensor  # (w, block, padded_len) token-level edges of the wide rows
    restore: torch.Tensor | None  # permutation putting [narrow, wide] back in block order (None: identity)


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

    # wide rows: a token mask over all keys
    adjacency = torch.zeros(len(wide_rows), nb, dtype=torch.bool)
    for i, row in enumerate(wide_rows.tolist()):
        adjacency[i, graph.indices[graph.indptr[row] : graph.indptr[row + 1]]] = True
    wide_mask = (adjacency.repeat_interleave(bs, dim=1) & key_real)[:, None, :].expand(-1, bs, -1)
    if graph.is_causal:
        wide_mask = wide_mask & (torch.arange(graph.padded_len)[None, None, :] <= positions[wide_rows][:, :, None])

    everything = torch.cat([narrow_rows, wide_rows])
    restore = None if torch.equal(everything, torch.arange(nb)) else torch.argsort(everything)
    return GatherPlan(
        narrow_rows.to(device),
        narrow_keys.to(device),
        narrow_mask.contiguous().to(device),
        wide_rows.to(device),
        wide_mask.contiguous().to(device),
        None if restore is None else restore.to(device),
    )


class _BlockProbs(torch.autograd.Function):
    """Masked softmax attention of gathered query blocks over their gathered key blocks.

    ``q_rows (B,H,n,bs,D)``, ``k_blocks (B,H,nb,bs,D)``, ``keys (n,d)``, ``mask (B|1,1|H,n,bs,d*bs)``
    -> probabilities ``(B,H,n,bs,d*bs)``, zero where masked (and on rows with no allowed key).
    Saves only ``q_rows``, ``k_blocks`` and the probabilities; the gathered keys are recomputed.
    """

    @staticmethod
    def forward(ctx, q_rows, k_blocks, keys, mask, scale: float):
        gathered = _gather_blocks(k_blocks, keys)
        scores = torch.matmul(q_rows, gathered.transpose(-1, -2))
        del gathered
        scores.mul_(scale).masked_fill_(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        del scores
        probs.mul_(mask)  # rows with no allowed key were uniform over nothing: make them zero
        ctx.scale = scale
        ctx.save_for_backward(q_rows, k_blocks, keys, probs)
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        q_rows, k_blocks, keys, probs = ctx.saved_tensors
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
        grad_scores.mul_(ctx.scale)
        gathered = _gather_blocks(k_blocks, keys)
        grad_q = torch.matmul(grad_scores, gathered) if ctx.needs_input_grad[0] else None
        grad_k = None
        if ctx.needs_input_grad[1]:
            grad_gathered = torch.matmul(grad_scores.transpose(-1, -2), q_rows)
            grad_k = _scatter_blocks(grad_gathered, keys, k_blocks)
        return grad_q, grad_k, None, None, None


class _BlockApply(torch.autograd.Function):
    """``out[n] = probs[n] @ concat(z_blocks[keys[n, s]] for s)``: block-sparse matrix times values."""

    @staticmethod
    def forward(ctx, probs, z_blocks, keys):
        ctx.save_for_backward(probs, z_blocks, keys)
        return torch.matmul(probs, _gather_blocks(z_blocks, keys))

    @staticmethod
    def backward(ctx, grad_out):
        probs, z_blocks, keys = ctx.saved_tensors
        grad_probs = grad_z = None
        if ctx.needs_input_grad[0]:
            grad_probs = torch.matmul(grad_out, _gather_blocks(z_blocks, keys).transpose(-1, -2))
        if ctx.needs_input_grad[1]:
            grad_z = _scatter_blocks(torch.matmul(probs.transpose(-1, -2), grad_out), keys, z_blocks)
        return grad_probs, grad_z, None


def _gather_blocks(blocks: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(B,H,nb,bs,D)`` indexed by ``keys (n,d)`` -> ``(B,H,n,d*bs,D)``."""
    b, h, _, bs, dim = blocks.shape
    n, d = keys.shape
    return blocks[:, :, keys].reshape(b, h, n, d * bs, dim)


def _scatter_blocks(grad_gathered: torch.Tensor, keys: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_gather_blocks`: sum ``(B,H,n,d*bs,D)`` back into ``(B,H,nb,bs,D)``."""
    b, h, nb, bs, dim = like.shape
    n, d = keys.shape
    out = torch.zeros_like(like)
    return out.index_add_(2, keys.reshape(-1), grad_gathered.reshape(b, h, n * d, bs, dim))


class GatherOperator:
    """The normalised attention ``A`` of one (q, k, graph, padding), ready to apply to values."""

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        graph: BlockGraph,
        key_padding_mask: torch.Tensor | None,
        scale: float,
    ) -> None:
        self.plan = plan = gather_plan(graph, q.device)
        self.graph, self.seq_len = graph, graph.seq_len
        bs, nb, pad = graph.block_size, graph.num_blocks, graph.padded_len - graph.seq_len
        batch, heads, _, dim = q.shape
        q_blocks = F.pad(q, (0, 0, 0, pad)).view(batch, heads, nb, bs, dim)
        k_padded = F.pad(k, (0, 0, 0, pad))
        k_blocks = k_padded.view(batch, heads, nb, bs, dim)
        real = None
        if key_padding_mask is not None:
            real = F.pad(key_padding_mask, (0, pad)).view(batch, nb, bs)

        self.narrow = self.wide = None
        if len(plan.narrow_rows):
            rows = plan.narrow_rows
            q_rows = q_blocks if plan.restore is None else q_blocks[:, :, rows]
            mask = plan.narrow_mask[None, None]
            if real is not None:
                keys_real = real[:, plan.narrow_keys].flatten(2)  # (B, n, d*bs)
                mask = mask & keys_real[:, None, :, None, :] & real[:, rows][:, None, :, :, None]
            self.narrow = _BlockProbs.apply(q_rows, k_blocks, plan.narrow_keys, mask, scale)
        if len(plan.wide_rows):
            rows = plan.wide_rows
            q_rows = q_blocks[:, :, rows].flatten(2, 3)  # (B,H,w*bs,D)
            scores = torch.matmul(q_rows, k_padded.transpose(-1, -2)) * scale
            mask = plan.wide_mask.flatten(0, 1)[None, None]
            if real is not None:
                mask = mask & real.flatten(1)[:, None, None, :] & real[:, rows].flatten(1)[:, None, :, None]
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            self.wide = torch.softmax(scores, dim=-1) * mask

    def dropped(self, p: float) -> GatherOperator:
        """A copy whose attention probabilities went through dropout (training only)."""
        other = object.__new__(GatherOperator)
        other.__dict__.update(self.__dict__)
        other.narrow = None if self.narrow is None else F.dropout(self.narrow, p)
        other.wide = None if self.wide is None else F.dropout(self.wide, p)
        return other

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """``A @ z`` for ``z`` of shape ``(batch, heads, seq_len, dim)``."""
        plan, graph = self.plan, self.graph
        batch, heads, _, dim = z.shape
        z_padded = F.pad(z, (0, 0, 0, graph.padded_len - graph.seq_len))
        parts = []
        if self.narrow is not None:
            z_blocks = z_padded.view(batch, heads, graph.num_blocks, graph.block_size, dim)
            parts.append(_BlockApply.apply(self.narrow, z_blocks, plan.narrow_keys))
        if self.wide is not None:
            wide = torch.matmul(self.wide, z_padded)
            parts.append(wide.view(batch, heads, len(plan.wide_rows), graph.block_size, dim))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        if plan.restore is not None:
            out = out[:, :, plan.restore]
        return out.reshape(batch, heads, graph.padded_len, dim)[:, :, : self.seq_len]
