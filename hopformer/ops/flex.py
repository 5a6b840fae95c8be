"""The ``flex`` backend: compiled FlexAttention with a BlockMask built straight from the block lists.

FlexAttention skips work per 128x128 tile. Each tile pair gets a code: 0 = no edge (skipped),
1 = partial (the element-wise ``mask_mod`` runs), 2 = full (no masking cost). Codes come from the
graph's block adjacency (never from a dense token mask); padding of the last block, causal diagonal
tiles and key padding make tiles partial. The graph part is computed once per graph and device and
cached on the graph; a mask without key padding is cached whole.

Guard against the silent eager fallback (``specs/gpu_and_kernels.md`` section 1): the kernel is
compiled with ``fullgraph=True``, so running past Dynamo's recompile limit raises instead of quietly
materialising every score; inputs are padded to a multiple of 128 so lengths bucket to tiles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph

TILE = 128  # FlexAttention's sparse block size
# Dynamo keeps one cache for every compiled flex_attention in the process; tests, benchmarks and models
# with several lengths easily pass the default of 8 variants. Raised only around hopformer's own calls.
RECOMPILE_LIMIT = 64


MIN_HEAD_DIM = 16  # FlexAttention's smallest head dimension (narrower ones fail inside Inductor)

# Kernel tiles for 16-bit inputs with head_dim <= 64 on Hopper. Measured on an H200 (bigbird, 131K
# tokens, 12 heads x 64, fwd+bwd): Inductor's defaults 11.2 ms, these 8.7 ms. Half-height query tiles
# double the programs, so the SMs balance the few long rows (global tokens) against the many short
# ones. The fwd_/bwd_ prefixes exist from PyTorch 2.9; older versions keep their defaults.
TUNED_KERNEL_OPTIONS = {
    "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_warps": 4, "fwd_num_stages": 3,
    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
    "bwd_num_warps": 4, "bwd_num_stages": 3,
}  # fmt: skip


def default_kernel_options(q: torch.Tensor) -> dict | None:
    """:data:`TUNED_KERNEL_OPTIONS` where they were measured to help (see there), else None (Inductor's)."""
    from torch.nn.attention import flex_attention as fa

    if (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] <= 64
        and torch.cuda.get_device_capability(q.device)[0] == 9
        and hasattr(fa, "AuxRequest")  # PyTorch >= 2.9, with the fwd_/bwd_ option prefixes
    ):
        return dict(TUNED_KERNEL_OPTIONS)
    return None


def tiles_fit(block_size: int) -> bool:
    """Whether blocks of ``block_size`` line up with FlexAttention's 128-token tiles."""
    return block_size % TILE == 0 or TILE % block_size == 0


def check_flex_graph(graph: BlockGraph) -> None:
    bs = graph.block_size
    if not tiles_fit(bs):
        raise ValueError(
            f"backend='flex' needs block_size to divide {TILE} or be a multiple of it, got block_size={bs}; "
            "use backend='gather' for other block sizes"
        )


