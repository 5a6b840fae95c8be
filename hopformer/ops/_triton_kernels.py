"""Triton kernels of the ``triton`` backend (imported only when that backend runs; see
:mod:`hopformer.ops.triton_diffusion` for the algorithm and the layout of the inputs).

Every kernel walks one *segment*: an output tile and at most ``split`` of the tiles it pairs with in
the graph. Short rows are one segment; a global row (or column) that pairs with every tile is cut into
many, so no program walks the whole sequence while the rest wait. Segments of one output tile add
their results with atomics; a tile with a single segment stores.

Scores are kept in base 2: ``s2 = q.k * scale * log2(e)``, ``lse2 = log2(sum 2^s2)``, ``p = 2^(s2 - lse2)``,
accumulated in float32 (float64 for float64 inputs); ``scales`` holds ``[scale * log2(e), scale]`` in
that dtype (a Python float argument would be float32).
Tensors are ``(batch * heads, padded_len, dim)``, contiguous; ``real`` is ``int8 (batch, padded_len)``.
Offsets: every kernel casts its ``(batch * heads)`` index ``bh`` to int64 first and builds each address
from it, so an offset into a tensor of any size is 64-bit; the int32 parts within a head's slice
(``position * dim``) are bounded by :func:`hopformer.ops.triton_diffusion.check_index_range`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _valid(q_idx, k_idx, seq, real_q, real_k, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr):
    """Which (query, key) pairs inside a tile pair are edges (the tile pair itself is one); ``real_q``,
    ``real_k``: the padding mask at those positions, broadcast like the indices."""
    valid = (q_idx < seq) & (k_idx < seq)
    if CAUSAL:
        valid = valid & (k_idx <= q_idx)
    if HAS_PAD:
        valid = valid & real_q & real_k
    return valid


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``a @ b``; ``PRECISION="fma"`` multiplies and sums in registers (float64 on NVIDIA GPUs, where
    Triton's float64 MMA fails to compile for some layouts; small tiles only)."""
    if PRECISION == "fma":
        product = tl.sum(a[:, :, None] * b[None, :, :], 1)
    else:
        product = tl.dot(a, b, input_precision=PRECISION)
    return product


@triton.jit
def _real(real_ptr, batch_offset, idx, HAS_PAD: tl.constexpr):
    """The padding mask (True = real token) at positions ``idx`` (a 1-d block); True without padding."""
    if HAS_PAD:
        return tl.load(real_ptr + batch_offset + idx) != 0
    return idx >= 0


@triton.jit
def _hop_epilogue(acc, rows, bh, padded_len, v_ptr, keep_ptr, out_ptr, a, keep_scale, DV: tl.constexpr,
                  DROPOUT: tl.constexpr, MIX: tl.constexpr):  # fmt: skip
    """Forward hop: ``out = drop((1 - a) acc + a v)`` at ``rows`` (``acc = P z`` there); ``MIX=False``
    when ``a = 0`` (plain attention), which skips reading ``v``."""
    offsets = bh * padded_len * DV + rows[:, None] * DV + tl.arange(0, DV)[None, :]
    mixed = acc
    if MIX:
        mixed = (1 - a) * acc + a * tl.load(v_ptr + offsets).to(acc.dtype)
    if DROPOUT:
        mixed = tl.where(tl.load(keep_ptr + offsets) != 0, mixed * keep_scale, 0.0)
    tl.store(out_ptr + offsets, mixed.to(out_ptr.dtype.element_ty))


