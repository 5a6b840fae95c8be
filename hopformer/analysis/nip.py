"""Normalized Information Payload (``specs/hypercube_nip.md`` section 2).

On the undirected graph (edges symmetrised, self-loops ignored; ``deg`` counts neighbours):

- cost ``CC = rho * kappa``: mean degree times diameter;
- payload of a pair ``IP(a, b) = sum over all shortest paths a -> b of prod 1/deg(v_t)`` over every node
  after the source (= ``[(D^-1 A)^d]_{b,a}`` at ``d = dist(a, b)``);
- ``IP(G)`` = the smallest pair payload among the pairs at distance ``kappa``; ``NIP = IP(G) / CC``.

A disconnected graph has ``kappa = inf`` and NIP 0. A graph with an *isolated* node (degree 0: no
neighbour other than itself) is an input error: ``1/deg`` is undefined there (:func:`diameter` and
:func:`degree_stats` still answer, with ``inf`` and ``degree_min = 0``).

**Hub-bottleneck correction** (``hub_correction=True``). A *hub* is a node adjacent to every other
node (a global token, the centre of a star). A path that is relayed by a hub (a hub strictly between
source and target) gets its payload divided by ``N - 1``: the hub's one representation carries the
messages of all ``N - 1`` other nodes, so each gets that share (the paper's ``IP <- IP / (N - 1)`` for
star-like graphs). Applied per path, this covers mixed graphs too: in Longformer/BigBird-style graphs a
far pair whose only shortest routes go through global tokens is corrected fully, a pair that also has
a route through a random neighbour only on the hub share. A graph with a hub has diameter <= 2, so
the correction only ever concerns length-2 paths; the complete graph (diameter 1, nothing relayed) is
unaffected and keeps ``NIP = 1/(N-1)^2``, the star gets ``N / (4 (N-1)^3)``.

**How it is computed.** Nodes with the same neighbourhood ("twins": all tokens of a block with a
self-loop) are interchangeable, so the graph is handled as a quotient over groups of twins: a token-level
block graph is a ``num_blocks``-node problem (each intermediate block contributes ``tokens/deg``, the
target ``1/deg``), and dense matrices are reduced by hashing rows. Shortest-path counting runs as a
breadth-first search from all sources at once, level by level, with payloads kept as logarithms
(``logsumexp`` over merging paths), so nothing under- or overflows (``2^-1023`` on a long local band is
fine). Path counts are never held as integers: each count enters as the weighted sum of its paths, so a
pair with more than ``2^64`` shortest paths (the corners of a 35 x 35 grid, tested against exact
rational arithmetic) is as exact as any other. Wide levels use a matrix product in linear space
instead, each source shifted by its largest log payload, and only when no entry then falls below
``e^-600``. Cost: O(groups x group edges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse

from hopformer.analysis.spectral import _block_sizes, _matrix_to_csr, _ranges, check_level
from hopformer.checks import check_int
from hopformer.graphs.block_graph import BlockGraph

__all__ = ["PayloadReport", "closed_form_nip", "degree_stats", "diameter", "information_payload", "nip"]

# Sources searched at once: bounds the (sources x groups) arrays of one BFS level.
CHUNK_PAIRS = 1 << 22
# Path extensions listed at once by the sparse BFS step.
CHUNK_EDGES = 1 << 22
# Relative cost of one listed path extension (sort, merge) against one multiply-add of the dense step,
# and the number of (sources x groups) passes the dense step makes: picks the cheaper step per level.
SPARSE_COST = 40
DENSE_PASSES = 6
# Group graphs at least this dense (1 in DENSITY) and at most this large multiply as dense matrices.
DENSE_OPERAND_DENSITY = 32
DENSE_OPERAND_MAX = 8192


@dataclass(frozen=True)
class PayloadReport:
    """The pieces of NIP for one graph."""

    num_nodes: int
    """``N``."""
    mean_degree: float
    """``rho``, neighbours per node (self-loops excluded)."""
    diameter: float
    """``kappa``; ``math.inf`` when the graph is disconnected."""
    log_payload: float
    """Natural log of ``IP(G)`` (after the hub correction); ``-inf`` when disconnected."""
    num_hubs: int
    """Nodes adjacent to every other node."""
    hub_corrected: bool
    """Whether some diametral shortest path was relayed by a hub and got the ``1/(N-1)`` factor."""

    @property
    def payload(self) -> float:
        """``IP(G)``."""
        return math.exp(self.log_payload)

    @property
    def cost(self) -> float:
        """``CC(G) = rho * kappa``."""
        return self.mean_degree * self.diameter

    @property
    def log_nip(self) -> float:
        """Natural log of NIP (finite even where NIP itself underflows)."""
        if not math.isfinite(self.diameter):
            return -math.inf
        return self.log_payload - math.log(self.cost)

    @property
    def nip(self) -> float:
        """``NIP(G) = IP(G) / CC(G)``; 0 for a disconnected graph."""
        return math.exp(self.log_nip)


# ------------------------------------------------------------------------------------ public API
def nip(graph: Any, hub_correction: bool = True, *, level: str = "block") -> float:
    """Normalized Information Payload of ``graph`` (a :class:`BlockGraph` or a square bool adjacency).

    ``level`` applies to BlockGraphs: ``"block"`` (one node per block, the paper's layout graph) or
    ``"token"`` (one node per token; tokens of a block with a self-loop are mutually adjacent).
    A disconnected graph has NIP 0. A graph with an *isolated* node (no neighbour other than itself,
    so degree 0 and its ``1/deg`` undefined) raises ValueError naming the node.
    """
    return information_payload(graph, hub_correction, level=level).nip


def information_payload(graph: Any, hub_correction: bool = True, *, level: str = "block") -> PayloadReport:
    """All pieces of NIP (mean degree, diameter, payload, hubs); see :class:`PayloadReport`."""
    if not isinstance(hub_correction, bool):
        raise ValueError(f"hub_correction must be True or False, got {hub_correction!r}")
    quotient = _quotient(graph, check_level(level))
    _check_no_isolated(quotient, graph, level)
    return _payload(quotient, hub_correction)


def diameter(graph: Any, *, level: str = "block") -> float:
    """Diameter of the undirected graph (hops); ``math.inf`` when it is disconnected, including when
    a node is isolated (unlike :func:`nip`, the diameter is defined there)."""
    return _payload(_quotient(graph, check_level(level)), False).diameter


def degree_stats(graph: Any, *, level: str = "block") -> dict[str, float]:
    """Degrees of the undirected graph, self-loops excluded: nodes, edges, min/max/mean degree, hubs."""
    quotient = _quotient(graph, check_level(level))
    degrees, sizes = quotient.degrees(), quotient.sizes
    total = int(sizes.sum())
    return {
        "nodes": total,
        "edges": int((sizes * degrees).sum()) // 2,
        "degree_min": float(degrees.min()),
        "degree_max": float(degrees.max()),
        "degree_mean": float((sizes * degrees).sum() / total),
        "hubs": int(sizes[degrees == total - 1].sum()) if total > 1 else 0,
    }


def closed_form_nip(family: str, n: int, *, hub_correction: bool = True) -> float:
    """NIP of textbook graphs on ``n`` nodes (``specs/hypercube_nip.md`` section 2).

    - ``"complete"`` ``K_n``: ``1/(n-1)^2``;
    - ``"hypercube"`` ``Q_k`` (``n = 2^k``): ``k! / k^(k+2)``;
    - ``"star"``: ``n / (4 (n-1)^3)`` with the hub correction, ``n / (4 (n-1)^2)`` without;
    - ``"cycle"`` ``C_n``: ``2^(1-kappa) / (2 kappa)`` for even ``n`` (two antipodal paths), else
      ``2^-kappa / (2 kappa)``, with ``kappa = floor(n/2)``.
    """
    check_int("n", n, 2)
    if family == "complete":
        return 1.0 / (n - 1) ** 2
    if family == "hypercube":
        k = n.bit_length() - 1
        if n != 1 << k:
            raise ValueError(f"a hypercube has a power-of-two number of nodes, got n={n}")
        return math.exp(math.lgamma(k + 1) - (k + 2) * math.log(k))
    if family == "star":
        if n < 3:
            raise ValueError(f"a star needs n >= 3 nodes (n=2 is K_2), got n={n}")
        return n / (4 * (n - 1) ** (3 if hub_correction else 2))
    if family == "cycle":
        if n < 3:
            raise ValueError(f"a cycle needs n >= 3 nodes, got n={n}")
        kappa = n // 2
        return (2.0 if n % 2 == 0 else 1.0) * 2.0**-kappa / (2 * kappa)
    raise ValueError(f"family must be 'complete', 'hypercube', 'star' or 'cycle', got {family!r}")


# --------------------------------------------------------------------------------- the quotient
@dataclass
class _Quotient:
    """An undirected graph over groups of twin nodes.

    ``adjacency`` (symmetric CSR, no diagonal) joins groups whose nodes are all adjacent; ``sizes``
    are nodes per group; ``clique[g]`` says the nodes of group ``g`` are adjacent to one another.
    """

    adjacency: scipy.sparse.csr_array
    sizes: np.ndarray
    clique: np.ndarray
    isolated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # node ids, degree 0

    def degrees(self) -> np.ndarray:
        """Node degree (self-loops excluded) of the nodes of each group."""
        inside = np.where(self.clique, self.sizes - 1, 0)
        return self.adjacency.astype(np.int64) @ self.sizes + inside


def _quotient(graph: Any, level: str) -> _Quotient:
    if isinstance(graph, BlockGraph):
        blocks = scipy.sparse.csr_array(
            (np.ones(graph.num_block_edges, dtype=bool), graph.indices.numpy(), graph.indptr.numpy()),
            shape=(graph.num_blocks, graph.num_blocks),
        )
        symmetric = (blocks + blocks.T).astype(bool).tocsr()
        if level == "token":
            # tokens of a block are twins: adjacent to each other exactly when the block has a self-loop
            clique = symmetric.diagonal().astype(bool)
            simple = _without_diagonal(symmetric)
            sizes = _block_sizes(graph)
            alone = (np.diff(simple.indptr) == 0) & (~clique | (sizes == 1))
            isolated = _ranges(np.flatnonzero(alone) * graph.block_size, sizes[alone])
            return _Quotient(simple, sizes, clique, isolated)
        return _twin_quotient(_without_diagonal(symmetric))
    matrix = _matrix_to_csr(graph)
    return _twin_quotient(_without_diagonal((matrix + matrix.T).astype(bool).tocsr()))


def _check_no_isolated(quotient: _Quotient, graph: Any, level: str) -> None:
    """NIP divides by every target's degree: a node without neighbours (self-loops do not count,
    ``specs/hypercube_nip.md`` section 2) makes it undefined, so it is an input error, not a 0."""
    total = int(quotient.sizes.sum())
    if total < 2:
        raise ValueError(f"graph must have at least 2 nodes for a payload; got {total}")
    isolated = quotient.isolated
    if len(isolated):
        if isinstance(graph, BlockGraph):
            where = f"{level}s of the {level}-level graph of {graph.name}"
        else:
            where = "nodes of the adjacency matrix"
        raise ValueError(
            f"graph has {len(isolated)} isolated node(s) (no neighbour other than itself; first "
            f"{where}: {isolated[:5].tolist()}): their degree is 0, so the payload 1/deg is undefined; "
            "remove them or connect them (diameter() reports inf for such a graph)"
        )


def _without_diagonal(matrix: scipy.sparse.csr_array) -> scipy.sparse.csr_array:
    coo = matrix.tocoo()
    keep = coo.row != coo.col
    out = scipy.sparse.csr_array((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=matrix.shape)
    out.sort_indices()
    return out


def _twin_quotient(simple: scipy.sparse.csr_array) -> _Quotient:
    """Group the nodes of a simple undirected graph into true twins (same closed neighbourhood, so
    mutually adjacent) and, among the rest, false twins (same open neighbourhood, not adjacent)."""
    n = simple.shape[0]
    indptr, indices = simple.indptr, simple.indices.astype(np.int64)
    group = np.full(n, -1, dtype=np.int64)
    clique: list[bool] = []
    by_closed: dict[bytes, list[int]] = {}
    for i in range(n):
        row = indices[indptr[i] : indptr[i + 1]]
        by_closed.setdefault(np.sort(np.append(row, i)).tobytes(), []).append(i)
    singletons = []
    for members in by_closed.values():
        if len(members) > 1:
            group[members] = len(clique)
            clique.append(True)
        else:
            singletons.append(members[0])
    by_open: dict[bytes, list[int]] = {}
    for i in singletons:
        by_open.setdefault(indices[indptr[i] : indptr[i + 1]].tobytes(), []).append(i)
    for members in by_open.values():
        group[members] = len(clique)
        clique.append(False)
    groups = len(clique)
    sizes = np.bincount(group, minlength=groups)
    isolated = np.flatnonzero(np.diff(indptr) == 0)
    # any member represents its group: twins have the same neighbours outside the group
    representative = np.zeros(groups, dtype=np.int64)
    representative[group] = np.arange(n)
    rows = simple[representative]
    coo = rows.tocoo()
    adjacency = scipy.sparse.csr_array(
        (np.ones(len(coo.row), dtype=bool), (coo.row, group[coo.col])), shape=(groups, groups)
    )
    adjacency.sum_duplicates()
    return _Quotient(_without_diagonal(adjacency.astype(bool).tocsr()), sizes, np.asarray(clique, dtype=bool), isolated)


# ----------------------------------------------------------------------------------- the payload
def _payload(quotient: _Quotient, hub_correction: bool) -> PayloadReport:
    sizes, clique = quotient.sizes, quotient.clique
    adjacency = quotient.adjacency
    total = int(sizes.sum())
    if total < 2:
        raise ValueError(f"graph must have at least 2 nodes for a payload; got {total}")
    degrees = quotient.degrees()
    mean_degree = float((sizes * degrees).sum() / total)
    hubs = degrees == total - 1
    num_hubs = int(sizes[hubs].sum())
    with np.errstate(divide="ignore"):
        log_degree = np.log(degrees.astype(np.float64))
        log_size = np.log(sizes.astype(np.float64))
    # an intermediate group contributes (its nodes) / deg, times 1/(N-1) when it is a relaying hub
    log_relay = log_size - log_degree
    if hub_correction and num_hubs:
        log_relay = log_relay - np.where(hubs, math.log(total - 1), 0.0)

    # pairs inside a group: adjacent twins (distance 1) or false twins meeting through a neighbour
    eccentricity: list[np.ndarray] = []
    worst: list[np.ndarray] = []
    multi = np.flatnonzero(sizes > 1)
    if len(multi):
        inside_distance = np.where(clique[multi], 1.0, np.where(degrees[multi] > 0, 2.0, math.inf))
        via = np.array([_logsumexp(log_relay[_neighbours(adjacency, g)]) for g in multi])
        via[degrees[multi] == 0] = 0.0  # isolated twins: infinite distance, payload irrelevant
        inside_payload = -log_degree[multi] + np.where(clique[multi], 0.0, via)
        eccentricity.append(inside_distance)
        worst.append(inside_payload)

    # pairs across groups: breadth-first search from every source group
    chunk = max(1, CHUNK_PAIRS // len(sizes))
    search_graph = _SearchGraph.of(adjacency)
    for start in range(0, len(sizes), chunk):
        sources = np.arange(start, min(start + chunk, len(sizes)))
        distance, payload = _search(search_graph, sources, log_relay, log_degree)
        eccentricity.append(distance)
        worst.append(payload)
    eccentricity_all, worst_all = np.concatenate(eccentricity), np.concatenate(worst)
    kappa = float(eccentricity_all.max())
    if not math.isfinite(kappa):
        return PayloadReport(total, mean_degree, math.inf, -math.inf, num_hubs, False)
    log_payload = float(worst_all[eccentricity_all == kappa].min())
    corrected = bool(hub_correction and num_hubs and kappa == 2)
    return PayloadReport(total, mean_degree, kappa, log_payload, num_hubs, corrected)


@dataclass
class _SearchGraph:
    """The group graph in the two forms the BFS steps use."""

    csr: scipy.sparse.csr_array  # symmetric, bool pattern: neighbour lists for the sparse step
    operand: Any  # float64 adjacency (dense when it is dense enough for BLAS) for the dense step

    @classmethod
    def of(cls, adjacency: scipy.sparse.csr_array) -> _SearchGraph:
        n = adjacency.shape[0]
        if adjacency.nnz * DENSE_OPERAND_DENSITY > n * n and n <= DENSE_OPERAND_MAX:
            return cls(adjacency, adjacency.toarray().astype(np.float64))
        return cls(adjacency, adjacency.astype(np.float64))


def _search(
    graph: _SearchGraph, sources: np.ndarray, log_relay: np.ndarray, log_degree: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Breadth-first search from ``sources`` over the group graph with log-payload accumulation.

    Returns, per source, its eccentricity (``inf`` if some group is unreachable; 0 for a lone group)
    and the smallest log payload among the groups at that distance.
    """
    n = graph.csr.shape[0]
    count = len(sources)
    visited = np.zeros((n, count), dtype=bool)  # (group, source): one column per source
    visited[sources, np.arange(count)] = True
    reached = np.ones(count, dtype=np.int64)
    eccentricity = np.zeros(count)
    worst = np.zeros(count)
    # frontier: (group, source, log of sum over the shortest paths reaching it of the product of the
    # relay weights of their intermediate groups); the group itself is not yet counted
    groups, columns, logs = sources, np.arange(count), np.zeros(count)
    distance = 0
    while True:
        if distance > 0:  # the paths now leave the frontier groups, which become intermediate nodes
            logs = logs + log_relay[groups]
        groups, columns, logs = _step(graph, visited, groups, columns, logs)
        if len(groups) == 0:
            break
        distance += 1
        visited[groups, columns] = True
        newly = np.bincount(columns, minlength=count)
        reached += newly
        eccentricity[newly > 0] = distance
        # a path ending here: the target contributes 1/deg (one node, never a relay)
        worst_now = np.full(count, np.inf)
        np.minimum.at(worst_now, columns, logs - log_degree[groups])
        touched = newly > 0
        worst[touched] = worst_now[touched]
    eccentricity[reached < n] = math.inf
    return eccentricity, worst


