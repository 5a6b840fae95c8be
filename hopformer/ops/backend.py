"""The backend interface: what a call asks for (:class:`Request`), what a backend declares it supports
(:class:`Support`), and the one signature every diffusion backend implements (:class:`DiffusionBackend`).

Modelled on xformers' attention ops: each backend states its limits once, as data, and
:meth:`Support.reasons` turns them into the reasons it cannot run a given call. Which supported backend
``auto`` prefers is :mod:`hopformer.ops.dispatch`'s business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import torch

from hopformer.graphs.tracing import exporting
from hopformer.ops.common import FLOAT_DTYPES

OPS = ("sparse_attention", "diffuse", "diffuse_weighted", "combiner")
EDGE_DROPOUT = ("once", "per_hop")


@dataclass(frozen=True)
class Request:
    """The facts of one call that decide which backends can run it.

    A fact left ``None`` is unknown and not checked (an attention module asks before it has seen an
    input). Build one from tensors with :meth:`of`.
    """

    op: str
    device: str | None = None  # "cpu", "cuda", ...
    dtype: torch.dtype | None = None
    batch: int | None = None
    heads: int | None = None
    seq_len: int | None = None
    head_dim: int | None = None
    value_dim: int | None = None
    block_size: int | None = None  # of the graph (sparse_attention, diffuse, diffuse_weighted)
    hops: int = 1  # attention applications: 1 for sparse_attention
    attention_dropout: bool = False  # dropout on the attention (edge) weights
    edge_dropout: str = "once"
    hop_dropout: bool = False
    variant: str | None = None  # Combiner's
    gpu_memory: int | None = None  # bytes of the GPU the call runs on
    exporting: bool = False  # traced by torch.export (and the ONNX exporter on it): a program for any device

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")

    @classmethod
    def of(cls, op: str, q: torch.Tensor, v: torch.Tensor | None = None, graph: Any = None, **facts: Any) -> Request:
        """The request of a call on ``q`` (and ``v``, ``graph``): device, dtype, shape and block size from
        the tensors, the rest from ``facts``."""
        batch, heads, seq_len, head_dim = q.shape
        if exporting():  # the program runs anywhere, on any batch: choose without either
            known = dict(dtype=q.dtype, heads=heads, seq_len=seq_len, head_dim=head_dim, exporting=True,
                         value_dim=head_dim if v is None else v.shape[-1],
                         block_size=None if graph is None else graph.block_size)  # fmt: skip
            return cls(op, **{**known, **facts})
        known = dict(
            device=q.device.type,
            dtype=q.dtype,
            batch=batch,
            heads=heads,
            seq_len=seq_len,
            head_dim=head_dim,
            value_dim=head_dim if v is None else v.shape[-1],
            block_size=None if graph is None else graph.block_size,
            gpu_memory=torch.cuda.get_device_properties(q.device).total_memory if q.is_cuda else None,
        )
        return cls(op, **{**known, **facts})

    def describe(self) -> str:
        """One line: the op and the facts that are known."""
        parts = [self.op]
        if self.op in ("diffuse", "diffuse_weighted"):
            parts.append(f"{self.hops} hops")
        if self.variant:
            parts.append(f"variant {self.variant!r}")
        shape = (self.batch, self.heads, self.seq_len, self.head_dim)
        if None not in shape:
            parts.append(f"q {shape}")
        if self.dtype is not None:
            parts.append(str(self.dtype).removeprefix("torch."))
        if self.device is not None:
            parts.append(f"on {self.device}")
        if self.block_size is not None:
            parts.append(f"block_size {self.block_size}")
        if self.attention_dropout:
            diffusion = self.op in ("diffuse", "diffuse_weighted")
            parts.append("attention dropout" + (f" ({self.edge_dropout})" if diffusion else ""))
        if self.hop_dropout:
            parts.append("hop dropout")
        if self.exporting:
            parts.append("under torch.export")
        return ", ".join(parts)

    def replace(self, **changes: Any) -> Request:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Request(**{**values, **changes})


@dataclass(frozen=True)
class Support:
    """What a backend can run, declared once. :meth:`reasons` lists what stops it running a request.

    ``block_sizes``: a predicate on the graph's block size with its description (``rule``);
    ``requires``: a check of the installation, returning the reason it cannot run at all (or None);
    ``exportable``: ``torch.export`` can trace it into a program of standard operators (no compiled kernel).
    """

    ops: tuple[str, ...]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    attention_dropout: bool = True
    edge_dropout: tuple[str, ...] = EDGE_DROPOUT
    hop_dropout: bool = True
    min_head_dim: int = 1
    same_value_dim: bool = False
    variants: tuple[str, ...] | None = None
    block_sizes: Callable[[int], bool] | None = None
    rule: str = ""
    requires: Callable[[], str | None] | None = field(default=None, compare=False)
    exportable: bool = True

    def reasons(self, request: Request) -> list[str]:
        """Why a backend with this support cannot run ``request``; empty when it can."""
        found = []
        if request.op not in self.ops:
            found.append(f"does not run {request.op}")
        # what this machine has matters only for a call on a known device (a module may be built here
        # and run elsewhere)
        if request.device is not None and self.requires is not None and (missing := self.requires()):
            found.append(missing)
        if request.exporting and not self.exportable:
            found.append("runs compiled kernels, which torch.export cannot trace")
        if request.device is not None and request.device not in self.devices:
            found.append(f"runs on {' or '.join(self.devices)}, not {request.device}")
        if request.dtype is not None and request.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            found.append(f"takes {names}, not {str(request.dtype).removeprefix('torch.')}")
        if request.attention_dropout:
            if not self.attention_dropout:
                found.append("has no attention dropout (dropout_p > 0)")
            elif request.edge_dropout not in self.edge_dropout:
                found.append(f"has no edge_dropout={request.edge_dropout!r}")
        if request.hop_dropout and not self.hop_dropout:
            found.append("has no hop dropout")
        dims = [d for d in (request.head_dim, request.value_dim) if d is not None]
        if dims and min(dims) < self.min_head_dim:
            found.append(f"needs head_dim >= {self.min_head_dim}, got {min(dims)}")
        if self.same_value_dim and None not in (request.head_dim, request.value_dim):
            if request.head_dim != request.value_dim:
                found.append(f"needs v's head_dim equal to q's, got {request.value_dim} and {request.head_dim}")
        if self.variants is not None and request.variant is not None and request.variant not in self.variants:
            found.append(f"runs variant {' or '.join(map(repr, self.variants))} only, not {request.variant!r}")
        if self.block_sizes is not None and request.block_size is not None:
            if not self.block_sizes(request.block_size):
                found.append(f"needs a block_size that {self.rule}, got {request.block_size}")
        return found


@dataclass(frozen=True)
class HopOptions:
    """The settings of one diffusion call that a backend may support or refuse (see :class:`Support`)."""

    dropout_p: float = 0.0  # attention (edge) dropout
    edge_dropout: str = "once"  # one edge mask for every hop, or a fresh one "per_hop"
    hop_dropout_p: float = 0.0  # feature dropout on every hop's state
    kernel_options: dict | None = field(default=None, compare=False)  # FlexAttention's tiles and warps


NO_OPTIONS = HopOptions()


@runtime_checkable
class DiffusionBackend(Protocol):
    """The contract of the ``dense``, ``gather``, ``matrix``, ``flex`` and ``triton`` backends.

    ``diffuse`` applies ``z <- lerp(A z, v, a)`` for each ``a`` in ``steps`` from ``z = v``, with ``A``
    the row softmax of ``q k^T * scale`` on the graph's edges (``steps=[0.0]`` is one hop: sparse
    attention). Inputs are checked already; outputs at padded queries may hold anything (the caller
    zeroes them).
    """

    name: str
    summary: str
    support: Support

    def diffuse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        graph: Any,
        key_padding_mask: torch.Tensor | None,
        steps: Sequence[float],
        scale: float,
        options: HopOptions = NO_OPTIONS,
    ) -> torch.Tensor: ...


@runtime_checkable
class CombinerBackend(Protocol):
    """The contract of Combiner's ``eager`` and ``flex`` backends (see :mod:`hopformer.ops.combiner_attention`).

    ``combine`` takes inputs padded to whole blocks and ``real`` (True = a real token) and returns the
    outputs at every padded position."""

    name: str
    summary: str
    support: Support

    def combine(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        variant: str,
        block_size: int,
        causal: bool,
        real: torch.Tensor | None,
        scale: float,
        dropout_p: float,
    ) -> torch.Tensor: ...