@triton.jit
def _adjoint_epilogue(acc, rows, bh, padded_len, v_ptr, keep_ptr, state_ptr, h_ptr, dv_ptr, delta_ptr, a, keep_scale,
                      DV: tl.constexpr, DROPOUT: tl.constexpr, WRITE_H: tl.constexpr):  # fmt: skip
    """Backward through the hop that made ``Z_t = drop((1 - a) P Z_{t-1} + a v)``, given ``acc = dZ_t``
    at ``rows``: ``g = drop'(acc)``; ``dv += a g``; with ``WRITE_H``: ``h_{t-1} = (1 - a) g`` and
    ``delta += h_{t-1} . P Z_{t-1}``, where ``P Z_{t-1} = (Z_t / keep_scale - a v) / (1 - a)``."""
    offsets = bh * padded_len * DV + rows[:, None] * DV + tl.arange(0, DV)[None, :]
    g = acc
    if DROPOUT:
        g = tl.where(tl.load(keep_ptr + offsets) != 0, g * keep_scale, 0.0)
    tl.store(dv_ptr + offsets, tl.load(dv_ptr + offsets) + a * g)
    if WRITE_H:
        h = ((1 - a) * g).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offsets, h)
        v = tl.load(v_ptr + offsets).to(acc.dtype)
        attended = (tl.load(state_ptr + offsets).to(acc.dtype) / keep_scale - a * v) / (1 - a)
        delta = delta_ptr + bh * padded_len + rows
        tl.store(delta, tl.load(delta) + tl.sum(h.to(acc.dtype) * attended, 1))


