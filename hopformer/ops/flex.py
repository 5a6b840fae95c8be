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
from typing import Any

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph

TILE = 128  # FlexAttention's sparse block size
# Dynamo keeps one cache for every compiled flex_attention in the process; tests, benchmarks and models
# with several lengths easily pass the default of 8 variants. Raised only around hopformer's own calls.
RECOMPILE_LIMIT = 64


def check_flex_graph(graph: BlockGraph) -> None:
    bs = graph.block_size
    if bs % TILE and TILE % bs:
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
        # tiles above the diagonal hold only future keys (possible inside blocks larger than a tile)
        codes = codes.tril()
        diagonal = torch.arange(tiles, device=device)
        codes[diagonal, diagonal] = codes[diagonal, diagonal].clamp(max=1)
    if graph.seq_len % TILE:
        codes[:, -1] = codes[:, -1].clamp(max=1)  # the last key tile holds padding
    # the lookup covers every padded position (blocks past the graph have no edges)
    blocks_needed = -(-tiles * TILE // bs)
    lookup = torch.zeros(blocks_needed, blocks_needed, dtype=torch.bool, device=device)
    lookup[:nb, :nb] = adjacency
    graph.cache[key] = (codes, lookup)
    return codes, lookup


def _padding_codes(real: torch.Tensor) -> torch.Tensor:
    """``(B, tiles)``: 2 where every token of the tile is real, 1 where some are, 0 where none."""
    per_tile = real.view(real.shape[0], -1, TILE)
    return per_tile.any(-1).to(torch.int8) + per_tile.all(-1).to(torch.int8)


def _ordered(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(B, Q, K)`` -> counts ``(B, 1, Q)`` and selected column indices first ``(B, 1, Q, K)``."""
    counts = selected.sum(-1, dtype=torch.int32)
    indices = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def block_mask(graph: BlockGraph, key_padding_mask: torch.Tensor | None, device: torch.device) -> Any:
    """The FlexAttention ``BlockMask`` of ``graph`` (and key padding), over ``ceil(seq/128)*128`` tokens."""
    from torch.nn.attention.flex_attention import BlockMask

    if key_padding_mask is None and ("flex_mask", str(device)) in graph.cache:
        return graph.cache[("flex_mask", str(device))]
    codes, lookup = _tile_codes(graph, device)
    seq, bs, causal = graph.seq_len, graph.block_size, graph.is_causal
    padded_len = codes.shape[0] * TILE
    codes = codes[None]
    real = None
    if key_padding_mask is not None:
        real = F.pad(key_padding_mask, (0, padded_len - seq))
        tile_real = _padding_codes(real)
        # padded queries attend nowhere (their output is zero), padded keys are never attended
        codes = torch.minimum(torch.minimum(codes, tile_real[:, None, :]), tile_real[:, :, None])

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (kv_idx < seq) & lookup[q_idx // bs, kv_idx // bs]
        if causal:
            allowed = allowed & (kv_idx <= q_idx)
        if real is not None:
            allowed = allowed & real[b, kv_idx] & real[b, q_idx]
        return allowed

    partial_counts, partial_indices = _ordered(codes == 1)
    full_counts, full_indices = _ordered(codes == 2)
    mask = BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=TILE,
        mask_mod=mask_mod,
        seq_lengths=(padded_len, padded_len),
    )
    if key_padding_mask is None:
        graph.cache[("flex_mask", str(device))] = mask
    return mask


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def flex_apply(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any,
    scale: float,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Compiled FlexAttention of ``(q, k, v)`` under ``mask``; inputs padded to the mask length."""
    seq = q.shape[-2]
    pad = mask.seq_lengths[0] - seq
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            out = _compiled_flex()(q, k, v, block_mask=mask, scale=scale, kernel_options=kernel_options)
    except Exception as error:  # turn Dynamo's recompile-limit error into advice
        if "recompile" in str(error).lower() or "cache_size_limit" in str(error):
            raise RuntimeError(
                "FlexAttention hit torch.compile's recompile limit (too many distinct input shapes, dtypes "
                "or requires_grad settings). hopformer refuses the silent eager fallback, which would "
                "materialise every score. Bucket sequence lengths and batch sizes to a few values, or raise "
                "hopformer.ops.flex.RECOMPILE_LIMIT."
            ) from error
        raise
    return out[:, :, :seq] if pad else out
