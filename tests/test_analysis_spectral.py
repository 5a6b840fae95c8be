"""Spectral gap of attention graphs: input handling, token CSR, dense vs sparse vs block-reduced paths,
the eigenvalue map against explicit matrix powers, and the certified sparse search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch

import hopformer.analysis.spectral as spectral
from hopformer.analysis import (
    adjacency_matrix,
    heat_spectral_map,
    ppr_spectral_map,
    spectral_gap,
    spectral_map,
    spectrum,
    transition_matrix,
)
from hopformer.graphs import bigbird, build_graph, diffuser, full, hypercube, local, longformer
from hopformer.ops.coefficients import diffusion_coefficients

SETTINGS = [
    {},
    {"alpha": 0.1},
    {"alpha": 0.1, "hops": 5},
    {"alpha": 0.5, "hops": 2},
    {"kernel": "heat"},
    {"kernel": "heat", "hops": 3, "heat_time": 2.0},
]


def random_digraph(n: int, p: float, seed: int, loops: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = rng.random((n, n)) < p
    if loops:
        np.fill_diagonal(matrix, True)
    matrix[np.arange(n), (np.arange(n) + 1) % n] = True  # no empty row, strongly connected
    return matrix


def cyclic_groups(groups: int = 3, per_group: int = 200, degree: int = 20, seed: int = 0) -> np.ndarray:
    """Each node points to ``degree`` random nodes of the next group: the largest eigenvalues of ``A``
    are the ``groups``-th roots of unity, so the top of the spectrum by modulus is complex."""
    rng = np.random.default_rng(seed)
    n = groups * per_group
    matrix = np.zeros((n, n), dtype=bool)
    for node in range(n):
        target = (node // per_group + 1) % groups
        matrix[node, target * per_group + rng.choice(per_group, degree, replace=False)] = True
    return matrix


def match(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance between two spectra after an optimal one-to-one matching."""
    cost = np.abs(a[:, None] - b[None, :])
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    return float(cost[rows, cols].max())


# ---------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("pattern", ["full", "local", "longformer", "bigbird", "diffuser", "hypercube"])
@pytest.mark.parametrize("seq_len, block_size", [(200, 16), (100, 7), (64, 1)])
def test_token_csr_matches_dense_mask(pattern, seq_len, block_size):
    graph = build_graph(pattern, seq_len, block_size)
    for variant in (graph, graph.causal()):
        assert np.array_equal(adjacency_matrix(variant).toarray(), variant.to_dense().numpy())
        assert np.array_equal(adjacency_matrix(variant, "block").toarray(), variant.block_adjacency().numpy())


def test_inputs_torch_numpy_blockgraph_agree():
    graph = bigbird(300, 16, seed=3)
    dense = graph.to_dense()
    expected = spectral_gap(graph, 0.1, 5)
    assert spectral_gap(dense, 0.1, 5) == pytest.approx(expected, abs=1e-12)
    assert spectral_gap(dense.numpy(), 0.1, 5) == pytest.approx(expected, abs=1e-12)
    assert spectral_gap(adjacency_matrix(graph), 0.1, 5) == pytest.approx(expected, abs=1e-12)
    rows = transition_matrix(graph).sum(axis=1)
    assert np.allclose(rows, 1.0)


@pytest.mark.parametrize(
    "graph, kwargs, message",
    [
        (np.ones((3, 4), dtype=bool), {}, "square"),
        (np.ones(5, dtype=bool), {}, "square"),
        (np.ones((4, 4)), {}, "bool"),
        (torch.ones(4, 4, dtype=torch.int64), {}, "bool"),
        (np.zeros((4, 4), dtype=bool), {}, "no out-edge"),
        (np.array([[True, True], [False, False]]), {}, "no out-edge"),
        (np.ones((1, 1), dtype=bool), {}, "at least 2 nodes"),
        (np.ones((4, 4), dtype=bool), {"alpha": 0.0}, "alpha"),
        (np.ones((4, 4), dtype=bool), {"alpha": 1.5}, "alpha"),
        (np.ones((4, 4), dtype=bool), {"alpha": 0.1, "hops": -1}, "hops"),
        (np.ones((4, 4), dtype=bool), {"hops": 3}, "needs alpha"),
        (np.ones((4, 4), dtype=bool), {"kernel": "heat", "alpha": 0.1}, "heat_time"),
        (np.ones((4, 4), dtype=bool), {"kernel": "gauss"}, "kernel"),
        (np.ones((4, 4), dtype=bool), {"level": "tokens"}, "level"),
        (np.ones((4, 4), dtype=bool), {"method": "lanczos"}, "method"),
        (np.ones((4, 4), dtype=bool), {"k": 1}, "k must be"),
        ("graph", {}, "square"),
    ],
)
def test_invalid_inputs_raise_value_error(graph, kwargs, message):
    with pytest.raises(ValueError, match=message):
        spectral_gap(graph, **kwargs)


