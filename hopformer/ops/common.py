"""Pieces every op and backend shares, each written once: input checks, the masked softmax, sequence
padding and the diffusion hop loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from hopformer.checks import InputTypeError
from hopformer.graphs.tracing import eager_constants  # noqa: F401 (where callers import it from)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------ checks
def describe_shape(x: object) -> object:
    """A tensor's shape, or the type name of anything else (for error messages)."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def check_qkv(q: object, k: object, v: object) -> None:
    """q, k, v must be ``(batch, heads, seq, head_dim)`` floating-point tensors of one dtype and device;
    q and k share a shape, v may have its own last dimension."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d (batch, heads, seq, head_dim) tensor, got {describe_shape(x)}")
        if x.dtype not in FLOAT_DTYPES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
            raise InputTypeError(f"{name} must be a floating-point tensor ({allowed}), got dtype {x.dtype}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "q, k, v must agree on (batch, heads, seq) and q, k on head_dim; got "
            f"q {describe_shape(q)}, k {describe_shape(k)}, v {describe_shape(v)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise InputTypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")


def check_key_padding_mask(key_padding_mask: object, q: torch.Tensor) -> None:
    """None, or a bool ``(batch, seq)`` tensor on q's device (True = real token)."""
    if key_padding_mask is None:
        return
    batch, _, seq, _ = q.shape
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        kind = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
        raise InputTypeError(f"key_padding_mask must be a bool tensor (True = real token), got {kind}")
    if key_padding_mask.shape != (batch, seq):
        raise ValueError(
            f"key_padding_mask must have shape (batch, seq) = {(batch, seq)}, got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


# ------------------------------------------------------------------------------------ arithmetic
def masked_softmax(
    scores: torch.Tensor,
    allowed: torch.Tensor,
    dim: int | tuple[int, ...] = -1,
    *,
    inplace: bool = False,
    empty_rows: str = "zero",
) -> torch.Tensor:
    """Softmax of ``scores`` over ``dim`` on the ``allowed`` entries; the others get exactly 0.

    The mask fills with the most negative finite value, not -inf, so nothing turns NaN. A row with nothing
    allowed is all zeros (``empty_rows="zero"``) or, where the caller discards such rows anyway, left
    uniform (``"any"``: saves a pass and, under autograd, a saved tensor). ``inplace`` fills ``scores``
    itself (a fresh tensor that autograd does not need) and may reduce several dims at once (then without
    autograd); otherwise the mask is applied to a copy. A single ``dim`` goes through PyTorch's softmax
    (float32 statistics for 16-bit inputs).
    """
    masked = ~allowed
    lowest = torch.finfo(scores.dtype).min
    if not inplace:
        probs = scores.masked_fill(masked, lowest).softmax(dim)
        return probs.masked_fill(masked, 0.0) if empty_rows == "zero" else probs
    scores.masked_fill_(masked, lowest)
    if isinstance(dim, int):
        probs = torch.softmax(scores, dim)
    else:
        probs = scores.sub_(scores.amax(dim=dim, keepdim=True)).exp_()
        probs.div_(probs.sum(dim=dim, keepdim=True))
    return probs.masked_fill_(masked, 0.0) if empty_rows == "zero" else probs


def pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the sequence axis (dim 2) of ``x`` up to ``length``; ``x`` itself when it is long enough."""
    return F.pad(x, (0, 0, 0, length - x.shape[2])) if length > x.shape[2] else x


def token_mask(graph, key_padding_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``(batch or 1, 1, seq, seq)`` bool: the graph's edges to real keys. The graph's token mask is cached
    on the graph. Padded queries keep their edges: callers zero their outputs, and as keys they are
    masked, so they never reach a real token."""
    allowed = graph.view(_dense_mask, str(device))[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


def _dense_mask(graph, device: str) -> torch.Tensor:
    return graph.to_dense(device)


def zero_padded_queries(z: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Outputs at padded query positions are zero (the convention of every op)."""
    return z if key_padding_mask is None else z * key_padding_mask[:, None, :, None].to(z.dtype)


def diffusion_steps(
    attend: Callable[[torch.Tensor, int], torch.Tensor],
    v: torch.Tensor,
    steps: Sequence[float],
    hop_dropout: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """The hop loop of every diffusion: yields ``z_1 .. z_T`` of ``z_0 = v``,
    ``z_t = hop_dropout((1 - a_t) attend(z_{t-1}, t) + a_t v, t)`` for ``a_t`` in ``steps``
    (:func:`~hopformer.ops.coefficients.mixing_weights`). ``a_t = 1`` resets the state to ``v`` without
    attending (the last step of a renormalised kernel). Lazy: a caller that already knows a state may stop
    before it is computed."""
    z = v
    for t, a in enumerate(steps):
        if a >= 1.0:
            z = v
        elif a == 0.0:
            z = attend(z, t)  # exactly lerp(A z, v, 0), without its copy (sparse attention is one such step)
        else:
            z = torch.lerp(attend(z, t), v, a)
        if hop_dropout is not None:
            z = hop_dropout(z, t)
        yield z


def run_diffusion(
    attend: Callable[[torch.Tensor, int], torch.Tensor],
    v: torch.Tensor,
    steps: Sequence[float],
    hop_dropout_p: float = 0.0,
) -> torch.Tensor:
    """The final state of :func:`diffusion_steps`, with feature dropout ``hop_dropout_p`` on every state."""
    dropout = (lambda z, _: F.dropout(z, hop_dropout_p)) if hop_dropout_p > 0 else None
    z = v
    for z in diffusion_steps(attend, v, steps, dropout):  # noqa: B007 (the last state is the result)
        pass
    return z
