"""The ``triton`` backend: sparse attention and diffusion with hopformer's own Triton kernels.

Why a backend of its own. Every hop of the diffusion ``Z <- (1 - a) P Z + a V`` uses the same
attention ``P = softmax(q k^T)``: only the values change. A loop of FlexAttention calls pays for a
full attention (online softmax) per hop and for a full attention backward per hop. Here:

- **Forward.** The first hop runs an online softmax and keeps each query's log-sum-exp (``lse``);
  every later hop is then the linear map ``P z`` with ``P = exp(s - lse)``: no running maximum, no
  rescaling.
- **Backward (adjoint).** The hops' state gradients run backwards through ``P^T`` (one transposed
  pass per hop, same ``lse``). The score gradient of all hops together is
  ``dS = P * (sum_t h_t z_t^T - delta)``, so *one* pass computes ``dq`` and ``dk`` for every hop,
  instead of one attention backward per hop. Plain attention (one hop, ``a = 0``) has no adjoint pass:
  its ``h_0`` is the output gradient and ``delta = rowsum(grad * out)``, as in FlashAttention.
- **Balance.** Work is cut into segments of at most ``split`` tile pairs, so the few global rows and
  columns that pair with every tile are spread over many programs (their parts add atomically).

With ``hops`` hops that is ``2 hops`` tile matmuls per tile pair forward and ``2 (hops - 1) + 4 + hops``
backward, and every pass is balanced.

Conventions as in :mod:`hopformer.ops.sparse`. CUDA only (and the Triton interpreter,
``TRITON_INTERPRET=1``, which runs these kernels on CPU tensors for tests). Graphs whose block size
is a multiple of 16; head dimensions are zero-padded to a power of two >= 16.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph
from hopformer.ops.backend import NO_OPTIONS, HopOptions, Support

MIN_TILE = 16  # tl.dot's smallest side
DEFAULT_TILE = 128  # rows and columns of a tile pair at most (a power of two dividing the block size)
DEFAULT_SPLIT = 32  # tile pairs per program at most
LOG2E = 1.4426950408889634
# Triton launch options per (kernel, tile), tuned at 131K tokens on Hopper; other tiles use (4 warps, 2 stages)
LAUNCH = {
    ("first", 64): {"num_warps": 4, "num_stages": 2},
    ("first", 128): {"num_warps": 4, "num_stages": 2},
    ("pass", 64): {"num_warps": 4, "num_stages": 2},
    ("pass", 128): {"num_warps": 4, "num_stages": 3},
    ("dqdk", 64): {"num_warps": 4, "num_stages": 3},
    ("dqdk", 128): {"num_warps": 8, "num_stages": 3},
}
DQ_HEAD_CHUNKS = 4  # dq's float32 buffer holds a quarter of the (batch * heads) at a time


# Looked up once, at import: backend choice runs inside compiled models too, and Dynamo cannot trace find_spec.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether Triton is installed (the backend also needs CUDA tensors, or ``TRITON_INTERPRET=1``)."""
    return _TRITON_INSTALLED


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): the backend then takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Segments:
    """Work of one pass: segment ``s`` covers output tile ``tile[s]`` and the loop tiles
    ``loop_tiles[begin[s]:end[s]]``. A tile with several segments is *split*: its segments add into
    ``scratch[slot[s]]`` (``slot = -1`` elsewhere) and ``slot_tiles[slot]`` names the tile.
    ``row_segments`` (CSR over output tiles) lists each tile's segments."""

    tile: torch.Tensor
    begin: torch.Tensor
    end: torch.Tensor
    slot: torch.Tensor
    loop_tiles: torch.Tensor
    row_segments: torch.Tensor
    slot_tiles: torch.Tensor
    split: torch.Tensor  # per segment, its index among the segments of split tiles (-1 elsewhere)

    @property
    def count(self) -> int:
        return self.tile.numel()

    @property
    def num_slots(self) -> int:
        return self.slot_tiles.numel()

    @property
    def num_split(self) -> int:
        return int(self.split.max()) + 1 if self.count else 0

    def to(self, device: torch.device) -> Segments:
        return Segments(*(getattr(self, name).to(device) for name in Segments.__dataclass_fields__))


