"""NIP: closed forms, brute-force enumeration of shortest paths, hub correction, twins, disconnected
graphs, underflow, and both BFS step kinds."""

from __future__ import annotations

import functools
import importlib
import math
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
import scipy.sparse
import torch

from hopformer.analysis import closed_form_nip, degree_stats, diameter, information_payload, nip
from hopformer.graphs import BlockGraph, bigbird, diffuser, full, hypercube, local, longformer

# the function hopformer.analysis.nip shadows its module's attribute name; fetch the module itself
nip_module = importlib.import_module("hopformer.analysis.nip")
POWERS_OF_TWO = [4, 8, 16, 32, 64, 128, 256]


# ------------------------------------------------------------------------------------ references
def xor_hypercube(n: int) -> np.ndarray:
    k = n.bit_length() - 1
    nodes = np.arange(n)
    matrix = np.zeros((n, n), dtype=bool)
    for j in range(k):
        matrix[nodes, nodes ^ (1 << j)] = True
    return matrix


def star(n: int) -> np.ndarray:
    matrix = np.zeros((n, n), dtype=bool)
    matrix[0, 1:] = matrix[1:, 0] = True
    return matrix


def cycle(n: int) -> np.ndarray:
    matrix = np.zeros((n, n), dtype=bool)
    matrix[np.arange(n), (np.arange(n) + 1) % n] = True
    return matrix


