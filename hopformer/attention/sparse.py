"""Graph attention modules: sparse patterns (local, Longformer, BigBird, hypercube) and Diffuser.

Graphs are built once per (pattern, options, sequence length) and shared by every layer and call
(:func:`cached_graph`), so device-side layouts cached on the graph (gather plans, FlexAttention block
masks) are built once too.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from hopformer.attention.base import AttentionModule
from hopformer.attention.decoding import GraphCache, slot_plan
from hopformer.attention.registry import register
from hopformer.checks import check_probability
from hopformer.graphs import PATTERNS, BlockGraph, build_graph
from hopformer.graphs.tracing import eager_constants, static_int, trace_constant
from hopformer.ops import diffuse, diffuse_weighted, dispatch, sparse_attention
from hopformer.ops.backend import EDGE_DROPOUT
from hopformer.ops.coefficients import check_coefficients, check_diffusion_args, diffusion_coefficients, mixing_weights


@functools.lru_cache(maxsize=256)
def _graph(pattern: str, seq_len: int, options: tuple[tuple[str, Any], ...]) -> BlockGraph:
    # on the CPU whatever the default device (transformers builds models under torch.device("meta")), and
    # eagerly under torch.export: a graph is a constant of the model, shared by every call
    with eager_constants(), torch.device("cpu"):
        return build_graph(pattern, seq_len, **dict(options))


def cached_graph(pattern: str, seq_len: int, **options: Any) -> BlockGraph:
    """The graph of ``pattern`` at ``seq_len``, built on first use and shared afterwards (under ``torch.compile``
    a constant of the compiled program, see :mod:`hopformer.graphs.tracing`)."""
    # list options (``global_blocks=[0, 5]``, e.g. from a YAML config) become tuples: the cache key must hash
    key = tuple(sorted((name, tuple(v) if isinstance(v, list) else v) for name, v in options.items()))
    return trace_constant(_shared_graph, pattern, static_int(seq_len), key)


def _shared_graph(pattern: str, seq_len: int, options: tuple[tuple[str, Any], ...]) -> BlockGraph:
    return _graph(pattern, seq_len, options)  # (a plain function: Dynamo passes only those to trace-time builders)


class GraphAttention(AttentionModule):
    """Attention on a graph pattern; subclasses choose what runs on it (one hop or diffusion).

    Args:
        dim, heads, dropout, bias: as :class:`~hopformer.attention.base.AttentionModule`; ``dropout``
            is attention (edge) dropout, which the ``flex``, ``matrix`` and ``triton`` backends cannot do:
            they raise.
        pattern: graph pattern name (``"local"``, ``"longformer"``, ``"bigbird"``, ``"diffuser"``,
            ``"hypercube"``, ``"full"``, ``"grid2d"``).
        backend: ``"auto"`` or a backend name (``"gather"``, ``"flex"``, ``"matrix"``, ``"triton"``,
            ``"dense"``); :meth:`explain` says which runs and why (see :mod:`hopformer.ops.sparse`).
        causal: keep only keys at or before the query.
        **graph_options: the pattern's keyword arguments (``block_size``, ``window``, ``num_global``,
            ``num_random``, ``seed``, ...).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        pattern: str,
        dropout: float = 0.0,
        backend: str = "auto",
        causal: bool = False,
        bias: bool = True,
        **graph_options: Any,
    ) -> None:
        super().__init__(dim, heads, dropout=dropout, bias=bias)
        if pattern not in PATTERNS:
            raise ValueError(f"pattern={pattern!r} is not known; choose one of {sorted(PATTERNS)}")
        dispatch.check_backend_name("sparse_attention", backend)
        self.pattern, self.backend, self.causal = pattern, backend, causal
        self.graph_options = dict(graph_options, causal=causal)
        probe = cached_graph(pattern, 4 * 1024, **self.graph_options)  # fail now, not mid-training, on bad options
        self.block_size = probe.block_size

    op = "sparse_attention"

    def _request_facts(self) -> dict[str, Any]:
        return {"block_size": self.block_size}

    def graph(self, seq_len: int) -> BlockGraph:
        return cached_graph(self.pattern, seq_len, **self.graph_options)

    def new_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> GraphCache:
        """Pools for the reachable blocks of the causal graph at ``max_len`` (prefix-stable: every shorter
        sequence's graph is its top-left corner)."""
        self._check_decoding()
        plan = slot_plan(self.graph(max_len), device)
        return GraphCache.new(plan, batch, self.heads, self.head_dim, self._decode_states(), device, dtype)

    def _decode_states(self) -> int:
        return 1

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.pattern!r}, backend={self.backend!r}, {self.graph_options}"

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0


