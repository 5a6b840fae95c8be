"""The ``flex`` backend: compiled FlexAttention with a BlockMask built straight from the block lists.

FlexAttention skips work per 128x128 tile. Each tile pair gets a code: 0 = no edge (skipped),
1 = partial (the element-wise ``mask_mod`` runs), 2 = full (no masking cost). Codes come from the
graph's block adjacency (never from a dense token mask); padding of the last block, causal diagonal
tiles and key padding make tiles partial. The graph part is computed once per graph and device and
cached on the graph; a mask without key padding is cached whole.

Guard against the silent eager fallback (``specs/gpu_and_kernels.md`` section 1): the kernel is
compiled with ``fullgraph=True``, so running past Dynamo's recompile limit raises instead of quietly
materialising every score; inputs are padded to a multiple of 128 so lengths bucket to tiles.

Load balance: global rows and columns make a few FlexAttention programs walk the whole sequence
while the rest walk a few tiles. Half-height query tiles (:data:`TUNED_KERNEL_OPTIONS`) double the
programs and take about 30% off the forward at 131K tokens. Moving the heavy rows and columns into side
calls over sequence chunks (merged by log-sum-exp) was measured and not kept: it shortens the backward
kernels, but its copies and merges cost more and double the memory.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph
from hopformer.ops.backend import NO_OPTIONS, HopOptions, Support
from hopformer.ops.common import pad_seq, run_diffusion

TILE = 128  # FlexAttention's sparse block size
# Dynamo keeps one cache for every compiled flex_attention in the process; tests, benchmarks and models
# with several lengths easily pass the default of 8 variants. Raised only around hopformer's own calls.
RECOMPILE_LIMIT = 64


MIN_HEAD_DIM = 16  # FlexAttention's smallest head dimension (narrower ones fail inside Inductor)

# Kernel tiles for 16-bit inputs with 32 < head_dim <= 64 on Hopper: half-height query tiles double the
# programs, so the SMs balance the few long rows (global tokens) against the many short ones (at 131K
# tokens, 12 heads x 64, fwd+bwd: 0.78x Inductor's defaults; at head_dim 64 over 1K-131K tokens 0.50x, and
# 0.27-0.29x with key padding). At head_dim 32 they gain nothing, and lose with padding, so narrower heads
# keep Inductor's. The fwd_/bwd_ prefixes exist from PyTorch 2.9; older versions keep their defaults.
TUNED_KERNEL_OPTIONS = {
    "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_warps": 4, "fwd_num_stages": 3,
    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
    "bwd_num_warps": 4, "bwd_num_stages": 3,
}  # fmt: skip


def tuned_tiles_apply(head_dim: int, dtype: torch.dtype, capability_major: int, has_tile_prefixes: bool) -> bool:
    """Whether :data:`TUNED_KERNEL_OPTIONS` were measured to beat Inductor's defaults for these inputs."""
    return (
        dtype in (torch.bfloat16, torch.float16)
        and 32 < head_dim <= 64
        and capability_major == 9
        and has_tile_prefixes  # PyTorch >= 2.9, with the fwd_/bwd_ option prefixes
    )


def default_kernel_options(q: torch.Tensor) -> dict | None:
    """:data:`TUNED_KERNEL_OPTIONS` where they were measured to help (see there), else None (Inductor's)."""
    from torch.nn.attention import flex_attention as fa

    if q.is_cuda and tuned_tiles_apply(
        q.shape[-1], q.dtype, torch.cuda.get_device_capability(q.device)[0], hasattr(fa, "AuxRequest")
    ):
        return dict(TUNED_KERNEL_OPTIONS)
    return None


def tiles_fit(block_size: int) -> bool:
    """Whether blocks of ``block_size`` line up with FlexAttention's 128-token tiles."""
    return block_size % TILE == 0 or TILE % block_size == 0


