"""Combiner attention: full-support attention at sparse cost (Ren et al., NeurIPS 2021).

For each query ``i`` the support ``Omega_i`` (all positions, or ``[0, i]`` when causal) is split into
a *direct set*, whose keys are attended one by one, and *regions*, each attended through one summary
token. A region ``R`` has

- key ``k_R = max_{j in R} k_j`` (element-wise max-pool),
- query ``q_R = max_{j in R} q_j`` (element-wise max-pool of the region's queries),
- value ``v_R = sum_{j in R} p(j|R) v_j`` with ``p(j|R) = softmax_{j in R}(q_R . k_j * scale)``,

and one softmax over ``[direct logits || region logits]`` gives the weights, so the implied attention
matrix ``P`` puts ``p(R|i) * p(j|R) > 0`` on every position of every region (see
``specs/combiner.md``). Scores are ``q k^T * scale`` with ``scale = head_dim ** -0.5`` by default.

Variants (``variant=``), each bidirectional or causal:

- ``"fixed"``: blocks of ``block_size``; the own block is direct (causal: up to ``i``), every other
  (causal: earlier) block is a region. ``O(L (s + L/s))``.
- ``"logsparse"``: blocks of ``block_size`` (default 2, the paper's form: ``{i}`` plus ``{i-1}`` when
  ``i`` is odd, counting from 0); the own block is direct, and at each level ``b`` of a binary tree
  over the blocks the query's *sibling* span of ``2**b`` blocks is a region (causal: only left
  siblings, i.e. the dyadic decomposition of ``[0, block_start)``). ``O(L log L)``.
- ``"axial_vertical"`` (alias ``"axial"``) and ``"axial_horizontal"``: the sequence is a grid of rows
  of length ``block_size`` (default ``ceil(sqrt(L))``). Direct set: own row (causal: up to ``i``)
  plus own column (causal: rows above; bidirectional: other rows). The rest, the off-axis set
  ``{(r', c') : r' != r (causal: r' < r), c' != c}``, is split into regions by column (vertical:
  one region per other column, summaries are prefix/cumulative maxes down each column) or by row
  (horizontal: one region per other row, each without the query's column). ``O(L sqrt(L))``.
- ``"mixture"``: the paper's Combiner-Mixture, ``(A_vertical + A_horizontal) / 2``, each component
  normalised on its own (rows of each component sum to 1).

Padding (``key_padding_mask``, True = real): padded keys are in no direct set and in no region's
pooling or distribution; a region without real tokens contributes nothing. Padded query positions
output zeros. Lengths that are not a multiple of the block (row) size are padded internally with
positions that neither send nor receive.

Implementation (no ``O(L^2)`` tensor, no loop over tokens or regions): ``fixed`` appends the block
summaries to every block's keys and runs one batched SDPA with a boolean mask (summaries as extra KV
tokens); on CUDA it can instead run as one FlexAttention call whose keys are ``[tokens ; block
summaries]`` (``backend="flex"``; ``auto`` from ``COMBINER_FLEX_MIN_LEN`` tokens): no per-block copies of the
summaries and no mask tensor, and a hand-written backward for the summaries that adds their gradients
in place (``_FixedSummaryAttention``): less memory at up to twice the time. The axial forms and mixture
have a ``flex`` path too (row, column and summary calls merged by log-sum-exp; asked for by name).
``logsparse`` max-pools the ``log L`` summary levels bottom up (each level from the one below) and works in
tiles of about ``LOGSPARSE_TILE`` tokens: the lower levels' regions lie inside a tile and get their summaries
from one masked attention of their pooled queries on the tile; a higher level's region is the sibling of a
whole tile (one matmul per level over views of ``k, v``); then one masked attention per tile on
``[tile tokens || in-tile summaries || higher summaries]`` gives the output.
The axial forms compute row, column and summary logits with einsums (direct keys differ per row
*and* per column, so no single SDPA call covers them) and one softmax over their concatenation;
summaries use exclusive max-pools along rows / columns (``cummax`` for the rows above; the best two entries
for all others) and per-column / per-row SDPA.

:func:`combiner_partition` lists the partition of every query straight from these definitions and
:func:`combiner_reference` builds the dense ``P`` from it (float64, small ``L``) for the tests.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from hopformer.checks import InputTypeError, check_finite, check_int, check_probability
from hopformer.ops import dispatch
from hopformer.ops.backend import Request, Support
from hopformer.ops.common import check_key_padding_mask, check_qkv, masked_softmax, pad_seq
from hopformer.ops.masked_sdpa import masked_sdpa

VARIANTS = ("fixed", "logsparse", "axial", "axial_vertical", "axial_horizontal", "mixture")
# The forms of each axial variant (mixture: the average of the two, each normalised on its own).
AXIAL_FORMS = {
    "axial": ("vertical",),
    "axial_vertical": ("vertical",),
    "axial_horizontal": ("horizontal",),
    "mixture": ("vertical", "horizontal"),
}

# Up to this many keys per region, the summaries use broadcast-multiply-and-sum instead of a batched matmul of
# tiny matrices (fixed's small blocks, cached decoding).
SMALL = 16
# Logsparse's tile, in tokens (rounded down to the block times a power of two): its lower levels' regions are
# attended inside tiles by two masked attentions, where one small matmul per level and region size took most of
# its time (batched GEMMs of 2 x 64 matrices).
LOGSPARSE_TILE = 128


def _tiny_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as a broadcast multiply-and-sum: for many tiny matrices, where batched GEMM kernels take far
    longer than the arithmetic needs. Its temporary holds ``M x K x N`` elements per matrix pair."""
    return (a[..., :, :, None] * b[..., None, :, :]).sum(-2)


