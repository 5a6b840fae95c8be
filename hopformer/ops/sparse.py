"""Sparse attention and attention diffusion on a :class:`~hopformer.graphs.BlockGraph`.

Backends:

- ``"dense"``: the reference. Materialises the token mask and the full score matrix; for tests and
  small inputs.
- ``"gather"``: pure PyTorch with autograd on any device (:mod:`hopformer.ops.gather`); the CPU
  training path. Memory ``O(seq * keys_per_query)``.
- ``"flex"``: compiled FlexAttention with a BlockMask built from the block lists
  (:mod:`hopformer.ops.flex`); CUDA only; no attention dropout (PyTorch has none for it).
- ``"matrix"``: the attention materialised as a ``(batch, heads, seq, seq)`` matrix in the inputs'
  dtype, computed once and reused by every hop, with a written-out backward
  (:mod:`hopformer.ops.matrix`); any device, no attention dropout. Memory ``O(seq^2)``: the fast
  diffusion path on GPUs up to about 2K tokens (LRA's ListOps, Pathfinder), where ``flex``
  recomputes the scores in every hop.
- ``"triton"``: hopformer's own Triton kernels (:mod:`hopformer.ops.triton_diffusion`); CUDA only.
  Diffusion computes each query's softmax normaliser once, makes every hop a linear map, and runs
  an adjoint backward: one transposed pass per hop plus a single ``dq``/``dk`` pass for all hops
  (a loop of FlexAttention calls pays a full attention forward and backward per hop). Global rows
  and columns are split over many programs. No attention dropout.
- ``"auto"``: ``gather`` off CUDA, except that :func:`diffuse` takes ``matrix`` there up to
  :data:`CPU_MATRIX_AUTO_MAX_LEN` tokens when there is no attention dropout (one CPU thread,
  batch 32 x 2 heads: 1.6x / 1.5x / 1.35x faster than ``gather`` at 128 / 256 / 512 tokens, slower
  from 1,024). On CUDA ``flex`` for :func:`sparse_attention`; :func:`diffuse` takes
  ``triton`` where Triton is installed and the block size is a multiple of 16 (on an H200: 1.8x
  faster than ``flex`` at 131K tokens, and 2.5-2.9x faster than ``matrix`` in whole ListOps and
  Pathfinder training steps), except for float64 inputs. Other graphs (token-level ones such as the
  paper's token-random Diffuser graph) take ``flex`` up to :data:`FLEX_AUTO_MAX_HOPS` hops, and
  ``matrix`` for more hops (or float64) when the sequence is at most :data:`MATRIX_AUTO_MAX_LEN`
  tokens and one attention matrix (``batch * heads * seq^2`` elements) takes at most
  :data:`MATRIX_AUTO_BYTES` and 1/32 of the GPU's memory; else ``flex`` (``benchmarks/README.md``).

Conventions (``specs``/DESIGN.md): q, k, v are ``(batch, heads, seq, head_dim)``; scores are
``q k^T * scale`` with ``scale = head_dim ** -0.5`` by default; ``key_padding_mask`` is bool
``(batch, seq)`` with True = real token. Padded keys are never attended; the output at padded query
positions is zero, and a query with no allowed key gets zeros, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph
from hopformer.ops import flex as flex_backend
from hopformer.ops import triton_diffusion as triton_backend
from hopformer.ops.checks import check_qkv
from hopformer.ops.coefficients import check_coefficients, check_diffusion_args, diffusion_coefficients, mixing_weights
from hopformer.ops.gather import gather_diffusion
from hopformer.ops.matrix import allowed_mask, matrix_diffusion

BACKENDS = ("auto", "dense", "gather", "flex", "matrix", "triton")
NO_ATTENTION_DROPOUT = ("flex", "matrix", "triton")  # backends that raise on dropout_p > 0
EDGE_DROPOUT = ("once", "per_hop")
# Where "auto" diffuses with the materialised matrix on CUDA when Triton cannot (see above).
MATRIX_AUTO_MAX_LEN = 2048
MATRIX_AUTO_BYTES = 2 << 30
# Up to this many hops "auto" prefers flex to matrix on CUDA when Triton cannot: flex recomputes the scores
# every hop, the matrix is built once. On an H200 (token-level Diffuser graph, 262K tokens per call, bf16,
# fwd+bwd) flex took 0.23-0.43x matrix's time at 1-2 hops from 1K tokens, 0.82-0.84x at 5 and 1.23-1.35x at 10
# (benchmarks/results/diffusion_token_graph_crossover_h200.json).
FLEX_AUTO_MAX_HOPS = 5
# Where "auto" diffuses with the materialised matrix off CUDA instead of gathering blocks (see above).
CPU_MATRIX_AUTO_MAX_LEN = 512


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    graph: BlockGraph,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Softmax attention restricted to the edges of ``graph``.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)``; ``v`` may have its own last dimension.
        graph: the attention pattern; ``graph.seq_len`` must equal ``seq``.
        key_padding_mask: bool ``(batch, seq)``, True = real token.
        backend: ``"auto"``, ``"dense"``, ``"gather"``, ``"flex"``, ``"matrix"`` or ``"triton"`` (see
            module docstring).
        dropout_p: dropout on the attention probabilities (applied whenever > 0: pass 0 in eval).
            Not available on ``flex``, ``matrix`` and ``triton``, which raise.
        scale: score scale, default ``head_dim ** -0.5``.
        kernel_options: passed to FlexAttention (tile sizes, warps) on the ``flex`` backend.

    Returns:
        ``(batch, heads, seq, v.shape[-1])``.
    """
    backend, scale = _check_inputs(q, k, v, graph, key_padding_mask, backend, dropout_p, scale)
    if backend == "flex":
        plan = flex_backend.block_mask(graph, key_padding_mask, q.device)
        return flex_backend.flex_apply(q, k, v, plan, scale, kernel_options)
    if backend == "gather":
        return gather_diffusion(q, k, v, graph, key_padding_mask, [0.0], scale, dropout_p)
    if backend == "triton":
        z = triton_backend.triton_diffusion(q, k, v, graph, key_padding_mask, [0.0], scale)
        return _zero_padded_queries(z, key_padding_mask)
    if backend == "matrix":
        z = matrix_diffusion(q, k, v, graph, key_padding_mask, [0.0], scale)
        return _zero_padded_queries(z, key_padding_mask)
    operator = _DenseOperator(q, k, graph, key_padding_mask, scale)
    if dropout_p > 0:
        operator = operator.dropped(dropout_p)
    return operator.apply(v)