def _step(
    graph: _SearchGraph, visited: np.ndarray, groups: np.ndarray, columns: np.ndarray, logs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One BFS level: the groups first reached from each frontier, with the log payload of their paths.

    Two equivalent ways. Narrow frontiers list every (path, edge) and merge by ``logsumexp``. Wide ones
    multiply the adjacency by a dense (groups x sources) matrix in linear space, each source's column
    shifted by its largest log value; used only when no entry falls below ``exp(-600)`` after the shift,
    so nothing underflows (all terms are positive: no cancellation either).
    """
    n, count = visited.shape
    indptr, indices = graph.csr.indptr, graph.csr.indices
    fan = np.diff(indptr)[groups]
    if int(fan.sum()) * SPARSE_COST > count * (graph.csr.nnz + DENSE_PASSES * n):
        shift = np.full(count, -np.inf)
        np.maximum.at(shift, columns, logs)
        relative = logs - shift[columns]
        if relative.min() > -600.0:
            frontier = np.zeros((n, count))
            frontier[groups, columns] = np.exp(relative)
            product = np.asarray(graph.operand @ frontier)
            product[visited] = 0.0
            new_groups, new_columns = np.nonzero(product)
            return new_groups, new_columns, np.log(product[new_groups, new_columns]) + shift[new_columns]
    # sparse: extend every frontier path by one edge; a group already reached is not on a shortest path
    pieces = []
    for part in _split(columns, fan, CHUNK_EDGES):
        ends = indices[_ranges(indptr[groups[part]], fan[part])]
        part_columns = np.repeat(columns[part], fan[part])
        extended = np.repeat(logs[part], fan[part])
        fresh = ~visited[ends, part_columns]
        if fresh.any():
            pieces.append(_merge(ends[fresh] * count + part_columns[fresh], count, extended[fresh]))
    if not pieces:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(column) for column in zip(*pieces))


def _split(columns: np.ndarray, fan: np.ndarray, budget: int) -> list[Any]:
    """Index sets of the frontier with about ``budget`` extensions each, cut between sources so that
    all paths to one (group, source) pair are merged within one set."""
    if int(fan.sum()) <= budget:
        return [slice(None)]
    per_source = np.bincount(columns, weights=fan)
    batch = ((np.cumsum(per_source) - per_source) // budget)[columns]
    order = np.argsort(batch, kind="stable")
    bounds = np.flatnonzero(np.diff(batch[order])) + 1
    return np.split(order, bounds)


def _merge(keys: np.ndarray, n: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group ``values`` by ``keys`` (``major * n + minor``), ``logsumexp`` each group; returns
    ``(major, minor, logsumexp)``."""
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    peak = np.maximum.reduceat(values, starts)
    counts = np.diff(np.append(starts, len(keys)))
    total = np.add.reduceat(np.exp(values - np.repeat(peak, counts)), starts)
    unique = keys[starts]
    return unique // n, unique % n, peak + np.log(total)


def _logsumexp(values: np.ndarray) -> float:
    if len(values) == 0:
        return -math.inf
    peak = float(values.max())
    if not math.isfinite(peak):
        return peak
    return peak + math.log(float(np.exp(values - peak).sum()))


def _neighbours(adjacency: scipy.sparse.csr_array, group: int) -> np.ndarray:
    return adjacency.indices[adjacency.indptr[group] : adjacency.indptr[group + 1]]