def random_graph(n: int, p: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = np.triu(rng.random((n, n)) < p, 1)
    matrix[np.arange(n - 1), np.arange(1, n)] = True  # a Hamiltonian path keeps it connected
    return matrix | matrix.T


def brute_force_nip(adjacency: np.ndarray, hub_correction: bool = True) -> tuple[float, float]:
    """(diameter, NIP) by listing every shortest path explicitly (the spec's definition, verbatim)."""
    n = len(adjacency)
    simple = (adjacency | adjacency.T) & ~np.eye(n, dtype=bool)
    neighbours = [list(np.flatnonzero(simple[i])) for i in range(n)]
    degree = [len(row) for row in neighbours]
    distance = []
    for source in range(n):
        seen = {source: 0}
        queue = deque([source])
        while queue:
            u = queue.popleft()
            for v in neighbours[u]:
                if v not in seen:
                    seen[v] = seen[u] + 1
                    queue.append(v)
        distance.append([seen.get(v, math.inf) for v in range(n)])
    kappa = max(max(row) for row in distance)
    if not math.isfinite(kappa):
        return math.inf, 0.0
    hubs = {v for v in range(n) if degree[v] == n - 1}

    def shortest_paths(path: list[int], target: int):
        u = path[-1]
        if u == target:
            yield path
            return
        for v in neighbours[u]:
            if distance[v][target] == distance[u][target] - 1:
                yield from shortest_paths(path + [v], target)

    payloads = []
    for a in range(n):
        for b in range(n):
            if a != b and distance[a][b] == kappa:
                total = 0.0
                for path in shortest_paths([a], b):
                    value = math.prod(1.0 / degree[v] for v in path[1:])
                    if hub_correction and any(v in hubs for v in path[1:-1]):
                        value /= n - 1
                    total += value
                payloads.append(total)
    mean_degree = sum(degree) / n
    return kappa, min(payloads) / (mean_degree * kappa)


@pytest.fixture(params=["auto", "sparse-steps", "dense-steps", "tiny-chunks"])
def step_mode(request, monkeypatch):
    """Run a test with the BFS forced onto each step kind and with tiny chunks (all give one answer)."""
    if request.param == "sparse-steps":
        monkeypatch.setattr(nip_module, "SPARSE_COST", 0)
    elif request.param == "dense-steps":
        monkeypatch.setattr(nip_module, "SPARSE_COST", 10**12)
    elif request.param == "tiny-chunks":
        monkeypatch.setattr(nip_module, "CHUNK_PAIRS", 7)
        monkeypatch.setattr(nip_module, "CHUNK_EDGES", 5)
    return request.param


# ---------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("n", POWERS_OF_TWO)
def test_hypercube_closed_form(n):
    k = n.bit_length() - 1
    expected = math.factorial(k) / k ** (k + 2)
    assert closed_form_nip("hypercube", n) == pytest.approx(expected, rel=1e-14)
    for graph in (xor_hypercube(n), torch.from_numpy(xor_hypercube(n))):
        assert nip(graph) == pytest.approx(expected, rel=1e-12)
    # the pattern at block level: self-loops ignored, Gray-code placement is still Q_k
    for block_size in (1, 4):
        report = information_payload(hypercube(n * block_size, block_size), level="block")
        assert report.mean_degree == k and report.diameter == k
        assert report.payload == pytest.approx(math.factorial(k) / k**k, rel=1e-12)
        assert report.nip == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n", POWERS_OF_TWO)
def test_complete_graph_closed_form(n):
    expected = 1.0 / (n - 1) ** 2
    assert closed_form_nip("complete", n) == pytest.approx(expected, rel=1e-15)
    assert nip(np.ones((n, n), dtype=bool)) == pytest.approx(expected, rel=1e-12)
    assert nip(full(n * 4, 4), level="block") == pytest.approx(expected, rel=1e-12)
    assert nip(full(n, 1), level="token") == pytest.approx(expected, rel=1e-12)
    # every node is a hub, but nothing is relayed at diameter 1: the correction changes nothing
    assert nip(np.ones((n, n), dtype=bool), hub_correction=False) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n", [3, 4, 7, 16, 100])
def test_star_closed_form_with_and_without_hub_correction(n):
    report = information_payload(star(n))
    assert report.num_hubs == 1 and report.hub_corrected
    assert report.nip == pytest.approx(n / (4 * (n - 1) ** 3), rel=1e-12)
    assert closed_form_nip("star", n) == pytest.approx(n / (4 * (n - 1) ** 3), rel=1e-15)
    assert nip(star(n), hub_correction=False) == pytest.approx(closed_form_nip("star", n, hub_correction=False))


@pytest.mark.parametrize("n", [3, 5, 8, 11, 64])
def test_cycle_closed_form(n):
    assert nip(cycle(n)) == pytest.approx(closed_form_nip("cycle", n), rel=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("block_size", [2, 3, 16])
def test_token_level_hypercube_closed_form(k, block_size):
    """Tokens of a block are twins: intermediate blocks contribute b/deg, the target 1/deg."""
    graph = hypercube((1 << k) * block_size, block_size)
    degree = (k + 1) * block_size - 1
    payload = math.factorial(k) * (block_size / degree) ** (k - 1) / degree
    report = information_payload(graph, level="token")
    assert report.mean_degree == degree and report.diameter == k
    assert report.payload == pytest.approx(payload, rel=1e-12)
    assert nip(graph.to_dense()) == pytest.approx(report.nip, rel=1e-12)


# ------------------------------------------------------------------------------------ brute force
BRUTE_FORCE_GRAPHS = {
    "K5": np.ones((5, 5), dtype=bool),
    "C7": cycle(7),
    "C8": cycle(8),
    "star7": star(7),
    "Q3": xor_hypercube(8),
    "Q4": xor_hypercube(16),
    "path6": local(6, 1, window=3).to_dense().numpy(),
    "random9a": random_graph(9, 0.3, 0),
    "random9b": random_graph(9, 0.45, 1),
    "random12": random_graph(12, 0.2, 2),
    "hypercube tokens": hypercube(16, 2).to_dense().numpy(),
    "longformer tokens": longformer(30, 3).to_dense().numpy(),
    "bigbird tokens": bigbird(24, 3, window=1, num_global=1, num_random=1, seed=3).to_dense().numpy(),
    "diffuser tokens": diffuser(20, 2, window=1, num_global=1, num_random=1, seed=1).to_dense().numpy(),
    "directed bigbird blocks": bigbird(160, 16, window=1, num_global=1, num_random=2, seed=0).block_adjacency().numpy(),
}


@pytest.mark.parametrize("name", list(BRUTE_FORCE_GRAPHS))
def test_against_brute_force_enumeration(name, step_mode):
    adjacency = BRUTE_FORCE_GRAPHS[name]
    for hub_correction in (True, False):
        kappa, expected = brute_force_nip(adjacency, hub_correction)
        report = information_payload(adjacency, hub_correction)
        assert report.diameter == kappa
        assert report.nip == pytest.approx(expected, rel=1e-12), hub_correction


@functools.cache
def brute_force_of_mask(graph: BlockGraph) -> float:
    return brute_force_nip(graph.to_dense().numpy())[1]


@pytest.mark.parametrize(
    "graph",
    [hypercube(32, 4), longformer(48, 4), bigbird(60, 5, window=1, num_global=1, num_random=1, seed=2)],
    ids=lambda graph: graph.name,
)
def test_token_level_block_graph_matches_its_dense_mask(graph, step_mode):
    expected = brute_force_of_mask(graph)
    assert nip(graph, level="token") == pytest.approx(expected, rel=1e-12)
    assert nip(graph.to_dense()) == pytest.approx(expected, rel=1e-12)
    assert nip(graph) == pytest.approx(brute_force_nip(graph.block_adjacency().numpy())[1], rel=1e-12)


def test_mixed_graph_hub_correction_is_per_path():
    """A pair relayed only by the hub is divided by N-1; a route through a non-hub is not."""
    # hub 0 joined to all; 1-2-3 path; 4 hangs off 3: pair (1, 4) has routes 1-0-4 (hub) and none else,
    # pair (1, 3) has 1-0-3 (hub) and 1-2-3 (plain)
    matrix = np.zeros((5, 5), dtype=bool)
    for a, b in [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (2, 3), (3, 4)]:
        matrix[a, b] = matrix[b, a] = True
    kappa, expected = brute_force_nip(matrix)
    report = information_payload(matrix)
    assert kappa == report.diameter == 2 and report.hub_corrected
    assert report.nip == pytest.approx(expected, rel=1e-12)
    uncorrected = information_payload(matrix, hub_correction=False)
    assert uncorrected.payload > report.payload and not uncorrected.hub_corrected


# ----------------------------------------------------------------------------- big path counts
def grid(rows: int, cols: int) -> np.ndarray:
    index = np.arange(rows * cols).reshape(rows, cols)
    matrix = np.zeros((rows * cols, rows * cols), dtype=bool)
    matrix[index[:-1].ravel(), index[1:].ravel()] = True
    matrix[index[:, :-1].ravel(), index[:, 1:].ravel()] = True
    return matrix | matrix.T


def exact_payload(adjacency: np.ndarray, source: int, target: int) -> tuple[int, Fraction]:
    """(number of shortest paths, payload) from ``source`` to ``target`` in exact arithmetic: Python
    integers and fractions over the BFS layers, no floating point anywhere."""
    neighbours = [np.flatnonzero(row).tolist() for row in adjacency]
    distance = {source: 0}
    layers = [[source]]
    while layers[-1]:
        nxt = []
        for u in layers[-1]:
            for v in neighbours[u]:
                if v not in distance:
                    distance[v] = distance[u] + 1
                    nxt.append(v)
        layers.append(nxt)
    count, weight = {source: 1}, {source: Fraction(1)}
    for layer in layers[1:]:
        for v in layer:
            before = [u for u in neighbours[v] if distance[u] == distance[v] - 1]
            count[v] = sum(count[u] for u in before)
            weight[v] = sum(weight[u] for u in before) / len(neighbours[v])
    return count[target], weight[target]


@pytest.mark.parametrize("steps", ["sparse-steps", "dense-steps"])
def test_path_counts_beyond_64_bits(steps, monkeypatch):
    """A 35 x 35 grid: the corner pairs are the only diametral pairs (distance 68), joined by
    C(68, 34) ~ 2.8e19 > 2^64 shortest paths (a uint64 path counter would wrap), and the grid has no
    twins, so the BFS itself carries them. IP and NIP must agree with exact rational arithmetic."""
    monkeypatch.setattr(nip_module, "SPARSE_COST", 0 if steps == "sparse-steps" else 10**12)
    side = 35
    adjacency = grid(side, side)
    count, payload = exact_payload(adjacency, 0, side * side - 1)
    assert count == math.comb(2 * side - 2, side - 1) > 2**64
    report = information_payload(adjacency)
    assert report.diameter == 2 * side - 2
    degrees = adjacency.sum(axis=1)
    assert report.mean_degree == pytest.approx(degrees.mean(), rel=1e-15)
    # log of an exact fraction whose terms are far below float range
    log_payload = math.log(payload.numerator) - math.log(payload.denominator)
    assert report.log_payload == pytest.approx(log_payload, rel=1e-13)
    assert report.nip == pytest.approx(float(payload / Fraction(int(degrees.sum()), side * side)) / 68, rel=1e-12)


def test_hypercube_without_twins_at_1024_nodes():
    """hypercube(1024, 1) is Q_10 with one node per token: no twins to merge, 10! paths per pair."""
    report = information_payload(hypercube(1024, 1), level="token")
    assert report.num_nodes == 1024 and report.diameter == 10 and report.mean_degree == 10
    assert report.nip == pytest.approx(closed_form_nip("hypercube", 1024), rel=1e-12)
    assert report.payload == pytest.approx(math.factorial(10) / 10**10, rel=1e-12)


# ----------------------------------------------------------------------------------- edge cases
def test_disconnected_graph_reports_infinite_diameter_and_zero_nip(step_mode):
    two = np.zeros((8, 8), dtype=bool)
    two[:4, :4] = two[4:, 4:] = True
    blocks = local(64, 16, window=1)  # token level: four cliques of 16 tokens, no edge between blocks
    for graph, level in ((two, "block"), (scipy.sparse.csr_array(two), "block"), (blocks, "token")):
        report = information_payload(graph, level=level)
        assert report.diameter == math.inf and report.payload == 0.0 and report.nip == 0.0
        assert report.log_nip == -math.inf
        assert diameter(graph, level=level) == math.inf
        assert nip(graph, level=level) == 0.0


def test_isolated_node_is_an_error_but_has_infinite_diameter():
    """An isolated node has degree 0 (self-loops do not count), so 1/deg in the payload is undefined."""
    isolated = np.ones((5, 5), dtype=bool)
    isolated[4, :] = isolated[:, 4] = False
    self_loop_only = np.ones((5, 5), dtype=bool)
    self_loop_only[4, :4] = self_loop_only[:4, 4] = False
    cases = [
        (isolated, "block", r"1 isolated node.*nodes of the adjacency matrix: \[4\]"),
        (self_loop_only, "block", r"1 isolated node.*\[4\]"),
        (torch.eye(3, dtype=torch.bool), "block", r"3 isolated node.*\[0, 1, 2\]"),
        (local(64, 16, window=1), "block", r"4 isolated node.*blocks of the block-level graph"),
        (local(8, 1, window=1), "token", r"8 isolated node.*tokens of the token-level graph"),
        # a last block of one token has a self-loop but no neighbour: token 32 alone is isolated
        (local(33, 16, window=1), "token", r"1 isolated node.*\[32\]"),
    ]
    for graph, level, message in cases:
        with pytest.raises(ValueError, match=message):
            nip(graph, level=level)
        with pytest.raises(ValueError, match="isolated"):
            information_payload(graph, False, level=level)
        assert diameter(graph, level=level) == math.inf
        assert degree_stats(graph, level=level)["degree_min"] == 0


@pytest.mark.parametrize("sparse_cost", [nip_module.SPARSE_COST, 0])
def test_long_band_does_not_underflow(sparse_cost, monkeypatch):
    """A path of 1,500 nodes: IP = 2^-1498 is below float range, its logarithm is exact."""
    monkeypatch.setattr(nip_module, "SPARSE_COST", sparse_cost)
    n = 1500
    report = information_payload(local(n, 1, window=3))
    assert report.diameter == n - 1
    assert report.log_payload == pytest.approx(-(n - 2) * math.log(2), rel=1e-12)
    assert report.nip == 0.0 and math.isfinite(report.log_nip)


def test_dense_step_never_underflows_inside_a_frontier(monkeypatch):
    """Payloads that differ by more than e^600 within one BFS level must not be lost in linear space:
    one branch runs through nodes of degree ~1e6 (a huge false-twin group hangs off each), the other
    through degree-2 nodes; the forced dense step has to fall back to the log-space one."""
    length, leaves = 120, 10**6
    # groups: 0 source; 1..L heavy chain; L+1..2L light chain; 2L+1..3L leaf groups of the heavy chain
    groups = 3 * length + 1
    edges = [(0, 1), (0, length + 1)]
    edges += [(i, i + 1) for i in range(1, length)] + [(length + i, length + i + 1) for i in range(1, length)]
    edges += [(i, 2 * length + i) for i in range(1, length + 1)]
    rows, cols = zip(*edges)
    adjacency = scipy.sparse.coo_array((np.ones(len(edges), dtype=bool), (rows, cols)), shape=(groups, groups))
    adjacency = (adjacency + adjacency.T).astype(bool).tocsr()
    sizes = np.ones(groups, dtype=np.int64)
    sizes[2 * length + 1 :] = leaves
    quotient = nip_module._Quotient(adjacency, sizes, np.zeros(groups, dtype=bool))
    reference = nip_module._payload(quotient, True)
    monkeypatch.setattr(nip_module, "SPARSE_COST", 10**12)
    forced = nip_module._payload(quotient, True)
    assert forced.diameter == reference.diameter
    assert forced.log_payload == pytest.approx(reference.log_payload, rel=1e-12)


def test_degree_stats_and_diameter():
    stats = degree_stats(hypercube(256 * 16, 16))
    assert stats == {
        "nodes": 256,
        "edges": 256 * 8 // 2,
        "degree_min": 8.0,
        "degree_max": 8.0,
        "degree_mean": 8.0,
        "hubs": 0,
    }
    stats = degree_stats(star(10))
    assert stats["hubs"] == 1 and stats["degree_max"] == 9 and stats["edges"] == 9
    assert degree_stats(hypercube(64, 16), level="token")["degree_min"] == 3 * 16 - 1
    assert diameter(hypercube(1024, 16)) == 6
    assert diameter(local(64 * 10, 64)) == 9
    assert diameter(longformer(64 * 10, 64)) == 2


@pytest.mark.parametrize(
    "graph, kwargs, message",
    [
        (np.ones((3, 4), dtype=bool), {}, "square"),
        (np.ones((4, 4), dtype=np.float32), {}, "bool"),
        (np.ones((1, 1), dtype=bool), {}, "at least 2 nodes"),
        (np.ones((4, 4), dtype=bool), {"level": "blocks"}, "level"),
        (np.ones((4, 4), dtype=bool), {"hub_correction": 1}, "hub_correction"),
    ],
)
def test_invalid_inputs(graph, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nip(graph, **kwargs)


def test_closed_form_arguments():
    with pytest.raises(ValueError, match="power-of-two"):
        closed_form_nip("hypercube", 12)
    with pytest.raises(ValueError, match="family"):
        closed_form_nip("torus", 16)
    with pytest.raises(ValueError, match="n must be"):
        closed_form_nip("complete", 1)