@dataclass
class TilePlan:
    """A graph cut into square tiles: the row-major and the column-major segment lists."""

    tile: int
    padded_len: int
    rows: Segments  # output = query tiles (forward, lse)
    cols: Segments  # output = key tiles (adjoint passes, dq/dk)
    all_tiles: torch.Tensor  # 0 .. num_tiles - 1

    def tensors(self) -> list[torch.Tensor]:
        """The index tensors in a fixed order (the custom ops take tensors, not plans)."""
        fields = Segments.__dataclass_fields__
        return (
            [getattr(self.rows, name) for name in fields]
            + [getattr(self.cols, name) for name in fields]
            + [self.all_tiles]
        )

    @classmethod
    def from_tensors(cls, tile: int, padded_len: int, tensors: Sequence[torch.Tensor]) -> TilePlan:
        """The plan whose :meth:`tensors` are ``tensors``."""
        count = len(Segments.__dataclass_fields__)
        return cls(tile, padded_len, Segments(*tensors[:count]), Segments(*tensors[count : 2 * count]), tensors[-1])


def tile_plan(graph: BlockGraph, device: torch.device, tile: int | None = None, split: int | None = None) -> TilePlan:
    """The tile pairs of ``graph`` (cached on it per device, tile and split)."""
    tile = tile or _default_tile(graph.block_size)
    split = DEFAULT_SPLIT if split is None else split
    if graph.block_size % tile or tile < MIN_TILE or tile & (tile - 1):
        raise ValueError(
            f"tile must be a power of two >= {MIN_TILE} dividing block_size={graph.block_size}, got tile={tile}"
        )
    if split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    return graph.view(_build_tile_plan, str(device), tile, split)


