"""Attention modules with one interface: ``forward(x, attention_mask=None) -> x``, ``(batch, seq, dim)``.

Build one by name with :func:`build` (``"full"``, ``"local"``, ``"longformer"``, ``"bigbird"``,
``"hypercube"``, ``"diffuser"``, ``"routing"``, ``"combiner"``); :func:`available` lists them.
"""

from hopformer.attention.base import use_portable_backends
from hopformer.attention.registry import available, build, register

__all__ = ["available", "build", "register", "use_portable_backends"]
