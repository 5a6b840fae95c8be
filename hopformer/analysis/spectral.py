"""Spectral gap of an attention graph, before and after diffusion (``specs/diffuser.md`` section 6).

The operator is uniform attention on the graph's edges: ``A = D^-1 M`` with ``M`` the bool adjacency
(row = query, column = key, self-loops as present) and ``D`` its row sums. Diffusion replaces ``A`` by
``sum_k c_k A^k``, whose eigenvalues are ``g(mu)`` for the eigenvalues ``mu`` of ``A``:

- exact PPR (``hops=None``): ``g(mu) = alpha / (1 - (1 - alpha) mu)`` (:func:`ppr_spectral_map`);
- exact heat kernel (``hops=None``): ``g(mu) = exp(t (mu - 1))`` (:func:`heat_spectral_map`);
- truncated at ``hops``: ``g(mu) = sum_k c_k mu^k`` with the coefficients of
  :func:`~hopformer.ops.coefficients.diffusion_coefficients` (:func:`spectral_map`).

The spectral gap is ``1 - |lambda_2|``, ``lambda_2`` the eigenvalue of second-largest modulus.

**Which eigenvalues.** ``|g(mu)|`` is not monotone in ``|mu|`` (``g(-0.9)`` is small, ``g(0.8)`` is
not), so ``lambda_2`` of the diffused operator is taken after mapping. Small graphs map the whole
spectrum (dense ``numpy.linalg.eigvals``). Large graphs compute the ``k`` eigenvalues of ``A`` of
largest modulus with ARPACK and *certify* the answer: every ``g`` here is a power series in ``mu``
with non-negative coefficients, so ``|g(mu)| <= g(|mu|)``, and an eigenvalue that was not computed has
``|mu| <= r_k`` (the smallest computed modulus), hence ``|g(mu)| <= g(r_k)``. When the second-largest
mapped modulus is at least ``g(r_k)`` no uncomputed eigenvalue can beat it. Otherwise (spectra whose
largest eigenvalues are negative or complex) the solver retries with more eigenvalues, then by largest
real part (exact kernels: ``|g(mu)| <= g(Re mu)`` there), and finally computes the diffused operator's
own eigenvalues directly: a polynomial in ``A`` applied by matrix-vector products (truncated), or the
eigenvalues of ``A`` nearest ``1 / (1 - alpha)`` by shift-invert (exact PPR, whose ``|g|`` only depends
on that distance).

**Block graphs at token level.** Without causality, all tokens of a block have the same row of ``A``,
so ``A = E W E^T`` (``E`` token -> block indicator, ``W[b, c] = M[b, c] / keys(b)``) and its non-zero
eigenvalues are those of the ``num_blocks x num_blocks`` matrix ``W S`` (``S`` = tokens per block: the
block adjacency weighted by block sizes, row-normalised); the other ``seq_len - num_blocks`` eigenvalues
are 0. ``method="auto"`` uses this exact reduction, so a 16K-token BigBird graph is a 256-node problem;
``method="sparse"`` runs ARPACK on the token-level CSR instead (built from the block CSR, never from
the dense mask), ``method="dense"`` on the dense token matrix.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from hopformer.checks import check_int
from hopformer.graphs.block_graph import BlockGraph
from hopformer.ops.coefficients import (
    check_diffusion_args,
    diffusion_coefficients,
    ppr_spectral_map,
    spectral_map,
)

LEVELS = ("token", "block")
METHODS = ("auto", "dense", "sparse")
KERNELS = ("ppr", "heat")
# Up to this many nodes the whole spectrum is computed densely. Beyond, the certified ARPACK search is
# as exact and much faster (on BigBird graphs about 6x at 256 nodes and 30x at 2,000).
DENSE_MAX_NODES = 128
# Operators with at most this many non-zeros are cached on their BlockGraph (``graph.cache``); the
# eigenvalues computed from them always are.
CACHE_MAX_NONZEROS = 1 << 20
# ARPACK relative tolerance on the computed eigenvalues.
ARPACK_TOL = 1e-10
# The certified sparse search grows k up to this many eigenvalues before the direct fallback.
MAX_EIGENVALUES = 128

__all__ = [
    "adjacency_matrix",
    "heat_spectral_map",
    "ppr_spectral_map",
    "spectral_gap",
    "spectral_map",
    "spectrum",
    "transition_matrix",
]


# ------------------------------------------------------------------------------------------ inputs
def check_level(level: Any) -> str:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return level


def adjacency_matrix(graph: Any, level: str = "token") -> scipy.sparse.csr_array:
    """The graph as a square bool CSR matrix (row = query, column = key, self-loops kept).

    ``graph`` is a :class:`BlockGraph` (``level="token"``: one node per token, built from the block
    CSR without materialising the dense mask; ``level="block"``: one node per block), or a square bool
    matrix (torch, NumPy, array-like or SciPy sparse; ``level`` does not apply).
    """
    check_level(level)
    if isinstance(graph, BlockGraph):
        if level == "block":
            indptr, indices = graph.indptr.numpy(), graph.indices.numpy()
            n = graph.num_blocks
        else:
            indptr, indices = token_csr(graph)
            n = graph.seq_len
        data = np.ones(len(indices), dtype=bool)
        return scipy.sparse.csr_array((data, indices, indptr), shape=(n, n))
    return _matrix_to_csr(graph)


def token_csr(graph: BlockGraph) -> tuple[np.ndarray, np.ndarray]:
    """Token-level ``(indptr, indices)`` of a BlockGraph, expanded from its block CSR.

    Each query block's key tokens are listed once, then repeated for every token of the block;
    causal graphs drop keys after the query (only inside diagonal blocks).
    """
    b, L = graph.block_size, graph.seq_len
    block_ptr, block_idx = graph.indptr.numpy(), graph.indices.numpy()
    sizes = _block_sizes(graph)
    # key tokens of every block edge, concatenated in CSR order (so sorted within each block row)
    key_tokens = _ranges(block_idx * b, sizes[block_idx])
    edge_end = np.concatenate([[0], np.cumsum(sizes[block_idx])])
    row_start, row_len = edge_end[block_ptr[:-1]], edge_end[block_ptr[1:]] - edge_end[block_ptr[:-1]]
    token_block = np.arange(L) // b
    lengths = row_len[token_block]
    indices = key_tokens[_ranges(row_start[token_block], lengths)]
    if graph.is_causal:
        keep = indices <= np.repeat(np.arange(L), lengths)
        indices = indices[keep]
        lengths = np.bincount(np.repeat(np.arange(L), lengths)[keep], minlength=L)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    index_dtype = np.int32 if len(indices) < 2**31 and L < 2**31 else np.int64
    return indptr.astype(index_dtype), indices.astype(index_dtype)


def transition_matrix(graph: Any, level: str = "token") -> scipy.sparse.csr_array:
    """Row-normalised adjacency ``A = D^-1 M`` (uniform attention on the edges) as float64 CSR.

    Raises ValueError when a node has no out-edge (its row of ``A`` is undefined).
    """
    adjacency = adjacency_matrix(graph, level)
    return _row_normalise(adjacency, _describe(graph, level))


def _matrix_to_csr(matrix: Any) -> scipy.sparse.csr_array:
    """Validate a square bool matrix (torch, NumPy, array-like or SciPy sparse) and return it as CSR."""
    if scipy.sparse.issparse(matrix):
        csr = scipy.sparse.csr_array(matrix)
    else:
        if isinstance(matrix, torch.Tensor):
            matrix = matrix.detach().cpu().numpy()
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"graph must be a BlockGraph or a square 2-D bool adjacency matrix; got shape {matrix.shape}"
            )
        if matrix.dtype != np.bool_:
            raise ValueError(f"graph must be a bool adjacency matrix (True = edge); got dtype {matrix.dtype}")
        csr = scipy.sparse.csr_array(matrix)
    if csr.ndim != 2 or csr.shape[0] != csr.shape[1]:
        raise ValueError(f"graph must be a square adjacency matrix; got shape {csr.shape}")
    if csr.dtype != np.bool_:
        raise ValueError(f"graph must be a bool adjacency matrix (True = edge); got dtype {csr.dtype}")
    if csr.shape[0] == 0:
        raise ValueError("graph must have at least one node; got a 0 x 0 matrix")
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


def _row_normalise(adjacency: scipy.sparse.csr_array, what: str) -> scipy.sparse.csr_array:
    counts = np.diff(adjacency.indptr)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(
            f"graph has {len(empty)} node(s) with no out-edge, isolated or sinks (first: {empty[:5].tolist()} "
            f"of {what}); uniform attention A = D^-1 M is undefined on an empty row"
        )
    data = np.repeat(1.0 / counts, counts)
    return scipy.sparse.csr_array((data, adjacency.indices, adjacency.indptr), shape=adjacency.shape)


def _describe(graph: Any, level: str) -> str:
    if isinstance(graph, BlockGraph):
        return f"the {level}-level graph of {graph.name}"
    return "the adjacency matrix"


def _block_sizes(graph: BlockGraph) -> np.ndarray:
    sizes = np.full(graph.num_blocks, graph.block_size, dtype=np.int64)
    sizes[-1] = graph.seq_len - (graph.num_blocks - 1) * graph.block_size
    return sizes


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every ``(s, n)``, without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(np.asarray(starts, dtype=np.int64) - offsets, lengths)


# ------------------------------------------------------------------------------------ operators
@dataclass
class _Operator:
    """The matrix whose spectrum stands for ``A``: ``matrix`` plus ``extra_zeros`` eigenvalues 0.
    Eigenvalues computed once are kept in ``memo`` (a table row asks for three gaps of one graph)."""

    matrix: scipy.sparse.csr_array
    extra_zeros: int
    num_nodes: int
    memo: dict[Any, np.ndarray] = field(default_factory=dict)

    def eigenvalues(self) -> np.ndarray:
        """The whole spectrum of ``matrix`` (dense solver)."""
        if "all" not in self.memo:
            self.memo["all"] = np.linalg.eigvals(self.matrix.toarray())
        return self.memo["all"]

    def top(self, k: int, which: str) -> np.ndarray:
        """``k`` eigenvalues of largest modulus (``"LM"``) or real part (``"LR"``) by ARPACK."""
        if (k, which) not in self.memo:
            self.memo[k, which] = _arpack(self.matrix, k, which)
        return self.memo[k, which]


def _operator(graph: Any, level: str, method: str) -> _Operator:
    reduce = (
        method == "auto"
        and isinstance(graph, BlockGraph)
        and level == "token"
        and not graph.is_causal
        and graph.block_size > 1
    )
    key = ("hopformer.analysis.operator", level, reduce)
    if isinstance(graph, BlockGraph) and key in graph.cache:
        return graph.cache[key]
    if reduce:
        operator = _block_reduced_operator(graph)
    else:
        matrix = transition_matrix(graph, level)
        operator = _Operator(matrix, 0, matrix.shape[0])
    if isinstance(graph, BlockGraph):
        if operator.matrix.nnz <= CACHE_MAX_NONZEROS:
            graph.cache[key] = operator  # small enough to keep on the graph with its other derived views
        # the eigenvalues are small whatever the matrix: keep them, so that a table row's three gaps of a
        # 10M-edge token graph run ARPACK once, not three times
        operator.memo = graph.cache.setdefault(("hopformer.analysis.eigenvalues", level, reduce), operator.memo)
    return operator


def _block_reduced_operator(graph: BlockGraph) -> _Operator:
    """``W S``: same non-zero spectrum as the token-level ``A`` of a non-causal block graph."""
    adjacency = adjacency_matrix(graph, "block")
    counts = np.diff(adjacency.indptr)
    if (counts == 0).any():
        _row_normalise(adjacency, _describe(graph, "block"))  # raises with the offending blocks
    sizes = _block_sizes(graph).astype(np.float64)
    weights = sizes[adjacency.indices]
    row_sums = np.add.reduceat(weights, adjacency.indptr[:-1])
    data = weights / np.repeat(row_sums, counts)
    matrix = scipy.sparse.csr_array((data, adjacency.indices, adjacency.indptr), shape=adjacency.shape)
    return _Operator(matrix, graph.seq_len - graph.num_blocks, graph.seq_len)


# ------------------------------------------------------------------------------------ diffusion
@dataclass
class _Diffusion:
    """The eigenvalue map of a diffusion setting; ``exact`` says which closed form (or None)."""

    map: Callable[[Any], Any]
    coefficients: list[float] | None  # truncated polynomial, else None
    exact: str | None  # "ppr" or "heat" for the untruncated kernels
    alpha: float | None
    heat_time: float


def heat_spectral_map(mu: Any, heat_time: float) -> Any:
    """Exact (untruncated) heat-kernel map ``exp(t (mu - 1)) = sum_k e^-t t^k mu^k / k!``."""
    return np.exp(heat_time * (mu - 1))


def _as_number(name: str, value: Any, kind: type) -> Any:
    """NumPy/torch scalars as plain ``float``/``int`` (so ``np.float32(0.1)`` is a valid alpha); bools
    and non-numbers are rejected here with the argument's name."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    abstract = numbers.Integral if kind is int else numbers.Real
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, abstract):
        return kind(value)
    if kind is int and isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    raise ValueError(f"{name} must be a number, got {value!r}")


