"""BlockGraph: a static attention pattern at block granularity.

Tokens are cut into blocks of ``block_size`` (the last block may be partial). The graph says, for
each query block, which key blocks it attends to; attention is dense inside each connected block
pair. A causal graph additionally drops keys after the query inside the diagonal blocks.

The block lists are stored in CSR form (``indptr``, ``indices``), so graphs with dense global rows
stay small at a million tokens. Kernels build the device-side views they need once per graph and
cache them on the graph (:meth:`BlockGraph.view`).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from hopformer.checks import check_int
from hopformer.graphs.tracing import eager_constants, trace_constant

# Rows of the block adjacency handled at once when a graph is built or densified, bounding memory.
ROW_CHUNK = 2048

View = TypeVar("View")
# Every live graph by its ``uid``, so that a view can be built from constants alone (see ``BlockGraph.view``).
_LIVE: weakref.WeakValueDictionary[int, BlockGraph] = weakref.WeakValueDictionary()
_UIDS = itertools.count()


@dataclass(frozen=True, eq=False)
class BlockGraph:
    """A static attention pattern: per query block, the sorted list of key blocks.

    Build one with the pattern constructors in :mod:`hopformer.graphs` (``full``, ``local``,
    ``longformer``, ``bigbird``, ``diffuser``, ``hypercube``, ``grid2d``) or
    :meth:`from_block_adjacency`. Patterns compose: ``a | b`` is the union and ``a & b`` the
    intersection (same ``seq_len``, ``block_size`` and causality); :meth:`causal` drops future keys;
    :meth:`mask_mod` hands the graph to FlexAttention.
    """

    seq_len: int
    """Number of tokens. Tokens past ``seq_len`` in the last block are padding: they never send or
    receive attention."""
    block_size: int
    """Tokens per block."""
    indptr: torch.Tensor
    """``int64[num_blocks + 1]``: the key blocks of query block ``i`` are
    ``indices[indptr[i]:indptr[i + 1]]``, sorted ascending."""
    indices: torch.Tensor
    """``int64[num_block_edges]``: key-block ids."""
    is_causal: bool = False
    """Whether keys after the query are dropped inside diagonal blocks (and only key blocks ``<=``
    the query block are listed)."""
    name: str = "graph"
    """A short description used in plots and tables."""
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """Device-side views that kernels build once per graph (gather plans, FlexAttention block masks),
    by key; not part of the graph's identity. Filled through :meth:`view`."""
    uid: int = field(init=False, default=-1, repr=False, compare=False)
    """A number that names this graph object for the life of the process (set on construction)."""

    def __post_init__(self) -> None:
        _check_positive_int("seq_len", self.seq_len)
        _check_positive_int("block_size", self.block_size)
        if self.indptr.shape != (self.num_blocks + 1,):
            raise ValueError(
                f"indptr must have shape ({self.num_blocks + 1},) for seq_len={self.seq_len}, "
                f"block_size={self.block_size}; got {tuple(self.indptr.shape)}"
            )
        object.__setattr__(self, "uid", next(_UIDS))
        _LIVE[self.uid] = self

    def view(self, build: Callable[..., View], *args: Any) -> View:
        """``build(self, *args)``, built on first use and kept in :attr:`cache`: the device-side layouts a
        kernel needs (index tables, masks). ``build`` must be a module-level function and ``args`` plain
        constants (strings, numbers, tuples; a device as its string).

        Views are constants of traced programs (:mod:`hopformer.graphs.tracing`): built eagerly under
        ``torch.export``, and under ``torch.compile`` built outside the trace and read as a guarded constant.
        """
        if torch.compiler.is_dynamo_compiling():
            return trace_constant(_live_view, self.uid, build, args)
        key = (f"{build.__module__}.{build.__qualname__}", *args)
        if key not in self.cache:
            with eager_constants():
                self.cache[key] = build(self, *args)
        return self.cache[key]

    def __reduce__(self) -> tuple:
        # Copies and unpickled graphs are built anew: their own uid, an empty cache.
        return BlockGraph, (self.seq_len, self.block_size, self.indptr, self.indices, self.is_causal, self.name)

    # ----------------------------------------------------------------------------------- basics
    @property
    def num_blocks(self) -> int:
        """Number of blocks, counting a partial last block."""
        return math.ceil(self.seq_len / self.block_size)

    @property
    def padded_len(self) -> int:
        """``num_blocks * block_size``: the length kernels pad inputs to."""
        return self.num_blocks * self.block_size

    @property
    def degrees(self) -> torch.Tensor:
        """Number of key blocks of each query block, ``int64[num_blocks]``."""
        return self.indptr[1:] - self.indptr[:-1]

    @property
    def num_block_edges(self) -> int:
        """Number of (query block, key block) pairs, the length of ``indices``."""
        return int(self.indices.numel())

    def key_blocks(self, query_block: int) -> list[int]:
        """Sorted key blocks of one query block."""
        if not 0 <= query_block < self.num_blocks:
            raise ValueError(f"query_block={query_block} is outside 0..{self.num_blocks - 1}")
        return self.indices[self.indptr[query_block] : self.indptr[query_block + 1]].tolist()

    def block_lists(self) -> list[list[int]]:
        """Per query block, the sorted list of key blocks."""
        return [self.key_blocks(i) for i in range(self.num_blocks)]

    def __repr__(self) -> str:
        causal = ", causal" if self.is_causal else ""
        return (
            f"BlockGraph({self.name}, seq_len={self.seq_len}, block_size={self.block_size}, "
            f"blocks={self.num_blocks}, block_edges={self.num_block_edges}, "
            f"density={self.density:.4f}{causal})"
        )

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_block_adjacency(
        cls, adjacency: torch.Tensor, seq_len: int, block_size: int, *, causal: bool = False, name: str = "graph"
    ) -> BlockGraph:
        """Build from a dense ``bool[num_blocks, num_blocks]`` block adjacency (row = query block)."""
        num_blocks = math.ceil(seq_len / block_size)
        if adjacency.dtype != torch.bool or adjacency.shape != (num_blocks, num_blocks):
            raise ValueError(
                f"adjacency must be a bool tensor of shape ({num_blocks}, {num_blocks}); "
                f"got {adjacency.dtype} {tuple(adjacency.shape)}"
            )
        if causal:
            adjacency = adjacency.tril()
        counts = adjacency.sum(dim=1)
        indptr = torch.zeros(num_blocks + 1, dtype=torch.int64)
        indptr[1:] = counts.cumsum(0)
        indices = adjacency.nonzero()[:, 1].to(torch.int64)  # nonzero is row-major: rows stay sorted
        return cls(seq_len, block_size, indptr, indices.contiguous(), causal, name)

    @classmethod
    def from_row_chunks(
        cls,
        seq_len: int,
        block_size: int,
        make_rows: Any,
        *,
        causal: bool = False,
        name: str = "graph",
    ) -> BlockGraph:
        """Build from ``make_rows(start, stop) -> bool[stop - start, num_blocks]``, a chunk at a time.

        Keeps memory at ``ROW_CHUNK * num_blocks`` booleans, so million-token graphs build on a laptop.
        """
        num_blocks = math.ceil(seq_len / block_size)
        counts, indices = [], []
        for start in range(0, num_blocks, ROW_CHUNK):
            stop = min(start + ROW_CHUNK, num_blocks)
            rows = make_rows(start, stop)
            if causal:
                rows = rows & _lower_triangle(start, stop, num_blocks)
            counts.append(rows.sum(dim=1))
            indices.append(rows.nonzero()[:, 1].to(torch.int64))
        indptr = torch.zeros(num_blocks + 1, dtype=torch.int64)
        indptr[1:] = torch.cat(counts).cumsum(0)
        return cls(seq_len, block_size, indptr, torch.cat(indices).contiguous(), causal, name)

    # ------------------------------------------------------------------------------- dense views
    def block_adjacency(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Dense ``bool[num_blocks, num_blocks]`` block adjacency (row = query block)."""
        n = self.num_blocks
        adjacency = torch.zeros(n, n, dtype=torch.bool, device=device)
        rows = torch.repeat_interleave(torch.arange(n), self.degrees)
        adjacency[rows.to(adjacency.device), self.indices.to(adjacency.device)] = True
        return adjacency

    def to_dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Token-level ``bool[seq_len, seq_len]`` mask: row = query, column = key, True = edge."""
        expanded = self.block_adjacency(device)
        expanded = expanded.repeat_interleave(self.block_size, 0).repeat_interleave(self.block_size, 1)
        dense = expanded[: self.seq_len, : self.seq_len]
        if self.is_causal:
            dense = dense.tril()
        return dense.contiguous()

    # ------------------------------------------------------------------------------- operations
    def causal(self) -> BlockGraph:
        """The same pattern with every edge to a later token removed (key <= query)."""
        rows = torch.repeat_interleave(torch.arange(self.num_blocks), self.degrees)
        keep = self.indices <= rows
        counts = torch.zeros(self.num_blocks, dtype=torch.int64).index_add_(0, rows, keep.long())
        indptr = torch.zeros(self.num_blocks + 1, dtype=torch.int64)
        indptr[1:] = counts.cumsum(0)
        return BlockGraph(
            self.seq_len, self.block_size, indptr, self.indices[keep].contiguous(), True, f"{self.name}, causal"
        )

    def __or__(self, other: BlockGraph) -> BlockGraph:
        """Union ``a | b``: an edge of either pattern. Both must have the same ``seq_len``,
        ``block_size`` and causality (a ``ValueError`` names the one that differs)."""
        if not isinstance(other, BlockGraph):
            return NotImplemented
        return self._combine(other, "unite", "|", lambda a, b: a | b)

    def __and__(self, other: BlockGraph) -> BlockGraph:
        """Intersection ``a & b``: an edge of both patterns. Both must have the same ``seq_len``,
        ``block_size`` and causality (a ``ValueError`` names the one that differs)."""
        if not isinstance(other, BlockGraph):
            return NotImplemented
        return self._combine(other, "intersect", "&", lambda a, b: a & b)

    def _combine(self, other: BlockGraph, verb: str, symbol: str, op: Any) -> BlockGraph:
        """Combine two graphs over the same tokens and blocks row chunk by row chunk with ``op``.

        Working on block rows is exact because both graphs share ``block_size`` and causality, so the
        token mask of the result is ``op`` of the two token masks.
        """
        for attribute in ("seq_len", "block_size", "is_causal"):
            if getattr(self, attribute) != getattr(other, attribute):
                raise ValueError(
                    f"cannot {verb} graphs with different {attribute}: "
                    f"{getattr(self, attribute)} and {getattr(other, attribute)}"
                )

        def rows(start: int, stop: int) -> torch.Tensor:
            return op(_chunk_rows(self, start, stop), _chunk_rows(other, start, stop))

        name = f"{_operand_name(self.name)} {symbol} {_operand_name(other.name)}"
        return BlockGraph.from_row_chunks(self.seq_len, self.block_size, rows, causal=self.is_causal, name=name)

    # ------------------------------------------------------------------------------ FlexAttention
    def mask_mod(self, device: torch.device | str | None = None) -> Any:
        """The graph as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``.

        True exactly where :meth:`to_dense` is True (the same for every batch and head); indices at or
        past ``seq_len`` (FlexAttention pads to its tiles) are False. Pass it to
        ``torch.nn.attention.flex_attention.create_block_mask`` and ``flex_attention``:

        ```python
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        graph = bigbird(1024, 64)
        mask = create_block_mask(graph.mask_mod("cuda"), None, None, 1024, 1024, device="cuda")
        out = flex_attention(q, k, v, block_mask=mask)
        ```

        The function looks the pair up in the dense block adjacency (``num_blocks ** 2`` booleans on
        ``device``, which must be the device of the indices), using index arithmetic only, so it
        vectorises and compiles. Token-level graphs (``block_size=1``, e.g. ``grid2d``) work the same
        way, at ``seq_len ** 2`` booleans. ``create_block_mask`` derives its tile map by evaluating
        the function on every pair; ``hopformer.ops`` builds its own masks from the block lists instead.
        """
        adjacency = self.block_adjacency(device)
        seq_len, block_size, last_block = self.seq_len, self.block_size, self.num_blocks - 1
        causal = self.is_causal

        def graph_mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            inside = (q_idx < seq_len) & (kv_idx < seq_len)
            # clamped so padded positions index inside the adjacency; ``inside`` drops them
            q_block = (q_idx // block_size).clamp(0, last_block)
            kv_block = (kv_idx // block_size).clamp(0, last_block)
            allowed = inside & adjacency[q_block, kv_block]
            if causal:
                allowed = allowed & (kv_idx <= q_idx)
            return allowed

        return graph_mask_mod

    def __eq__(self, other: object) -> bool:
        """Same tokens, blocks, causality and edges (the ``name`` is not compared)."""
        if not isinstance(other, BlockGraph):
            return NotImplemented
        return (
            self.seq_len == other.seq_len
            and self.block_size == other.block_size
            and self.is_causal == other.is_causal
            and torch.equal(self.indptr, other.indptr)
            and torch.equal(self.indices, other.indices)
        )

    __hash__ = object.__hash__  # graphs are cache keys by identity

    # ------------------------------------------------------------------------------- statistics
    def _block_sizes(self) -> torch.Tensor:
        """Real (non-padding) tokens in each block."""
        sizes = torch.full((self.num_blocks,), self.block_size, dtype=torch.int64)
        sizes[-1] = self.seq_len - (self.num_blocks - 1) * self.block_size
        return sizes

    def keys_per_query(self) -> torch.Tensor:
        """Token-level number of keys of every query, ``int64[seq_len]``."""
        sizes = self._block_sizes()
        rows = torch.repeat_interleave(torch.arange(self.num_blocks), self.degrees)
        per_block = torch.zeros(self.num_blocks, dtype=torch.int64).index_add_(0, rows, sizes[self.indices])
        keys = per_block.repeat_interleave(self.block_size)[: self.seq_len]
        if self.is_causal:
            # inside a diagonal block, query at offset t sees t + 1 keys instead of the whole block
            has_diagonal = torch.zeros(self.num_blocks, dtype=torch.bool)
            has_diagonal[rows[self.indices == rows]] = True
            offset = torch.arange(self.seq_len) % self.block_size
            block = torch.arange(self.seq_len) // self.block_size
            keys = keys - torch.where(has_diagonal[block], sizes[block] - 1 - offset, 0)
        return keys

    @property
    def num_edges(self) -> int:
        """Token-level number of (query, key) edges."""
        return int(self.keys_per_query().sum())

    @property
    def density(self) -> float:
        """Fraction of the ``seq_len**2`` token pairs that are edges."""
        return self.num_edges / self.seq_len**2

    def degree_stats(self) -> dict[str, float]:
        """Key blocks per query block and keys per query token: min, max, mean."""
        blocks = self.degrees.double()
        keys = self.keys_per_query().double()
        return {
            "blocks_min": float(blocks.min()),
            "blocks_max": float(blocks.max()),
            "blocks_mean": float(blocks.mean()),
            "keys_min": float(keys.min()),
            "keys_max": float(keys.max()),
            "keys_mean": float(keys.mean()),
        }

    # ------------------------------------------------------------------------------------ picture
    def plot(self, path: str | None = None, ax: Any = None, max_pixels: int = 1024) -> Any:
        """Draw the block adjacency (black = attended). Saves a PNG when ``path`` is given.

        Graphs with more than ``max_pixels`` blocks are shown max-pooled so the picture stays readable.
        Returns the matplotlib figure. Needs matplotlib (``pip install hopformer[plot]``).
        """
        import matplotlib

        if path is not None and ax is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        adjacency = self.block_adjacency().float()
        factor = max(1, math.ceil(self.num_blocks / max_pixels))
        if factor > 1:
            adjacency = torch.nn.functional.max_pool2d(adjacency[None, None], factor, ceil_mode=True)[0, 0]
        figure = None
        if ax is None:
            figure, ax = plt.subplots(figsize=(5, 5), dpi=120)
        ax.imshow(adjacency.numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
        pooled = f", {factor}x{factor} pooled" if factor > 1 else ""
        ax.set_title(f"{self.name}\nL={self.seq_len}, block={self.block_size}, density={self.density:.3f}{pooled}")
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        figure = figure or ax.figure
        if path is not None:
            figure.tight_layout()
            figure.savefig(path)
            plt.close(figure)
        return figure


def _live_view(uid: int, build: Callable[..., View], args: tuple) -> View:
    # Dynamo hands constants only to trace-time builders: the graph is found by its uid.
    return _LIVE[uid].view(build, *args)


def _lower_triangle(start: int, stop: int, num_blocks: int) -> torch.Tensor:
    rows = torch.arange(start, stop)[:, None]
    return torch.arange(num_blocks)[None, :] <= rows


def _operand_name(name: str) -> str:
    """A graph's name as one operand of ``|`` or ``&``: composite names get parentheses."""
    return f"({name})" if " | " in name or " & " in name else name


def _chunk_rows(graph: BlockGraph, start: int, stop: int) -> torch.Tensor:
    """Dense block-adjacency rows ``start:stop`` of a graph."""
    rows = torch.zeros(stop - start, graph.num_blocks, dtype=torch.bool)
    lo, hi = int(graph.indptr[start]), int(graph.indptr[stop])
    owner = torch.repeat_interleave(torch.arange(stop - start), graph.degrees[start:stop])
    rows[owner, graph.indices[lo:hi]] = True
    return rows


def _check_positive_int(name: str, value: Any) -> None:
    check_int(name, value, 1)