@triton.jit
def pass_kernel(
    a_ptr, b_ptr, x_ptr, lse_ptr, real_ptr, scratch_ptr,
    v_ptr, keep_ptr, out_ptr, state_ptr, h_ptr, dv_ptr, delta_ptr,
    seg_tile_ptr, seg_begin_ptr, seg_end_ptr, seg_slot_ptr, loop_tiles_ptr, slot_tile_ptr,
    seq, heads, padded_len, num_slots, scalars_ptr,
    D: tl.constexpr, DV: tl.constexpr, T: tl.constexpr,
    TRANSPOSED: tl.constexpr, FINISH: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, WRITE_H: tl.constexpr, MIX: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One hop of the forward (``TRANSPOSED=False``: ``acc = P x`` over query rows, a = q, b = k, then
    :func:`_hop_epilogue`) or of the adjoint (``TRANSPOSED=True``: ``acc = P^T x`` over key rows,
    a = k, b = q, then :func:`_adjoint_epilogue`). ``P = 2^(s2 - lse2)`` on the graph's edges.

    Segments of a split tile add ``acc`` atomically into ``scratch[slot]``; a second launch with
    ``FINISH=True`` (one program per slot, ``slot_tile`` maps it to its tile) runs their epilogue.
    ``scalars = [scale * log2(e), a, keep_scale]``."""
    bh = tl.program_id(1).to(tl.int64)
    a_mix = tl.load(scalars_ptr + 1)
    keep_scale = tl.load(scalars_ptr + 2)
    acc_dtype = a_mix.dtype
    if FINISH:
        slot = tl.program_id(0)
        rows = tl.load(slot_tile_ptr + slot) * T + tl.arange(0, T)
        scratch = scratch_ptr + ((bh * num_slots + slot) * T + tl.arange(0, T)[:, None]) * DV
        acc = tl.load(scratch + tl.arange(0, DV)[None, :]).to(acc_dtype)
    else:
        seg = tl.program_id(0)
        batch_offset = (bh // heads) * padded_len
        begin = tl.load(seg_begin_ptr + seg)
        end = tl.load(seg_end_ptr + seg)
        dims = tl.arange(0, D)
        vdims = tl.arange(0, DV)
        rows = tl.load(seg_tile_ptr + seg) * T + tl.arange(0, T)
        a = tl.load(a_ptr + bh * padded_len * D + rows[:, None] * D + dims[None, :])
        real_rows = _real(real_ptr, batch_offset, rows, HAS_PAD)
        scale2 = tl.load(scalars_ptr)
        if not TRANSPOSED:
            row_lse = tl.load(lse_ptr + bh * padded_len + rows)
        acc = tl.zeros((T, DV), acc_dtype)
        for t in range(begin, end):
            cols = tl.load(loop_tiles_ptr + t) * T + tl.arange(0, T)
            b = tl.load(b_ptr + bh * padded_len * D + cols[:, None] * D + dims[None, :])
            s = _dot(a, tl.trans(b), PRECISION).to(acc_dtype) * scale2
            real_cols = _real(real_ptr, batch_offset, cols, HAS_PAD)
            if TRANSPOSED:  # rows are keys, cols are queries
                valid = _valid(
                    cols[None, :], rows[:, None], seq, real_cols[None, :], real_rows[:, None], HAS_PAD, CAUSAL
                )
                lse = tl.load(lse_ptr + bh * padded_len + cols)[None, :]
            else:
                valid = _valid(
                    rows[:, None], cols[None, :], seq, real_rows[:, None], real_cols[None, :], HAS_PAD, CAUSAL
                )
                lse = row_lse[:, None]
            p = tl.where(valid, tl.exp2(s - lse), 0.0)
            x = tl.load(x_ptr + bh * padded_len * DV + cols[:, None] * DV + vdims[None, :])
            acc += _dot(p.to(x.dtype), x, PRECISION).to(acc_dtype)
        slot = tl.load(seg_slot_ptr + seg)
    if not FINISH and slot >= 0:  # a split tile: add up here, the FINISH launch runs the epilogue
        scratch = scratch_ptr + ((bh * num_slots + slot) * T + tl.arange(0, T)[:, None]) * DV
        tl.atomic_add(scratch + tl.arange(0, DV)[None, :], acc, sem="relaxed")
    elif TRANSPOSED:
        _adjoint_epilogue(acc, rows, bh, padded_len, v_ptr, keep_ptr, state_ptr, h_ptr, dv_ptr, delta_ptr,
                          a_mix, keep_scale, DV, DROPOUT, WRITE_H)  # fmt: skip
    else:
        _hop_epilogue(acc, rows, bh, padded_len, v_ptr, keep_ptr, out_ptr, a_mix, keep_scale, DV, DROPOUT, MIX)


@triton.jit
def first_hop_kernel(
    q_ptr, k_ptr, x_ptr, lse_ptr, real_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, v_ptr, keep_ptr, out_ptr,
    seg_tile_ptr, seg_begin_ptr, seg_end_ptr, seg_split_ptr, loop_tiles_ptr, row_segments_ptr, slot_tile_ptr,
    seq, heads, padded_len, num_split, scalars_ptr,
    D: tl.constexpr, DV: tl.constexpr, T: tl.constexpr,
    FINISH: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MIX: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """The first forward hop with an online softmax: ``out = drop((1 - a) softmax(s) x + a v)`` and
    each query's base-2 log-sum-exp ``lse``, which every later pass reuses.

    A segment of a split tile stores its running ``(max, sum, acc)`` in ``part_*[split id]``; the
    ``FINISH`` launch (one program per split tile) merges the tile's segments and runs the epilogue.
    ``scalars = [scale * log2(e), a, keep_scale]``."""
    bh = tl.program_id(1).to(tl.int64)
    a_mix = tl.load(scalars_ptr + 1)
    keep_scale = tl.load(scalars_ptr + 2)
    acc_dtype = a_mix.dtype
    vdims = tl.arange(0, DV)
    m = tl.full((T,), float("-inf"), acc_dtype)
    l = tl.zeros((T,), acc_dtype)
    acc = tl.zeros((T, DV), acc_dtype)
    split = -1
    if FINISH:
        tile = tl.load(slot_tile_ptr + tl.program_id(0))
        for seg in range(tl.load(row_segments_ptr + tile), tl.load(row_segments_ptr + tile + 1)):
            part = bh * num_split + tl.load(seg_split_ptr + seg)
            m_seg = tl.load(part_m_ptr + part * T + tl.arange(0, T))
            m_new = tl.maximum(m, m_seg)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            old, new = tl.exp2(m - shift), tl.exp2(m_seg - shift)
            l = l * old + tl.load(part_l_ptr + part * T + tl.arange(0, T)) * new
            acc_seg = tl.load(part_acc_ptr + (part * T + tl.arange(0, T)[:, None]) * DV + vdims[None, :])
            acc = acc * old[:, None] + acc_seg * new[:, None]
            m = m_new
    else:
        seg = tl.program_id(0)
        tile = tl.load(seg_tile_ptr + seg)
        split = tl.load(seg_split_ptr + seg)
        batch_offset = (bh // heads) * padded_len
        dims = tl.arange(0, D)
        rows = tile * T + tl.arange(0, T)
        q = tl.load(q_ptr + bh * padded_len * D + rows[:, None] * D + dims[None, :])
        real_rows = _real(real_ptr, batch_offset, rows, HAS_PAD)
        scale2 = tl.load(scalars_ptr)
        for t in range(tl.load(seg_begin_ptr + seg), tl.load(seg_end_ptr + seg)):
            cols = tl.load(loop_tiles_ptr + t) * T + tl.arange(0, T)
            k = tl.load(k_ptr + bh * padded_len * D + cols[:, None] * D + dims[None, :])
            s = _dot(q, tl.trans(k), PRECISION).to(acc_dtype) * scale2
            real_cols = _real(real_ptr, batch_offset, cols, HAS_PAD)
            valid = _valid(rows[:, None], cols[None, :], seq, real_rows[:, None], real_cols[None, :], HAS_PAD, CAUSAL)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no edge yet stays (-inf, 0, 0)
            old = tl.exp2(m - shift)
            p = tl.exp2(s - shift[:, None])
            l = l * old + tl.sum(p, 1)
            x = tl.load(x_ptr + bh * padded_len * DV + cols[:, None] * DV + vdims[None, :])
            acc = acc * old[:, None] + _dot(p.to(x.dtype), x, PRECISION).to(acc_dtype)
            m = m_new
    rows = tile * T + tl.arange(0, T)
    if split >= 0:  # part of a split tile: the FINISH launch merges
        part = bh * num_split + split
        tl.store(part_m_ptr + part * T + tl.arange(0, T), m)
        tl.store(part_l_ptr + part * T + tl.arange(0, T), l)
        tl.store(part_acc_ptr + (part * T + tl.arange(0, T)[:, None]) * DV + vdims[None, :], acc)
    else:
        tl.store(lse_ptr + bh * padded_len + rows, m + tl.log2(l))
        attended = acc / tl.where(l > 0, l, 1.0)[:, None]  # a row without edges attends to nothing: 0
        _hop_epilogue(attended, rows, bh, padded_len, v_ptr, keep_ptr, out_ptr, a_mix, keep_scale, DV, DROPOUT,
                      MIX)  # fmt: skip


@triton.jit
def dqdk_kernel(
    q_ptr, k_ptr, z0_ptr, states_ptr, hgrads_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dz0_ptr, real_ptr, scratch_ptr,
    dz0_scratch_ptr, seg_tile_ptr, seg_begin_ptr, seg_end_ptr, seg_slot_ptr, loop_tiles_ptr,
    seq, heads, padded_len, num_hops, num_bh, num_slots, bh_start, scalars_ptr,
    D: tl.constexpr, DV: tl.constexpr, T: tl.constexpr,
    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ADD_DZ0: tl.constexpr,
):  # fmt: skip
    """The score gradients of every hop at once, and the gradient of the first state. Per key tile
    and the query tiles of its segment:

    - ``dP = sum_t h_t z_t^T`` (hop t's input state ``z_t``: ``z0`` for t = 0, else ``states[t - 1]``;
      ``h_t`` the gradient reaching ``P z_t``), ``dS = P * (dP - delta)``;
    - ``dq += scale dS k`` (atomic, float32; ``dq`` holds heads ``bh_start ..`` only);
    - ``dk = scale dS^T q`` (stored; a split key tile adds into ``scratch[slot]``, unscaled);
    - ``dz0 += P^T h_0``: with ``ADD_DZ0`` into a float32 ``dz0`` that holds other terms (atomic where the
      key tile is split); else stored in ``dz0``'s dtype (a split key tile adds into ``dz0_scratch[slot]``).

    ``scalars = [scale * log2(e), scale]``."""
    seg = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64) + bh_start
    batch_offset = (bh // heads) * padded_len
    begin = tl.load(seg_begin_ptr + seg)
    end = tl.load(seg_end_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg)
    dims = tl.arange(0, D)
    vdims = tl.arange(0, DV)
    keys = tl.load(seg_tile_ptr + seg) * T + tl.arange(0, T)
    k = tl.load(k_ptr + bh * padded_len * D + keys[:, None] * D + dims[None, :])
    z0 = tl.load(z0_ptr + bh * padded_len * DV + keys[:, None] * DV + vdims[None, :])
    real_keys = _real(real_ptr, batch_offset, keys, HAS_PAD)
    scale2 = tl.load(scalars_ptr)
    scale = tl.load(scalars_ptr + 1)
    acc_dtype = scale2.dtype
    dk = tl.zeros((T, D), acc_dtype)
    dz0 = tl.zeros((T, DV), acc_dtype)
    for t in range(begin, end):
        queries = tl.load(loop_tiles_ptr + t) * T + tl.arange(0, T)
        q = tl.load(q_ptr + bh * padded_len * D + queries[:, None] * D + dims[None, :])
        s = _dot(k, tl.trans(q), PRECISION).to(acc_dtype) * scale2  # (keys, queries)
        lse = tl.load(lse_ptr + bh * padded_len + queries)[None, :]
        real_queries = _real(real_ptr, batch_offset, queries, HAS_PAD)
        valid = _valid(queries[None, :], keys[:, None], seq, real_queries[None, :], real_keys[:, None], HAS_PAD, CAUSAL)
        p = tl.where(valid, tl.exp2(s - lse), 0.0)
        h0 = tl.load(hgrads_ptr + bh * padded_len * DV + queries[:, None] * DV + vdims[None, :])
        dz0 += _dot(p.to(h0.dtype), h0, PRECISION).to(acc_dtype)
        dp = _dot(z0, tl.trans(h0), PRECISION).to(acc_dtype)
        for hop in range(1, num_hops):
            # (hop, bh) row of a (hops, batch * heads, padded_len, DV) stack: bh is int64, so the whole
            # offset is; hop * (batch * heads * padded_len * DV) in int32 overflowed from 2^31 elements
            offset = ((hop - 1) * num_bh + bh) * padded_len * DV
            z = tl.load(states_ptr + offset + keys[:, None] * DV + vdims[None, :])
            offset = (hop * num_bh + bh) * padded_len * DV
            h = tl.load(hgrads_ptr + offset + queries[:, None] * DV + vdims[None, :])
            dp += _dot(z, tl.trans(h), PRECISION).to(acc_dtype)
        delta = tl.load(delta_ptr + bh * padded_len + queries)[None, :]
        ds = (p * (dp - delta)).to(q.dtype)
        dk += _dot(ds, q, PRECISION).to(acc_dtype)
        dq = _dot(tl.trans(ds), k, PRECISION).to(acc_dtype) * scale
        dq_out = dq_ptr + (bh - bh_start) * padded_len * D + queries[:, None] * D + dims[None, :]
        tl.atomic_add(dq_out, dq, sem="relaxed")
    dz0_out = dz0_ptr + bh * padded_len * DV + keys[:, None] * DV + vdims[None, :]
    if slot >= 0:
        scratch = scratch_ptr + ((bh * num_slots + slot) * T + tl.arange(0, T)[:, None]) * D
        tl.atomic_add(scratch + dims[None, :], dk, sem="relaxed")
        if ADD_DZ0:
            tl.atomic_add(dz0_out, dz0, sem="relaxed")
        else:
            dz0_scratch = dz0_scratch_ptr + ((bh * num_slots + slot) * T + tl.arange(0, T)[:, None]) * DV
            tl.atomic_add(dz0_scratch + vdims[None, :], dz0, sem="relaxed")
    else:
        out = dk_ptr + bh * padded_len * D + keys[:, None] * D + dims[None, :]
        tl.store(out, (dk * scale).to(dk_ptr.dtype.element_ty))
        if ADD_DZ0:
            tl.store(dz0_out, tl.load(dz0_out) + dz0)
        else:
            tl.store(dz0_out, dz0.to(dz0_ptr.dtype.element_ty))


@triton.jit
def delta_kernel(grad_ptr, out_ptr, delta_ptr, padded_len, DV: tl.constexpr, T: tl.constexpr):
    """``delta = rowsum(grad * out)`` per query: the adjoint epilogue's ``delta`` for plain attention
    (one hop, ``a = 0``, no dropout), where the hop's input gradient is ``grad`` itself."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * T + tl.arange(0, T)
    offsets = bh * padded_len * DV + rows[:, None] * DV + tl.arange(0, DV)[None, :]
    acc_dtype = delta_ptr.dtype.element_ty
    product = tl.load(grad_ptr + offsets).to(acc_dtype) * tl.load(out_ptr + offsets).to(acc_dtype)
    tl.store(delta_ptr + bh * padded_len + rows, tl.sum(product, 1))
