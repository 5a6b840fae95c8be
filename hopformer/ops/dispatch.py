"""Which backend runs a call, and why: one place for ``auto`` and for the answer to "why not that one?".

Every backend declares what it can run (:class:`~hopformer.ops.backend.Support`, next to its code).
:func:`choose` reads those declarations and the measured crossovers below: it ranks the backends that
``auto`` may take for the request, then takes the first that can run it. A named backend that cannot
run a call raises a ``ValueError`` that says why and which backends would. :func:`explain` gives the
whole verdict for any call::

    >>> print(hopformer.ops.explain(q, graph, op="diffuse", hops=5))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from hopformer.graphs.tracing import trace_constant
from hopformer.ops.backend import CombinerBackend, DiffusionBackend, Request

# ---------------------------------------------------------------------------------- crossovers
# Off CUDA, diffusion of at most this many tokens runs on the materialised matrix: one CPU thread,
# batch 32 x 2 heads, fwd+bwd, it was 1.6x / 1.5x / 1.35x faster than gather at 128 / 256 / 512 tokens
# and slower from 1,024.
CPU_MATRIX_AUTO_MAX_LEN = 512
# On CUDA, where Triton cannot run, diffusion takes the matrix up to this many tokens, while one
# attention matrix takes at most MATRIX_AUTO_BYTES and 1/MATRIX_AUTO_GPU_FRACTION of the GPU (a model
# keeps one per layer for backward: a 4-layer ListOps model peaked at 15.7 GiB with 2 GiB matrices).
MATRIX_AUTO_MAX_LEN = 2048
MATRIX_AUTO_BYTES = 2 << 30
MATRIX_AUTO_GPU_FRACTION = 32
# Up to this many hops flex beats the matrix on CUDA where Triton cannot run: flex recomputes the scores
# every hop, the matrix is built once (token-level graph, bf16, fwd+bwd: flex took 0.23-0.43x the
# matrix's time at 1-2 hops, 0.82-0.84x at 5, 1.23-1.35x at 10).
FLEX_AUTO_MAX_HOPS = 5
# From this length auto runs Combiner-Fixed on FlexAttention: it trades up to twice the time for a
# third of the memory (bf16, 12 heads x 64, fwd+bwd at 64K: 12.0 against 9.2 ms, 642 against 1705 MiB),
# and memory is what long sequences run out of.
COMBINER_FLEX_MIN_LEN = 16384


@functools.cache
def diffusion_backends() -> dict[str, DiffusionBackend]:
    """The backends of ``sparse_attention``, ``diffuse`` and ``diffuse_weighted``, by name."""
    from hopformer.ops.flex import FLEX
    from hopformer.ops.gather import GATHER
    from hopformer.ops.matrix import MATRIX
    from hopformer.ops.reference import DENSE
    from hopformer.ops.triton_diffusion import TRITON

    return {backend.name: backend for backend in (DENSE, GATHER, MATRIX, FLEX, TRITON)}


@functools.cache
def combiner_backends() -> dict[str, CombinerBackend]:
    """Combiner's backends, by name."""
    from hopformer.ops.combiner_attention import EAGER
    from hopformer.ops.combiner_flex import FLEX

    return {backend.name: backend for backend in (EAGER, FLEX)}


def backends_for(op: str) -> dict[str, Any]:
    """The backends of ``op`` by name (``"auto"`` not included)."""
    return trace_constant(_backend_table, op)  # under torch.compile read as a constant, not traced


def _backend_table(op: str) -> dict[str, Any]:
    return combiner_backends() if op == "combiner" else diffusion_backends()


# ------------------------------------------------------------------------------------- ranking
def _matrix_bytes(request: Request) -> int | None:
    facts = (request.batch, request.heads, request.seq_len, request.dtype)
    if None in facts:
        return None
    return request.batch * request.heads * request.seq_len**2 * torch.empty((), dtype=request.dtype).element_size()


