"""Pattern constructors: each returns a :class:`BlockGraph`.

All take ``seq_len`` and ``block_size``; counts (``window``, ``num_global``, ``num_random``) are in
blocks and do not depend on ``seq_len``; a sequence with fewer blocks gets all it has. (The Diffuser
reference crops a 4096-grid graph instead, so its budgets silently shrink on short inputs; see
``specs/diffuser.md`` section 8.) Random parts are a pure function of ``(seed, seq_len, block_size)``,
so every rank and every call builds the same graph.

**Causal graphs are prefix-stable**: with ``causal=True`` the edges of query block ``i`` depend only on
``i``, the settings and the seed, never on the sequence length, so the graph at ``n`` tokens is the
top-left ``n x n`` of the graph at any longer length. A causal model's past then does not depend on
how long the sequence will become, and cached decoding sees the graph training saw. Random key blocks
are the lowest-scoring earlier blocks under a hash of ``(seed, i, j)``; global blocks are the first
ones (BigBird's last block, and Diffuser's scattered globals, would depend on the length). Bidirectional
graphs draw as they always have (their random blocks do depend on the length), so checkpoints trained
on them keep their graphs.

``window`` is the number of blocks in the sliding band centred on the query block (odd: 3 means the
own block and one on each side, as in BigBird's ``num_sliding_blocks``). A window wider than the
sequence is not an error: as with the counts, a short sequence gets all it has (every block sees every
block), so the defaults (64-token blocks, window 3) run on inputs of any length, 64 tokens or fewer
included.

``grid2d`` is the exception: a token-level graph (``block_size=1``) of pixel neighbourhoods, for
images in raster order, where a 1-D band cannot reach the pixels above and below.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hopformer.checks import check_int
from hopformer.graphs.block_graph import BlockGraph, _check_positive_int


def full(seq_len: int, block_size: int = 64, *, causal: bool = False) -> BlockGraph:
    """Every query attends to every key (dense attention as a graph)."""
    num_blocks = _num_blocks(seq_len, block_size)
    return BlockGraph.from_row_chunks(
        seq_len,
        block_size,
        lambda start, stop: torch.ones(stop - start, num_blocks, dtype=torch.bool),
        causal=causal,
        name="full",
    )


def local(seq_len: int, block_size: int = 64, *, window: int = 3, causal: bool = False) -> BlockGraph:
    """Sliding window of ``window`` blocks centred on the query block."""
    num_blocks = _num_blocks(seq_len, block_size)
    radius = _check_window(window, num_blocks, seq_len, block_size)
    return BlockGraph.from_row_chunks(
        seq_len,
        block_size,
        lambda start, stop: _band(start, stop, num_blocks, radius),
        causal=causal,
        name=f"local(w={window})",
    )


def longformer(
    seq_len: int, block_size: int = 64, *, window: int = 3, num_global: int = 1, causal: bool = False
) -> BlockGraph:
    """Sliding window plus ``num_global`` global blocks at the start (they see and are seen by all)."""
    num_blocks = _num_blocks(seq_len, block_size)
    radius = _check_window(window, num_blocks, seq_len, block_size)
    global_blocks = torch.arange(_check_count("num_global", num_global, num_blocks))

    def rows(start: int, stop: int) -> torch.Tensor:
        return _band(start, stop, num_blocks, radius) | _global(start, stop, num_blocks, global_blocks)

    return BlockGraph.from_row_chunks(
        seq_len, block_size, rows, causal=causal, name=f"longformer(w={window}, g={num_global})"
    )


def bigbird(
    seq_len: int,
    block_size: int = 64,
    *,
    window: int = 3,
    num_global: int = 2,
    num_random: int = 3,
    seed: int = 0,
    global_placement: str = "first",
    causal: bool = False,
) -> BlockGraph:
    """BigBird (ITC): sliding window, ``num_global`` global blocks, and ``num_random`` random key blocks
    per query block, drawn without replacement from the blocks not already attended (seeded). With
    ``causal=True`` random blocks are drawn from earlier blocks only (prefix-stable, see the module).

    ``global_placement``: ``"first"`` (the first ``num_global`` blocks) or ``"first_last"`` (BigBird's
    own: the first ``ceil(g / 2)`` and the last ``floor(g / 2)`` blocks; bidirectional graphs only, since
    the last block moves with the length)."""
    num_blocks = _num_blocks(seq_len, block_size)
    radius = _check_window(window, num_blocks, seq_len, block_size)
    count = _check_count("num_global", num_global, num_blocks)
    if global_placement not in ("first", "first_last"):
        raise ValueError(f"global_placement must be 'first' or 'first_last', got {global_placement!r}")
    if global_placement == "first_last" and causal:
        raise ValueError(
            "global_placement='first_last' puts a global block at the end, which moves with the sequence "
            "length; a causal graph must not depend on it (prefix stability): use 'first'"
        )
    global_blocks = torch.arange(count)
    if global_placement == "first_last":
        global_blocks = torch.cat([torch.arange(-(-count // 2)), torch.arange(num_blocks - count // 2, num_blocks)])
        global_blocks = global_blocks.unique()
    _check_count("num_random", num_random, num_blocks)
    draw = _random_draw(seed, causal)

    def rows(start: int, stop: int) -> torch.Tensor:
        fixed = _band(start, stop, num_blocks, radius) | _global(start, stop, num_blocks, global_blocks)
        return fixed | draw(start, stop, num_blocks, num_random, fixed)

    placement = ", first+last" if global_placement == "first_last" else ""
    name = f"bigbird(w={window}, g={num_global}{placement}, r={num_random})"
    return BlockGraph.from_row_chunks(seq_len, block_size, rows, causal=causal, name=name)


def diffuser(
    seq_len: int,
    block_size: int = 64,
    *,
    window: int = 3,
    num_global: int = 2,
    num_random: int = 3,
    seed: int = 0,
    random_granularity: str = "block",
    global_blocks: list[int] | None = None,
    causal: bool = False,
) -> BlockGraph:
    """The Diffuser reference pattern (``specs/diffuser.md`` section 1) at block granularity.

    - local: a blocked window of ``window`` blocks. With ``block_size=32, window=3`` this is exactly the
      reference's 64-wide blocks at stride 32 (a token sees its own half-block and both neighbours).
    - global: ``num_global`` global blocks scattered through the sequence (the reference scatters its
      global tokens and never makes the first token global), drawn with ``seed`` from blocks ``1..``;
      or pass ``global_blocks`` explicitly. Causal graphs take the first ``num_global`` blocks instead
      (scattered ones would depend on the length), and drop explicit ones past the sequence.
    - random: ``num_random`` random key blocks per query block, directed (not symmetrised).

    ``random_granularity="token"`` keeps the same random budget (``num_random * block_size`` keys per
    query) but draws single tokens, as the paper's figure does. That graph is returned at
    ``block_size=1``: the Triton kernels (16-token tiles) refuse it, every other backend runs it exactly,
    and under the 128-token tiles of the ``flex`` backend it is effectively dense
    (``specs/gpu_and_kernels.md`` section 1), so its cost grows with the square of the length. Hence the
    default is ``"block"``, a documented deviation from the paper.
    """
    num_blocks = _num_blocks(seq_len, block_size)
    radius = _check_window(window, num_blocks, seq_len, block_size)
    _check_count("num_random", num_random, num_blocks)
    if random_granularity not in ("block", "token"):
        raise ValueError(f"random_granularity must be 'block' or 'token', got {random_granularity!r}")
    generator = _generator(seed)
    draw = _random_draw(seed, causal, generator)
    if global_blocks is None and causal:
        global_ids = torch.arange(_check_count("num_global", num_global, num_blocks))
    elif global_blocks is None:
        count = _check_count("num_global", num_global, max(num_blocks - 1, 0))
        scattered = 1 + torch.randperm(num_blocks - 1, generator=generator)[:count]
        global_ids = scattered.sort().values
    else:
        global_ids = torch.as_tensor(sorted(set(global_blocks)), dtype=torch.int64)
        if len(global_ids) and global_ids.min() < 0:
            raise ValueError(f"global_blocks must be non-negative block ids, got {global_blocks}")
        if causal:
            global_ids = global_ids[global_ids < num_blocks]  # later ones are in every query's future
        elif len(global_ids) and global_ids.max() >= num_blocks:
            raise ValueError(f"global_blocks must lie in 0..{num_blocks - 1}, got {global_blocks}")
    token = ", token-random" if random_granularity == "token" else ""
    name = f"diffuser(w={window}, g={len(global_ids)}, r={num_random}{token})"

    if random_granularity == "block":

        def rows(start: int, stop: int) -> torch.Tensor:
            fixed = _band(start, stop, num_blocks, radius) | _global(start, stop, num_blocks, global_ids)
            return fixed | draw(start, stop, num_blocks, num_random, fixed)

        return BlockGraph.from_row_chunks(seq_len, block_size, rows, causal=causal, name=name)

    # Token granularity: every token is its own block; the window and globals keep their block shape.
    token_block = torch.arange(seq_len) // block_size
    is_global_token = torch.zeros(num_blocks, dtype=torch.bool)
    is_global_token[global_ids] = True
    is_global_token = is_global_token[token_block]

    def token_rows(start: int, stop: int) -> torch.Tensor:
        query_block = token_block[start:stop, None]
        fixed = (token_block[None, :] - query_block).abs() <= radius
        fixed |= is_global_token[None, :] | is_global_token[start:stop, None]
        return fixed | draw(start, stop, seq_len, num_random * block_size, fixed)

    return BlockGraph.from_row_chunks(seq_len, 1, token_rows, causal=causal, name=name)


def hypercube(seq_len: int, block_size: int = 16, *, causal: bool = False) -> BlockGraph:
    """Hypercube attention (``specs/hypercube_nip.md`` section 3) over blocks.

    Block ``p`` holds hypercube vertex ``g(p)`` (Gray-code placement), so its neighbours are the
    mirror images ``p ^ (2**(j+1) - 1)`` for ``j < k = ceil(log2(num_blocks))``, plus a self-loop;
    neighbours past the last block are dropped (the reference's behaviour without padding). Degree
    is ``k + 1`` and the diameter ``k`` when ``num_blocks`` is a power of two. The reference uses
    ``block_size=16``; 128 is the fast variant on GPU (16-token blocks make partial 128-token tiles).
    """
    num_blocks = _num_blocks(seq_len, block_size)
    k = max(0, math.ceil(math.log2(num_blocks))) if num_blocks > 1 else 0
    masks = torch.tensor([(1 << (j + 1)) - 1 for j in range(k)], dtype=torch.int64)

    def rows(start: int, stop: int) -> torch.Tensor:
        positions = torch.arange(start, stop)
        out = torch.zeros(stop - start, num_blocks, dtype=torch.bool)
        out[torch.arange(stop - start), positions] = True
        if k:
            neighbours = positions[:, None] ^ masks[None, :]
            valid = neighbours < num_blocks
            row_ids = torch.arange(stop - start)[:, None].expand_as(neighbours)
            out[row_ids[valid], neighbours[valid]] = True
        return out

    return BlockGraph.from_row_chunks(seq_len, block_size, rows, causal=causal, name=f"hypercube(k={k})")


def grid2d(
    seq_len: int,
    block_size: int = 1,
    *,
    side: int | None = None,
    radius: int = 1,
    num_random: int = 0,
    seed: int = 0,
    causal: bool = False,
    channels: int = 1,
) -> BlockGraph:
    """Pixel neighbourhoods of an image in raster order, at token granularity.

    Token ``i`` is pixel ``(i // side, i % side)`` and sees every pixel within ``radius`` rows and
    ``radius`` columns (a ``(2 * radius + 1) ** 2`` square; no wrap-around at the edges), plus
    ``num_random`` random keys (seeded, directed). ``side=None`` takes the image as square, so
    ``seq_len`` must then be a perfect square; with ``side`` set, tokens past the image (padding)
    form further rows. A grid is a poor expander: spreading information across it takes about
    ``side / radius`` hops, which is what Diffuser's multi-hop diffusion supplies in one layer.

    ``channels > 1``: tokens are subpixels, the ``channels`` values of a pixel consecutive (pixel modeling's
    raster order): token ``i`` is channel ``i % channels`` of pixel ``i // channels`` and sees every channel
    of the pixels around its own. With ``causal=True`` only the earlier tokens of that square remain: the rows
    above, the pixels to the left and the earlier channels of its own pixel.
    """
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("channels", channels)
    if block_size != 1:
        raise ValueError(f"grid2d is a token-level graph: block_size must be 1, got {block_size!r}")
    if side is None:
        side = math.isqrt(seq_len // channels)
        if side * side * channels != seq_len:
            raise ValueError(
                f"grid2d without side needs a square image, but seq_len={seq_len} is not channels={channels} times "
                "a perfect square; pass side=<image width in pixels>"
            )
    _check_positive_int("side", side)
    _check_positive_int("radius", radius)
    count = _check_count("num_random", num_random, seq_len)
    draw = _random_draw(seed, causal)
    pixel = torch.arange(seq_len) // channels
    row, col = pixel // side, pixel % side

    reach = (radius * (side + 1) + 1) * channels  # raster distance to the farthest neighbour

    def rows(start: int, stop: int) -> torch.Tensor:
        lo, hi = max(0, start - reach), min(seq_len, stop + reach)  # compare only where neighbours can be
        near = torch.zeros(stop - start, seq_len, dtype=torch.bool)
        near[:, lo:hi] = (row[None, lo:hi] - row[start:stop, None]).abs() <= radius
        near[:, lo:hi] &= (col[None, lo:hi] - col[start:stop, None]).abs() <= radius
        return near | draw(start, stop, seq_len, count, near)

    random = f", r={count}" if count else ""
    colours = f", channels={channels}" if channels > 1 else ""
    return BlockGraph.from_row_chunks(
        seq_len, 1, rows, causal=causal, name=f"grid2d(side={side}, radius={radius}{colours}{random})"
    )


PATTERNS = {
    "full": full,
    "local": local,
    "longformer": longformer,
    "bigbird": bigbird,
    "diffuser": diffuser,
    "hypercube": hypercube,
    "grid2d": grid2d,
}
"""Pattern name -> constructor, the names :func:`build_graph` (and attention ``pattern=`` options) accept."""


def build_graph(pattern: str, seq_len: int, block_size: int | None = None, **options: Any) -> BlockGraph:
    """Build a pattern by name (``"full"``, ``"local"``, ``"longformer"``, ``"bigbird"``, ``"diffuser"``,
    ``"hypercube"``, ``"grid2d"``) with its keyword options; ``block_size=None`` takes the pattern's default."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r} is not known; choose one of {sorted(PATTERNS)}")
    if block_size is not None:
        options["block_size"] = block_size
    return PATTERNS[pattern](seq_len, **options)


# ------------------------------------------------------------------------------------------ parts
def _band(start: int, stop: int, num_blocks: int, radius: int) -> torch.Tensor:
    rows = torch.arange(start, stop)[:, None]
    return (torch.arange(num_blocks)[None, :] - rows).abs() <= radius


def _global(start: int, stop: int, num_blocks: int, global_blocks: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(stop - start, num_blocks, dtype=torch.bool)
    out[:, global_blocks] = True  # everyone attends to the global blocks
    inside = global_blocks[(global_blocks >= start) & (global_blocks < stop)]
    out[inside - start] = True  # and the global blocks attend to everyone
    return out


def _random_draw(seed: Any, causal: bool, generator: torch.Generator | None = None):
    """The random-edge draw of a pattern: ``draw(start, stop, num_blocks, count, taken)``, from ``generator``
    in row order for bidirectional graphs, from a hash of ``(seed, row, column)`` for causal ones
    (prefix-stable: a row's draw does not depend on the other rows or on the length)."""
    generator = generator if generator is not None else _generator(seed)

    def draw(start: int, stop: int, num_blocks: int, count: int, taken: torch.Tensor) -> torch.Tensor:
        if count == 0:
            return torch.zeros(stop - start, num_blocks, dtype=torch.bool)
        if not causal:
            return _random(
                start, stop, num_blocks, count, taken, torch.rand(stop - start, num_blocks, generator=generator)
            )
        # float64: 53-bit scores do not tie, so which block wins never depends on how many columns there are
        scores = torch.full((stop - start, num_blocks), 2.0, dtype=torch.float64)
        past = min(stop, num_blocks)  # a row's candidates are its own and earlier columns
        scores[:, :past] = _hash_uniform(seed, torch.arange(start, stop), torch.arange(past))
        scores[torch.arange(num_blocks)[None, :] > torch.arange(start, stop)[:, None]] = 2.0
        return _random(start, stop, num_blocks, count, taken, scores)

    return draw


def _hash_uniform(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1), one per (row, column), from the splitmix64 finaliser of
    ``(seed, row, column)``: each is a pure function of its own three integers."""
    with np.errstate(over="ignore"):
        x = _mix(np.uint64(seed % 2**64) + _GOLDEN)
        x = _mix(x ^ rows.numpy().astype(np.uint64)[:, None])
        x = _mix(x ^ (cols.numpy().astype(np.uint64)[None, :] * _GOLDEN))
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * 2.0**-53)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _random(
    start: int, stop: int, num_blocks: int, count: int, taken: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """``count`` distinct columns per row among those not ``taken``: the lowest ``scores`` (uniform in
    [0, 1); 2 marks a column that may never be chosen); rows with fewer candidates get all of them."""
    out = torch.zeros(stop - start, num_blocks, dtype=torch.bool)
    scores[taken] = 2.0  # never chosen while an allowed column is left
    chosen = scores.topk(min(count, num_blocks), dim=1, largest=False)
    rows = torch.arange(stop - start)[:, None].expand_as(chosen.indices)
    keep = chosen.values < 2.0
    out[rows[keep], chosen.indices[keep]] = True
    return out


# ------------------------------------------------------------------------------------ validation
def _num_blocks(seq_len: int, block_size: int) -> int:
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("block_size", block_size)
    return math.ceil(seq_len / block_size)


def _check_window(window: Any, num_blocks: int, seq_len: int, block_size: int) -> int:
    """The band's radius in blocks. ``window`` must be a positive odd number; like the block counts, a window
    wider than a short sequence gets all the sequence has (the band of every block then covers every block),
    so short inputs run with the defaults (the same graph a window of ``2 * num_blocks - 1`` gives)."""
    if check_int("window", window, 1, allowed="a positive odd number of blocks") % 2 == 0:
        raise ValueError(f"window must be a positive odd number of blocks (3 = own block +-1), got {window!r}")
    return min(window, 2 * num_blocks - 1) // 2


def _check_count(name: str, value: Any, limit: int) -> int:
    """Validate a non-negative block count; short sequences get at most the ``limit`` blocks they have."""
    return min(check_int(name, value, 0), limit)


def _generator(seed: Any) -> torch.Generator:
    check_int("seed", seed)
    generator = torch.Generator()
    generator.manual_seed(seed % (2**63))
    return generator