def combiner(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: str = "fixed",
    block_size: int | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Combiner attention on ``(batch, heads, seq, head_dim)`` tensors.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)``; ``v`` may have its own last dimension.
        variant: one of :data:`VARIANTS` (see the module docstring).
        block_size: block size for ``fixed`` / ``logsparse``, row length for the axial forms and
            ``mixture``. ``None`` picks ``ceil(sqrt(seq))`` (``logsparse``: 2). At most ``seq``.
        causal: restrict every set to positions ``<= i``.
        key_padding_mask: bool ``(batch, seq)``, True = real token.
        scale: score scale, default ``head_dim ** -0.5``.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
        backend: ``"eager"`` (batched SDPA and einsums, any device), ``"flex"`` (CUDA, every variant but
            ``logsparse``, no dropout, head_dim >= 16: FlexAttention calls, no score tensor; see
            :mod:`hopformer.ops.combiner_flex`) or ``"auto"`` (:func:`hopformer.ops.explain` says which and why).

    Returns:
        ``(batch, heads, seq, v.shape[-1])``; zeros at padded query positions.
    """
    block_size = check_combiner_inputs(q, k, v, variant, block_size, causal, key_padding_mask, dropout_p)
    request = Request.of("combiner", q, v, variant=variant, attention_dropout=dropout_p > 0)
    runner = dispatch.combiner_backend(request, backend)
    batch, _, seq, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else check_finite("scale", scale)
    real = key_padding_mask
    if real is None:
        real = torch.ones(batch, seq, dtype=torch.bool, device=q.device)

    # Pad to whole blocks (rows); the pads are marked not-real, so they neither send nor receive.
    padded = -(-seq // block_size) * block_size
    if padded != seq:
        q, k, v = (pad_seq(x, padded) for x in (q, k, v))
        real = F.pad(real, (0, padded - seq), value=False)

    all_real = key_padding_mask is None and padded == seq
    out = runner.combine(q, k, v, variant, block_size, causal, None if all_real else real, scale, dropout_p)
    if all_real:
        return out  # nothing to zero: skip a full-size copy (it would be saved for the backward too)
    return (out * real[:, None, :, None].to(out.dtype))[:, :, :seq]


class EagerCombiner:
    """``eager``: every variant through batched SDPA and einsums, on any device."""

    name = "eager"
    summary = "batched SDPA and einsums, every variant, any device"
    support = Support(ops=("combiner",), devices=("cpu", "cuda"))

    def combine(self, q, k, v, variant, block_size, causal, real, scale, dropout_p):
        # Logsparse and the axial forms take real=None (every token real) themselves: then they mask less.
        if variant == "logsparse":
            return _logsparse(q, k, v, block_size, causal, real, scale, dropout_p)
        if variant != "fixed":
            return _axial(q, k, v, block_size, causal, real, scale, dropout_p, AXIAL_FORMS[variant])
        if real is None:
            real = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
        return _fixed(q, k, v, block_size, causal, real, scale, dropout_p)


EAGER = EagerCombiner()


# ----------------------------------------------------------------------------------------------
# Shared pieces


def _region_summaries(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summaries of regions laid out along dim -2: ``q, k, v (..., n, d)``, ``real (..., n)``.

    Returns ``(key, value, nonempty)`` with shapes ``(..., d)``, ``(..., dv)``, ``(...)``. A region
    without real tokens gets a zero key and value and ``nonempty = False``. ``real=None``: every token
    is real (``nonempty`` is then None).
    """
    nonempty = None if real is None else real.any(-1)
    key, query = _masked_max(k, real, nonempty)[0], _masked_max(q, real, nonempty)[0]
    matmul = _tiny_matmul if k.shape[-2] <= SMALL else torch.matmul
    logits = matmul(k, query[..., None]).squeeze(-1) * scale
    weights = logits.softmax(-1) if real is None else masked_softmax(logits, real, empty_rows="any")
    value = matmul(weights[..., None, :], v).squeeze(-2)
    return key, value, nonempty


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, dropout_p: float
) -> torch.Tensor:
    """Batched attention of query groups on their own keys through SDPA.

    ``q (B, H, G, Q, d)``, ``k, v (B, H, G, K, d)``, ``mask`` bool broadcastable to ``(B, G, Q, K)``
    (True = attend; shared by all heads). Rows with no allowed key output zeros.
    """
    batch, heads, groups, queries, _ = q.shape
    keys = k.shape[-2]
    mask = mask.expand(batch, groups, queries, keys)
    ok = mask.any(-1)
    mask = mask | ~ok[..., None]  # SDPA must not see an empty row

    def fold(x: torch.Tensor) -> torch.Tensor:  # groups into the batch so the mask broadcasts over heads
        return x.transpose(1, 2).reshape(batch * groups, heads, x.shape[-2], x.shape[-1])

    out = masked_sdpa(
        fold(q), fold(k), fold(v), mask.reshape(batch * groups, 1, queries, keys), dropout_p=dropout_p, scale=scale
    )
    out = out.view(batch, groups, heads, queries, -1).transpose(1, 2)
    return out * ok[:, None, :, :, None].to(out.dtype)