def auto_ranking(request: Request) -> list[tuple[str, str]]:
    """The backends ``auto`` considers for ``request``, best first, each with why it is there. Backends
    left out are ones ``auto`` never takes for such a call (see :func:`_left_out`)."""
    cuda = request.device == "cuda" and not request.exporting  # an exported program: the portable ranking
    if request.op == "combiner":
        long = request.seq_len is not None and request.seq_len >= COMBINER_FLEX_MIN_LEN
        if cuda and long and request.variant == "fixed":  # the axial forms' flex path is asked for by name
            return [("flex", f"Combiner-Fixed from {COMBINER_FLEX_MIN_LEN:,} tokens on CUDA: a third of eager's "
                     "memory"), ("eager", "every variant, any device")]  # fmt: skip
        return [("eager", "every variant, any device")]
    if not cuda:
        size = _matrix_bytes(request)
        short = (
            request.op != "sparse_attention"
            and request.seq_len is not None
            and request.seq_len <= CPU_MATRIX_AUTO_MAX_LEN
            and (size is None or size <= MATRIX_AUTO_BYTES)
            and not request.attention_dropout
        )
        where = "under torch.export" if request.exporting else "off CUDA"
        gather = ("gather", f"{where}: block tiles in pure PyTorch, memory O(seq x keys)")
        if short:
            why = f"diffusion {where} up to {CPU_MATRIX_AUTO_MAX_LEN} tokens: faster than gathering blocks"
            return [("matrix", why), gather]
        return [gather]
    if request.op == "sparse_attention":
        return [
            ("flex", "sparse attention on CUDA: compiled FlexAttention"),
            ("triton", "where FlexAttention cannot take the graph"),
        ]
    # At batch 1 and 4K tokens flex was slightly faster (0.89x, both bound by launch costs); from 16K, and in
    # whole training steps of short batched inputs, triton was.
    triton = ("triton", "diffusion on CUDA: the fastest path measured from 16K tokens and in training steps")
    low_precision = request.dtype != torch.float64
    flex_first = low_precision and request.hops <= FLEX_AUTO_MAX_HOPS
    matrix = []
    if _matrix_fits(request):
        matrix = [("matrix", f"up to {MATRIX_AUTO_MAX_LEN:,} tokens: the attention built once, every hop a product")]
    flex_why = f"recomputes the scores every hop, so it is preferred only up to {FLEX_AUTO_MAX_HOPS} hops"
    if low_precision:
        if flex_first:
            return [triton, ("flex", f"without Triton, up to {FLEX_AUTO_MAX_HOPS} hops")] + matrix
        return [triton, *matrix, ("flex", flex_why)]
    # float64: Triton multiplies float64 in registers on 16-token tiles, so the matrix goes first
    return [*matrix, ("triton", "float64 beyond the matrix's size"), ("flex", "float64 beyond the matrix's size")]


