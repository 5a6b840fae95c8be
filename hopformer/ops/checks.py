"""Input checks shared by every op, so a bad call fails at the door with the argument named."""

from __future__ import annotations

import torch


def describe_shape(x: object) -> object:
    """A tensor's shape, or the type name of anything else (for error messages)."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def check_qkv(q: object, k: object, v: object) -> None:
    """q, k, v must be ``(batch, heads, seq, head_dim)`` tensors; q and k share a shape, v may have
    its own last dimension."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d (batch, heads, seq, head_dim) tensor, got {describe_shape(x)}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "q, k, v must agree on (batch, heads, seq) and q, k on head_dim; got "
            f"q {describe_shape(q)}, k {describe_shape(k)}, v {describe_shape(v)}"
        )
