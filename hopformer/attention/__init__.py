"""Attention modules with one interface: ``forward(x, attention_mask=None) -> x``, ``(batch, seq, dim)``.

Build one by name with :func:`build` (``"full"``, ``"local"``, ``"longformer"``, ``"bigbird"``,
``"hypercube"``, ``"diffuser"``, ``"routing"``, ``"combiner"``); :func:`available` lists them and
:func:`option_names` the keyword options each takes.
"""

from hopformer.attention.base import use_portable_backends
from hopformer.attention.registry import available, build, option_names, register

__all__ = ["available", "build", "option_names", "register", "use_portable_backends"]
