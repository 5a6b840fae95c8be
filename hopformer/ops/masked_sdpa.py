"""``scaled_dot_product_attention`` with an explicit mask, kept off a kernel known to return NaN.

PyTorch 2.11's default cuDNN SDPA backward on Hopper GPUs returns NaN in ``grad_q`` when an ``attn_mask``
is passed, ``seq_len % 128 == 64`` and a row's log-sum-exp falls below about -88.7
(pytorch/pytorch#196678). Training walks into that state after some hundred steps (full attention and
Combiner diverged to NaN on LRA ListOps). With a mask, hopformer therefore lets SDPA choose among the
Flash, memory-efficient and math kernels only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_MASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)``, never on cuDNN (CUDA)."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
    with sdpa_kernel(_MASKED_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
