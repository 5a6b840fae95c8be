"""Functional attention ops on ``(batch, heads, seq, head_dim)`` tensors.

- :func:`sparse_attention`, :func:`diffuse`, :func:`diffuse_weighted`: attention on a BlockGraph and
  multi-hop diffusion (fixed or learned hop weights), on the ``dense``, ``gather``, ``matrix``, ``flex``
  and ``triton`` backends.
- :func:`combiner`, :func:`routing`: Combiner and Routing attention.
- :func:`explain`: which backend ``auto`` picks for a call, and why not each of the others.
"""

from __future__ import annotations

from hopformer.ops.coefficients import (
    check_coefficients,
    diffusion_coefficients,
    mixing_weights,
    ppr_spectral_map,
    spectral_map,
)
from hopformer.ops.combiner_attention import combiner
from hopformer.ops.dispatch import Explanation, explain
from hopformer.ops.routing_attention import routing
from hopformer.ops.sparse import BACKENDS, diffuse, diffuse_weighted, sparse_attention

__all__ = [
    "BACKENDS",
    "Explanation",
    "check_coefficients",
    "combiner",
    "diffuse",
    "diffuse_weighted",
    "diffusion_coefficients",
    "explain",
    "mixing_weights",
    "ppr_spectral_map",
    "routing",
    "sparse_attention",
    "spectral_map",
]