def _diffusion(alpha: Any, hops: Any, kernel: str, heat_time: float, remainder: str) -> _Diffusion | None:
    alpha = _as_number("alpha", alpha, float)
    hops = _as_number("hops", hops, int)
    heat_time = _as_number("heat_time", heat_time, float)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "ppr" and alpha is None:
        if hops is not None:
            raise ValueError(f"hops={hops!r} needs alpha: the PPR kernel is diffused only when alpha is given")
        return None
    if kernel == "heat" and alpha is not None:
        raise ValueError(f"alpha={alpha!r} applies to kernel='ppr'; the heat kernel is set by heat_time")
    # validates alpha in (0, 1], hops >= 0, heat_time > 0 with messages naming the argument
    check_diffusion_args(0 if hops is None else hops, 0.1 if alpha is None else alpha, kernel, heat_time, remainder)
    if hops is not None:
        coefficients = diffusion_coefficients(
            hops, 0.1 if alpha is None else alpha, kernel=kernel, heat_time=heat_time, remainder=remainder
        )
        return _Diffusion(lambda mu: spectral_map(mu, coefficients), coefficients, None, alpha, heat_time)
    if kernel == "ppr":
        return _Diffusion(lambda mu: ppr_spectral_map(mu, alpha), None, "ppr", alpha, heat_time)
    return _Diffusion(lambda mu: heat_spectral_map(mu, heat_time), None, "heat", alpha, heat_time)