def diffuse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    graph: BlockGraph,
    hops: int = 5,
    alpha: float = 0.1,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    kernel: str = "ppr",
    heat_time: float = 1.0,
    remainder: str = "keep",
    coefficients: Sequence[float] | None = None,
    dropout_p: float = 0.0,
    edge_dropout: str = "once",
    hop_dropout_p: float = 0.0,
    scale: float | None = None,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Multi-hop attention diffusion (Diffuser): ``sum_k c_k A^k V`` over the graph's attention ``A``.

    With the defaults this is the Diffuser reference power iteration
    ``Z_0 = V, Z_{t+1} = (1 - alpha) A Z_t + alpha V`` for ``hops`` steps, where ``A`` is the row
    softmax of ``q k^T * scale`` on the graph's edges, computed once and reused by every hop
    (``gather``/``dense``; ``flex`` reuses the BlockMask and recomputes scores per hop).

    Args:
        hops: number of diffusion steps (0 returns ``v``).
        alpha: PPR teleport probability in (0, 1]; ``alpha=1`` returns ``v``.
        kernel: ``"ppr"`` (``c_k = alpha (1-alpha)^k``) or ``"heat"`` (``c_k = e^-t t^k / k!``).
        heat_time: ``t`` of the heat kernel (> 0).
        remainder: ``"keep"`` puts the truncated tail mass on ``A^hops`` (the reference), or
            ``"renormalize"`` drops it and rescales (see :mod:`hopformer.ops.coefficients`).
        coefficients: explicit weights ``[c_0, ..., c_hops]`` on ``A^0 .. A^hops`` (non-negative, summing
            to 1) in place of the kernel's; ``alpha``, ``kernel``, ``heat_time`` and ``remainder`` are then
            unused. ``[0, 1]`` with ``hops=1`` is plain sparse attention.
        dropout_p: dropout on the edge weights ``A`` (pass 0 in eval); ``edge_dropout="once"`` samples
            one mask reused by every hop (the reference), ``"per_hop"`` a fresh one per hop (MAGNA).
            Not available on ``flex``, ``matrix`` and ``triton``.
        hop_dropout_p: feature dropout on every hop's state, after the alpha-mix (the reference).
        Other arguments as in :func:`sparse_attention`.
    """
    auto = backend == "auto"
    backend, scale = _check_inputs(q, k, v, graph, key_padding_mask, backend, dropout_p, scale)
    check_diffusion_args(hops, alpha, kernel, heat_time, remainder)
    if auto:
        backend = _auto_diffusion_backend(q, graph, dropout_p, hops)
    if edge_dropout not in EDGE_DROPOUT:
        raise ValueError(f"edge_dropout must be one of {EDGE_DROPOUT}, got {edge_dropout!r}")
    if not 0.0 <= hop_dropout_p < 1.0:
        raise ValueError(f"hop_dropout_p must be in [0, 1), got {hop_dropout_p!r}")
    if coefficients is None:
        coefficients = diffusion_coefficients(hops, alpha, kernel=kernel, heat_time=heat_time, remainder=remainder)
    else:
        coefficients = check_coefficients(coefficients, hops)
    steps = mixing_weights(coefficients)
    if all(a == 1.0 for a in steps):
        return v  # hops=0 or alpha=1: the operator is the identity

    if backend == "gather":
        z = gather_diffusion(q, k, v, graph, key_padding_mask, steps, scale, dropout_p, edge_dropout, hop_dropout_p)
        return _zero_padded_queries(z, key_padding_mask)

    if backend == "matrix":
        z = matrix_diffusion(q, k, v, graph, key_padding_mask, steps, scale, hop_dropout_p)
        return _zero_padded_queries(z, key_padding_mask)

    if backend == "triton":
        z = triton_backend.triton_diffusion(q, k, v, graph, key_padding_mask, steps, scale, hop_dropout_p)
        return _zero_padded_queries(z, key_padding_mask)

    if backend == "flex":
        plan = flex_backend.block_mask(graph, key_padding_mask, q.device)
        z = flex_backend.flex_diffuse(q, k, v, plan, steps, scale, kernel_options, hop_dropout_p)
        return _zero_padded_queries(z, key_padding_mask)

    operator = _DenseOperator(q, k, graph, key_padding_mask, scale)
    if dropout_p > 0 and edge_dropout == "once":
        operator = operator.dropped(dropout_p)

    def attend(z: torch.Tensor) -> torch.Tensor:
        if dropout_p > 0 and edge_dropout == "per_hop":
            return operator.dropped(dropout_p).apply(z)
        return operator.apply(z)

    z = v
    for a in steps:
        if a < 1.0:  # a == 1 (renormalised last step) would discard A z: skip computing it
            z = torch.lerp(attend(z), v, a)  # (1 - a) A z + a v
        else:
            z = v
        if hop_dropout_p > 0:
            z = F.dropout(z, hop_dropout_p)
    return _zero_padded_queries(z, key_padding_mask)


def diffuse_weighted(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    graph: BlockGraph,
    weights: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    dropout_p: float = 0.0,
    hop_dropout_p: float = 0.0,
    scale: float | None = None,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Diffusion with hop weights given as a tensor: ``sum_k w_k A^k V``, ``k = 0 .. hops``.

    For weights that are learned (``DiffuserAttention(learned_coefficients=True)``), so that they get
    gradients; :func:`diffuse` takes fixed PPR or heat-kernel weights and is faster.

    Args:
        weights: ``(hops + 1,)`` for all heads or ``(heads, hops + 1)`` per head; ``w_0`` weighs ``V``
            itself. Not normalised here (pass a softmax to keep the operator row-stochastic).
        dropout_p: edge dropout, drawn afresh at every hop (MAGNA's ``per_hop``); as in
            :func:`sparse_attention`, not on ``flex``, ``matrix`` and ``triton``.
        hop_dropout_p: feature dropout on every power ``A^k V`` before it is weighed.
        Other arguments as in :func:`sparse_attention`.

    ``dense`` and ``matrix`` compute ``A`` once (materialised, plain autograd) and apply it ``hops``
    times; the other backends run one :func:`sparse_attention` per hop, which recomputes the scores.
    ``auto`` picks as :func:`diffuse` does. Every power is kept for backward. On an H200, a training
    step of the small Pathfinder model (1,024 tokens, batch 256, 5 hops) takes 1.9x as long as with
    fixed weights on ``triton`` (one call per hop), 2.6x on ``flex`` and 4.5x on ``matrix``
    (``benchmarks/results/train_step_pathfinder_learned.json``).
    """
    auto = backend == "auto"
    backend, scale = _check_inputs(q, k, v, graph, key_padding_mask, backend, dropout_p, scale)
    heads = q.shape[1]
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got {type(weights).__name__}")
    if weights.dim() == 1:
        weights = weights.expand(heads, -1)
    if weights.dim() != 2 or weights.shape[0] != heads or weights.shape[1] < 1:
        raise ValueError(
            f"weights must have shape (hops + 1,) or (heads, hops + 1) = ({heads}, hops + 1), "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != q.device:
        raise ValueError(f"weights are on {weights.device} but q is on {q.device}")
    if not 0.0 <= hop_dropout_p < 1.0:
        raise ValueError(f"hop_dropout_p must be in [0, 1), got {hop_dropout_p!r}")
    if auto:
        backend = _auto_diffusion_backend(q, graph, dropout_p, hops=weights.shape[1] - 1)
    if backend in ("dense", "matrix"):
        operator = _DenseOperator(q, k, graph, key_padding_mask, scale)

        def attend(z: torch.Tensor) -> torch.Tensor:
            return (operator.dropped(dropout_p) if dropout_p > 0 else operator).apply(z)

    else:

        def attend(z: torch.Tensor) -> torch.Tensor:
            return sparse_attention(
                q,
                k,
                z,
                graph,
                key_padding_mask,
                backend,
                dropout_p=dropout_p,
                scale=scale,
                kernel_options=kernel_options,
            )

    per_head = weights[:, :, None, None]  # (heads, hops + 1, 1, 1): broadcasts over (batch, heads, seq, dim)
    power, out = v, per_head[:, 0] * v
    for hop in range(1, weights.shape[1]):
        power = attend(power)
        if hop_dropout_p > 0:
            power = F.dropout(power, hop_dropout_p)
        out = out + per_head[:, hop] * power
    return _zero_padded_queries(out.to(v.dtype), key_padding_mask)


# ------------------------------------------------------------------------------------ internals
class _DenseOperator:
    """Reference: the full ``(batch, heads, seq, seq)`` attention matrix on the graph's edges."""

    def __init__(self, q, k, graph: BlockGraph, key_padding_mask, scale: float) -> None:
        mask = allowed_mask(graph, key_padding_mask, q.device)  # the graph's token mask is cached on it
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, :, None]
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        # in q's dtype: under bf16 autocast the softmax comes out fp32, and every hop would cast it again
        self.matrix = (torch.softmax(scores, dim=-1) * mask).to(q.dtype)

    def dropped(self, p: float) -> _DenseOperator:
        other = object.__new__(_DenseOperator)
        other.matrix = F.dropout(self.matrix, p)
        return other

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.matrix, z)