def _exclusive_max(x: torch.Tensor, dim: int, both_sides: bool) -> torch.Tensor:
    """Max over the entries strictly before each position along ``dim`` (``both_sides``: all others).

    Empty sets give ``-inf``. Uses ``cummax`` (never a cumulative sum, spec pitfall); the max of all others is
    the best entry, or the second best at the best one's own position.
    """
    return _MaxOfOthers.apply(x, dim) if both_sides else _ExclusiveMax.apply(x, dim)


class _MaxOfOthers(torch.autograd.Function):
    """The max of all other entries along ``dim``, from the best two entries of each run: two reductions and a
    few small tensors, where a ``cummax`` both ways writes full-size int64 indices four times and keeps one for
    the backward. The backward sends each position's gradient to the best entry, or to the second best from the
    best one's own position (nothing where the max is ``-inf``: an empty set or padding only)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int) -> torch.Tensor:
        position = torch.arange(x.shape[dim], device=x.device).view(-1, *([1] * (x.dim() - 1 - dim)))
        best, first = x.max(dim, keepdim=True)
        at_first = position == first
        second, runner_up = torch.where(at_first, -math.inf, x).max(dim, keepdim=True)
        ctx.dim = dim
        ctx.save_for_backward(first, runner_up, best.isfinite(), second.isfinite())
        return torch.where(at_first, second, best)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        first, runner_up, best_finite, second_finite = ctx.saved_tensors
        dim = ctx.dim
        at_first = grad.gather(dim, first)
        # the best entry wins every position but its own; summed in float32 at least, so the subtraction keeps
        # its digits
        wide = torch.promote_types(grad.dtype, torch.float32)
        to_first = (grad.sum(dim, keepdim=True, dtype=wide) - at_first.to(wide)) * best_finite
        grad_x = torch.zeros_like(grad)
        grad_x.scatter_(dim, first, to_first.to(grad.dtype))
        # added, not written: with no finite second best, its index may be the best's own
        return grad_x.scatter_add_(dim, runner_up, at_first * second_finite), None


class _ExclusiveMax(torch.autograd.Function):
    """The max strictly before each position along ``dim``, keeping only the winning position, as int16 (int32
    past 32,767 entries), for the backward: autograd's ``cummax`` keeps int64 indices the size of its input,
    which at long lengths outweigh everything else the causal axial forms keep. Forward and backward run a
    quarter of dim 1 (the heads) at a time, so their int64 temporaries stay small too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int) -> torch.Tensor:
        if dim < 2:
            raise ValueError(f"_exclusive_max runs along dim >= 2 (dim 1 is sliced), got dim={dim}")
        small = torch.int16 if x.shape[dim] <= 2**15 else torch.int32
        best, where = torch.empty_like(x), torch.empty(x.shape, dtype=small, device=x.device)
        for heads in _quarters(x.shape[1]):
            best[:, heads], where[:, heads] = _max_before_with_index(x[:, heads], dim)
        ctx.dim = dim
        ctx.save_for_backward(where)
        return best

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (where,) = ctx.saved_tensors
        grad_x = torch.zeros_like(grad)
        for heads in _quarters(grad.shape[1]):  # a few heads' int64 positions at a time
            index = where[:, heads].long()
            found = index >= 0  # an empty set (-inf) sends nothing back
            grad_x[:, heads].scatter_add_(ctx.dim, index.clamp_(min=0), grad[:, heads] * found)
        return grad_x, None