class SparseAttention(GraphAttention):
    """Softmax attention on the edges of a graph pattern (one hop)."""

    def __init__(self, dim: int, heads: int, *, pattern: str, **options: Any) -> None:
        super().__init__(dim, heads, pattern=pattern, **options)
        self._check_backend()

    def prefill(self, q, k, v, key_padding_mask, cache: GraphCache, lengths: torch.Tensor) -> torch.Tensor:
        cache.fill(k, [v], lengths)
        return self.attend(q, k, v, key_padding_mask)

    def attend_step(self, q, k, v, cache: GraphCache, positions: torch.Tensor) -> torch.Tensor:
        return cache.step(q, k, v, positions, [0.0])[-1]

    def attend(self, q, k, v, key_padding_mask):
        graph = self.graph(q.shape[2])
        return sparse_attention(q, k, v, graph, key_padding_mask, self.backend, dropout_p=self._dropout_p())


def _sparse(pattern: str):
    def __init__(self, dim: int, heads: int, **options: Any) -> None:
        SparseAttention.__init__(self, dim, heads, pattern=pattern, **options)

    cls = type(
        f"{pattern.capitalize()}Attention",
        (SparseAttention,),
        {"__init__": __init__, "__doc__": f"Sparse attention on the ``{pattern}`` pattern ({SparseAttention.__doc__})"},
    )
    return register(pattern)(cls)


@register("local")
class LocalAttention(SparseAttention):
    """Sparse attention on a local neighbourhood: the 1-D band of ``window`` blocks (``pattern="local"``,
    the default) or, for images in raster order, each pixel's 2-D neighbourhood (``pattern="grid2d"``:
    ``side``, ``radius``; see :func:`hopformer.graphs.grid2d`). Other arguments as :class:`GraphAttention`."""

    def __init__(self, dim: int, heads: int, *, pattern: str = "local", **options: Any) -> None:
        if pattern not in ("local", "grid2d"):
            raise ValueError(f"local attention takes pattern='local' or 'grid2d', got pattern={pattern!r}")
        super().__init__(dim, heads, pattern=pattern, **options)


LongformerAttention = _sparse("longformer")
BigBirdAttention = _sparse("bigbird")
HypercubeAttention = _sparse("hypercube")


