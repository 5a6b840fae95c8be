"""Rotary position embeddings (RoPE; Su et al., "RoFormer", 2021).

Each pair of channels ``(x[i], x[i + d/2])`` of a query or key at position ``p`` is rotated by the
angle ``p * base ** (-2i / d)`` (the "rotate half" layout of GPT-NeoX and LLaMA). A query at ``m``
and a key at ``n`` then score ``q . R(n - m) k``: attention sees relative offsets only, on every
backend, because the rotation happens before the attention core. On the Long Range Arena this
matters most: its tasks are largely local (Miralles-Gonzalez et al., "On the locality bias and
results in the Long Range Arena", 2025).

Axial 2-D rotary (``grid=True``; Heo et al., "Rotary Position Embedding for Vision Transformer", 2024)
is for a square image read in raster order, as Pathfinder and LRA Image are: token ``p`` of an
``S x S`` grid sits at row ``p // S``, column ``p % S``; the first half of the channel pairs turns by the
column, the second half by the row. Scores then see the 2-D offset ``(dr, dc)``, so a pixel and the
one above it are neighbours, not 32 tokens apart.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates ``(batch, heads, seq, head_dim)`` queries and keys by their positions ``0 .. seq - 1``.

    Args:
        head_dim: channels per head; must be even (a multiple of 4 with ``grid``).
        base: the wavelength base (10,000 as in RoFormer; 100 suits a 32-pixel side, as in Heo et al.).
        grid: axial 2-D positions on a square grid (see the module docstring); the sequence length
            must then be a perfect square.

    The angles are cached per (length, device, dtype); the rotation runs in float32 (float64 for
    float64 inputs) and returns the input dtype. No parameters: a model with rotary attention saves
    and loads as before.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, *, grid: bool = False) -> None:
        super().__init__()
        multiple = 4 if grid else 2
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % multiple:
            need = "a head_dim divisible by 4 (2-D)" if grid else "an even head_dim"
            raise ValueError(f"rotary positions need {need}, got head_dim={head_dim!r}")
        if not base > 1.0:
            raise ValueError(f"rotary base must be > 1, got {base!r}")
        self.head_dim, self.base, self.grid = head_dim, float(base), grid
        self._cache: dict[tuple, Any] = {}

    def angles(
        self, seq: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` tables, each ``(seq, head_dim)``."""
        key = (seq, str(device), dtype)
        if key not in self._cache:
            position = torch.arange(seq, dtype=torch.float64, device=device)[:, None]
            if self.grid:
                side = math.isqrt(seq)
                if side * side != seq:
                    raise ValueError(
                        f"2-D rotary positions need a square image of tokens, got a sequence of {seq} "
                        "(a CLS vector or padding adds positions: use mean pooling and pad_to_multiple=1)"
                    )
                quarter = self.head_dim // 4
                frequency = self.base ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
                angle = torch.cat([(position % side) * frequency, (position // side) * frequency], dim=-1)
            else:
                angle = position * self._frequency(device)
            angle = torch.cat([angle, angle], dim=-1)
            self._cache[key] = (angle.cos().to(dtype), angle.sin().to(dtype))
        return self._cache[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"rotary head_dim={self.head_dim}, got q {tuple(q.shape)} and k {tuple(k.shape)}")
        q_len, k_len = q.shape[-2], k.shape[-2]
        if self.grid and q_len != k_len:
            raise ValueError(f"2-D rotary positions need as many queries as keys, got {q_len} and {k_len}")
        compute = torch.promote_types(q.dtype, torch.float32)
        cos, sin = self.angles(max(q_len, k_len), q.device, compute)
        return _rotate(q, cos[:q_len], sin[:q_len]), _rotate(k, cos[:k_len], sin[:k_len])

    def _frequency(self, device: torch.device) -> torch.Tensor:
        """``base ** (-2i / head_dim)`` for the 1-D channel pairs, float64, cached per device."""
        key = ("frequency", str(device))
        if key in self._cache:
            return self._cache[key]
        half = self.head_dim // 2
        frequency = self.base ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):  # not a CUDA graph's memory
            self._cache[key] = frequency
        return frequency

    def angles_at(
        self, positions: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` rows ``(batch, head_dim)`` of the 1-D positions ``positions (batch,)``: the rows
        :meth:`angles` has for them, computed from the positions alone (no table sized by the largest position,
        which would need it on the host)."""
        if self.grid:
            raise ValueError("incremental decoding with 2-D rotary positions is not supported (positions='rope2d')")
        angle = positions.to(torch.float64)[:, None] * self._frequency(positions.device)
        angle = torch.cat([angle, angle], dim=-1)
        return angle.cos().to(dtype), angle.sin().to(dtype)

    def at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x (batch, heads, 1, head_dim)`` by each sequence's own position (``positions (batch,)``):
        one token of incremental decoding. 1-D positions only (a 2-D grid needs the whole image)."""
        cos, sin = self.angles_at(positions, torch.promote_types(x.dtype, torch.float32))
        return self.rotate_at(x, cos, sin)

    @staticmethod
    def rotate_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x (batch, heads, 1, head_dim)`` by the rows of :meth:`angles_at` (one per sequence)."""
        return _rotate(x, cos[:, None, None, :], sin[:, None, None, :])

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}" + (", grid=True" if self.grid else "")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    wide = x.to(cos.dtype)
    first, second = wide.chunk(2, dim=-1)
    turned = torch.cat([-second, first], dim=-1)  # multiplication by i in each channel pair
    return (wide * cos + turned * sin).to(x.dtype)
