"""The shared shape of every attention module, and full (dense) attention.

An attention module maps ``(batch, seq, dim) -> (batch, seq, dim)`` with
``forward(x, attention_mask=None)``; ``attention_mask`` is HF-style (1 / True = real token).
Subclasses implement :meth:`AttentionModule.attend` on ``(batch, heads, seq, head_dim)`` tensors
with a boolean ``key_padding_mask`` (True = real token), the convention of :mod:`hopformer.ops`.

Positions: when ``self.rotary`` holds a :class:`~hopformer.attention.rotary.RotaryEmbedding`, queries
and keys are rotated by their positions before ``attend`` (RoPE), whatever the core; the encoder sets
it for ``positions="rope"``.

Auxiliary losses (routing's commitment loss) are left in ``self.aux_loss`` by ``forward``; the
trainer adds every module's ``aux_loss`` to the task loss (see ``hopformer.models.aux_loss``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hopformer.attention.decoding import KVCache
from hopformer.attention.registry import register
from hopformer.attention.rotary import RotaryEmbedding
from hopformer.checks import InputTypeError, check_int, check_probability
from hopformer.ops import dispatch
from hopformer.ops.backend import Request
from hopformer.ops.dispatch import Explanation
from hopformer.ops.masked_sdpa import masked_sdpa


def key_padding_mask(attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """HF-style ``attention_mask`` (1 = real) -> bool ``(batch, seq)``, or None when nothing is padded."""
    if attention_mask is None:
        return None
    batch, seq = x.shape[:2]
    if attention_mask.shape != (batch, seq):
        raise ValueError(
            f"attention_mask must have shape (batch, seq) = {(batch, seq)}, got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    if torch.compiler.is_compiling():  # no branch on the mask's values in a compiled or exported program: an
        return mask  # all-True mask gives the outputs None gives
    return None if bool(mask.all()) else mask


def check_input_like(x: torch.Tensor, weight: torch.Tensor) -> None:
    """A module's input must be a floating-point tensor on its weights' device and, outside autocast, in their
    dtype (as ``nn.Linear`` requires, but said at the door): float64 input to float32 weights is an
    :class:`~hopformer.checks.InputTypeError` naming both dtypes. Under ``torch.autocast`` float16, bfloat16 and
    float32 pass: autocast casts them, as it does for PyTorch's own modules (it leaves float64 alone)."""
    if not x.is_floating_point():
        raise InputTypeError(
            f"x must be a floating-point tensor (the module's weights are {weight.dtype}), got {x.dtype}"
        )
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the module's weights are on {weight.device}; move one to the other")
    autocast = torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype != weight.dtype and not autocast:
        raise InputTypeError(
            f"x has dtype {x.dtype} but the module's weights are {weight.dtype}: convert one (x.to({weight.dtype}) or "
            f"module.to({x.dtype})), or run under torch.autocast (which casts float16, bfloat16 and float32)"
        )