def _build_tile_plan(graph: BlockGraph, device: str, tile: int, split: int) -> TilePlan:
    per_block = graph.block_size // tile
    num_tiles = -(-graph.seq_len // tile)
    block_rows = torch.repeat_interleave(torch.arange(graph.num_blocks), graph.degrees)
    within = torch.arange(per_block)
    rows = (block_rows[:, None, None] * per_block + within[None, :, None]).expand(-1, per_block, per_block)
    cols = (graph.indices[:, None, None] * per_block + within[None, None, :]).expand(-1, per_block, per_block)
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    keep = (rows < num_tiles) & (cols < num_tiles)
    if graph.is_causal:
        keep &= cols <= rows  # tiles above the diagonal hold only future keys
    rows, cols = rows[keep], cols[keep]
    return TilePlan(
        tile,
        num_tiles * tile,
        _segments(rows, cols, num_tiles, split).to(device),
        _segments(cols, rows, num_tiles, split).to(device),
        torch.arange(num_tiles, dtype=torch.int32, device=device),
    )


def _default_tile(block_size: int) -> int:
    """The largest power of two dividing ``block_size``, at most :data:`DEFAULT_TILE`."""
    return min(block_size & -block_size, DEFAULT_TILE)


def _segments(out_tiles: torch.Tensor, loop_tiles: torch.Tensor, num_tiles: int, split: int) -> Segments:
    order = torch.argsort(out_tiles * num_tiles + loop_tiles)
    out_tiles, loop_tiles = out_tiles[order], loop_tiles[order]
    counts = torch.bincount(out_tiles, minlength=num_tiles)
    starts = torch.cumsum(counts, 0) - counts
    per_tile = (-(-counts // split)).clamp(min=1)  # an empty tile still gets one (empty) segment: it writes zeros
    tile = torch.repeat_interleave(torch.arange(num_tiles), per_tile)
    first = torch.cumsum(per_tile, 0) - per_tile
    index = torch.arange(tile.numel()) - first[tile]
    begin = starts[tile] + index * split
    end = torch.minimum(begin + split, starts[tile] + counts[tile])
    row_segments = torch.zeros(num_tiles + 1, dtype=torch.int64)
    row_segments[1:] = torch.cumsum(per_tile, 0)
    split_tiles = torch.nonzero(per_tile > 1).flatten()
    slot_of_tile = torch.full((num_tiles,), -1, dtype=torch.int64)
    slot_of_tile[split_tiles] = torch.arange(split_tiles.numel())

    def i32(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.int32).contiguous()

    in_split_tile = slot_of_tile[tile] >= 0
    split = torch.where(in_split_tile, torch.cumsum(in_split_tile, 0) - 1, -1)
    return Segments(i32(tile), i32(begin), i32(end), i32(slot_of_tile[tile]), i32(loop_tiles), i32(row_segments),
                    i32(split_tiles), i32(split))  # fmt: skip


# ------------------------------------------------------------------------------------ passes
class _Passes:
    """The kernels on one (graph, inputs) layout: ``(batch * heads, padded_len, dim)`` tensors."""

    def __init__(self, plan: TilePlan, seq: int, causal: bool, heads: int, real: torch.Tensor | None, dtype):
        from hopformer.ops import _triton_kernels as kernels

        self.kernels = kernels
        self.plan, self.seq, self.causal, self.heads, self.real = plan, seq, causal, heads, real
        self.device = plan.all_tiles.device
        # float64 on CUDA multiplies in registers (see _triton_kernels._dot); the interpreter has no such limit
        fp64 = "fma" if self.device.type == "cuda" else "ieee"
        self.precision = {torch.float64: fp64, torch.float32: "ieee"}.get(dtype, "tf32")  # tf32: unused for 16-bit
        self.acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def scalars(self, *values: float) -> torch.Tensor:
        """Scalars for a kernel, in the accumulation dtype (a Python float argument would be float32)."""
        return _scalar_tensor(values, self.acc_dtype, self.device)

    def launch(self, kernel: str) -> dict:
        return LAUNCH.get((kernel, self.plan.tile), {"num_warps": 4, "num_stages": 2})

    def _flags(self) -> dict:
        return dict(HAS_PAD=self.real is not None, CAUSAL=self.causal, PRECISION=self.precision, T=self.plan.tile)

    def first_hop(self, q, k, x, scale: float, *, a: float, keep_scale: float, v, keep, out) -> torch.Tensor:
        """``out = drop((1 - a) softmax(s) x + a v)``; returns each query's base-2 log-sum-exp
        ``(batch * heads, padded_len)`` in the accumulation dtype."""
        segs = self.plan.rows
        bh, length, dim = q.shape
        vdim = v.shape[-1]
        lse = torch.empty(bh, length, device=q.device, dtype=self.acc_dtype)
        num_split = max(segs.num_split, 1)
        part_m = torch.empty(bh, num_split, self.plan.tile, device=q.device, dtype=self.acc_dtype)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(bh, num_split, self.plan.tile, vdim, device=q.device, dtype=self.acc_dtype)
        real = self.real if self.real is not None else q  # never read without HAS_PAD

        def launch(grid, finish):
            self.kernels.first_hop_kernel[grid](
                q, k, x, lse, real, part_m, part_l, part_acc, v, keep if keep is not None else q, out,
                segs.tile, segs.begin, segs.end, segs.split, segs.loop_tiles, segs.row_segments, segs.slot_tiles,
                self.seq, self.heads, length, num_split, self.scalars(scale * LOG2E, a, keep_scale),
                D=dim, DV=vdim, FINISH=finish, DROPOUT=keep is not None, MIX=a != 0, **self._flags(),
                **self.launch("first"),
            )  # fmt: skip

        launch((segs.count, bh), False)
        if segs.num_slots:
            launch((segs.num_slots, bh), True)
        return lse

    def run_pass(self, q, k, x, lse, scale: float, *, transposed: bool, a: float, keep_scale: float = 1.0,
                 v, keep=None, out=None, state=None, h=None, dv=None, delta=None, from_grad=None) -> None:  # fmt: skip
        """One forward hop (``out = drop((1 - a) P x + a v)``) or one adjoint hop (``P^T x`` into
        ``dv``, ``h`` and ``delta``; see the kernels). ``from_grad``: skip the pass and run the
        adjoint epilogue on this gradient instead (the last hop's)."""
        segs = self.plan.cols if transposed else self.plan.rows
        bh, length, dim = q.shape
        vdim = v.shape[-1]
        dummy = q
        pointers = [
            v, keep if keep is not None else dummy, out if out is not None else dummy,
            state if state is not None else dummy, h if h is not None else dummy,
            dv if dv is not None else dummy, delta if delta is not None else dummy,
        ]  # fmt: skip
        real = self.real if self.real is not None else dummy
        scalars = self.scalars(scale * LOG2E, a, keep_scale)
        flags = dict(D=dim, DV=vdim, TRANSPOSED=transposed, DROPOUT=keep is not None, WRITE_H=h is not None, MIX=a != 0)
        flags |= self._flags()

        def launch(grid, scratch, slot_tiles, num_slots, finish):
            self.kernels.pass_kernel[grid](
                q if not transposed else k, k if not transposed else q, x, lse, real, scratch, *pointers,
                segs.tile, segs.begin, segs.end, segs.slot, segs.loop_tiles, slot_tiles,
                self.seq, self.heads, length, num_slots, scalars, FINISH=finish, **flags, **self.launch("pass"),
            )  # fmt: skip

        if from_grad is not None:  # every tile is a "slot" whose sum is the given gradient
            num_tiles = self.plan.all_tiles.numel()
            launch((num_tiles, bh), from_grad, self.plan.all_tiles, num_tiles, True)
            return
        scratch = torch.zeros(bh, max(segs.num_slots, 1), self.plan.tile, vdim, device=q.device, dtype=self.acc_dtype)
        launch((segs.count, bh), scratch, segs.slot_tiles, segs.num_slots, False)
        if segs.num_slots:
            launch((segs.num_slots, bh), scratch, segs.slot_tiles, segs.num_slots, True)

    def delta(self, grad, out) -> torch.Tensor:
        """``rowsum(grad * out)`` in the accumulation dtype (plain attention's ``delta``)."""
        bh, length, vdim = out.shape
        delta = torch.empty(bh, length, device=out.device, dtype=self.acc_dtype)
        self.kernels.delta_kernel[(length // self.plan.tile, bh)](grad, out, delta, length, DV=vdim, T=self.plan.tile)
        return delta

    def dqdk(self, q, k, z0, states, hgrads, lse, delta, scale: float, dz0=None) -> tuple[torch.Tensor, ...]:
        """``(dq, dk, dz0)``: the score gradients of every hop at once and ``dz0 (+)= P^T h_0`` (see
        :func:`hopformer.ops._triton_kernels.dqdk_kernel`). ``dz0``: a float32 buffer holding the other
        terms of ``z0``'s gradient, or None (``dz0`` is then a new tensor in ``z0``'s dtype). ``dq`` is
        added up in float32 a few heads at a time (:data:`DQ_HEAD_CHUNKS`), which keeps that buffer small."""
        segs = self.plan.cols
        bh, length, dim = q.shape
        vdim = z0.shape[-1]
        dq = torch.empty(bh, length, dim, device=q.device, dtype=q.dtype)
        dk = torch.empty(bh, length, dim, device=q.device, dtype=k.dtype)
        add_dz0 = dz0 is not None
        if not add_dz0:
            dz0 = torch.empty(z0.shape, device=z0.device, dtype=z0.dtype)
        slots = max(segs.num_slots, 1)
        scratch = torch.zeros(bh, slots, self.plan.tile, dim, device=q.device, dtype=self.acc_dtype)
        dz0_scratch = scratch if add_dz0 else torch.zeros(bh, slots, self.plan.tile, vdim, device=q.device,
                                                         dtype=self.acc_dtype)  # fmt: skip
        real = self.real if self.real is not None else q
        chunk = -(-bh // DQ_HEAD_CHUNKS)
        for start in range(0, bh, chunk):
            stop = min(start + chunk, bh)
            dq_part = torch.zeros(stop - start, length, dim, device=q.device, dtype=self.acc_dtype)
            self.kernels.dqdk_kernel[(segs.count, stop - start)](
                q, k, z0, states, hgrads, lse, delta, dq_part, dk, dz0, real, scratch, dz0_scratch,
                segs.tile, segs.begin, segs.end, segs.slot, segs.loop_tiles,
                self.seq, self.heads, length, hgrads.shape[0], bh, segs.num_slots, start,
                self.scalars(scale * LOG2E, scale), D=dim, DV=vdim, ADD_DZ0=add_dz0, **self._flags(),
                **self.launch("dqdk"),
            )  # fmt: skip
            dq[start:stop] = dq_part
            del dq_part
        if segs.num_slots:  # split key tiles: their parts were added up unscaled (dz0's in float32)
            tiles = segs.slot_tiles.long()
            tile_view = (bh, -1, self.plan.tile)
            dk.view(*tile_view, dim)[:, tiles] = (scratch[:, : segs.num_slots] * scale).to(dk.dtype)
            if not add_dz0:
                dz0.view(*tile_view, vdim)[:, tiles] = dz0_scratch[:, : segs.num_slots].to(dz0.dtype)
        return dq, dk, dz0


def _diffusion_forward(passes: _Passes, q, k, v, z0, steps: Sequence[float], scale: float, hop_dropout_p: float):
    """``Z_0 = z0; Z_{t+1} = drop((1 - a_t) P Z_t + a_t v)`` on ``(batch * heads, padded_len, dim)`` inputs:
    ``(Z_hops, lse, states Z_1 .. Z_{hops-1}, hop keep-masks)``; ``steps`` are the mixing weights ``a_t`` (< 1)."""
    hops = len(steps)
    states = _new_states(v, hops)
    keep_scale = 1 / (1 - hop_dropout_p)
    keeps = torch.empty((hops if hop_dropout_p > 0 else 0, *v.shape), device=v.device, dtype=torch.uint8)
    z, lse = z0, None
    out = torch.empty_like(v)
    for t, a in enumerate(steps):
        keep = None
        if hop_dropout_p > 0:
            keeps[t] = (torch.rand(v.shape, device=v.device) >= hop_dropout_p).view(torch.uint8)
            keep = keeps[t]
        target = states[t] if t < hops - 1 else out
        hop = dict(a=a, keep_scale=keep_scale, v=v, keep=keep, out=target)
        if lse is None:  # the first hop also finds each query's log-sum-exp
            lse = passes.first_hop(q, k, z, scale, **hop)
        else:
            passes.run_pass(q, k, z, lse, scale, transposed=False, **hop)
        z = target
    return out, lse, states, keeps


def _new_states(v: torch.Tensor, hops: int) -> torch.Tensor:
    """The stack for Z_1 .. Z_{hops-1}. One hop keeps none: one zero stands in, since the kernels take a
    pointer (that they never read then); a (1, *v.shape) placeholder cost a whole output's size."""
    return v.new_empty((hops - 1, *v.shape)) if hops > 1 else v.new_zeros(1)


def _diffusion_backward(passes: _Passes, grad, q, k, v, z0, out, lse, states, keeps, steps, scale, hop_dropout_p):
    """``(dq, dk, dv, dz0)`` of :func:`_diffusion_forward` (``dz0`` None when ``z0`` is ``v``)."""
    hops = len(steps)
    if hops == 1 and steps[0] == 0 and hop_dropout_p == 0 and z0 is None:
        # plain attention: grad is h_0 and dv is P^T grad, so the adjoint pass reduces to delta
        dq, dk, dv = passes.dqdk(q, k, v, states, grad[None], lse, passes.delta(grad, out), scale)
        return dq, dk, dv, None
    keep_scale = 1 / (1 - hop_dropout_p)
    hgrads = torch.empty((hops, *v.shape), device=v.device, dtype=v.dtype)  # h_t: gradient reaching P Z_t
    delta = torch.zeros(q.shape[:2], device=q.device, dtype=passes.acc_dtype)
    dv = torch.zeros(v.shape, device=v.device, dtype=passes.acc_dtype)

    def keep(t):
        return keeps[t] if keeps.shape[0] else None

    # the last hop: its output gradient is given; then back through P^T, hop by hop
    common = dict(v=v, dv=dv, delta=delta, keep_scale=keep_scale)
    passes.run_pass(q, k, grad, lse, scale, transposed=True, a=steps[-1], keep=keep(hops - 1), state=out,
                    h=hgrads[hops - 1], from_grad=grad.contiguous(), **common)  # fmt: skip
    for t in reversed(range(1, hops)):
        passes.run_pass(q, k, hgrads[t], lse, scale, transposed=True, a=steps[t - 1], keep=keep(t - 1),
                        state=states[t - 1], h=hgrads[t - 1], **common)  # fmt: skip
    if z0 is None:  # dZ_0 = P^T h_0 adds into dv
        dq, dk, _ = passes.dqdk(q, k, v, states, hgrads, lse, delta, scale, dz0=dv)
        dz0 = None
    else:
        dq, dk, dz0 = passes.dqdk(q, k, z0, states, hgrads, lse, delta, scale)
    del hgrads  # before dv's copy in v's dtype, which would otherwise raise the peak by half an output
    return dq, dk, dv.to(v.dtype), dz0


def _passes_of(tensors, tile, padded_len, seq, causal, heads, real, dtype) -> _Passes:
    return _Passes(TilePlan.from_tensors(tile, padded_len, tensors), seq, causal, heads, real, dtype)


@torch.library.custom_op("hopformer::triton_diffusion", mutates_args=())
def _triton_diffusion_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    z0: torch.Tensor | None,
    real: torch.Tensor | None,
    plan: list[torch.Tensor],
    steps: Sequence[float],
    scale: float,
    hop_dropout_p: float,
    tile: int,
    padded_len: int,
    seq: int,
    causal: bool,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Z_hops, lse, states, hop keep-masks)`` of ``(batch * heads, padded_len, dim)`` inputs on the tiles of
    ``plan`` (:meth:`TilePlan.tensors`); ``z0`` None: the diffusion starts from ``v``."""
    passes = _passes_of(plan, tile, padded_len, seq, causal, heads, real, q.dtype)
    with torch.no_grad():
        return _diffusion_forward(passes, q, k, v, v if z0 is None else z0, steps, scale, hop_dropout_p)


@_triton_diffusion_op.register_fake
def _(q, k, v, z0, real, plan, steps, scale, hop_dropout_p, tile, padded_len, seq, causal, heads):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    hops = len(steps)
    return (
        v.new_empty(v.shape),
        q.new_empty(q.shape[:2], dtype=acc),
        _new_states(v, hops),
        v.new_empty((hops if hop_dropout_p > 0 else 0, *v.shape), dtype=torch.uint8),
    )


@torch.library.custom_op("hopformer::triton_diffusion_backward", mutates_args=())
def _triton_diffusion_backward_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    z0: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    states: torch.Tensor,
    keeps: torch.Tensor,
    real: torch.Tensor | None,
    plan: list[torch.Tensor],
    steps: Sequence[float],
    scale: float,
    hop_dropout_p: float,
    tile: int,
    padded_len: int,
    seq: int,
    causal: bool,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dz0)`` of ``hopformer::triton_diffusion`` (``dz0`` empty when ``z0`` is None)."""
    passes = _passes_of(plan, tile, padded_len, seq, causal, heads, real, q.dtype)
    with torch.no_grad():
        dq, dk, dv, dz0 = _diffusion_backward(passes, grad, q, k, v, z0, out, lse, states, keeps, steps, scale,
                                              hop_dropout_p)  # fmt: skip
    return dq, dk, dv, v.new_empty(0) if dz0 is None else dz0


@_triton_diffusion_backward_op.register_fake
def _(grad, q, k, v, z0, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), v.new_empty(0 if z0 is None else v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, z0, real, plan, *settings = inputs
    out, lse, states, keeps = output
    # Only Z_hops carries a gradient. Left differentiable, autograd would hand the backward a zero tensor for
    # each of the others: a (hops - 1, batch * heads, seq, dim) block of zeros for the states alone.
    ctx.mark_non_differentiable(lse, states, keeps)
    ctx.set_materialize_grads(False)
    ctx.has_z0, ctx.has_real, ctx.plan_size = z0 is not None, real is not None, len(plan)
    empty = q.new_empty(0)
    ctx.save_for_backward(q, k, v, z0 if z0 is not None else empty, out, lse, states, keeps,
                          real if real is not None else empty, *plan)  # fmt: skip
    ctx.settings = (list(settings[0]), *settings[1:])  # steps, scale, hop dropout, the layout's facts


def _backward_formula(ctx, grad, *_):
    plan_grads = [None] * ctx.plan_size  # (a list input gets a list of gradients)
    if grad is None:  # the output was not used
        return None, None, None, None, None, plan_grads, *([None] * 8)
    q, k, v, z0, out, lse, states, keeps, real, *plan = ctx.saved_tensors
    dq, dk, dv, dz0 = torch.ops.hopformer.triton_diffusion_backward(
        grad.contiguous(), q, k, v, z0 if ctx.has_z0 else None, out, lse, states, keeps,
        real if ctx.has_real else None, plan, *ctx.settings,
    )  # fmt: skip
    return dq, dk, dv, dz0 if ctx.has_z0 else None, None, plan_grads, *([None] * 8)


_triton_diffusion_op.register_autograd(_backward_formula, setup_context=_setup_context)


def op_arguments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    graph: BlockGraph,
    key_padding_mask: torch.Tensor | None,
    steps: list[float],
    scale: float,
    hop_dropout_p: float = 0.0,
    *,
    tile: int | None = None,
    split: int | None = None,
) -> tuple:
    """The arguments of ``hopformer::triton_diffusion`` for ``(batch, heads, seq, dim)`` inputs (steps after the
    last reset; see :func:`triton_diffusion`)."""
    if q.dtype == torch.float64 and q.is_cuda:
        tile = MIN_TILE  # float64 on CUDA multiplies in registers (see _triton_kernels._dot): small tiles
    plan = tile_plan(graph, q.device, tile, split)
    batch, heads, seq, dim = q.shape
    vdim = v.shape[-1]
    check_index_range(plan.padded_len, _pow2(max(dim, vdim)))

    def layout(x: torch.Tensor, width: int) -> torch.Tensor:
        if width > x.shape[-1] or plan.padded_len > seq:
            x = F.pad(x, (0, width - x.shape[-1], 0, plan.padded_len - seq))
        return x.reshape(batch * heads, plan.padded_len, width).contiguous()

    width, vwidth = _pow2(dim), _pow2(vdim)
    real = None
    if key_padding_mask is not None:
        real = F.pad(key_padding_mask, (0, plan.padded_len - seq)).to(torch.int8).contiguous()
    q, k, v = layout(q, width), layout(k, width), layout(v, vwidth)
    return (q, k, v, None, real, plan.tensors(), [float(a) for a in steps], float(scale), float(hop_dropout_p),
            plan.tile, plan.padded_len, graph.seq_len, graph.is_causal, heads)  # fmt: skip


def triton_diffusion(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    graph: BlockGraph,
    key_padding_mask: torch.Tensor | None,
    steps: list[float],
    scale: float,
    hop_dropout_p: float = 0.0,
    *,
    tile: int | None = None,
    split: int | None = None,
) -> torch.Tensor:
    """Diffusion (``steps``: mixing weights, :func:`~hopformer.ops.coefficients.mixing_weights`) or
    sparse attention (``steps=[0.0]``) of ``(batch, heads, seq, dim)`` inputs on the ``triton`` backend.
    Steps equal to 1 reset the state to ``v``; only the hops after the last of them are computed."""
    last_reset = -1  # (a loop, not max() over a generator: Dynamo traces this)
    for index, a in enumerate(steps):
        if a >= 1.0:
            last_reset = index
    steps = steps[last_reset + 1 :]
    if not steps:
        return v
    batch, heads, seq, _ = q.shape
    args = op_arguments(q, k, v, graph, key_padding_mask, steps, scale, hop_dropout_p, tile=tile, split=split)
    if last_reset >= 0 and hop_dropout_p > 0:  # the reset state: v after dropout
        args = (*args[:3], F.dropout(args[2], hop_dropout_p), *args[4:])
    z = torch.ops.hopformer.triton_diffusion(*args)[0]
    padded_len = args[10]
    return z.view(batch, heads, padded_len, -1)[:, :, :seq, : v.shape[-1]]


@functools.lru_cache(maxsize=1024)
def _scalar_tensor(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A device tensor of a few kernel scalars, made once per (values, dtype, device): building it
    is a blocking host-to-device copy (a stream synchronisation per kernel launch otherwise, which on
    a GPU time-shared with other processes also waits for their work). The kernels only read it."""
    return torch.tensor(values, dtype=dtype, device=device)


INT32_LIMIT = 2**31


def check_index_range(padded_len: int, width: int) -> None:
    """The kernels index within one head's ``(padded_len, width)`` slice in int32 (everything across heads,
    hops and batches is int64): raise before launch if that slice could overflow it."""
    if padded_len * width >= INT32_LIMIT:
        raise ValueError(
            f"backend='triton' indexes one head's (sequence, head_dim) slice in 32 bits: {padded_len:,} x {width} "
            f"elements is past 2^31; use backend='flex' or shorter sequences"
        )


def _pow2(n: int) -> int:
    return max(MIN_TILE, 1 << math.ceil(math.log2(n)))


class TritonBackend:
    """``triton``: hopformer's Triton kernels; each softmax normaliser once, every later hop a linear map."""

    name = "triton"
    summary = "hopformer's Triton kernels: one softmax pass, then each hop a linear map; adjoint backward"

    @property
    def support(self) -> Support:
        return Support(
            ops=("sparse_attention", "diffuse", "diffuse_weighted"),
            # the interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors, for tests
            devices=("cuda", "cpu") if interpreting() else ("cuda",),
            exportable=False,
            attention_dropout=False,
            block_sizes=lambda size: size % MIN_TILE == 0,
            rule=f"is a multiple of {MIN_TILE}",
            requires=lambda: None if available() else "needs the triton package (it comes with CUDA builds of PyTorch)",
        )

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
        return triton_diffusion(q, k, v, graph, key_padding_mask, list(steps), scale, options.hop_dropout_p)


TRITON = TritonBackend()
