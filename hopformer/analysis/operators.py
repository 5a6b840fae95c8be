"""The operators a model's attention layers apply to their values, rebuilt for analysis.

:func:`attention_operators` runs a model once and, for every attention layer, rebuilds the dense matrix
that mixes the values from the queries and keys the layer computed:

- ``"A"``: the softmax of the scores on the layer's graph (full attention: on every key);
- ``"diffused"`` (Diffuser only): ``sum_k c_k A^k``, with the layer's coefficients (its kernel's,
  its explicit ``coefficients`` or its learned weights).

The matrices come from the graph ops (:func:`~hopformer.ops.sparse_attention`,
:func:`~hopformer.ops.diffuse_weighted`; full attention as the ``"full"`` pattern) applied to identity values, so
``operator @ v`` is what the layer's attention core returns. They cost O(L^2) memory per head and input:
they are meant for analysis at the lengths of LRA inputs, not at 100K tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hopformer.attention.base import AttentionModule, FullAttention
from hopformer.attention.sparse import DiffuserAttention, GraphAttention, cached_graph
from hopformer.ops import diffuse_weighted, sparse_attention

SUPPORTED = (FullAttention, GraphAttention)


def attention_operators(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    uniform: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Per attention layer, in order: ``{"A": ..., "diffused": ...}``, each ``(batch, heads, L, L)`` float64.

    Rows are queries and columns keys. ``L`` is the length the layer sees, after the model's own padding.
    Padded keys get weight 0, and padded queries get rows of 0.

    Args:
        model: any module whose attention layers are full, sparse-graph or Diffuser attention; it runs
            once on ``input_ids`` (and ``attention_mask``) as called, so put it in eval mode first.
        uniform: ``True`` sets every score to 0, i.e. the operators of an untrained layer on the same
            graph (uniform weights over each query's keys): a reference for the trained ones.

    Raises:
        TypeError: when the model has no attention layer, or one whose operator is not rebuilt here
            (Routing, Combiner).
    """
    layers = [module for module in model.modules() if isinstance(module, AttentionModule)]
    if not layers:
        raise TypeError(f"{type(model).__name__} has no attention layer (hopformer AttentionModule)")
    for layer in layers:
        if not isinstance(layer, SUPPORTED):
            raise TypeError(
                f"attention_operators rebuilds full, sparse-graph and Diffuser attention; "
                f"{type(layer).__name__} is none of them"
            )
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    for layer in layers:
        layer.attend = _recording(layer.attend, captured)
    with torch.no_grad():  # learned hop weights are parameters: keep their autograd graph out of the result
        try:
            model(input_ids, attention_mask)
        finally:
            for layer in layers:
                del layer.attend  # back to the class's method
        return [_operators(layer, q, k, mask, uniform) for layer, (q, k, mask) in zip(layers, captured)]


def _recording(attend: Callable, captured: list) -> Callable:
    """``attend`` that first records its queries, keys and key mask in ``captured``."""

    def recorded(q, k, v, key_padding_mask):
        captured.append((q, k, key_padding_mask))
        return attend(q, k, v, key_padding_mask)

    return recorded


def _operators(
    layer: AttentionModule, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, uniform: bool
) -> dict[str, torch.Tensor]:
    batch, heads, seq, _ = q.shape
    q, k = (torch.zeros_like(q) if uniform else q).double(), (torch.zeros_like(k) if uniform else k).double()
    # full attention is the "full" pattern's graph, so every layer goes through the same graph ops
    graph = cached_graph("full", seq, causal=layer.causal) if isinstance(layer, FullAttention) else layer.graph(seq)
    eye = torch.eye(seq, dtype=torch.float64, device=q.device).expand(batch, heads, seq, seq)
    found = {"A": sparse_attention(q, k, eye, graph, mask, "dense")}
    if isinstance(layer, DiffuserAttention):
        weights = layer.coefficients().to(device=q.device, dtype=torch.float64)
        found["diffused"] = diffuse_weighted(q, k, eye, graph, weights, mask, "dense")
    return found
