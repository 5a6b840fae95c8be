"""Rotary positions: the rotation itself, its relative-offset property, and every attention with it."""

from __future__ import annotations

import math

import pytest
import torch

from hopformer.attention import available, build
from hopformer.attention.rotary import RotaryEmbedding
from hopformer.models import EncoderConfig, SequenceClassifier, TransformerEncoder, aux_loss, from_pretrained


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
        TransformerEncoder(EncoderConfig(vocab_size=10, dim=18, heads=2, positions="rope"))  # head dim 9


@pytest.mark.parametrize("attention", available())
def test_every_attention_trains_with_rope(attention):
    torch.manual_seed(0)
    model = SequenceClassifier(
        TransformerEncoder(EncoderConfig(
            vocab_size=20, dim=16, depth=1, heads=2, mlp_dim=32, max_len=256, attention=attention,
            positions="rope", pad_to_multiple=128,
        )),
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
    model = SequenceClassifier(
        TransformerEncoder(EncoderConfig(vocab_size=12, dim=16, heads=2, positions="rope")), 4
    ).eval()
    ids = torch.randint(1, 12, (2, 30))
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.encoder.blocks[0].attention.rotary is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_grid_rotation_turns_by_column_then_row():
    """2-D: pairs (i, i + d/2) turn by column * base^(-i/(d/4)) for i < d/4, by row * ... after."""
    torch.manual_seed(4)
    d, side = 8, 5
    q = torch.randn(1, 2, side * side, d, dtype=torch.float64)
    rq, _ = RotaryEmbedding(d, base=100.0, grid=True)(q, q)
    position = torch.arange(side * side, dtype=torch.float64)
    frequency = 100.0 ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    angle = torch.cat([(position % side)[:, None] * frequency, (position // side)[:, None] * frequency], -1)
    z = torch.complex(q[..., : d // 2], q[..., d // 2 :]) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(rq, torch.cat([z.real, z.imag], -1), rtol=0, atol=1e-12)


def test_grid_scores_depend_on_the_2d_offset_only():
    """On a 6 x 6 image: the same (row, column) offset scores the same anywhere; 1-D neighbours do not."""
    torch.manual_seed(5)
    d, side = 16, 6
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    queries = q.expand(1, 1, side * side, d).clone()
    keys = k.expand(1, 1, side * side, d).clone()
    rq, rk = RotaryEmbedding(d, base=100.0, grid=True)(queries, keys)
    scores = (rq @ rk.transpose(-1, -2))[0, 0]
    at = lambda row, col: row * side + col  # noqa: E731
    torch.testing.assert_close(scores[at(0, 0), at(1, 2)], scores[at(3, 3), at(4, 5)])
    torch.testing.assert_close(scores[at(2, 5), at(0, 4)], scores[at(4, 1), at(2, 0)])
    # the last pixel of row 0 and the first of row 1 are 1-D neighbours but 5 columns apart
    assert not torch.allclose(scores[at(0, 5), at(1, 0)], scores[at(2, 2), at(2, 3)])


def test_grid_needs_a_square_sequence_and_head_dim_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        RotaryEmbedding(6, grid=True)
    with pytest.raises(ValueError, match="head dim divisible by 4"):
        TransformerEncoder(EncoderConfig(vocab_size=10, dim=12, heads=2, positions="rope2d"))  # head dim 6
    rotary = RotaryEmbedding(8, grid=True)
    x = torch.randn(1, 1, 30, 8)
    with pytest.raises(ValueError, match="square image of tokens, got a sequence of 30"):
        rotary(x, x)
    with pytest.raises(ValueError, match="as many queries as keys, got 16 and 36"):
        rotary(torch.randn(1, 1, 16, 8), torch.randn(1, 1, 36, 8))
    encoder = TransformerEncoder(EncoderConfig(vocab_size=10, dim=16, heads=2, positions="rope2d", max_len=64))
    with pytest.raises(ValueError, match="pooling='cls'"):
        SequenceClassifier(encoder, 2, pooling="cls")


@pytest.mark.parametrize("attention", ["full", "bigbird", "diffuser"])
def test_rope2d_model_trains_and_is_translation_equivariant(attention):
    """rope2d on an 8 x 8 image: every attention trains with it; full attention has no absolute position
    anywhere, so its outputs move with the image."""
    torch.manual_seed(6)
    encoder = TransformerEncoder(EncoderConfig(
        vocab_size=256, dim=16, depth=2, heads=2, mlp_dim=32, max_len=64, attention=attention,
        positions="rope2d", pad_id=None, dropout=0.0,
        attention_options={} if attention == "full" else {"block_size": 16},
    ))  # fmt: skip
    model = SequenceClassifier(encoder, 2).double()
    ids = torch.randint(0, 256, (3, 64))
    logits = model(ids)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if attention == "full":
        # Only the image's own pixels are attended (the rest is masked), so moving the whole image two
        # rows down moves every output with it: rope2d sees offsets, not places.
        image = ids[:1].view(1, 8, 8).clone()
        real = torch.zeros(1, 8, 8, dtype=torch.bool)
        real[:, :6] = True
        with torch.no_grad():
            a = encoder(image.view(1, 64), real.view(1, 64)).view(8, 8, -1)
            b = encoder(torch.roll(image, 2, dims=1).view(1, 64), torch.roll(real, 2, dims=1).view(1, 64)).view(
                8, 8, -1
            )
            shifted = encoder(torch.roll(image, 1, dims=2).view(1, 64), real.view(1, 64)).view(8, 8, -1)
        torch.testing.assert_close(b[2:], a[:6])
        assert not torch.allclose(shifted[:6, 1:], a[:6, :7])  # wrapping a column around changes things
