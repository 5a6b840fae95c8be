"""The ``matrix`` backend: the attention ``A`` materialised once as a ``(batch, heads, seq, seq)``
matrix in the inputs' dtype, reused by every hop; for GPUs at moderate lengths.

Diffusion applies the same ``A`` ``hops`` times. FlexAttention recomputes ``q k^T`` and the softmax in
every hop, forward and backward; up to about 2K tokens the graphs cover a third to a half of the
matrix anyway, so one score product, one softmax and ``hops`` plain matrix products (cuBLAS, bf16
with fp32 accumulation) are faster (4.3x in a whole ListOps training step). Memory is
``O(seq^2)`` per head: ``A`` is kept for backward, and one more matrix of its size lives during backward.

Backward is written out (as in :mod:`hopformer.ops.gather`): the adjoint recurrence
``u <- A^T w_t``, then ``dA = sum_t w_t z_{t-1}^T`` as a single product over all hops side by side,
and ``dS = A * (dA - r)`` with the softmax's row term ``r = rowsum(A * dA)``.
Autocast is off inside: everything runs in ``q``'s dtype (softmax statistics in fp32 for bf16/fp16,
as PyTorch's softmax does), so under bf16 autocast ``A`` is stored once in bf16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hopformer.graphs import BlockGraph
from hopformer.ops.backend import NO_OPTIONS, HopOptions, Support
from hopformer.ops.common import diffusion_steps, masked_softmax, token_mask


class _MatrixDiffusion(torch.autograd.Function):
    """``z <- lerp(A z, v, a_t)`` for each step weight ``a_t`` from ``z = v``, then optional feature
    dropout on the state (hop dropout); see :func:`matrix_diffusion`."""

    @staticmethod
    def forward(ctx, q, k, v, allowed, steps, scale, hop_p):
        with torch.autocast(q.device.type, enabled=False):
            attention = masked_softmax(torch.matmul(q * scale, k.transpose(-1, -2)), allowed, inplace=True)
            keeps = []

            def hop_dropout(z: torch.Tensor, _: int) -> torch.Tensor:
                keep = torch.rand_like(z) >= hop_p if hop_p > 0 else None
                keeps.append(keep)
                return z if keep is None else z * keep / (1 - hop_p)

            states = [v, *diffusion_steps(lambda z, _: torch.matmul(attention, z), v, steps, hop_dropout)]
            z = states[-1]
        if z is v:  # every step skipped: return a new tensor, not the input
            z = v.clone()
        ctx.steps, ctx.scale, ctx.hop_p, ctx.keeps = steps, scale, hop_p, keeps
        ctx.save_for_backward(q, k, v, attention, *states[:-1])
        return z

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attention, *states = ctx.saved_tensors  # states: z_0 .. z_{T-1}
        steps, hop_p = ctx.steps, ctx.hop_p
        with torch.autocast(q.device.type, enabled=False):
            # Adjoint sweep: u = dL/dz_t, u' = u through the hop dropout, w_t = (1 - a_t) u' is the
            # gradient of A z_{t-1}; the w_t are kept side by side for the score gradient.
            grad_v = torch.zeros_like(v)
            w = v.new_zeros(*v.shape[:-1], len(steps), v.shape[-1])  # zero for skipped (a == 1) steps
            u = grad_out.to(v.dtype)
            for t in reversed(range(len(steps))):
                if ctx.keeps[t] is not None:
                    u = u * ctx.keeps[t] / (1 - hop_p)
                a = steps[t]
                grad_v += a * u
                if a < 1.0:
                    w[..., t, :] = (1 - a) * u
                    u = torch.matmul(attention.transpose(-1, -2), w[..., t, :])
                else:
                    u = torch.zeros_like(u)
            grad_v += u

            # dA = sum_t w_t z_{t-1}^T as one product over the hops side by side; dS = A * (dA - r) with
            # r_i = sum_j A_ij dA_ij taken from this (rounded) dA, so that every row of dS sums to
            # zero in bf16 too (r from the states instead doubles the bf16 error of dq and dk).
            z = torch.stack(states, dim=-2)
            grad_scores = torch.matmul(w.flatten(-2), z.flatten(-2).transpose(-1, -2))
            del w, z
            r = torch.einsum("...ij,...ij->...i", attention, grad_scores)  # batched dot products, no temporary
            grad_scores.sub_(r[..., None]).mul_(attention)
            grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
            grad_k = torch.matmul(grad_scores.transpose(-1, -2), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None, None


def matrix_diffusion(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    graph: BlockGraph,
    key_padding_mask: torch.Tensor | None,
    steps: list[float],
    scale: float,
    hop_dropout_p: float = 0.0,
) -> torch.Tensor:
    """Apply ``z <- lerp(A z, v, a)`` for each ``a`` in ``steps`` from ``z = v`` with ``A`` materialised.

    ``steps=[0.0]`` is sparse attention (``A v``). Runs in ``q``'s dtype (``k`` and ``v`` are cast to
    it); outputs at padded queries are not zeroed here (the caller does). No edge dropout.
    """
    dtype = q.dtype
    allowed = token_mask(graph, key_padding_mask, q.device)
    return _MatrixDiffusion.apply(q, k.to(dtype), v.to(dtype), allowed, tuple(steps), scale, hop_dropout_p)


class MatrixBackend:
    """``matrix``: the attention materialised once per call and reused by every hop (cuBLAS)."""

    name = "matrix"
    summary = "the attention materialised once per call, every hop a matrix product; O(seq^2) memory"
    support = Support(
        ops=("sparse_attention", "diffuse", "diffuse_weighted"), devices=("cpu", "cuda"), attention_dropout=False
    )

    def diffuse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        graph: BlockGraph,
        key_padding_mask: torch.Tensor | None,
        steps: Sequence[float],
        scale: float,
        options: HopOptions = NO_OPTIONS,
    ) -> torch.Tensor:
        return matrix_diffusion(q, k, v, graph, key_padding_mask, steps, scale, options.hop_dropout_p)

    def operator(self, q, k, graph, key_padding_mask, scale):
        """``A`` computed once for many applications (learned hop weights): the reference's, with autograd."""
        from hopformer.ops.reference import DenseOperator

        return DenseOperator(q, k, graph, key_padding_mask, scale)


MATRIX = MatrixBackend()
