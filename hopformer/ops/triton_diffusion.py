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
  instead of one attention backward per hop.
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


def available() -> bool:
    """Whether Triton is installed (the backend also needs CUDA tensors, or ``TRITON_INTERPRET=1``)."""
    return importlib.util.find_spec("triton") is not None


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
    key = ("triton_plan", str(device), tile, split)
    if key in graph.cache:
        return graph.cache[key]
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
    plan = TilePlan(
        tile,
        num_tiles * tile,
        _segments(rows, cols, num_tiles, split).to(device),
        _segments(cols, rows, num_tiles, split).to(device),
        torch.arange(num_tiles, dtype=torch.int32, device=device),
    )
    graph.cache[key] = plan
    return plan


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

    def __init__(self, plan: TilePlan, graph: BlockGraph, heads: int, real: torch.Tensor | None, dtype):
        from hopformer.ops import _triton_kernels as kernels

        self.kernels = kernels
        self.plan, self.seq, self.causal, self.heads, self.real = plan, graph.seq_len, graph.is_causal, heads, real
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
                D=dim, DV=vdim, FINISH=finish, DROPOUT=keep is not None, **self._flags(), **self.launch("first"),
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
        flags = dict(D=dim, DV=vdim, TRANSPOSED=transposed, DROPOUT=keep is not None, WRITE_H=h is not None)
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

    def dqdk(self, q, k, z0, states, hgrads, lse, delta, dz0, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``dq, dk`` of every hop at once, and ``dz0 += P^T h_0`` (see
        :func:`hopformer.ops._triton_kernels.dqdk_kernel`). ``dq`` is added up in float32 a few heads
        at a time (:data:`DQ_HEAD_CHUNKS`), which keeps the float32 buffer small."""
        segs = self.plan.cols
        bh, length, dim = q.shape
        dq = torch.empty(bh, length, dim, device=q.device, dtype=q.dtype)
        dk = torch.empty(bh, length, dim, device=q.device, dtype=k.dtype)
        scratch = torch.zeros(bh, max(segs.num_slots, 1), self.plan.tile, dim, device=q.device, dtype=self.acc_dtype)
        real = self.real if self.real is not None else q
        chunk = -(-bh // DQ_HEAD_CHUNKS)
        for start in range(0, bh, chunk):
            stop = min(start + chunk, bh)
            dq_part = torch.zeros(stop - start, length, dim, device=q.device, dtype=self.acc_dtype)
            self.kernels.dqdk_kernel[(segs.count, stop - start)](
                q, k, z0, states, hgrads, lse, delta, dq_part, dk, dz0, real, scratch,
                segs.tile, segs.begin, segs.end, segs.slot, segs.loop_tiles,
                self.seq, self.heads, length, hgrads.shape[0], bh, segs.num_slots, start,
                self.scalars(scale * LOG2E, scale), D=dim, DV=z0.shape[-1], **self._flags(), **self.launch("dqdk"),
            )  # fmt: skip
            dq[start:stop] = dq_part
            del dq_part
        if segs.num_slots:  # split key tiles: their parts were added up unscaled
            tiles = segs.slot_tiles.long()
            dk.view(bh, -1, self.plan.tile, dim)[:, tiles] = (scratch[:, : segs.num_slots] * scale).to(dk.dtype)
        return dq, dk


class _Diffusion(torch.autograd.Function):
    """``Z_0 = z0; Z_{t+1} = drop((1 - a_t) P Z_t + a_t v)``; returns ``Z_hops``. Inputs are laid out
    ``(batch * heads, padded_len, dim)``; ``steps`` are the mixing weights ``a_t`` (< 1); ``z0`` is
    ``v`` itself, or ``v`` after dropout where a step of weight 1 reset the state."""

    @staticmethod
    def forward(ctx, q, k, v, z0, passes: _Passes, steps: tuple[float, ...], scale: float, hop_dropout_p: float):
        hops = len(steps)
        states = torch.empty((max(hops - 1, 1), *v.shape), device=v.device, dtype=v.dtype)  # Z_1 .. Z_{hops-1}
        keep_scale = 1 / (1 - hop_dropout_p)
        keeps = []
        z, lse = z0, None
        for t, a in enumerate(steps):
            keep = None
            if hop_dropout_p > 0:
                keep = (torch.rand(v.shape, device=v.device) >= hop_dropout_p).view(torch.uint8)
                keeps.append(keep)
            out = states[t] if t < hops - 1 else torch.empty_like(v)
            hop = dict(a=a, keep_scale=keep_scale, v=v, keep=keep, out=out)
            if lse is None:  # the first hop also finds each query's log-sum-exp
                lse = passes.first_hop(q, k, z, scale, **hop)
            else:
                passes.run_pass(q, k, z, lse, scale, transposed=False, **hop)
            z = out
        ctx.passes, ctx.steps, ctx.scale, ctx.keep_scale = passes, steps, scale, keep_scale
        ctx.z0_is_v = z0 is v
        ctx.save_for_backward(q, k, v, z0, lse, z, states, *keeps)
        return z

    @staticmethod
    def backward(ctx, grad):
        passes, steps, scale, keep_scale = ctx.passes, ctx.steps, ctx.scale, ctx.keep_scale
        q, k, v, z0, lse, out, states, *keeps = ctx.saved_tensors
        hops = len(steps)
        hgrads = torch.empty((hops, *v.shape), device=v.device, dtype=v.dtype)  # h_t: gradient reaching P Z_t
        delta = torch.zeros(q.shape[:2], device=q.device, dtype=passes.acc_dtype)
        dv = torch.zeros(v.shape, device=v.device, dtype=passes.acc_dtype)
        dz0 = dv if ctx.z0_is_v else torch.zeros_like(dv)

        def keep(t):
            return keeps[t] if keeps else None

        # the last hop: its output gradient is given; then back through P^T, hop by hop
        common = dict(v=v, dv=dv, delta=delta, keep_scale=keep_scale)
        passes.run_pass(q, k, grad, lse, scale, transposed=True, a=steps[-1], keep=keep(hops - 1), state=out,
                        h=hgrads[hops - 1], from_grad=grad.contiguous(), **common)  # fmt: skip
        for t in reversed(range(1, hops)):
            passes.run_pass(q, k, hgrads[t], lse, scale, transposed=True, a=steps[t - 1], keep=keep(t - 1),
                            state=states[t - 1], h=hgrads[t - 1], **common)  # fmt: skip
        dq, dk = passes.dqdk(q, k, z0, states, hgrads, lse, delta, dz0, scale)  # and dZ_0 = P^T h_0
        del hgrads
        return dq, dk, dv.to(v.dtype), None if ctx.z0_is_v else dz0.to(v.dtype), None, None, None, None


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
    last_reset = max((i for i, a in enumerate(steps) if a >= 1.0), default=-1)
    steps = steps[last_reset + 1 :]
    if not steps:
        return v
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
    passes = _Passes(plan, graph, heads, real, q.dtype)
    v = layout(v, vwidth)
    z0 = F.dropout(v, hop_dropout_p) if last_reset >= 0 and hop_dropout_p > 0 else v  # the reset state
    z = _Diffusion.apply(layout(q, width), layout(k, width), v, z0, passes, tuple(steps), scale, hop_dropout_p)
    return z.view(batch, heads, plan.padded_len, vwidth)[:, :, :seq, :vdim]


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