# ------------------------------------------------------------------------------------- spectrum
def spectrum(graph: Any, k: int | None = None, *, level: str = "token", method: str = "auto") -> np.ndarray:
    """Eigenvalues of ``A = D^-1 M``, sorted by decreasing modulus (complex128).

    ``k=None`` returns the whole spectrum (dense; with the block reduction the ``seq_len - num_blocks``
    zero eigenvalues are included); otherwise the ``k`` of largest modulus (ARPACK on large graphs).
    """
    check_level(level)
    _check_method(method)
    operator = _operator(graph, level, method)
    n = operator.matrix.shape[0]
    if k is None or method == "dense" or (method == "auto" and n <= DENSE_MAX_NODES):
        values = np.concatenate([operator.eigenvalues(), np.zeros(operator.extra_zeros)])
        values = _sorted_by_modulus(values)
        return values if k is None else values[:k]
    _check_k(k)
    values = operator.top(k, "LM")
    if operator.extra_zeros:
        values = np.concatenate([values, [0.0]])
    return _sorted_by_modulus(values)[:k]


def spectral_gap(
    graph: Any,
    alpha: float | None = None,
    hops: int | None = None,
    *,
    kernel: str = "ppr",
    heat_time: float = 1.0,
    remainder: str = "keep",
    level: str = "token",
    method: str = "auto",
    k: int = 8,
    return_eigenvalues: bool = False,
) -> float | tuple[float, np.ndarray]:
    """``1 - |lambda_2|`` of uniform attention on ``graph``, optionally diffused.

    Args:
        graph: a :class:`BlockGraph` or a square bool adjacency (torch / NumPy / SciPy sparse).
        alpha: PPR teleport probability in (0, 1]. ``None`` (and ``kernel="ppr"``): no diffusion.
        hops: ``None`` for the exact (infinite) diffusion, else the truncated ``hops``-step operator
            ``sum_{k<=hops} c_k A^k`` with the tail mass kept on the last term (``remainder``), i.e. the
            Diffuser power iteration.
        kernel: ``"ppr"`` or ``"heat"`` (``c_k = e^-t t^k / k!`` with ``t = heat_time``; diffused
            whenever chosen, ``alpha`` must then be ``None``).
        remainder: ``"keep"`` or ``"renormalize"``, passed to ``diffusion_coefficients``.
        level: for a BlockGraph, ``"token"`` (one node per token) or ``"block"``.
        method: ``"auto"`` (exact block reduction when possible, dense below ``DENSE_MAX_NODES``
            nodes, else ARPACK), ``"dense"`` or ``"sparse"`` (no block reduction, forced solver).
        k: eigenvalues ARPACK computes first (grown when the answer cannot be certified).
        return_eigenvalues: also return the eigenvalues used, of the diffused operator when diffused,
            sorted by decreasing modulus (the whole spectrum on the dense path, the computed part on
            the sparse path; the block reduction's zero eigenvalue appears once).

    Returns:
        The gap as a float, or ``(gap, eigenvalues)``.
    """
    check_level(level)
    _check_method(method)
    _check_k(k)
    diffusion = _diffusion(alpha, hops, kernel, heat_time, remainder)
    operator = _operator(graph, level, method)
    if operator.num_nodes < 2:
        raise ValueError("graph must have at least 2 nodes for a second eigenvalue; got 1")
    n = operator.matrix.shape[0]
    use_dense = method == "dense" or (method == "auto" and n <= DENSE_MAX_NODES) or n < 8
    if use_dense:
        values = operator.eigenvalues()
        if operator.extra_zeros:
            values = np.concatenate([values, [0.0]])
        used = _sorted_by_modulus(values if diffusion is None else diffusion.map(values))
    else:
        used = _sparse_top(operator, diffusion, k)
    # |lambda_2| <= 1 for a row-stochastic operator; clip the rounding error (1 + 4e-16 on bipartite graphs)
    gap = min(1.0, max(0.0, float(1.0 - abs(used[1]))))
    return (gap, used) if return_eigenvalues else gap


