"""masked_sdpa: the same answer as SDPA, and no NaN gradient in the case of pytorch/pytorch#196678."""

import pytest
import torch
import torch.nn.functional as F

from hopformer.ops.masked_sdpa import masked_sdpa


def test_matches_sdpa_on_cpu():
    q, k, v = (torch.randn(2, 3, 37, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 37, 37) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(masked_sdpa(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masked_gradients_stay_finite_when_every_score_is_very_negative():
    # seq % 128 == 64, an explicit mask, and row log-sum-exp far below -88.7: cuDNN's backward gave NaN dq
    seq, dim = 704, 64
    direction = torch.randn(dim, device="cuda")
    q = (4 * direction).expand(1, 2, seq, dim).to(torch.bfloat16).requires_grad_()
    k = (-4 * direction).expand(1, 2, seq, dim).to(torch.bfloat16).requires_grad_()
    v = torch.randn(1, 2, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool, device="cuda")
    out = masked_sdpa(q, k, v, mask)
    out.float().square().sum().backward()
    for name, tensor in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(tensor).all(), name