def _tile_codes(graph: BlockGraph, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (query tile, key tile): 0 none, 1 partial, 2 full; and the block adjacency that the
    mask_mod looks up (FlexAttention's contract: mask_mod describes the whole mask; compiled kernels
    evaluate it only on partial tiles). Cached on the graph."""
    key = ("flex_tiles", str(device))
    if key in graph.cache:
        return graph.cache[key]
    check_flex_graph(graph)
    bs, nb = graph.block_size, graph.num_blocks
    tiles = -(-graph.seq_len // TILE)
    adjacency = graph.block_adjacency(device)
    if bs >= TILE:
        r = bs // TILE
        tile_adj = adjacency.repeat_interleave(r, 0).repeat_interleave(r, 1)[:tiles, :tiles]
        codes = tile_adj.to(torch.int8) * 2
    else:
        r = TILE // bs
        padded = torch.zeros(tiles * r, tiles * r, dtype=torch.bool, device=device)
        padded[:nb, :nb] = adjacency
        grouped = padded.view(tiles, r, tiles, r)
        codes = grouped.any(3).any(1).to(torch.int8) + grouped.all(3).all(1).to(torch.int8)
    if graph.is_causal:
        codes = causal_tiles(codes)
    if graph.seq_len % TILE:
        codes[:, -1] = codes[:, -1].clamp(max=1)  # the last key tile holds padding
    # the lookup covers every padded position (blocks past the graph have no edges)
    blocks_needed = -(-tiles * TILE // bs)
    lookup = torch.zeros(blocks_needed, blocks_needed, dtype=torch.bool, device=device)
    lookup[:nb, :nb] = adjacency
    graph.cache[key] = (codes, lookup)
    return codes, lookup


def causal_tiles(codes: torch.Tensor) -> torch.Tensor:
    """Square tile codes made causal: tiles above the diagonal hold only future keys (possible inside
    blocks larger than a tile) and go; diagonal tiles become partial (the mask_mod cuts them)."""
    codes = codes.tril()
    diagonal = torch.arange(codes.shape[0], device=codes.device)
    codes[diagonal, diagonal] = codes[diagonal, diagonal].clamp(max=1)
    return codes


def _padding_codes(real: torch.Tensor) -> torch.Tensor:
    """``(B, tiles)``: 2 where every token of the tile is real, 1 where some are, 0 where none."""
    per_tile = real.view(real.shape[0], -1, TILE)
    return per_tile.any(-1).to(torch.int8) + per_tile.all(-1).to(torch.int8)


def _ordered(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(B, Q, K)`` -> counts ``(B, 1, Q)`` and selected column indices first ``(B, 1, Q, K)``."""
    counts = selected.sum(-1, dtype=torch.int32)
    indices = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


# ---------------------------------------------------------------------------------- load balancing
# FlexAttention gives every query tile one program that walks its key tiles (for the output and dq),
# and every key tile one program that walks its query tiles (for dk and dv). Global rows and columns
# make a few programs walk the whole sequence while the rest walk ~8 tiles: at 131K tokens those
# serial chains set the run time (H200, bigbird: forward 3.9 -> 2.2 ms, backward 6.8 -> 4.9 ms).
# We split them. The layout is extended by copies of tiles, appended after the sequence:
# - a heavy query tile becomes several query copies, each walking a contiguous share of its key
#   tiles; the copies' outputs are merged by their log-sum-exp into the original row;
# - a heavy key tile becomes several key/value copies, each attended by a share of the query tiles;
#   autograd sums the copies' gradients back into the original tokens.
# One square layout serves q, k and v alike, so a diffusion hop's output is the next hop's values
# without re-copying the sequence.
#
# Off by default: the kernels get 30% faster, but the copies and fix-ups around them (extra full-size
# passes in autograd, +1.1 GiB at 131K) eat the gain for one attention call and break diffusion's memory
# budget (H200, 131K, bf16, fwd+bwd: sparse 11.2 -> 11.4 ms; diffuse 57.7 -> 52.7 ms but 2.7 -> 4.7 GiB).
# Fusing the fix-ups into one autograd function per hop is what would make it pay.
BALANCE = False
MIN_CHAIN = 16  # key tiles per program below which splitting does not pay


@dataclass
class _Balance:
    """How the extended (balanced) tile layout maps back to the original tiles."""

    codes: torch.Tensor  # (N, N) int8 tile codes of the extended layout, N = T + row copies + column copies
    sources: torch.Tensor  # (N,) original tile of each extended tile
    heavy_rows: torch.Tensor  # (R,) original query tiles that were split; their copies are tiles T ...
    copies: int  # copies per heavy row: row r's copies are tiles T + r*copies ... T + (r+1)*copies - 1
    column_copies: int  # number of key-tile copies, the last tiles of the layout


def _chunk_ranks(major: torch.Tensor, minor: torch.Tensor) -> torch.Tensor:
    """Rank of each entry among the entries with the same ``major``, ordered by ``minor``."""
    order = torch.argsort(major * (minor.max() + 1 if minor.numel() else 1) + minor)
    sorted_major = major[order]
    starts = torch.searchsorted(sorted_major, sorted_major, right=False)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device) - starts
    return ranks