@register("diffuser")
class DiffuserAttention(GraphAttention):
    """Diffuser: attention on the Diffuser graph, diffused over ``hops`` steps (``hopformer.ops.diffuse``).

    Args:
        hops, alpha, kernel, heat_time, remainder: the diffusion (defaults: the reference's 5 hops of
            PPR with alpha 0.1, remainder kept).
        edge_dropout: ``"once"`` (one mask for all hops, the reference) or ``"per_hop"``; the rate is
            ``dropout``.
        hop_dropout: feature dropout on every hop's state.
        pattern: the graph, ``"diffuser"`` by default; any pattern name works (``"grid2d"``: pixel
            neighbourhoods of an image, which diffusion then spreads along paths).
        coefficients: explicit weights on ``A^0 .. A^hops`` (``hops + 1`` non-negative numbers summing to
            1) in place of the kernel's, e.g. ``[0, 1]`` with ``hops=1``: plain sparse attention on the
            graph. With ``learned_coefficients`` they are the start.
        learned_coefficients: learn each head's weights on ``A^0 .. A^hops`` instead of fixing them, as
            GPR-GNN does for graph diffusion (Chien et al. 2021); not in the Diffuser reference.
            ``True`` (or ``"softmax"``): a softmax over ``hops + 1`` logits per head, so the operator stays
            row-stochastic. ``"free"``: the weights themselves, any sign (GPR-GNN's choice: a head can
            then subtract, e.g. ``A V - V``, a high-pass filter). Both start at ``coefficients`` or the
            kernel's; the learned weights get no weight decay. Softmax weights move slowly at the model's
            learning rate (Pathfinder-32, 18,000 steps: no weight moved by more than 0.18), so the start
            matters; ``optim.hop_lr_scale`` gives them their own rate. Runs through
            :func:`~hopformer.ops.diffuse_weighted`: one sparse attention per hop (a training step 1.9x
            one with fixed weights); edge dropout is
            then drawn per hop (``edge_dropout="per_hop"``).
        Other arguments as :class:`GraphAttention`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        hops: int = 5,
        alpha: float = 0.1,
        kernel: str = "ppr",
        heat_time: float = 1.0,
        remainder: str = "keep",
        edge_dropout: str = "once",
        hop_dropout: float = 0.0,
        pattern: str = "diffuser",
        coefficients: list[float] | None = None,
        learned_coefficients: bool | str = False,
        **options: Any,
    ) -> None:
        super().__init__(dim, heads, pattern=pattern, **options)
        check_diffusion_args(hops, alpha, kernel, heat_time, remainder)
        if edge_dropout not in EDGE_DROPOUT:
            raise ValueError(f"edge_dropout must be one of {EDGE_DROPOUT}, got {edge_dropout!r}")
        self.hops, self.edge_dropout, self.hop_dropout = (
            hops,
            edge_dropout,
            check_probability("hop_dropout", hop_dropout),
        )
        if coefficients is None:
            start = diffusion_coefficients(hops, alpha, kernel=kernel, heat_time=heat_time, remainder=remainder)
        else:
            start = check_coefficients(coefficients, hops)
        # the weights, or with learned_coefficients where they start; a tuple of floats, which torch.compile keeps
        # constant (a bare float attribute that differs between two compiled models becomes a symbolic value)
        self.fixed_coefficients = tuple(start)
        if learned_coefficients is True:
            learned_coefficients = "softmax"
        if learned_coefficients not in (False, "softmax", "free"):
            allowed = "False, True, 'softmax' or 'free'"
            raise ValueError(f"learned_coefficients must be {allowed}, got {learned_coefficients!r}")
        self.learned = learned_coefficients or None
        if self.learned and self.dropout > 0 and edge_dropout != "per_hop":
            raise ValueError(
                f"learned_coefficients draws edge dropout afresh at every hop; with dropout={self.dropout} "
                f"pass edge_dropout='per_hop' (got {edge_dropout!r}) or dropout=0"
            )
        self.hop_logits = self.hop_weights = None
        if self.learned == "softmax":
            logits = torch.tensor(start).clamp_min(1e-6).log()  # a zero weight stays movable
            self.hop_logits = nn.Parameter(logits.repeat(heads, 1))
        elif self.learned == "free":
            self.hop_weights = nn.Parameter(torch.tensor(start).repeat(heads, 1))
        self._check_backend()

    @property
    def op(self) -> str:
        return "diffuse_weighted" if self.learned else "diffuse"

    def _request_facts(self) -> dict[str, Any]:
        edge = "per_hop" if self.learned else self.edge_dropout
        facts = {"hops": self.hops, "edge_dropout": edge, "hop_dropout": self.hop_dropout > 0}
        return {**super()._request_facts(), **facts}

    def _decode_states(self) -> int:
        return self.hops if self.learned else len(mixing_weights(self.fixed_coefficients))

    def prefill(self, q, k, v, key_padding_mask, cache: GraphCache, lengths: torch.Tensor) -> torch.Tensor:
        """The prompts' outputs hop by hop (one sparse attention per hop), keeping every state a later token
        reads: the hop states ``Z_0 .. Z_{T-1}``, or with learned weights the powers ``A^k V``."""
        graph = self.graph(q.shape[2])

        def attend(z: torch.Tensor) -> torch.Tensor:
            return sparse_attention(q, k, z, graph, key_padding_mask, self.backend)

        if self.learned:
            powers = [v]
            for _ in range(self.hops):
                powers.append(attend(powers[-1]))
            weights = self.coefficients().to(v.dtype)[:, :, None, None]  # (heads, hops + 1, 1, 1)
            out = sum(weights[:, hop] * power for hop, power in enumerate(powers))
            cache.fill(k, powers[:-1], lengths)
            return out
        states, z = [v], v
        for a in mixing_weights(self.fixed_coefficients):
            z = v if a >= 1.0 else (attend(z) if a == 0.0 else torch.lerp(attend(z), v, a))
            states.append(z)
        cache.fill(k, states[:-1], lengths)
        return states[-1]

    def attend_step(self, q, k, v, cache: GraphCache, positions: torch.Tensor) -> torch.Tensor:
        if not self.learned:
            return cache.step(q, k, v, positions, mixing_weights(self.fixed_coefficients))[-1]
        powers = [v, *cache.step(q, k, v, positions, [0.0] * self.hops)]
        weights = self.coefficients().to(v.dtype)[:, :, None, None]
        return sum(weights[:, hop] * power for hop, power in enumerate(powers))

    def coefficients(self) -> torch.Tensor:
        """The weights on ``A^0 .. A^hops``, ``(heads, hops + 1)``: learned (in the parameters' dtype and
        device), or the fixed ones for every head (float64, on the CPU)."""
        if self.hop_logits is not None:
            return self.hop_logits.softmax(dim=-1)
        if self.hop_weights is not None:
            return self.hop_weights
        return torch.tensor(self.fixed_coefficients, dtype=torch.float64).repeat(self.heads, 1)

    def attend(self, q, k, v, key_padding_mask):
        graph = self.graph(q.shape[2])
        if self.learned:
            return diffuse_weighted(
                q,
                k,
                v,
                graph,
                self.coefficients(),
                key_padding_mask,
                self.backend,
                dropout_p=self._dropout_p(),
                hop_dropout_p=self.hop_dropout if self.training else 0.0,
            )
        return diffuse(
            q,
            k,
            v,
            graph,
            self.hops,
            key_padding_mask=key_padding_mask,
            backend=self.backend,
            coefficients=self.fixed_coefficients,
            dropout_p=self._dropout_p(),
            edge_dropout=self.edge_dropout,
            hop_dropout_p=self.hop_dropout if self.training else 0.0,
        )

    def extra_repr(self) -> str:
        weights = ", ".join(f"{c:.3g}" for c in self.fixed_coefficients)
        learned = f", learned_coefficients={self.learned!r}" if self.learned else ""
        return f"{super().extra_repr()}, hops={self.hops}, coefficients=[{weights}]{learned}"