def _sparse_top(operator: _Operator, diffusion: _Diffusion | None, k: int) -> np.ndarray:
    """Eigenvalues of the (diffused) operator whose two largest moduli are certified exact."""
    matrix = operator.matrix
    n = matrix.shape[0]
    zeros = np.zeros(1 if operator.extra_zeros else 0)
    if diffusion is None:
        return _sorted_by_modulus(np.concatenate([operator.top(max(k, 2), "LM"), zeros]))

    def certified(values: np.ndarray, bound: float) -> np.ndarray | None:
        mapped = _sorted_by_modulus(diffusion.map(np.concatenate([values, zeros])))
        return mapped if abs(mapped[1]) >= bound * (1 - 1e-12) else None

    if diffusion.exact == "heat":
        # |exp(t (mu - 1))| = exp(t (Re mu - 1)): the largest real parts are exactly the right ones
        return _sorted_by_modulus(diffusion.map(np.concatenate([operator.top(max(k, 2), "LR"), zeros])))
    size = k
    while True:
        values = operator.top(size, "LM")
        smallest = float(np.abs(values).min())
        result = certified(values, float(np.real(diffusion.map(smallest))))
        if result is None and diffusion.exact == "ppr":
            real_values = operator.top(size, "LR")
            # |1 - (1 - alpha) mu| >= 1 - (1 - alpha) Re mu, so uncomputed ones map below g(min Re mu)
            result = certified(real_values, float(np.real(diffusion.map(np.real(real_values).min()))))
        if result is not None:
            return result
        if size >= min(MAX_EIGENVALUES, n - 2):
            break
        size = min(4 * size, MAX_EIGENVALUES, n - 2)
    # the top of A's spectrum says too little: compute the diffused operator's own eigenvalues
    if diffusion.coefficients is not None:
        return _sorted_by_modulus(
            np.concatenate([_arpack(_polynomial(matrix, diffusion.coefficients), k, "LM"), diffusion.map(zeros)])
        )
    # exact PPR (alpha < 1 here: at alpha = 1 every eigenvalue maps to 1 and certifies at once)
    sigma = 1.0 / (1.0 - diffusion.alpha)
    nearest = scipy.sparse.linalg.eigs(
        matrix.tocsc(), k=min(k, n - 2), sigma=sigma, return_eigenvectors=False, tol=ARPACK_TOL, v0=_start_vector(n)
    )
    return _sorted_by_modulus(diffusion.map(np.concatenate([nearest, zeros])))