def _zero_padded_queries(z: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Outputs at padded query positions are zero (the convention of every backend)."""
    return z if key_padding_mask is None else z * key_padding_mask[:, None, :, None].to(z.dtype)


def _auto_diffusion_backend(q: torch.Tensor, graph: BlockGraph, dropout_p: float, hops: int) -> str:
    """What ``auto`` diffusion runs. On CUDA: ``triton`` where it can (the fastest in whole training
    steps at every length measured); where it cannot, ``flex`` up to :data:`FLEX_AUTO_MAX_HOPS` hops
    (it recomputes the scores every hop), else ``matrix`` if it fits (also for float64: Triton
    multiplies float64 in registers on 16-token tiles), else ``flex``. Off CUDA: ``matrix`` up to
    :data:`CPU_MATRIX_AUTO_MAX_LEN` tokens without attention dropout, else ``gather``."""
    if not q.is_cuda:
        short = q.shape[2] <= CPU_MATRIX_AUTO_MAX_LEN and _matrix_bytes(q) <= MATRIX_AUTO_BYTES
        return "matrix" if short and dropout_p == 0 else "gather"
    low_precision = q.dtype != torch.float64
    triton_fits = triton_backend.available() and graph.block_size % triton_backend.MIN_TILE == 0
    if triton_fits and low_precision:
        return "triton"
    flex_preferred = low_precision and hops <= FLEX_AUTO_MAX_HOPS and q.shape[-1] >= flex_backend.MIN_HEAD_DIM
    if _matrix_fits(q) and not flex_preferred:  # (reached with triton_fits only for float64: not preferred)
        return "matrix"
    return "triton" if triton_fits else "flex"


def _matrix_bytes(q: torch.Tensor) -> int:
    batch, heads, seq, _ = q.shape
    return batch * heads * seq * seq * q.element_size()


def _matrix_fits(q: torch.Tensor) -> bool:
    """Whether ``auto`` diffusion on CUDA takes the ``matrix`` backend for inputs like ``q``: short
    enough, and one matrix within ``MATRIX_AUTO_BYTES`` and 1/32 of the GPU's memory (a model keeps
    one per layer for backward; a 4-layer ListOps model peaked at 15.7 GiB with 2 GiB matrices)."""
    limit = min(MATRIX_AUTO_BYTES, torch.cuda.get_device_properties(q.device).total_memory // 32)
    return q.shape[2] <= MATRIX_AUTO_MAX_LEN and _matrix_bytes(q) <= limit


def _check_inputs(q, k, v, graph, key_padding_mask, backend, dropout_p, scale) -> tuple[str, float]:
    check_qkv(q, k, v)
    if not isinstance(graph, BlockGraph):
        raise TypeError(f"graph must be a hopformer.graphs.BlockGraph, got {type(graph).__name__}")
    if graph.seq_len != q.shape[2]:
        raise ValueError(f"graph.seq_len={graph.seq_len} does not match the input length seq={q.shape[2]}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = real token)")
        if key_padding_mask.shape != (q.shape[0], q.shape[2]):
            raise ValueError(
                f"key_padding_mask must have shape (batch, seq) = {(q.shape[0], q.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "flex" if q.is_cuda else "gather"
    if backend == "flex":
        if not q.is_cuda:
            raise ValueError(f"backend='flex' needs CUDA tensors, got device {q.device}; use 'gather' or 'auto'")
        flex_backend.check_flex_graph(graph)
        if min(q.shape[-1], v.shape[-1]) < flex_backend.MIN_HEAD_DIM:
            raise ValueError(
                f"backend='flex' needs head_dim >= 16 (FlexAttention's minimum), got q/k {q.shape[-1]} and v "
                f"{v.shape[-1]}; use fewer, wider heads or backend='gather' / 'matrix'"
            )
    if backend == "triton":
        triton_backend.check_triton_inputs(q, graph)
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and backend in NO_ATTENTION_DROPOUT:
        raise ValueError(
            f"backend={backend!r} has no attention dropout; use dropout_p=0 "
            "(e.g. hop_dropout_p for diffusion) or backend='gather'"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return backend, float(scale)
