"""Diffusion kernels as coefficient sequences: the operator is ``sum_k c_k A^k`` for ``k = 0..hops``.

- ``"ppr"`` (Personalized PageRank): ``c_k = alpha (1 - alpha)^k``.
- ``"heat"``: ``c_k = exp(-t) t^k / k!``.

Truncation at ``hops`` leaves tail mass ``1 - sum_k c_k``. ``remainder="keep"`` puts it on the last
term (for PPR this is exactly the Diffuser reference's power iteration, whose weight on ``A^hops`` is
``(1 - alpha)^hops``); ``"renormalize"`` drops the tail and rescales the kept terms (for PPR the terms
``k < hops``) to sum to 1. Both give row-stochastic operators. :func:`check_coefficients` admits any
other weights that do (an explicit list, e.g. all on the one-hop attention ``A``).
"""

from __future__ import annotations

import math

from hopformer.checks import check_int

KERNELS = ("ppr", "heat")
REMAINDERS = ("keep", "renormalize")


def check_diffusion_args(hops: object, alpha: object, kernel: str, heat_time: object, remainder: str) -> None:
    """Raise ValueError naming the argument when a diffusion setting is out of range."""
    check_int("hops", hops, 0)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    if kernel == "ppr" and not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if kernel == "heat" and not (isinstance(heat_time, (int, float)) and heat_time > 0 and math.isfinite(heat_time)):
        raise ValueError(f"heat_time must be a finite number > 0, got {heat_time!r}")


def diffusion_coefficients(
    hops: int, alpha: float = 0.1, *, kernel: str = "ppr", heat_time: float = 1.0, remainder: str = "keep"
) -> list[float]:
    """Weights ``[c_0, ..., c_hops]`` of ``A^0 .. A^hops``; they sum to 1."""
    check_diffusion_args(hops, alpha, kernel, heat_time, remainder)
    if hops == 0:
        return [1.0]
    if kernel == "ppr":
        weights = [alpha * (1 - alpha) ** k for k in range(hops)] + [0.0]
        if remainder == "keep":
            weights[hops] = (1 - alpha) ** hops
    else:
        weights = [math.exp(-heat_time + k * math.log(heat_time) - math.lgamma(k + 1)) for k in range(hops + 1)]
        if remainder == "keep":
            weights[hops] += max(0.0, 1.0 - sum(weights))
    total = sum(weights)
    if total <= 0.0:
        raise ValueError(f"remainder='renormalize' leaves no weight for kernel={kernel!r}, hops={hops}, alpha={alpha}")
    return [w / total for w in weights]


def check_coefficients(coefficients: object, hops: int) -> list[float]:
    """An explicit weight list ``[c_0, ..., c_hops]``: ``hops + 1`` finite, non-negative numbers that sum to
    1 (within 1e-6, then renormalised exactly), so the operator stays row-stochastic. Raises ValueError
    naming what is wrong."""
    if isinstance(coefficients, (str, bytes)) or not hasattr(coefficients, "__len__"):
        raise ValueError(f"coefficients must be a list of hops + 1 = {hops + 1} numbers, got {coefficients!r}")
    values = list(coefficients)
    if len(values) != hops + 1:
        raise ValueError(f"coefficients must have hops + 1 = {hops + 1} entries (A^0 .. A^{hops}), got {len(values)}")
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0 for c in values):
        raise ValueError(f"coefficients must be finite numbers >= 0, got {values!r}")
    total = sum(values)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"coefficients must sum to 1 (a row-stochastic operator), got {values!r} summing to {total}")
    return [float(c) / total for c in values]


def mixing_weights(coefficients: list[float]) -> list[float]:
    """Per-step weights ``a_k`` of the normalised Horner recurrence

        Z_hops = V;   Z_k = a_k V + (1 - a_k) A Z_{k+1}   (k = hops-1 .. 0);   output = Z_0,

    with ``a_k = c_k / sum_{j>=k} c_j``. Every state is a row-stochastic mix of ``A^j V``; for PPR
    with ``remainder="keep"`` every ``a_k`` equals ``alpha``: the Diffuser power iteration
    ``Z_{t+1} = (1 - alpha) A Z_t + alpha V``. Returned in application order (``k = hops-1`` first).
    """
    tails = [sum(coefficients[k:]) for k in range(len(coefficients))]
    steps = [coefficients[k] / tails[k] if tails[k] > 0 else 1.0 for k in range(len(coefficients) - 1)]
    return steps[::-1]


def spectral_map(mu, coefficients: list[float]):
    """Eigenvalue of the diffused operator for an eigenvalue ``mu`` of ``A``: ``sum_k c_k mu^k``.
    Works on floats, complex numbers and NumPy arrays."""
    result = 0 * mu
    for c in reversed(coefficients):
        result = result * mu + c
    return result


def ppr_spectral_map(mu, alpha: float):
    """Exact (untruncated) PPR map ``alpha / (1 - (1 - alpha) mu)``."""
    return alpha / (1 - (1 - alpha) * mu)
