"""Rotary positions: the rotation itself, its relative-offset property, and every attention with it."""

from __future__ import annotations

import math

import pytest
import torch

from hopformer.attention import available, build
from hopformer.attention.rotary import RotaryEmbedding
from hopformer.models import SequenceClassifier, TransformerEncoder, aux_loss, from_pretrained


def test_rotation_matches_complex_multiplication():
    """Channel pairs (i, i + d/2) are complex numbers turned by p * base^(-2i/d)."""
    torch.manual_seed(0)
    d, seq = 8, 11
    q, k = torch.randn(2, 3, seq, d, dtype=torch.float64), torch.randn(2, 3, seq, d, dtype=torch.float64)
    rq, rk = RotaryEmbedding(d)(q, k)
    for x, rotated in ((q, rq), (k, rk)):
        z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
        angle = torch.arange(seq, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(d // 2) / (d // 2))
        expected = z * torch.polar(torch.ones_like(angle), angle)
        torch.testing.assert_close(rotated, torch.cat([expected.real, expected.imag], -1), rtol=0, atol=1e-6)
    assert rq.dtype == q.dtype
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation keeps lengths


def test_scores_depend_on_relative_offset_only():
    """q at m and k at n score the same as q at m + s and k at n + s."""
    torch.manual_seed(1)
    d, shift = 16, 5
    rotary = RotaryEmbedding(d)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    seq = 20
    queries = torch.zeros(1, 1, seq, d, dtype=torch.float64)
    keys = torch.zeros_like(queries)
    queries[..., :, :] = q
    keys[..., :, :] = k
    rq, rk = rotary(queries, keys)
    scores = (rq @ rk.transpose(-1, -2))[0, 0]
    for m, n in [(0, 3), (7, 2), (4, 4), (10, 14)]:
        torch.testing.assert_close(scores[m, n], scores[m + shift, n + shift])
    assert not torch.allclose(scores[0, 3], scores[0, 4])  # but it does see the offset


def test_bad_head_dim_is_refused():
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="head dim"):
        TransformerEncoder(vocab_size=10, dim=18, heads=2, positions="rope")  # head dim 9


@pytest.mark.parametrize("attention", available())
def test_every_attention_trains_with_rope(attention):
    torch.manual_seed(0)
    model = SequenceClassifier(
        TransformerEncoder(
            vocab_size=20, dim=16, depth=1, heads=2, mlp_dim=32, max_len=256, attention=attention,
            positions="rope", pad_to_multiple=128,
        ),
        num_classes=3,
    )  # fmt: skip
    assert model.encoder.positions is None and model.encoder.blocks[0].attention.rotary is not None
    ids = torch.randint(1, 20, (2, 70))
    mask = torch.arange(70)[None] < torch.tensor([[70], [45]])
    logits = model(ids, mask)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    (logits.sum() + (aux_loss(model) or 0)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_attention_module_rotates_before_its_core():
    """Full attention with rotary equals SDPA on rotated q and k (the module's own projections)."""
    torch.manual_seed(2)
    module = build("full", 16, 2).double()
    module.rotary = RotaryEmbedding(8)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    q, k, v = module.qkv(x).view(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    rq, rk = module.rotary(q, k)
    scores = rq @ rk.transpose(-1, -2) / math.sqrt(8)
    expected = module.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 16))
    torch.testing.assert_close(module(x), expected)


def test_rope_model_saves_and_loads(tmp_path):
    torch.manual_seed(3)
    model = SequenceClassifier(TransformerEncoder(vocab_size=12, dim=16, heads=2, positions="rope"), 4).eval()
    ids = torch.randint(1, 12, (2, 30))
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.encoder.blocks[0].attention.rotary is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