# ------------------------------------------------------------------------------------ known values
def test_complete_graph_and_cycle_closed_forms():
    graph = full(256, 16)
    # A = J / N: eigenvalues 1 and 0, and 0 maps to c_0 (alpha for PPR)
    assert spectral_gap(graph) == pytest.approx(1.0)
    assert spectral_gap(graph, 0.1) == pytest.approx(0.9)
    assert spectral_gap(graph, 0.1, 5) == pytest.approx(0.9)
    assert spectral_gap(graph, kernel="heat", heat_time=2.0) == pytest.approx(1 - math.exp(-2.0))
    # cycle with self-loops: A = (I + S + S^-1) / 3, eigenvalues (1 + 2 cos(2 pi j / n)) / 3
    n = 50
    cycle = np.eye(n, dtype=bool) | np.roll(np.eye(n, dtype=bool), 1, 1) | np.roll(np.eye(n, dtype=bool), -1, 1)
    expected = max(abs(1 + 2 * math.cos(2 * math.pi * j / n)) / 3 for j in range(1, n))
    assert spectral_gap(cycle) == pytest.approx(1 - expected, abs=1e-12)
    exact = max(abs(ppr_spectral_map((1 + 2 * math.cos(2 * math.pi * j / n)) / 3, 0.1)) for j in range(1, n))
    assert spectral_gap(cycle, 0.1) == pytest.approx(1 - exact, abs=1e-12)