class AttentionModule(nn.Module):
    """Q/K/V and output projections around an ``attend(q, k, v, key_padding_mask)`` core.

    Args:
        dim: model width; must be divisible by ``heads``.
        heads: number of attention heads.
        dropout: attention-probability dropout (where the core supports it).
        bias: whether the projections have biases.
    """

    def __init__(self, dim: int, heads: int, *, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        check_int("dim", dim, 1)
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or dim % heads:
            raise ValueError(f"heads must be a positive integer dividing dim={dim}, got {heads!r}")
        check_probability("dropout", dropout)
        self.dim, self.heads, self.head_dim, self.dropout = dim, heads, dim // heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)
        self.aux_loss: torch.Tensor | None = None
        self.rotary: RotaryEmbedding | None = None  # set to rotate q and k by position (RoPE)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``(batch, seq, dim) -> (batch, seq, dim)``; with ``cache`` (from :meth:`new_cache`) the same outputs,
        and the cache filled for decoding the tokens after these prompts (right-padded by ``attention_mask``)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, seq, {self.dim}), got {tuple(x.shape)}")
        check_input_like(x, self.qkv.weight)
        padding = key_padding_mask(attention_mask, x)
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        if cache is None:
            y = self.attend(q, k, v, padding)
        else:
            lengths = torch.full((batch,), seq, device=x.device) if padding is None else padding.sum(1)
            y = self.prefill(q, k, v, padding, cache, lengths)
        return self.out(y.transpose(1, 2).reshape(batch, seq, self.dim))

    def step(self, x: torch.Tensor, cache: Any, positions: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, ``x (batch, 1, dim)`` at ``positions (batch,)``, against the cache of
        everything before it (:mod:`hopformer.attention.decoding`); the cache takes the new token in."""
        batch = x.shape[0]
        q, k, v = self.qkv(x).view(batch, 1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            cos, sin = self.rotary.angles_at(positions, torch.promote_types(q.dtype, torch.float32))
            q, k = self.rotary.rotate_at(q, cos, sin), self.rotary.rotate_at(k, cos, sin)
        y = self.attend_step(q, k, v, cache, positions)
        return self.out(y.transpose(1, 2).reshape(batch, 1, self.dim))

    def new_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> Any:
        """An empty decoding cache for ``batch`` sequences of up to ``max_len`` tokens (causal modules only)."""
        raise NotImplementedError(f"{type(self).__name__} has no decoding cache")

    def prefill(self, q, k, v, key_padding_mask, cache: Any, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no decoding cache")

    def attend_step(self, q, k, v, cache: Any, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no decoding cache")

    def _check_decoding(self) -> None:
        if not getattr(self, "causal", False):
            name = type(self).__name__
            raise ValueError(f"{name} decodes incrementally only when causal (build it with causal=True)")

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    # Modules that run an op of hopformer.ops with a choice of backends set these two.
    op: str | None = None
    backend: str = "auto"

    def request(self, seq_len: int | None = None, device: str | None = None, dtype=None, batch: int = 1) -> Request:
        """What this module asks of the backends of :attr:`op` in training; facts left None are unknown."""
        return Request(
            self.op,
            device=device,
            dtype=dtype,
            batch=batch if seq_len is not None else None,
            heads=self.heads,
            seq_len=seq_len,
            head_dim=self.head_dim,
            value_dim=self.head_dim,
            attention_dropout=self.dropout > 0,
            **self._request_facts(),
        )

    def _request_facts(self) -> dict[str, Any]:
        return {}

    def _check_backend(self) -> None:
        """A named backend that cannot run this module fails when the module is built, whatever the device."""
        if self.backend != "auto":
            dispatch.choose(self.request(), self.backend)

    def explain(
        self, seq_len: int, device: str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 1
    ) -> Explanation | None:
        """Which backend runs this attention in training on ``(batch, seq_len)`` inputs on ``device`` in
        ``dtype``, and why not the others; None for attentions without a choice of backends."""
        if self.op is None:
            return None
        return dispatch.explain_request(self.request(seq_len, device, dtype, batch), self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dropout={self.dropout}"


@register("full")
class FullAttention(AttentionModule):
    """Dense softmax attention through ``scaled_dot_product_attention`` (cuDNN / Flash on GPU).

    Args:
        causal: attend only to keys at or before the query.
    """

    def __init__(self, dim: int, heads: int, *, dropout: float = 0.0, causal: bool = False, bias: bool = True):
        super().__init__(dim, heads, dropout=dropout, bias=bias)
        self.causal = causal

    def new_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        self._check_decoding()
        return KVCache.new(batch, self.heads, self.head_dim, max_len, device, dtype)

    def prefill(self, q, k, v, key_padding_mask, cache: KVCache, lengths: torch.Tensor) -> torch.Tensor:
        cache.fill(k, v)
        return self.attend(q, k, v, key_padding_mask)

    def attend_step(self, q, k, v, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        return cache.step(q, k, v, positions)

    def attend(self, q, k, v, key_padding_mask):
        dropout = self.dropout if self.training else 0.0
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        # A sequence with no real token would make every row -inf; let it attend to all, then zero it.
        has_real = key_padding_mask.any(dim=1)
        keys = key_padding_mask | ~has_real[:, None]
        mask = keys[:, None, None, :]
        if self.causal:
            seq = q.shape[-2]
            mask = mask & torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
        out = masked_sdpa(q, k, v, mask, dropout_p=dropout)
        return out * (key_padding_mask & has_real[:, None])[:, None, :, None].to(out.dtype)


def use_portable_backends(model: nn.Module, exporting: bool = False) -> set[str]:
    """Set every attention layer of ``model`` whose backend runs on CUDA only (``flex``, ``triton``) to
    ``"auto"``, which computes the same attention on any device; returns the backends replaced. For
    evaluating or analysing a checkpoint trained on a GPU with an explicit backend on a CPU. ``exporting``:
    also replace the backends ``torch.export`` cannot trace (compiled kernels, wherever they run)."""
    from hopformer.ops import dispatch

    replaced = set()
    for module in model.modules():
        backend = getattr(module, "backend", "auto")
        if isinstance(module, AttentionModule) and backend != "auto":
            support = dispatch.backends_for(module.op)[backend].support
            if "cpu" not in support.devices or (exporting and not support.exportable):
                replaced.add(backend)
                module.backend = "auto"
    return replaced