def _balance(codes: torch.Tensor) -> _Balance | None:
    """Split heavy query rows and key columns of the ``(T, T)`` tile codes; None when nothing is heavy."""
    tiles, device = codes.shape[0], codes.device
    nonzero = codes > 0
    row_counts = nonzero.sum(1)
    if not BALANCE or not bool(nonzero.any()):
        return None
    chain = max(MIN_CHAIN, 2 * int(row_counts[row_counts > 0].median()))
    heavy_row = row_counts > 2 * chain
    # columns are counted without the heavy rows, whose entries move to the row copies
    col_counts = (nonzero & ~heavy_row[:, None]).sum(0)
    heavy_col = col_counts > 2 * chain
    if not bool(heavy_row.any() or heavy_col.any()):
        return None
    rows, cols = nonzero.nonzero(as_tuple=True)
    values = codes[rows, cols]

    heavy_rows = heavy_row.nonzero().flatten()
    copies = -(-int(row_counts[heavy_rows].max()) // chain) if heavy_rows.numel() else 0
    row_slot = torch.zeros(tiles, dtype=torch.long, device=device)
    row_slot[heavy_rows] = torch.arange(heavy_rows.numel(), device=device)
    in_heavy_row = heavy_row[rows]
    new_rows = torch.where(in_heavy_row, tiles + row_slot[rows] * copies + _chunk_ranks(rows, cols) // chain, rows)

    # each heavy column gets ceil(count / chain) copies, after the row copies
    moved = heavy_col[cols] & ~in_heavy_row
    per_column = torch.where(heavy_col, -(-col_counts // chain), 0)
    column_base = tiles + heavy_rows.numel() * copies + torch.cumsum(per_column, 0) - per_column
    new_cols = cols.clone()
    if bool(moved.any()):
        new_cols[moved] = column_base[cols[moved]] + _chunk_ranks(cols[moved], rows[moved]) // chain

    everything = torch.arange(tiles, device=device)
    sources = torch.cat([everything, heavy_rows.repeat_interleave(copies), everything.repeat_interleave(per_column)])
    extended = torch.zeros(sources.numel(), sources.numel(), dtype=codes.dtype, device=device)
    extended[new_rows, new_cols] = values
    return _Balance(extended, sources, heavy_rows, copies, int(per_column.sum()))


def _tokens(tile_indices: torch.Tensor) -> torch.Tensor:
    return (tile_indices[:, None] * TILE + torch.arange(TILE, device=tile_indices.device)).flatten()


class _Extend(torch.autograd.Function):
    """``x`` -> ``[x, zero padding, x[extra]]`` along the sequence; the backward sums the copies'
    gradients into their sources with one copy and a small index_add (not autograd's cat + index)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, padded: int, extra: torch.Tensor) -> torch.Tensor:
        b, h, seq, d = x.shape
        out = x.new_empty(b, h, padded + extra.numel(), d)
        out[:, :, :seq] = x
        out[:, :, seq:padded] = 0
        out[:, :, padded:] = out[:, :, :padded].index_select(2, extra)
        ctx.seq, ctx.padded = seq, padded
        ctx.save_for_backward(extra)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (extra,) = ctx.saved_tensors
        result = grad[:, :, : ctx.padded].contiguous()
        result.index_add_(2, extra, grad[:, :, ctx.padded :])
        return result[:, :, : ctx.seq], None, None


@dataclass
class FlexPlan:
    """A BlockMask over the padded (and, with heavy rows or columns, extended) sequence, and the maps
    between that layout and the caller's ``(B, H, seq, d)`` tensors."""

    mask: Any  # FlexAttention BlockMask over `length` tokens
    seq: int  # real sequence length
    padded: int  # seq rounded up to TILE
    extra: torch.Tensor | None  # source token of every copy token (copies follow the padded sequence)
    heavy: torch.Tensor | None  # tokens of the heavy rows, merged from their copies
    copies: int  # copies per heavy row
    column_targets: torch.Tensor | None  # the key-copy tokens of the extended layout ...
    column_sources: torch.Tensor | None  # ... and the tokens they copy

    @property
    def needs_lse(self) -> bool:
        return self.heavy is not None

    def extend(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, seq, d)`` -> the plan's layout."""
        if self.extra is None:
            return F.pad(x, (0, 0, 0, self.padded - x.shape[2])) if self.padded > x.shape[2] else x
        return _Extend.apply(x, self.padded, self.extra)

    def merged_heavy_rows(self, raw: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """The heavy rows' outputs ``(B, H, R*TILE, d)``: their copies combined by log-sum-exp."""
        b, h, _, d = raw.shape
        rows = self.heavy.numel() // TILE
        span = slice(self.padded, self.padded + rows * self.copies * TILE)
        acc = torch.promote_types(raw.dtype, torch.float32)  # merge bf16/fp16 parts in fp32
        parts = raw[:, :, span].reshape(b, h, rows, self.copies, TILE, d).to(acc)
        part_lse = lse[:, :, span].reshape(b, h, rows, self.copies, TILE).to(acc)
        total = torch.logsumexp(part_lse, dim=3, keepdim=True)
        total = torch.where(torch.isinf(total), torch.zeros_like(total), total)  # rows with no key
        merged = (parts * torch.exp(part_lse - total)[..., None]).sum(3)
        return merged.reshape(b, h, rows * TILE, d).to(raw.dtype)

    def output(self, raw: torch.Tensor, lse: torch.Tensor | None) -> torch.Tensor:
        """FlexAttention's output in the plan's layout -> ``(B, H, seq, d)``."""
        if self.heavy is not None:
            raw = raw[:, :, : self.padded].index_copy(2, self.heavy, self.merged_heavy_rows(raw, lse))
        return raw[:, :, : self.seq]


def block_mask(graph: BlockGraph, key_padding_mask: torch.Tensor | None, device: torch.device) -> FlexPlan:
    """The FlexAttention plan of ``graph`` (and key padding): a BlockMask over ``ceil(seq/128)*128``
    tokens, extended by copies of heavy rows and columns when the graph has them (see above)."""

    cache_key = ("flex_plan", str(device))
    if key_padding_mask is None and cache_key in graph.cache:
        return graph.cache[cache_key]
    codes, lookup = _tile_codes(graph, device)
    seq, bs, causal = graph.seq_len, graph.block_size, graph.is_causal
    tiles = codes.shape[0]
    padded = tiles * TILE
    balance_key = ("flex_balance", str(device))
    if balance_key not in graph.cache:
        graph.cache[balance_key] = _balance(codes)
    balance = graph.cache[balance_key]
    sources = torch.arange(tiles, device=device) if balance is None else balance.sources
    if balance is not None:
        codes = balance.codes
    tokens = _tokens(sources)  # original position of every token of the layout

    codes = codes[None]
    real = None
    if key_padding_mask is not None:
        real = F.pad(key_padding_mask, (0, padded - seq))
        tile_real = _padding_codes(real)[:, sources]
        # padded queries attend nowhere (their output is zero), padded keys are never attended
        codes = torch.minimum(torch.minimum(codes, tile_real[:, None, :]), tile_real[:, :, None])

    # the mask_mod describes the whole mask (eager FlexAttention evaluates it everywhere): in the
    # extended layout a copy sees only its share of tiles, then the original pattern decides
    share = None if balance is None else balance.codes > 0

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos, kv_pos = tokens[q_idx], tokens[kv_idx]
        allowed = (kv_pos < seq) & lookup[q_pos // bs, kv_pos // bs]
        if share is not None:
            allowed = allowed & share[q_idx // TILE, kv_idx // TILE]
        if causal:
            allowed = allowed & (kv_pos <= q_pos)
        if real is not None:
            allowed = allowed & real[b, kv_pos] & real[b, q_pos]
        return allowed

    mask = block_mask_from_codes(codes, mask_mod, tokens.numel(), tokens.numel())
    plan = FlexPlan(mask, seq, padded, None, None, 0, None, None)
    if balance is not None:
        plan.extra = tokens[padded:]
        if balance.copies:
            plan.heavy, plan.copies = _tokens(balance.heavy_rows), balance.copies
        if balance.column_copies:
            plan.column_targets = torch.arange(
                tokens.numel() - balance.column_copies * TILE, tokens.numel(), device=device
            )
            plan.column_sources = tokens[plan.column_targets]
    if key_padding_mask is None:
        graph.cache[cache_key] = plan
    return plan


def _flex_call(return_lse: bool):
    """``(q, k, v, block_mask, scale, kernel_options) -> out`` or ``(out, lse)`` (eager)."""
    from torch.nn.attention import flex_attention as fa

    def attend(q, k, v, block_mask, scale, kernel_options):
        if not return_lse:
            return fa.flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)
        if hasattr(fa, "AuxRequest"):  # PyTorch >= 2.9; return_lse is deprecated there
            out, aux = fa.flex_attention(
                q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options,
                return_aux=fa.AuxRequest(lse=True),
            )  # fmt: skip
            return out, aux.lse
        return fa.flex_attention(
            q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options, return_lse=True
        )

    return attend


@functools.cache
def _compiled_flex(return_lse: bool):
    return torch.compile(_flex_call(return_lse), dynamic=False, fullgraph=True)


def _attend(q, k, v, plan: FlexPlan, scale: float, kernel_options: dict | None):
    """One compiled FlexAttention call in the plan's layout: ``(raw output, lse or None)``."""
    result = run_flex(q, k, v, plan.mask, scale, kernel_options, return_lse=plan.needs_lse)
    return result if plan.needs_lse else (result, None)


def run_flex(q, k, v, mask, scale: float, kernel_options: dict | None = None, *, return_lse: bool = False):
    """Compiled FlexAttention (``fullgraph``: no silent eager fallback) under a BlockMask; without
    ``kernel_options``, :func:`default_kernel_options`."""
    if kernel_options is None:
        kernel_options = default_kernel_options(q)
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return _compiled_flex(return_lse)(q, k, v, mask, scale, kernel_options)
    except Exception as error:  # turn Dynamo's recompile-limit error into advice
        if "recompile" in str(error).lower() or "cache_size_limit" in str(error):
            raise RuntimeError(
                "FlexAttention hit torch.compile's recompile limit (too many distinct input shapes, dtypes "
                "or requires_grad settings). hopformer refuses the silent eager fallback, which would "
                "materialise every score. Bucket sequence lengths and batch sizes to a few values, or raise "
                "hopformer.ops.flex.RECOMPILE_LIMIT."
            ) from error
        raise


def block_mask_from_codes(codes: torch.Tensor, mask_mod, q_len: int, kv_len: int):
    """A BlockMask of 128-token tiles from codes ``(B, q_tiles, kv_tiles)``: 0 none (skipped),
    1 partial (``mask_mod`` decides per element), 2 full."""
    from torch.nn.attention.flex_attention import BlockMask

    partial_counts, partial_indices = _ordered(codes == 1)
    full_counts, full_indices = _ordered(codes == 2)
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=TILE,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


def flex_apply(q, k, v, plan: FlexPlan, scale: float, kernel_options: dict | None = None) -> torch.Tensor:
    """Compiled FlexAttention of ``(B, H, seq, d)`` inputs under ``plan``."""
    raw, lse = _attend(plan.extend(q), plan.extend(k), plan.extend(v), plan, scale, kernel_options)
    return plan.output(raw, lse)


def flex_diffuse(
    q, k, v, plan: FlexPlan, steps: list[float], scale: float, kernel_options: dict | None, hop_dropout_p: float
) -> torch.Tensor:
    """The power iteration ``z <- (1 - a) A z + a v`` (one FlexAttention call per hop), kept in the
    plan's layout from hop to hop: only the few heavy rows and column copies are fixed up in place."""
    q, k, v = plan.extend(q), plan.extend(k), plan.extend(v)
    z = v
    for a in steps:
        if a < 1.0:  # a == 1 (renormalised last step) would discard A z: skip computing it
            raw, lse = _attend(q, k, z, plan, scale, kernel_options)
            z = torch.lerp(raw, v, a)  # (1 - a) A z + a v
            if plan.heavy is not None:
                merged = torch.lerp(plan.merged_heavy_rows(raw, lse), v.index_select(2, plan.heavy), a)
                z.index_copy_(2, plan.heavy, merged)
        else:
            z = v
        if hop_dropout_p > 0:
            z = F.dropout(z, hop_dropout_p)
        if plan.column_targets is not None and z is not v:  # key copies carry the new values too
            z.index_copy_(2, plan.column_targets, z.index_select(2, plan.column_sources))
    return z[:, :, : plan.seq]