def _quarters(count: int) -> list[slice]:
    """``range(count)`` in about four slices: the temporaries of one slice are a quarter of the whole's, for
    about four times the (few) kernel launches."""
    step = max(1, count // 4)
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _max_before_with_index(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The max strictly before each position along ``dim`` and where it is (``-inf`` and ``-1`` at the first)."""
    values, index = x.cummax(dim)
    first = x.narrow(dim, 0, 1)
    shifted = (values.narrow(dim, 0, x.shape[dim] - 1), index.narrow(dim, 0, x.shape[dim] - 1))
    fill = torch.full_like(first, -math.inf), torch.full_like(first, -1, dtype=torch.long)
    return tuple(torch.cat([f, t], dim) for f, t in zip(fill, shifted))


# ----------------------------------------------------------------------------------------------
# Variants (all tensors here are already padded to whole blocks / rows)


def _fixed(q, k, v, block, causal, real, scale, dropout_p):
    batch, heads, seq, dim = q.shape
    blocks = seq // block
    qb, kb, vb = (x.view(batch, heads, blocks, block, x.shape[-1]) for x in (q, k, v))
    rb = real.view(batch, blocks, block)
    key_s, value_s, nonempty = _region_summaries(qb, kb, vb, rb[:, None], scale)  # (B, H, nb, d)
    nonempty = nonempty[:, 0]  # (B, nb)

    # Keys of query block t: its own block, then one summary per block (own / later ones masked).
    keys = torch.cat([kb, key_s[:, :, None].expand(-1, -1, blocks, -1, -1)], dim=3)
    values = torch.cat([vb, value_s[:, :, None].expand(-1, -1, blocks, -1, -1)], dim=3)
    direct = rb[:, :, None, :]
    if causal:
        direct = direct & torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    index = torch.arange(blocks, device=q.device)
    region = index[None, :] < index[:, None] if causal else index[None, :] != index[:, None]
    region = (nonempty[:, None, :] & region)[:, :, None, :]  # (B, t, 1, u)
    mask = torch.cat([direct.expand(batch, blocks, block, block), region.expand(-1, -1, block, -1)], -1)
    out = grouped_attention(qb, keys, values, mask, scale, dropout_p)
    return out.reshape(batch, heads, seq, -1)


def _masked_max(
    x: torch.Tensor, real: torch.Tensor | None, nonempty: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-pool ``x (..., n, d)`` over the real tokens (``real (..., n)``): ``(values, argmax)``, each
    ``(..., d)``; regions without real tokens (``nonempty`` False) get zeros."""
    if real is None:
        return x.max(-2)
    values, index = x.masked_fill(~real[..., None], -math.inf).max(-2)
    return values.masked_fill_(~nonempty[..., None], 0.0), index


def _logsparse(q, k, v, block, causal, real, scale, dropout_p):
    """Combiner-Logsparse on tensors padded to whole blocks; ``real=None``: every token is real.

    At level ``b`` of a binary tree over the blocks a query's region is its sibling span (``2**b`` blocks). The
    sequence is cut into tiles of ``block << inner`` tokens (about ``LOGSPARSE_TILE``):

    - the regions of the ``inner`` lowest levels lie inside one tile: one masked attention of their pooled queries
      on the tile's tokens gives all their summaries;
    - a region of a higher level is the sibling of a whole tile: its summary is the same for every query there,
      one matmul per level over views of ``k`` and ``v``;
    - one masked attention per tile on ``[tile tokens || in-tile summaries || higher summaries]`` gives the output
      (the own block is the direct set; the masks pick each query's siblings).

    A handful of kernels per higher level and a fixed number for the rest; no ``(L, L)`` tensor, and no
    ``(L, d)`` tensor per level.
    """
    batch, heads, seq, dim = q.shape
    dv = v.shape[-1]
    levels = (seq // block - 1).bit_length()  # binary tree over next_pow2(blocks) leaf blocks
    tree = block << levels
    if tree != seq:  # the tree needs a power-of-two number of blocks: the extra ones are empty regions
        if real is None:
            real = torch.ones(batch, seq, dtype=torch.bool, device=q.device)
        q, k, v = (F.pad(x, (0, 0, 0, tree - seq)) for x in (q, k, v))
        real = F.pad(real, (0, tree - seq), value=False)
    leaves = tree // block
    inner = min(levels, max(0, (LOGSPARSE_TILE // block).bit_length() - 1))  # levels inside a tile
    tile = block << inner
    tiles = tree // tile
    device = q.device

    # Max-pools of q and k per level, bottom up (a level's is the max of its two children's); padded tokens never
    # win, and a region of padding only is -inf (its key and query become 0 below; masks keep it out).
    if real is not None:
        pad = ~real[:, None, :, None]
        pooled = torch.stack([x.masked_fill(pad, -math.inf).unflatten(2, (leaves, block)).amax(3) for x in (q, k)])
        nonempty = real.view(batch, leaves, block).any(2)
    else:
        pooled = torch.stack([x.unflatten(2, (leaves, block)).amax(3) for x in (q, k)])
        nonempty = None
    pools, filled = [], []  # per level: (2, B, H, count, d) and (B, count) or None
    for level in range(levels):
        if level:
            pooled = pooled.unflatten(3, (-1, 2)).amax(4)
            nonempty = None if nonempty is None else nonempty.unflatten(1, (-1, 2)).any(2)
        pools.append(pooled.nan_to_num(neginf=0.0) if real is not None else pooled)
        filled.append(nonempty)

    position = torch.arange(tile, device=device)
    tiled = [x.view(batch, heads, tiles, tile, x.shape[-1]) for x in (q, k, v)]
    real_tiles = None if real is None else real.view(batch, tiles, tile)
    keys, values, masks = [tiled[1]], [tiled[2]], []

    # The direct set: the own block (causal: up to the query).
    direct = position[:, None] // block == position[None, :] // block
    if causal:
        direct = direct & (position[:, None] >= position[None, :])
    masks.append(direct if real_tiles is None else direct & real_tiles[:, :, None, :])

    if inner:  # the in-tile levels' regions, level 0 first: each by its level and its index there in the tile
        level_of = torch.cat([torch.full((tile // (block << b),), b, device=device) for b in range(inner)])
        region_q = torch.cat([pools[b][0].view(batch, heads, tiles, -1, dim) for b in range(inner)], 3)
        region_k = torch.cat([pools[b][1].view(batch, heads, tiles, -1, dim) for b in range(inner)], 3)
        index = torch.cat([torch.arange(tile // (block << b), device=device) for b in range(inner)])
        span = block << level_of  # tokens per region
        member = position[None, :] // span[:, None] == index[:, None]  # (R, T)
        summary_mask = member if real_tiles is None else member & real_tiles[:, :, None, :]
        keys.append(region_k)
        values.append(grouped_attention(region_q, tiled[1], tiled[2], summary_mask, scale, 0.0))
        own = position[:, None] // span[None, :]  # (T, R): the query's span at each region's level
        sibling = index[None, :] == own ^ 1
        if causal:
            sibling = sibling & (own % 2 == 1)
        if real_tiles is not None:
            sibling = sibling & summary_mask.any(-1)[:, :, None, :]
        masks.append(sibling)

    # The higher levels: a tile's region at level b is the sibling of the span holding the tile.
    tile_index = torch.arange(tiles, device=device)
    higher_k, higher_v, higher_use = [], [], []
    for level in range(inner, levels):
        span, count = block << level, leaves >> level
        region_q, region_k = pools[level].unbind(0)
        logits = torch.matmul(k.view(batch, heads, count, span, dim), region_q[..., None] * scale).squeeze(-1)
        if real is None:
            weights = logits.softmax(-1)
        else:
            weights = masked_softmax(logits, real.view(batch, 1, count, span), empty_rows="any")
        value = torch.matmul(weights[..., None, :], v.view(batch, heads, count, span, dv)).squeeze(-2)
        holder = tile_index >> (level - inner)  # the span of this level that holds each tile
        higher_k.append(region_k[:, :, holder ^ 1])
        higher_v.append(value[:, :, holder ^ 1])
        use = torch.ones(1, tiles, dtype=torch.bool, device=device)
        if causal:
            use = use & (holder % 2 == 1)
        if filled[level] is not None:
            use = use & filled[level][:, holder ^ 1]
        higher_use.append(use)
    if higher_k:
        keys.append(torch.stack(higher_k, 3))
        values.append(torch.stack(higher_v, 3))
        masks.append(torch.stack(torch.broadcast_tensors(*higher_use), -1)[:, :, None, :].expand(-1, -1, tile, -1))

    # One softmax per query over [own block || one summary per level]; extra masked keys round the key count up
    # to a multiple of 8 (the memory-efficient kernel's alignment).
    extra = -sum(x.shape[3] for x in keys) % 8
    if extra:
        keys.append(keys[0].new_zeros(batch, heads, tiles, extra, dim))
        values.append(values[0].new_zeros(batch, heads, tiles, extra, dv))
        masks.append(torch.zeros(1, 1, tile, extra, dtype=torch.bool, device=device))
    shape = (batch, tiles, tile)
    mask = torch.cat([m.expand(*shape, m.shape[-1]) for m in masks], -1)
    out = grouped_attention(tiled[0], torch.cat(keys, 3), torch.cat(values, 3), mask, scale, dropout_p)
    return out.reshape(batch, heads, tree, dv)[:, :, :seq]


def _axial(q, k, v, width, causal, real, scale, dropout_p, forms):
    """Axial Combiner on a (rows x width) grid; ``forms`` is a subset of {vertical, horizontal}; ``real=None``:
    every token is real (no masks where the structure alone decides)."""
    batch, heads, seq, dim = q.shape
    rows = seq // width
    padded = real is not None
    if real is None:
        real = torch.ones(batch, seq, dtype=torch.bool, device=q.device)
    qg, kg, vg = (x.view(batch, heads, rows, width, x.shape[-1]) for x in (q, k, v))
    rg = real.view(batch, rows, width)
    r_idx = torch.arange(rows, device=q.device)
    c_idx = torch.arange(width, device=q.device)
    # other_row[r, t]: may query row r use row t off its own axis (causal: t above r)?
    other_row = r_idx[None, :] < r_idx[:, None] if causal else r_idx[None, :] != r_idx[:, None]
    other_col = c_idx[None, :] != c_idx[:, None]

    # Direct logits, laid out per query (r, c): own row (keys (r, e)) and own column (keys (t, c)). The scale goes
    # on the queries: one pass over (L, d) instead of one over each (L, sqrt(L)) logit block, forward and backward.
    scaled = qg * scale
    row_logits = torch.einsum("bhrcd,bhred->bhrce", scaled, kg)
    row_mask = rg[:, None, :, None, :]
    if causal:
        row_mask = row_mask & torch.ones(width, width, dtype=torch.bool, device=q.device).tril()
    col_logits = torch.einsum("bhrcd,bhtcd->bhrct", scaled, kg)
    col_mask = rg.transpose(1, 2)[:, None, None, :, :] & other_row[None, None, :, None, :]

    out = 0.0
    for form in forms:
        if form == "vertical":
            key_s, value_s, nonempty = _column_summaries(qg, kg, vg, rg, scale, causal, padded)
            sum_logits = torch.einsum("bhrcd,bhred->bhrce", scaled, key_s)  # summary (r, e)
            sum_mask = nonempty[:, None, :, None, :] & other_col
            sum_eq = "bhrce,bhred->bhrcd"
        else:
            key_s, value_s, nonempty = _row_summaries(qg, kg, vg, rg, scale, padded)
            sum_logits = torch.einsum("bhrcd,bhtcd->bhrct", scaled, key_s)  # summary (t, c)
            sum_mask = nonempty.transpose(1, 2)[:, None, None, :, :] & other_row[None, None, :, None, :]
            sum_eq = "bhrct,bhtcd->bhrcd"
        # One softmax over [own row || own column || summaries]: one partition function per query. The masked
        # logits are filled in place behind autograd's back (through a detached alias): a filled logit gets
        # probability exactly 0 and so no gradient, and a recorded fill would cost a pass over the whole gradient
        # (on a view: two copies). A query with no allowed key at all is padding, whose output the caller zeroes.
        logits = torch.cat([row_logits, col_logits, sum_logits], dim=-1)
        lowest, filled = torch.finfo(logits.dtype).min, logits.detach()
        row_part, col_part, sum_part = filled.split([width, rows, sum_logits.shape[-1]], dim=-1)
        if padded or causal or rows == 1 or width == 1:
            for part, allowed in ((row_part, row_mask), (col_part, col_mask), (sum_part, sum_mask)):
                part.masked_fill_(~allowed, lowest)
        else:  # only the query's own position leaves its column and its summaries: two diagonals, no mask
            col_part.diagonal(0, 2, 4).fill_(lowest)  # key (t, c) with t = r
            sum_part.diagonal(0, 3 if form == "vertical" else 2, 4).fill_(lowest)  # summary e = c, or t = r
        probs = logits.softmax(-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        p_row, p_col, p_sum = probs.split([width, rows, sum_logits.shape[-1]], dim=-1)
        out = out + (
            torch.einsum("bhrce,bhred->bhrcd", p_row, vg)
            + torch.einsum("bhrct,bhtcd->bhrcd", p_col, vg)
            + torch.einsum(sum_eq, p_sum, value_s)
        )
    out = out / len(forms)  # Combiner-Mixture: the 1/M average of separately normalised plans
    return out.reshape(batch, heads, seq, -1)


def axial_region_pools(
    qg: torch.Tensor, kg: torch.Tensor, rg: torch.Tensor, along: int, both_sides: bool, padded: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Region keys and queries of the axial forms on the grid ``qg, kg (B, H, rows, width, d)``, ``rg (B, rows,
    width)``: exclusive max-pools along the rows (``along=2``: each column over the rows before, or all other
    rows) or the columns (``along=3``: each row without one column), padding left out. A region without real
    tokens gets zeros and ``nonempty (B, rows, width) = False``. ``padded=False`` promises that every token is
    real: the pools then skip masking the tokens (and zeroing the regions, where none is empty)."""
    counts = rg.long()
    if both_sides:
        others = counts.sum(along - 1, keepdim=True) - counts
    else:
        others = counts.cumsum(along - 1) - counts  # real tokens strictly before
    nonempty = others > 0
    if padded:
        pad = ~rg[:, None, :, :, None]
        kg, qg = (x.masked_fill(pad, -math.inf) for x in (kg, qg))
    key, query = (_exclusive_max(x, along, both_sides) for x in (kg, qg))
    if padded or not both_sides or qg.shape[along] == 1:  # some region is empty (-inf): zeros there
        keep = nonempty[:, None, ..., None]
        key, query = torch.where(keep, key, 0.0), torch.where(keep, query, 0.0)
    return key, query, nonempty


def _column_summaries(qg, kg, vg, rg, scale, causal, padded):
    """Vertical regions: column ``e`` over the rows above ``r`` (bidirectional: all rows but ``r``).

    Returns key and value summaries indexed ``[..., r, e, :]`` and ``nonempty (B, r, e)``.
    """
    rows = qg.shape[2]
    key, query, nonempty = axial_region_pools(qg, kg, rg, along=2, both_sides=not causal, padded=padded)
    # Within-region distribution: per column, region query (r, e) attends to keys (t, e), t in R(r).
    r_idx = torch.arange(rows, device=qg.device)
    inside = r_idx[None, :] < r_idx[:, None] if causal else r_idx[None, :] != r_idx[:, None]
    mask = rg.transpose(1, 2)[:, :, None, :] & inside  # (B, e, r, t)
    value = grouped_attention(
        *(x.transpose(2, 3) for x in (query, kg, vg)), mask, scale, 0.0
    ).transpose(2, 3)  # fmt: skip
    return key, value, nonempty


def _row_summaries(qg, kg, vg, rg, scale, padded):
    """Horizontal regions: row ``t`` without column ``c`` (rows are complete, causal or not).

    Returns key and value summaries indexed ``[..., t, c, :]`` and ``nonempty (B, t, c)``.
    """
    width = qg.shape[3]
    key, query, nonempty = axial_region_pools(qg, kg, rg, along=3, both_sides=True, padded=padded)
    c_idx = torch.arange(width, device=qg.device)
    mask = rg[:, :, None, :] & (c_idx[None, :] != c_idx[:, None])  # (B, t, c, c')
    value = grouped_attention(query, kg, vg, mask, scale, 0.0)
    return key, value, nonempty


# ----------------------------------------------------------------------------------------------
# Validation


def check_combiner_inputs(q, k, v, variant, block_size, causal, key_padding_mask, dropout_p) -> int:
    """Raise naming the argument when a :func:`combiner` input is wrong; returns the block size to use."""
    check_qkv(q, k, v)
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not known; choose one of {list(VARIANTS)}")
    if not isinstance(causal, bool):
        raise InputTypeError(f"causal must be a bool, got {causal!r}")
    check_probability("dropout_p", dropout_p)
    check_key_padding_mask(key_padding_mask, q)
    return resolve_block_size(variant, block_size, q.shape[2], causal)


def resolve_block_size(variant: str, block_size: int | None, seq: int, causal: bool = False) -> int:
    """The block size (row length) ``combiner`` uses; raises ``ValueError`` for a bad one. Causal inputs may be
    shorter than a block (a decoder keeps one block size whatever the length so far)."""
    if block_size is None:
        return min(2, seq) if variant == "logsparse" else max(1, math.ceil(math.sqrt(seq)))
    if causal:
        return check_int("block_size", block_size, 1)
    return check_int("block_size", block_size, 1, seq, allowed=f"an integer in [1, seq={seq}]")