def _matrix_fits(request: Request) -> bool:
    size = _matrix_bytes(request)
    if request.seq_len is None or request.seq_len > MATRIX_AUTO_MAX_LEN or size is None:
        return False
    limit = MATRIX_AUTO_BYTES
    if request.gpu_memory is not None:
        limit = min(limit, request.gpu_memory // MATRIX_AUTO_GPU_FRACTION)
    return size <= limit


def _left_out(name: str, request: Request) -> str:
    """Why ``auto`` never considers backend ``name`` for a call like ``request``."""
    if name == "dense":
        return "the reference: auto never takes it (it materialises every score)"
    if name == "gather" and request.device == "cuda":
        return "auto takes it only off CUDA (pure PyTorch: slow on GPUs); pass backend='gather' to use it"
    if name == "matrix":
        size = _matrix_bytes(request)
        if request.device == "cuda":
            limit = MATRIX_AUTO_BYTES
            if request.gpu_memory is not None:
                limit = min(limit, request.gpu_memory // MATRIX_AUTO_GPU_FRACTION)
            need = "" if size is None else f" (this one: {size / 2**30:.3g} GiB)"
            return (
                f"auto takes it on CUDA up to {MATRIX_AUTO_MAX_LEN:,} tokens and {limit / 2**30:.3g} GiB per "
                f"attention matrix{need}"
            )
        if request.op == "sparse_attention":
            return "auto takes it off CUDA for diffusion only"
        return f"auto takes it off CUDA up to {CPU_MATRIX_AUTO_MAX_LEN} tokens without attention dropout"
    if name in ("flex", "triton") and request.device != "cuda":
        return "auto takes it on CUDA only"
    if name == "flex" and request.op == "combiner":
        return f"auto takes it for Combiner-Fixed on CUDA from {COMBINER_FLEX_MIN_LEN:,} tokens"
    return "auto does not take it for this call"


# -------------------------------------------------------------------------------------- choices
@dataclass
class Explanation:
    """What :func:`explain` returns: the backend that runs the call and a verdict on every other one.

    ``chosen`` is None when nothing can run the call (``verdicts`` then say why). ``reasons`` holds,
    per backend, what stops it running this call (empty: it can).
    """

    request: Request
    backend: str  # what was asked: "auto" or a name
    chosen: str | None
    why: str
    reasons: dict[str, list[str]] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [self.request.describe()]
        if self.chosen is None:
            lines.append(f"backend={self.backend!r} cannot run it: {self.why}")
        else:
            lines.append(f"{'auto picks' if self.backend == 'auto' else 'runs on'} {self.chosen}: {self.why}")
        others = [name for name in self.verdicts if name != self.chosen]
        width = max((len(name) for name in others), default=0)
        lines += [f"  {name:<{width}}  {self.verdicts[name]}" for name in others]
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython prints it readably too
        printer.text(str(self))


def explain_request(request: Request, backend: str = "auto") -> Explanation:
    """The verdict of every backend of ``request.op`` on ``request``; ``backend`` is what the caller asked."""
    table = backends_for(request.op)
    if backend != "auto" and backend not in table:
        raise ValueError(f"backend={backend!r} is not known for {request.op}; choose one of {['auto', *table]}")
    reasons = {name: runner.support.reasons(request) for name, runner in table.items()}
    ranking = auto_ranking(request)
    ranked = dict(ranking)
    if backend != "auto":
        chosen = None if reasons[backend] else backend
        why = "; ".join(reasons[backend]) if reasons[backend] else table[backend].summary
    else:
        chosen = next((name for name, _ in ranking if not reasons[name]), None)
        if chosen is not None:
            why = ranked[chosen]
        else:
            why = "; ".join(f"{name} {', '.join(reasons[name])}" for name, _ in ranking)
    verdicts = {}
    for name in table:
        if name == chosen:
            verdicts[name] = "chosen"
        elif reasons[name]:
            verdicts[name] = "cannot: " + "; ".join(reasons[name])
        elif backend != "auto":
            verdicts[name] = f"could: {table[name].summary}"
        elif name in ranked:
            first = f"auto ranks {chosen} first" if chosen is not None else "auto ranks it"
            verdicts[name] = f"could; {first} (this one: {ranked[name]})"
        else:
            verdicts[name] = f"could; {_left_out(name, request)}"
    return Explanation(request, backend, chosen, why, reasons, verdicts)


def choose(request: Request, backend: str = "auto") -> Any:
    """The backend object that runs ``request``: ``auto``'s choice, or the named one if it can run it.

    Raises ``ValueError`` naming what stops it and the backends that would run the call.
    """
    verdict = explain_request(request, backend)
    if verdict.chosen is not None:
        return backends_for(request.op)[verdict.chosen]
    able = [name for name, found in verdict.reasons.items() if not found]
    alternatives = f"backend={able[0]!r} can" if len(able) == 1 else f"these can: {', '.join(map(repr, able))}"
    if not able:
        alternatives = "no backend can"
    if backend == "auto":
        raise ValueError(f"backend='auto' has no fast backend for {request.describe()} ({verdict.why}); {alternatives}")
    raise ValueError(f"backend={backend!r} cannot run {request.describe()}: {verdict.why}; {alternatives}")


def check_backend_name(op: str, backend: object) -> None:
    """``backend`` must be ``"auto"`` or a backend of ``op``: checked where a module is built."""
    names = ["auto", *backends_for(op)]
    if backend not in names:
        raise ValueError(f"backend={backend!r} is not known for {op}; choose one of {names}")


def combiner_backend(request: Request, backend: str = "auto") -> CombinerBackend:
    """:func:`choose` for Combiner."""
    return choose(request, backend)


def can_run(backend: str, request: Request) -> bool:
    """Whether the named backend of ``request.op`` can run ``request``."""
    return not backends_for(request.op)[backend].support.reasons(request)


def runs_on(backend: str, device: str) -> bool:
    """Whether the named backend of sparse attention and diffusion runs on ``device`` at all."""
    return device in diffusion_backends()[backend].support.devices


def explain(q: torch.Tensor, graph: Any = None, op: str = "diffuse", **call_options: Any) -> Explanation:
    """Which backend runs ``op`` for inputs like ``q`` (and ``graph``), and why each other backend does not.

    ``call_options`` are the op's own keyword arguments as you would pass them (``backend``, ``hops``,
    ``dropout_p``, ``edge_dropout``, ``hop_dropout_p``, ``coefficients``, ``weights``, ``v``, ``variant``;
    anything else, such as ``k`` or ``key_padding_mask``, does not change the choice and is ignored).
    ``op``: ``"sparse_attention"``, ``"diffuse"``, ``"diffuse_weighted"`` or ``"combiner"``. The result
    prints as a short report; its fields (``chosen``, ``reasons``, ``verdicts``) are there for programs.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-d (batch, heads, seq, head_dim) tensor, got {type(q).__name__}")
    if op not in ("sparse_attention", "diffuse", "diffuse_weighted", "combiner"):
        raise ValueError(f"op must be 'sparse_attention', 'diffuse', 'diffuse_weighted' or 'combiner', got {op!r}")
    if op != "combiner" and graph is None:
        raise ValueError(f"op={op!r} runs on a graph: pass graph=")
    options = dict(call_options)
    backend = options.pop("backend", "auto")
    dropout = options.get("dropout_p", 0.0) > 0
    facts: dict[str, Any] = {"attention_dropout": dropout}
    if op == "diffuse":
        coefficients = options.get("coefficients")
        facts["hops"] = len(coefficients) - 1 if coefficients is not None else options.get("hops", 5)
        facts["edge_dropout"] = options.get("edge_dropout", "once")
    if op == "diffuse_weighted":
        weights = options.get("weights")
        facts["hops"] = weights.shape[-1] - 1 if weights is not None else options.get("hops", 5)
        facts["edge_dropout"] = "per_hop"
    if op in ("diffuse", "diffuse_weighted"):
        facts["hop_dropout"] = options.get("hop_dropout_p", 0.0) > 0
    if op == "combiner":
        facts["variant"] = options.get("variant", "fixed")
        graph = None
    return explain_request(Request.of(op, q, options.get("v"), graph, **facts), backend)