def test_disconnected_graph_has_zero_gap():
    two = np.zeros((20, 20), dtype=bool)
    two[:10, :10] = two[10:, 10:] = True
    assert spectral_gap(two) == pytest.approx(0.0, abs=1e-12)
    assert spectral_gap(two, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_reference_style_graph_shape_of_the_spec_check():
    """specs/diffuser.md section 6: on the reference graph |lambda_2| ~ 0.71, K=5 ~ 0.36, exact ~ 0.28,
    with exact = alpha / (1 - (1 - alpha) |lambda_2|) because lambda_2 is real and positive."""
    rng = np.random.default_rng(0)
    grid, length = 4096, 512  # built on the 4096 grid, then cropped, as the reference does
    matrix = np.zeros((length, length), dtype=bool)
    for start in range(0, length, 32):  # 64-wide blocks at stride 32
        matrix[start : start + 64, start : start + 64] = True
    cells = rng.integers(0, grid, size=(64 * grid, 2))  # 64 x 4096 random cells of the grid
    cells = cells[(cells < length).all(axis=1)]
    matrix[cells[:, 0], cells[:, 1]] = True
    globals_ = rng.choice(np.arange(64, grid), 64, replace=False)
    globals_ = globals_[globals_ < length]
    matrix[globals_, :] = True
    matrix[:, globals_] = True
    gap, values = spectral_gap(matrix, return_eigenvalues=True, method="sparse")
    lambda_2 = values[1]
    assert abs(lambda_2.imag) < 1e-9 and lambda_2.real > 0.5
    exact = 1 - spectral_gap(matrix, 0.1, method="sparse")
    truncated = 1 - spectral_gap(matrix, 0.1, 5, method="sparse")
    assert exact == pytest.approx(0.1 / (1 - 0.9 * lambda_2.real), rel=1e-10)
    assert exact < truncated < 1 - gap  # diffusion widens the gap; the truncated operator less so


# ------------------------------------------------------------------------------ the eigenvalue map
@pytest.mark.parametrize("seed", [0, 1])
def test_mapped_spectrum_matches_explicit_operator(seed):
    matrix = random_digraph(60, 0.08, seed)
    a = transition_matrix(matrix).toarray()
    _, mapped_exact = spectral_gap(matrix, 0.2, return_eigenvalues=True, method="dense")
    closed = 0.2 * np.linalg.inv(np.eye(60) - 0.8 * a)
    assert match(mapped_exact, np.linalg.eigvals(closed)) < 1e-9
    for hops in (1, 3, 5):
        coefficients = diffusion_coefficients(hops, 0.2, remainder="keep")
        operator = sum(c * np.linalg.matrix_power(a, k) for k, c in enumerate(coefficients))
        _, mapped = spectral_gap(matrix, 0.2, hops, return_eigenvalues=True, method="dense")
        assert match(mapped, np.linalg.eigvals(operator)) < 1e-9
    # a long explicit sum converges to the closed form
    coefficients = diffusion_coefficients(300, 0.2, remainder="keep")
    operator = sum(c * np.linalg.matrix_power(a, k) for k, c in enumerate(coefficients))
    assert match(mapped_exact, np.linalg.eigvals(operator)) < 1e-9
    heat = spectral_gap(matrix, kernel="heat", heat_time=1.5, return_eigenvalues=True, method="dense")[1]
    values = np.linalg.eigvals(a)
    assert match(heat, heat_spectral_map(values, 1.5)) < 1e-12
    assert match(heat, np.exp(1.5 * values - 1.5)) < 1e-12


def test_map_functions_are_reexported():
    assert ppr_spectral_map(0.5, 0.1) == pytest.approx(0.1 / 0.55)
    assert spectral_map(0.5, [0.5, 0.5]) == pytest.approx(0.75)


# ---------------------------------------------------------------------------- dense / sparse / block
def reference_gap(values: np.ndarray, alpha=None, hops=None, kernel="ppr", heat_time=1.0) -> float:
    """The gap straight from the definition: map every eigenvalue of ``A``, take the second modulus."""
    if hops is not None:
        values = spectral_map(values, diffusion_coefficients(hops, alpha or 0.1, kernel=kernel, heat_time=heat_time))
    elif kernel == "heat":
        values = np.exp(heat_time * (values - 1))
    elif alpha is not None:
        values = alpha / (1 - (1 - alpha) * values)
    return 1 - np.sort(np.abs(values))[-2]


@pytest.mark.parametrize(
    "graph",
    [
        bigbird(448, 16, seed=1),
        diffuser(440, 20, seed=2),
        hypercube(512, 16),
        longformer(300, 10),
        local(300, 10, window=5),
        diffuser(320, 8, random_granularity="token", seed=0),
    ],
    ids=lambda graph: graph.name,
)
def test_dense_sparse_and_block_reduction_agree(graph):
    values = np.linalg.eigvals(transition_matrix(graph).toarray())
    for setting in SETTINGS:
        expected = reference_gap(values, **setting)
        assert spectral_gap(graph, **setting) == pytest.approx(expected, abs=1e-8), setting
        assert spectral_gap(graph, **setting, method="sparse") == pytest.approx(expected, abs=1e-7), setting
    assert spectral_gap(graph, 0.1, method="dense") == pytest.approx(reference_gap(values, 0.1), abs=1e-9)


def test_causal_and_block_level():
    graph = bigbird(300, 12, seed=0)
    causal = graph.causal()
    assert spectral_gap(causal, 0.1) == pytest.approx(spectral_gap(causal.to_dense(), 0.1), abs=1e-12)
    block = graph.block_adjacency()
    for setting in SETTINGS:
        assert spectral_gap(graph, **setting, level="block") == pytest.approx(spectral_gap(block, **setting))


def test_spectrum_full_and_top_k():
    graph = bigbird(480, 16, seed=5)
    values = spectrum(graph)
    assert len(values) == 480 and values[0] == pytest.approx(1.0)
    assert np.all(np.diff(np.abs(values)) <= 1e-12)
    dense = spectrum(graph, method="dense")
    assert match(values, dense) < 1e-8
    top = spectrum(graph, 6, method="sparse")
    assert np.allclose(np.abs(top), np.abs(dense[:6]), atol=1e-8)


@pytest.mark.parametrize("groups", [3, 4])
def test_sparse_search_certifies_when_the_top_is_complex(groups, monkeypatch):
    """Largest-modulus eigenvalues map to small values here: the search must grow k, switch to the
    largest real parts, or fall back to the diffused operator itself, and still be exact."""
    matrix = cyclic_groups(groups, per_group=100, degree=12)
    values = np.linalg.eigvals(transition_matrix(matrix).toarray())
    for setting in SETTINGS:
        expected = reference_gap(values, **setting)
        assert spectral_gap(matrix, **setting, method="sparse", k=2) == pytest.approx(expected, abs=1e-8)
    # with no room to grow, the last resorts (polynomial operator, shift-invert) are exact too
    monkeypatch.setattr(spectral, "MAX_EIGENVALUES", 2)
    for setting in ({"alpha": 0.1}, {"alpha": 0.1, "hops": 5}):
        expected = reference_gap(values, **setting)
        assert spectral_gap(matrix, **setting, method="sparse", k=2) == pytest.approx(expected, abs=1e-8)