def _tile_codes(graph: BlockGraph, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (query tile, key tile): 0 none, 1 partial, 2 full; and the block adjacency that the
    mask_mod looks up (FlexAttention's contract: mask_mod describes the whole mask; compiled kernels
    evaluate it only on partial tiles). Cached on the graph."""
    return graph.view(_build_tile_codes, str(device))


def _build_tile_codes(graph: BlockGraph, device: str) -> tuple[torch.Tensor, torch.Tensor]:
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


@dataclass
class FlexPlan:
    """The FlexAttention BlockMask of a graph over ``ceil(seq / 128) * 128`` tokens."""

    mask: Any  # FlexAttention BlockMask
    seq: int  # real sequence length
    padded: int  # seq rounded up to TILE


def block_mask(graph: BlockGraph, key_padding_mask: torch.Tensor | None, device: torch.device) -> FlexPlan:
    """The FlexAttention plan of ``graph`` (and key padding): a BlockMask over ``ceil(seq/128)*128`` tokens."""
    if key_padding_mask is None:  # the whole plan depends on the graph alone: cached on it
        return graph.view(_graph_plan, str(device))
    return _plan(graph, key_padding_mask, device)


def _graph_plan(graph: BlockGraph, device: str) -> FlexPlan:
    return _plan(graph, None, torch.device(device))


def _plan(graph: BlockGraph, key_padding_mask: torch.Tensor | None, device: torch.device) -> FlexPlan:
    codes, lookup = _tile_codes(graph, device)
    seq, bs, causal = graph.seq_len, graph.block_size, graph.is_causal
    padded = codes.shape[0] * TILE
    codes = codes[None]
    real = None
    if key_padding_mask is not None:
        real = F.pad(key_padding_mask, (0, padded - seq))
        tile_real = _padding_codes(real)
        # padded queries attend nowhere (their output is zero), padded keys are never attended
        codes = torch.minimum(torch.minimum(codes, tile_real[:, None, :]), tile_real[:, :, None])

    # the mask_mod describes the whole mask (FlexAttention's contract), not only the partial tiles
    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (kv_idx < seq) & lookup[q_idx // bs, kv_idx // bs]
        if causal:
            allowed = allowed & (kv_idx <= q_idx)
        if real is not None:
            allowed = allowed & real[b, kv_idx] & real[b, q_idx]
        return allowed

    return FlexPlan(block_mask_from_codes(codes, mask_mod, padded, padded), seq, padded)


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


def run_flex(q, k, v, mask, scale: float, kernel_options: dict | None = None, *, return_lse: bool = False):
    """Compiled FlexAttention (``fullgraph``: no silent eager fallback) under a BlockMask; without
    ``kernel_options``, :func:`default_kernel_options`."""
    if kernel_options is None:
        kernel_options = default_kernel_options(q)
    if torch.compiler.is_dynamo_compiling():  # inside a compiled model: the model's compile fuses the kernel
        return _flex_call(return_lse)(q, k, v, mask, scale, kernel_options)
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


class FlexBackend:
    """``flex``: compiled FlexAttention under a BlockMask built from the graph's block lists (CUDA)."""

    name = "flex"
    summary = "compiled FlexAttention, one call per hop on the graph's BlockMask"
    support = Support(
        ops=("sparse_attention", "diffuse", "diffuse_weighted"),
        devices=("cuda",),
        exportable=False,
        attention_dropout=False,  # PyTorch's FlexAttention has none
        min_head_dim=MIN_HEAD_DIM,
        block_sizes=tiles_fit,
        rule=f"divides {TILE} or is a multiple of it",
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
        """The power iteration with one FlexAttention call per hop, all on one BlockMask."""
        plan = block_mask(graph, key_padding_mask, q.device)
        q, k, v = (pad_seq(t, plan.padded) for t in (q, k, v))

        def attend(z: torch.Tensor, _: int) -> torch.Tensor:
            return run_flex(q, k, z, plan.mask, scale, options.kernel_options)

        return run_diffusion(attend, v, steps, options.hop_dropout_p)[:, :, : plan.seq]


FLEX = FlexBackend()
