"""Sparse attention and attention diffusion on a :class:`~hopformer.graphs.BlockGraph`: the public entry
points. Each checks its arguments, asks :mod:`hopformer.ops.dispatch` which backend runs the call, and
runs it. The backends (``hopformer.ops.explain`` says which runs a call and why the others do not):

- ``"dense"``: the reference. Materialises the token mask and the full score matrix; for tests and
  small inputs (:mod:`hopformer.ops.reference`).
- ``"gather"``: pure PyTorch with a written-out backward on any device; the CPU training path. Memory
  ``O(seq * keys_per_query)`` (:mod:`hopformer.ops.gather`).
- ``"matrix"``: the attention materialised once per call as a ``(batch, heads, seq, seq)`` matrix and
  reused by every hop; memory ``O(seq^2)``: the fast diffusion path at moderate lengths where Triton
  cannot run (:mod:`hopformer.ops.matrix`).
- ``"flex"``: compiled FlexAttention with a BlockMask built from the block lists; CUDA
  (:mod:`hopformer.ops.flex`).
- ``"triton"``: hopformer's own kernels; each query's softmax normaliser once, every later hop a
  linear map, an adjoint backward; CUDA (:mod:`hopformer.ops.triton_diffusion`).
- ``"auto"``: :func:`hopformer.ops.dispatch.choose`.

Conventions: q, k, v are ``(batch, heads, seq, head_dim)``; scores are ``q k^T * scale`` with
``scale = head_dim ** -0.5`` by default; ``key_padding_mask`` is bool ``(batch, seq)`` with True = real
token. Padded keys are never attended; the output at padded query positions is zero, and a query with
no allowed key gets zeros, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hopformer.checks import InputTypeError, check_finite, check_probability
from hopformer.graphs import BlockGraph
from hopformer.ops import dispatch
from hopformer.ops.backend import EDGE_DROPOUT, HopOptions, Request
from hopformer.ops.coefficients import check_coefficients, check_diffusion_args, diffusion_coefficients, mixing_weights
from hopformer.ops.common import check_key_padding_mask, check_qkv, zero_padded_queries

BACKENDS = ("auto", "dense", "gather", "flex", "matrix", "triton")


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
    scale = _check_inputs(q, k, v, graph, key_padding_mask, dropout_p, scale)
    request = Request.of("sparse_attention", q, v, graph, attention_dropout=dropout_p > 0)
    runner = dispatch.choose(request, backend)
    options = HopOptions(dropout_p=dropout_p, kernel_options=kernel_options)
    z = runner.diffuse(q, k, v, graph, key_padding_mask, [0.0], scale, options)
    return zero_padded_queries(z, key_padding_mask)


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
    scale = _check_inputs(q, k, v, graph, key_padding_mask, dropout_p, scale)
    check_diffusion_args(hops, alpha, kernel, heat_time, remainder)
    if edge_dropout not in EDGE_DROPOUT:
        raise ValueError(f"edge_dropout must be one of {EDGE_DROPOUT}, got {edge_dropout!r}")
    check_probability("hop_dropout_p", hop_dropout_p)
    if coefficients is None:
        coefficients = diffusion_coefficients(hops, alpha, kernel=kernel, heat_time=heat_time, remainder=remainder)
    else:
        coefficients = check_coefficients(coefficients, hops)
    facts = dict(hops=hops, attention_dropout=dropout_p > 0, edge_dropout=edge_dropout, hop_dropout=hop_dropout_p > 0)
    runner = dispatch.choose(Request.of("diffuse", q, v, graph, **facts), backend)
    steps = mixing_weights(coefficients)
    if all(a == 1.0 for a in steps):
        return v  # hops=0 or alpha=1: the operator is the identity
    options = HopOptions(dropout_p, edge_dropout, hop_dropout_p, kernel_options)
    z = runner.diffuse(q, k, v, graph, key_padding_mask, steps, scale, options)
    return zero_padded_queries(z, key_padding_mask)


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
    ``auto`` picks as :func:`diffuse` does. Every power is kept for backward: a training step of the small
    Pathfinder model (1,024 tokens, 5 hops) takes 1.9x as long as with fixed weights on ``triton`` (one
    call per hop), 2.6x on ``flex`` and 4.5x on ``matrix``.
    """
    scale = _check_inputs(q, k, v, graph, key_padding_mask, dropout_p, scale)
    heads = q.shape[1]
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        kind = f"dtype {weights.dtype}" if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise InputTypeError(f"weights must be a floating-point tensor (any float dtype), got {kind}")
    if weights.dim() == 1:
        weights = weights.expand(heads, -1)
    if weights.dim() != 2 or weights.shape[0] != heads or weights.shape[1] < 1:
        raise ValueError(
            f"weights must have shape (hops + 1,) or (heads, hops + 1) = ({heads}, hops + 1), "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != q.device:
        raise ValueError(f"weights are on {weights.device} but q is on {q.device}")
    check_probability("hop_dropout_p", hop_dropout_p)
    facts = dict(hops=weights.shape[1] - 1, attention_dropout=dropout_p > 0, edge_dropout="per_hop")
    runner = dispatch.choose(
        Request.of("diffuse_weighted", q, v, graph, hop_dropout=hop_dropout_p > 0, **facts), backend
    )
    if hasattr(runner, "operator"):  # A computed once, applied at every hop
        operator = runner.operator(q, k, graph, key_padding_mask, scale)

        def attend(z: torch.Tensor) -> torch.Tensor:
            return (operator.dropped(dropout_p) if dropout_p > 0 else operator).apply(z)

    else:  # one sparse attention per hop
        one_hop = HopOptions(dropout_p=dropout_p, kernel_options=kernel_options)

        def attend(z: torch.Tensor) -> torch.Tensor:
            return runner.diffuse(q, k, z, graph, key_padding_mask, [0.0], scale, one_hop)

    per_head = weights[:, :, None, None]  # (heads, hops + 1, 1, 1): broadcasts over (batch, heads, seq, dim)
    power, out = v, per_head[:, 0] * v
    for hop in range(1, weights.shape[1]):
        power = attend(power)
        if hop_dropout_p > 0:
            power = F.dropout(power, hop_dropout_p)
        out = out + per_head[:, hop] * power
    return zero_padded_queries(out.to(v.dtype), key_padding_mask)


def _check_inputs(q, k, v, graph, key_padding_mask, dropout_p, scale) -> float:
    """Checks shared by the three ops; returns the score scale."""
    check_qkv(q, k, v)
    if not isinstance(graph, BlockGraph):
        raise InputTypeError(f"graph must be a hopformer.graphs.BlockGraph, got {type(graph).__name__}")
    if graph.seq_len != q.shape[2]:
        raise ValueError(f"graph.seq_len={graph.seq_len} does not match the input length seq={q.shape[2]}")
    check_key_padding_mask(key_padding_mask, q)
    check_probability("dropout_p", dropout_p)
    return q.shape[-1] ** -0.5 if scale is None else check_finite("scale", scale)
