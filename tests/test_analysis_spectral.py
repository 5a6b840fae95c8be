"""Spectral gap of attention graphs: input handling, token CSR, dense vs sparse vs block-reduced paths,
the eigenvalue map against explicit matrix powers, and the certified sparse search."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import scipy.sparse.linalg
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
        (np.pad(np.ones((4, 4), dtype=bool), ((0, 1), (0, 1))), {}, r"isolated.*\[4\]"),
        (np.ones((4, 4), dtype=bool), {"alpha": True}, "alpha must be a number"),
        (np.ones((4, 4), dtype=bool), {"alpha": "0.1"}, "alpha must be a number"),
        (np.ones((4, 4), dtype=bool), {"alpha": -0.1}, "alpha"),
        (np.ones((4, 4), dtype=bool), {"alpha": float("nan")}, "alpha"),
        (np.ones((4, 4), dtype=bool), {"alpha": 0.1, "hops": 2.5}, "hops must be a non-negative integer"),
        (np.ones((4, 4), dtype=bool), {"kernel": "heat", "heat_time": 0.0}, "heat_time"),
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


def test_numpy_and_torch_scalars_are_valid_arguments():
    graph = bigbird(512, 32, seed=1)
    expected = spectral_gap(graph, 0.1, 5)
    assert spectral_gap(graph, np.float64(0.1), np.int64(5)) == expected
    assert spectral_gap(graph, torch.tensor(0.1, dtype=torch.float64), 5) == expected
    assert spectral_gap(graph, np.float32(0.1), 5) == pytest.approx(expected, abs=1e-7)


def xor_hypercube(k: int) -> np.ndarray:
    nodes = np.arange(1 << k)
    matrix = np.zeros((1 << k, 1 << k), dtype=bool)
    for j in range(k):
        matrix[nodes, nodes ^ (1 << j)] = True
    return matrix


@pytest.mark.parametrize("method", ["auto", "dense", "sparse"])
def test_star_hypercube_and_complete_graph_closed_forms(method):
    """Closed-form spectra. Star with self-loops: {1, 1/2 (x N-2), 1/N - 1/2}. Hypercube pattern
    (self-loops): (k + 1 - 2j) / (k + 1), so |lambda_2| = (k-1)/(k+1) twice (+ and -). Hypercube without
    self-loops is bipartite: -1 is an eigenvalue, gap 0, and PPR maps -1 to alpha / (2 - alpha), below
    the image of (k-2)/k. K_N without self-loops: {1, -1/(N-1)}."""
    alpha = 0.1
    ppr = lambda mu: alpha / (1 - (1 - alpha) * mu)  # noqa: E731
    five = lambda mu: spectral_map(mu, diffusion_coefficients(5, alpha))  # noqa: E731
    for n in (10, 60) if method == "dense" else (10, 300):  # 300 > DENSE_MAX_NODES: ARPACK under "auto"
        star = np.eye(n, dtype=bool)
        star[0, :] = star[:, 0] = True
        assert spectral_gap(star, method=method) == pytest.approx(0.5, abs=1e-9)
        assert spectral_gap(star, alpha, method=method) == pytest.approx((1 - alpha) / (1 + alpha), abs=1e-9)
        assert spectral_gap(star, alpha, 5, method=method) == pytest.approx(1 - five(0.5), abs=1e-9)
        complete = ~np.eye(n, dtype=bool)
        assert spectral_gap(complete, method=method) == pytest.approx(1 - 1 / (n - 1), abs=1e-9)
        assert spectral_gap(complete, alpha, method=method) == pytest.approx(1 - ppr(-1 / (n - 1)), abs=1e-9)
    # k = 9: 512 blocks and 1024 tokens, beyond DENSE_MAX_NODES, so "auto" runs the certified ARPACK search
    for k in (3, 6) if method == "dense" else (3, 6, 9):
        pattern = hypercube((1 << k) * 2, 2)  # token level: the block reduction (auto) or the 2x larger CSR
        mu = (k - 1) / (k + 1)
        assert spectral_gap(pattern, method=method) == pytest.approx(1 - mu, abs=1e-9)
        assert spectral_gap(pattern, alpha, method=method) == pytest.approx(1 - ppr(mu), abs=1e-9)
        assert spectral_gap(pattern, alpha, 5, method=method) == pytest.approx(
            1 - max(abs(five(mu)), abs(five(-mu))), abs=1e-9
        )
        bipartite = xor_hypercube(k)
        gap = spectral_gap(bipartite, method=method)
        assert 0.0 <= gap < 1e-9  # never a negative rounding error
        assert spectral_gap(bipartite, alpha, method=method) == pytest.approx(1 - ppr((k - 2) / k), abs=1e-9)
        # the 5-hop operator keeps most of the period: -1 maps to -0.50678 at alpha = 0.1
        expected = 1 - max(abs(five(-1.0)), abs(five((k - 2) / k)))
        assert spectral_gap(bipartite, alpha, 5, method=method) == pytest.approx(expected, abs=1e-9)


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
    assert match(heat, np.linalg.eigvals(scipy.linalg.expm(1.5 * (a - np.eye(60))))) < 1e-9
    coefficients = diffusion_coefficients(4, kernel="heat", heat_time=1.5)
    operator = sum(c * np.linalg.matrix_power(a, k) for k, c in enumerate(coefficients))
    _, mapped = spectral_gap(matrix, kernel="heat", hops=4, heat_time=1.5, return_eigenvalues=True, method="dense")
    assert match(mapped, np.linalg.eigvals(operator)) < 1e-9
    # the map functions themselves, applied to the eigenvalues of A
    assert match(ppr_spectral_map(values, 0.2), np.linalg.eigvals(closed)) < 1e-9
    coefficients = diffusion_coefficients(5, 0.2)
    operator = sum(c * np.linalg.matrix_power(a, k) for k, c in enumerate(coefficients))
    assert match(spectral_map(values, coefficients), np.linalg.eigvals(operator)) < 1e-9


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
    mask = graph.to_dense().numpy().astype(np.float64)  # brute force: A from the dense mask, no CSR code
    values = np.linalg.eigvals(mask / mask.sum(axis=1, keepdims=True))
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


def test_eigenvalues_are_reused_when_the_operator_is_too_big_to_cache(monkeypatch):
    """A table row asks for three gaps of one graph; a token graph over CACHE_MAX_NONZEROS (10M edges
    at 16K tokens) must still run ARPACK once, not once per diffusion setting."""
    monkeypatch.setattr(spectral, "CACHE_MAX_NONZEROS", 0)
    calls = []
    arpack = spectral._arpack
    monkeypatch.setattr(spectral, "_arpack", lambda *args: calls.append(args[1:]) or arpack(*args))
    graph = bigbird(2048, 16, seed=0)
    gaps = [spectral_gap(graph, *setting, method="sparse") for setting in ((), (0.1, 5), (0.1,))]
    assert len(calls) == 1, calls
    fresh = bigbird(2048, 16, seed=0)
    assert gaps == pytest.approx([spectral_gap(fresh, *s) for s in ((), (0.1, 5), (0.1,))], abs=1e-8)


def test_sparse_gaps_are_reproducible_to_the_last_digit():
    """ARPACK starts from a fixed vector: the same graph gives the same floats on every call."""
    first = [spectral_gap(diffuser(2048, 16, seed=4), *s, method="sparse") for s in ((), (0.1, 5), (0.1,))]
    again = [spectral_gap(diffuser(2048, 16, seed=4), *s, method="sparse") for s in ((), (0.1, 5), (0.1,))]
    assert first == again


@pytest.mark.slow
def test_arpack_no_convergence_retries_before_accepting_a_partial_answer(monkeypatch):
    matrix = random_digraph(400, 0.03, seed=5)
    expected = reference_gap(np.linalg.eigvals(transition_matrix(matrix).toarray()))
    eigs = scipy.sparse.linalg.eigs
    failures = []

    def flaky(*args, **kwargs):
        if len(failures) < budget:
            values = eigs(*args, **kwargs)
            failures.append(kwargs.get("ncv"))
            # ARPACK hands back the converged part: here everything but the largest eigenvalue
            raise scipy.sparse.linalg.ArpackNoConvergence("no convergence", values[1:], None)
        return eigs(*args, **kwargs)

    monkeypatch.setattr(scipy.sparse.linalg, "eigs", flaky)
    budget = 1  # the retry with a larger Krylov space succeeds: exact answer, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spectral_gap(matrix, method="sparse") == pytest.approx(expected, abs=1e-9)
    assert failures == [None]
    failures.clear()
    budget = 2  # both attempts fail: the converged part is used, and the caller is told
    with pytest.warns(RuntimeWarning, match="converged on 7 of 8"):
        spectral_gap(matrix, method="sparse")