def _polynomial(matrix: scipy.sparse.csr_array, coefficients: list[float]) -> scipy.sparse.linalg.LinearOperator:
    """``sum_k c_k A^k`` as a LinearOperator (Horner: one sparse product per hop)."""

    def matvec(x: np.ndarray) -> np.ndarray:
        result = coefficients[-1] * x
        for c in reversed(coefficients[:-1]):
            result = matrix @ result + c * x
        return result

    n = matrix.shape[0]
    return scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)


def _start_vector(n: int) -> np.ndarray:
    """ARPACK's starting vector, fixed so that the same graph gives the same digits on every run
    (ARPACK's own default is random)."""
    return np.random.default_rng(0).standard_normal(n)


def _arpack(matrix: Any, k: int, which: str) -> np.ndarray:
    """The ``k`` eigenvalues selected by ``which`` ("LM" modulus, "LR" real part) with ARPACK.

    When ARPACK stops before all ``k`` converge (seen on a 512-block Diffuser graph about one run in
    eight with a random start), it retries once with a larger Krylov space: the certification in
    :func:`_sparse_top` needs the top ``k``, which a partial answer need not be. Only if that fails too
    are the converged ones returned, with a warning.
    """
    n = matrix.shape[0]
    k = min(k, n - 2)
    error = None
    for ncv in (None, min(n - 1, max(4 * k + 1, 40))):
        try:
            return scipy.sparse.linalg.eigs(
                matrix, k=k, which=which, tol=ARPACK_TOL, ncv=ncv, v0=_start_vector(n), return_eigenvectors=False
            )
        except scipy.sparse.linalg.ArpackNoConvergence as failure:
            error = failure
    if len(error.eigenvalues) >= 2:
        warnings.warn(
            f"ARPACK converged on {len(error.eigenvalues)} of {k} eigenvalues (the gap may not be certified)",
            RuntimeWarning,
            stacklevel=3,
        )
        return error.eigenvalues
    raise error


def _sorted_by_modulus(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.complex128)
    # modulus first, then real part, so that 1 precedes -1 and conjugate pairs stay together
    order = np.lexsort((-values.imag, -values.real, -np.round(np.abs(values), 12)))
    return values[order]


def _check_method(method: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_k(k: Any) -> None:
    check_int("k", k, 2, allowed="an integer >= 2 (eigenvalues computed by the sparse solver)")
