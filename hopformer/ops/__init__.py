"""Functional attention ops on ``(batch, heads, seq, head_dim)`` tensors.

- :func:`sparse_attention`, :func:`diffuse`, :func:`diffuse_weighted`: attention on a BlockGraph and
  multi-hop diffusion (fixed or learned hop weights), with ``dense`` / ``gather`` / ``flex`` /
  ``matrix`` / ``triton`` backends.
- :func:`combiner`, :func:`routing`: Combiner and Routing attention.
"""

from __future__ import annotations

from hopformer.ops.coefficients import (
    check_coefficients,
    diffusion_coefficients,
    mixing_weights,
    ppr_spectral_map,
    spectral_map,
)
from hopformer.ops.sparse import BACKENDS, diffuse, diffuse_weighted, sparse_attention

__all__ = [
    "BACKENDS",
    "combiner",
    "diffuse",
    "diffuse_weighted",
    "check_coefficients",
    "diffusion_coefficients",
    "mixing_weights",
    "ppr_spectral_map",
    "routing",
    "sparse_attention",
    "spectral_map",
]


def __getattr__(name: str):
    # Combiner and Routing live in their own modules; import them on first use.
    if name == "combiner":
        from hopformer.ops.combiner import combiner

        return combiner
    if name == "routing":
        from hopformer.ops.routing import routing

        return routing
    raise AttributeError(f"module 'hopformer.ops' has no attribute {name!r}")
