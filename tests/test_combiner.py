"""Combiner: fast path against the dense reference P, the spec's invariants, and the module."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

import hopformer.ops.combiner_attention as combiner_attention
import hopformer.ops.combiner_flex as combiner_flex
from hopformer.attention import build
from hopformer.ops.combiner_attention import _exclusive_max, _region_summaries, combiner, grouped_attention
from hopformer.ops.combiner_flex import AXIAL_FORMS, SUMMARY_GROUP, _fixed_tile_codes, _group_tile_codes
from hopformer.ops.reference import combiner_partition, combiner_reference

CAUSAL = [False, True]
# (variant, seq, block_size): lengths that are not multiples of the block, and ones that are.
CASES = [
    ("fixed", 13, 4),
    ("fixed", 16, 4),
    ("logsparse", 13, 2),
    ("logsparse", 11, 3),
    ("axial", 13, 4),
    ("axial_horizontal", 11, 3),
    ("mixture", 13, 4),
    # whole grids, more rows than columns and fewer (unpadded, bidirectional: no mask tensor), one row, one column
    ("axial", 24, 4),
    ("axial_horizontal", 20, 5),
    ("mixture", 18, 3),
    ("axial", 5, 5),
    ("mixture", 6, 1),
]
VARIANTS = ["fixed", "logsparse", "axial", "axial_horizontal", "mixture"]


def _inputs(seq, batch=3, heads=2, dim=5, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g, dtype=torch.float64) for _ in range(3))
    return [x.requires_grad_(grad) for x in (q, k, v)]


def _padding(batch, seq, block):
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, -3:] = False  # trailing padding
    mask[1, 1] = False
    mask[1, block : 2 * block] = False  # a whole block / row padded: an empty region
    if batch > 2:
        mask[2] = False  # a fully padded sequence
    return mask


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("variant,seq,block", CASES)
def test_matches_dense_reference_forward_and_gradients(variant, seq, block, causal, padded):
    q, k, v = _inputs(seq, grad=True, seed=seq + block)
    mask = _padding(3, seq, block) if padded else None
    out = combiner(q, k, v, variant, block, causal, mask)
    ref, _ = combiner_reference(q, k, v, variant, block, causal, mask)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(out)
    fast = torch.autograd.grad(out, (q, k, v), upstream)
    slow = torch.autograd.grad(ref, (q, k, v), upstream)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    if padded:
        assert out[2].abs().max() == 0  # fully padded sequence: zeros, not NaN
        assert out[0, :, -3:].abs().max() == 0


@pytest.mark.parametrize("variant,causal", [("fixed", True), ("logsparse", False), ("mixture", True)])
def test_gradcheck_tiny(variant, causal):
    q, k, v = _inputs(7, batch=1, heads=1, dim=3, seed=1, grad=True)
    mask = torch.tensor([[True, True, True, False, True, True, True]])
    fn = lambda q, k, v: combiner(q, k, v, variant, 2, causal, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("variant,seq,block", CASES)
def test_full_support_rows_sum_to_one(variant, seq, block, causal):
    q, k, v = _inputs(seq, seed=3)
    mask = _padding(3, seq, block)
    _, p = combiner_reference(q, k, v, variant, block, causal, mask)
    i = torch.arange(seq)
    support = mask[:, None, None, :] & mask[:, None, :, None]  # real query, real key
    if causal:
        support = support & (i[None, :] <= i[:, None])
    support = support.expand_as(p)
    assert (p[support] > 0).all(), "every allowed key gets positive weight"
    assert (p[~support] == 0).all(), "no weight outside the support (causal: none on j > i)"
    sums = p.sum(-1)
    real_rows = mask[:, None, :].expand_as(sums)
    torch.testing.assert_close(sums[real_rows], torch.ones_like(sums[real_rows]))
    assert (sums[~real_rows] == 0).all()


def test_partition_is_disjoint_and_covers_the_support():
    for variant, seq, block in CASES:
        for causal in CAUSAL:
            for plan in combiner_partition(variant, seq, block, causal):
                n = len(plan)
                for i, (direct, regions) in enumerate(plan):
                    members = direct + [j for region in regions for j in region]
                    assert len(members) == len(set(members)), (variant, causal, i)  # no double count
                    assert set(members) == set(range(i + 1 if causal else n)), (variant, causal, i)
                    assert i in direct


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("variant", ["fixed", "logsparse", "axial_vertical", "axial_horizontal"])
def test_region_blocks_have_rank_one(variant, causal):
    seq, block = 16, 4
    q, k, v = _inputs(seq, batch=1, heads=2, seed=4)
    _, p = combiner_reference(q, k, v, variant, block, causal)
    users: dict[tuple[int, ...], list[int]] = {}
    for i, (_, regions) in enumerate(combiner_partition(variant, seq, block, causal)[0]):
        for region in regions:
            users.setdefault(tuple(region), []).append(i)
    checked = 0
    for region, queries in users.items():
        if len(region) < 2 or len(queries) < 2:
            continue
        for h in range(2):
            sigma = torch.linalg.svdvals(p[0, h][queries][:, list(region)])
            assert sigma[1] / sigma[0] < 1e-5, (region, queries)
            checked += 1
    assert checked > 0


def test_mixture_is_the_average_of_two_separately_normalised_plans():
    q, k, v = _inputs(13, seed=5)
    mask = _padding(3, 13, 4)
    for causal in CAUSAL:
        mix = combiner(q, k, v, "mixture", 4, causal, mask)
        vertical = combiner(q, k, v, "axial_vertical", 4, causal, mask)
        horizontal = combiner(q, k, v, "axial_horizontal", 4, causal, mask)
        torch.testing.assert_close(mix, (vertical + horizontal) / 2)
        _, p_mix = combiner_reference(q, k, v, "mixture", 4, causal, mask)
        _, p_v = combiner_reference(q, k, v, "axial_vertical", 4, causal, mask)
        _, p_h = combiner_reference(q, k, v, "axial_horizontal", 4, causal, mask)
        torch.testing.assert_close(p_mix, (p_v + p_h) / 2)
        for p in (p_v, p_h):  # each component sums to 1 on its own
            sums = p.sum(-1)[mask[:, None].expand(-1, 2, -1)]
            torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("causal", CAUSAL)
def test_single_token_regions_give_full_attention(causal):
    q, k, v = _inputs(11, seed=6)
    mask = _padding(2, 11, 1)[:2]
    q, k, v = q[:2], k[:2], v[:2]
    out = combiner(q, k, v, "fixed", 1, causal, mask)
    allowed = mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(11, 11, dtype=torch.bool).tril()
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed) * mask[:, None, :, None]
    torch.testing.assert_close(out, full)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_has_no_future_gradient(variant):
    seq = 13
    q, k, v = _inputs(seq, batch=1, seed=7, grad=True)
    out = combiner(q, k, v, variant, 3, True)
    for i in range(seq):
        grads = torch.autograd.grad(out[:, :, i].sum(), (q, k, v), retain_graph=True)
        for name, g in zip("qkv", grads):
            assert (g[:, :, i + 1 :] == 0).all(), f"d out_{i} / d {name}_j != 0 for some j > {i}"


def test_bad_configuration_raises_value_error_naming_the_argument():
    q, k, v = _inputs(8, batch=1)
    with pytest.raises(ValueError, match="variant"):
        combiner(q, k, v, "nope", 2)
    for bad in (0, -1, 9, 2.5):
        with pytest.raises(ValueError, match="block_size"):
            combiner(q, k, v, "fixed", bad)
    with pytest.raises(ValueError, match="key_padding_mask"):
        combiner(q, k, v, "fixed", 2, key_padding_mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match="variant"):
        build("combiner", 16, 2, variant="nope")
    with pytest.raises(ValueError, match="block_size"):
        build("combiner", 16, 2, block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        build("combiner", 16, 2, block_size=16)(torch.randn(1, 8, 16))


def test_default_block_size_any_length():
    for seq in (1, 2, 5, 30):
        q, k, v = _inputs(seq, batch=1, seed=seq)
        for variant in VARIANTS:
            ref, _ = combiner_reference(q, k, v, variant)
            torch.testing.assert_close(combiner(q, k, v, variant), ref)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("variant", VARIANTS)
def test_module_shapes_and_padding_invariance(variant, causal):
    torch.manual_seed(0)
    module = build("combiner", 16, 2, variant=variant, block_size=3, causal=causal).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    attention_mask = torch.ones(2, 10)
    attention_mask[1, 7:] = 0
    y = module(x, attention_mask)
    assert y.shape == x.shape
    # Extra padded tokens (random content) change nothing on the real tokens.
    longer = torch.cat([x, torch.randn(2, 5, 16, dtype=torch.float64)], dim=1)
    longer_mask = torch.cat([attention_mask, torch.zeros(2, 5)], dim=1)
    y_long = module(longer, longer_mask)
    torch.testing.assert_close(y_long[0, :10], y[0])
    torch.testing.assert_close(y_long[1, :7], y[1, :7])


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq,block", [(16, 2), (24, 3), (10, 2)])
def test_logsparse_without_mask_matches_all_real_mask_and_reference(seq, block, causal):
    """Logsparse masks nothing when every token is real (no mask, a power-of-two block count); a mask of
    all True, and a length whose block count is no power of two (10 = 5 blocks of 2), take the masked path."""
    q, k, v = _inputs(seq, grad=True, seed=seq)
    ones = torch.ones(3, seq, dtype=torch.bool)
    plain = combiner(q, k, v, "logsparse", block, causal)
    masked = combiner(q, k, v, "logsparse", block, causal, ones)
    ref, _ = combiner_reference(q, k, v, "logsparse", block, causal)
    torch.testing.assert_close(plain, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(masked, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(ref)
    slow = torch.autograd.grad(ref, (q, k, v), upstream)
    for out in (plain, masked):
        for a, b in zip(torch.autograd.grad(out, (q, k, v), upstream), slow):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("tile_blocks", [1, 2, 4])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seq,block", [(37, 2), (40, 4), (21, 3)])
def test_logsparse_tiles_match_reference(seq, block, causal, padded, tile_blocks, monkeypatch):
    """Tiles of 1, 2 and 4 blocks: every level above the tile (summaries by matmul, the same for a whole tile),
    then one and two levels inside it (summaries by masked attention on the tile's tokens), beside the dense
    reference, outputs and gradients."""
    monkeypatch.setattr(combiner_attention, "LOGSPARSE_TILE", tile_blocks * block)
    q, k, v = _inputs(seq, grad=True, seed=seq + block)
    mask = _padding(3, seq, block) if padded else None
    out = combiner(q, k, v, "logsparse", block, causal, mask)
    ref, _ = combiner_reference(q, k, v, "logsparse", block, causal, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), upstream), torch.autograd.grad(ref, (q, k, v), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", CAUSAL)
def test_logsparse_gradcheck_padded_non_power_of_two_blocks(causal):
    """11 tokens in blocks of 2: 6 blocks (a tree of 8), an odd length, a padded token and a padded block."""
    q, k, v = _inputs(11, batch=2, heads=1, dim=3, seed=2, grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 4] = False
    mask[1, 6:8] = False
    fn = lambda q, k, v: combiner(q, k, v, "logsparse", 2, causal, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# --------------------------------------------------------------------------------------------
# Combiner-Fixed on FlexAttention (CUDA)


def test_region_summaries_without_padding_match_all_real():
    q, k, v = _inputs(24, seed=5)
    view = lambda x: x.view(3, 2, 4, 6, 5)  # noqa: E731
    real = torch.ones(3, 1, 4, 6, dtype=torch.bool)
    plain = _region_summaries(view(q), view(k), view(v), None, 0.5)
    masked = _region_summaries(view(q), view(k), view(v), real, 0.5)
    torch.testing.assert_close(plain[0], masked[0])
    torch.testing.assert_close(plain[1], masked[1])
    assert plain[2] is None and masked[2].all()


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("block,token_tiles", [(48, 5), (128, 4), (256, 6), (64, 3)])
def test_fixed_flex_tile_codes_cover_the_direct_mask(block, token_tiles, causal):
    """Tiles marked 0 hold no allowed (query, token key) pair; tiles marked 2 hold only allowed ones."""
    codes = _fixed_tile_codes(token_tiles, 2, 3, block, causal, full=True)
    assert codes.shape == (token_tiles, token_tiles + 6)
    # each query tile reads the 2 summary tiles of its own copy (SUMMARY_GROUP query tiles per copy)
    own = torch.arange(token_tiles) // SUMMARY_GROUP
    for tile in range(token_tiles):
        expected = torch.zeros(6, dtype=torch.int8)
        expected[2 * own[tile] : 2 * own[tile] + 2] = 1
        assert torch.equal(codes[tile, token_tiles:], expected)
    i = torch.arange(token_tiles * 128)
    allowed = (i[:, None] // block) == (i[None, :] // block)
    if causal:
        allowed = allowed & (i[None, :] <= i[:, None])
    tiles = allowed.view(token_tiles, 128, token_tiles, 128).transpose(1, 2)
    any_, all_ = tiles.any(-1).any(-1), tiles.all(-1).all(-1)
    direct = codes[:, :token_tiles]
    assert not (any_ & (direct == 0)).any()
    assert (all_[direct == 2]).all()


FLEX_CASES = [(300, 48), (517, 128), (512, 128), (700, 256), (256, 16)]


def _dense_flex(monkeypatch, group: int) -> list[int]:
    """Route ``backend="flex"`` through ``_FixedSummaryAttention`` with the dense stand-in for FlexAttention
    (CPU, float64); returns a list that grows by one per call of the Function."""
    monkeypatch.setattr(combiner_flex, "SUMMARY_GROUP", group)
    on_cpu = dataclasses.replace(combiner_flex.FlexCombiner.support, devices=("cpu", "cuda"), min_head_dim=1)
    monkeypatch.setattr(combiner_flex.FlexCombiner, "support", on_cpu)
    monkeypatch.setattr(combiner_flex, "_fixed_flex", functools.partial(combiner_flex._fixed_flex, dense=True))
    calls: list[int] = []
    apply = combiner_flex._FixedSummaryAttention.apply
    monkeypatch.setattr(combiner_flex._FixedSummaryAttention, "apply", lambda *args: calls.append(1) or apply(*args))
    return calls


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq,block", FLEX_CASES)
@pytest.mark.parametrize("group", [16, 2])
def test_fixed_summary_function_matches_eager(seq, block, causal, padded, group, monkeypatch):
    """The flex path's hand-written summary backward (``_FixedSummaryAttention``, here with a dense
    attention) against the eager path's autograd: outputs and gradients of q, k, v in float64. Lengths
    off the block and the 128-token tile, a partly padded and a wholly padded (empty) block, and
    ``group`` 2: several copies of the summaries."""
    calls = _dense_flex(monkeypatch, group)
    g = torch.Generator().manual_seed(seq + block + group)
    q, k, v = (torch.randn(2, 2, seq, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = None
    if padded:
        mask = torch.ones(2, seq, dtype=torch.bool)
        mask[0, -37:] = False
        mask[1, 1] = False
        mask[1, block : 2 * block] = False  # an empty region
    upstream = torch.randn(2, 2, seq, 16, generator=g, dtype=torch.float64)
    results = []
    for backend in ("eager", "flex"):
        out = combiner(q, k, v, "fixed", block, causal, mask, backend=backend)
        results.append([out, *torch.autograd.grad(out, (q, k, v), upstream)])
    assert calls == [1]
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", CAUSAL)
def test_fixed_summary_function_directional_derivatives(causal, monkeypatch):
    """The hand-written backward against central finite differences (gradcheck's repeated backward on
    one graph is not supported: the graph is freed in the first backward)."""
    _dense_flex(monkeypatch, 1)  # two copies of the summaries at 200 tokens
    q, k, v = _inputs(200, batch=2, heads=1, dim=3, seed=2, grad=True)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[0, 3] = False
    mask[1, 14:28] = False  # an empty block
    fn = lambda q, k, v: combiner(q, k, v, "fixed", 14, causal, mask, backend="flex")  # noqa: E731
    g = torch.Generator().manual_seed(5)
    upstream = torch.randn(2, 1, 200, 3, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(fn(q, k, v), (q, k, v), upstream)
    for _ in range(3):
        direction = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (q, k, v)]
        eps = 1e-6
        with torch.no_grad():
            plus = fn(*(x + eps * d for x, d in zip((q, k, v), direction)))
            minus = fn(*(x - eps * d for x, d in zip((q, k, v), direction)))
        numeric = ((plus - minus) * upstream).sum() / (2 * eps)
        analytic = sum((gr * d).sum() for gr, d in zip(grads, direction))
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_fixed_summary_function_second_backward_raises(monkeypatch):
    _dense_flex(monkeypatch, 16)
    q, k, v = _inputs(20, batch=1, heads=1, dim=3, grad=True)
    out = combiner(q, k, v, "fixed", 4, backend="flex").sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()


def test_fixed_summary_function_without_grad(monkeypatch):
    """No gradient wanted: same output, and no graph is kept."""
    _dense_flex(monkeypatch, 2)
    q, k, v = _inputs(300, batch=2, heads=2, dim=4, seed=3, grad=True)
    expected = combiner(q, k, v, "fixed", 48, True, backend="eager")
    with torch.no_grad():
        out = combiner(q, k, v, "fixed", 48, True, backend="flex")
    assert out.grad_fn is None
    torch.testing.assert_close(out, expected.detach(), rtol=1e-10, atol=1e-12)


def test_fixed_summary_function_ties_keep_the_total_gradient(monkeypatch):
    """Tied maxima: the gradient of a max-pool goes to one of the tied tokens (autograd's amax splits it);
    both are subgradients, so what a tied block receives in total is the same."""
    _dense_flex(monkeypatch, 16)
    q, k, v = _inputs(12, batch=1, heads=2, dim=4, seed=4)
    q[:, :, 4:8], k[:, :, 4:8] = q[:, :, 4:5], k[:, :, 4:5]  # block 1: four identical tokens
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    grads = []
    for backend in ("eager", "flex"):
        out = combiner(q, k, v, "fixed", 4, False, backend=backend)
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for a, b in zip(*grads):
        torch.testing.assert_close(b[:, :, 4:8].sum(2), a[:, :, 4:8].sum(2))
        torch.testing.assert_close(b[:, :, :4], a[:, :, :4])
        torch.testing.assert_close(b[:, :, 8:], a[:, :, 8:])


# (seq, row width): rows off the 128-token tile, a length off the row, rows longer than a tile, one row
AXIAL_FLEX_CASES = [(300, 17), (517, 23), (400, 160), (90, 90)]


def _axial_dense_flex(monkeypatch) -> None:
    """Route ``backend="flex"`` for the axial forms through ``_axial_flex`` with dense masked attentions in place
    of FlexAttention (CPU, float64): its layouts, masks, summaries and log-sum-exp merge, without the kernel."""
    on_cpu = dataclasses.replace(combiner_flex.FlexCombiner.support, devices=("cpu", "cuda"), min_head_dim=1)
    monkeypatch.setattr(combiner_flex.FlexCombiner, "support", on_cpu)
    monkeypatch.setattr(combiner_flex, "_axial_flex", functools.partial(combiner_flex._axial_flex, dense=True))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq,width", [(61, 8), (40, 40)])
@pytest.mark.parametrize("variant", ["axial", "axial_horizontal", "mixture"])
def test_axial_flex_path_matches_dense_reference(variant, seq, width, causal, padded, monkeypatch):
    """The row and column calls merged by log-sum-exp give the one softmax of the dense reference ``P``:
    outputs and gradients in float64, with padding (a padded row is an empty region) and a fully padded
    sequence."""
    _axial_dense_flex(monkeypatch)
    q, k, v = _inputs(seq, dim=4, grad=True, seed=seq + width)
    mask = _padding(3, seq, width) if padded else None
    out = combiner(q, k, v, variant, width, causal, mask, backend="flex")
    ref, _ = combiner_reference(q, k, v, variant, width, causal, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), upstream), torch.autograd.grad(ref, (q, k, v), upstream)):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    if padded:
        assert out[2].abs().max() == 0


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq,width", AXIAL_FLEX_CASES)
@pytest.mark.parametrize("variant", ["axial", "axial_horizontal", "mixture"])
def test_axial_flex_path_matches_eager_at_tile_scale(variant, seq, width, causal, padded, monkeypatch):
    """The same against the eager backend (itself checked against the reference) at lengths past the 128-token
    tile, rows off the tile, longer than it and a single row."""
    _axial_dense_flex(monkeypatch)
    q, k, v = _inputs(seq, dim=4, grad=True, seed=seq + width)
    mask = _padding(3, seq, width) if padded else None
    upstream = torch.randn(q.shape, dtype=torch.float64)
    results = []
    for backend in ("eager", "flex"):
        out = combiner(q, k, v, variant, width, causal, mask, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), upstream)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("rule", list(combiner_flex.RULES))
@pytest.mark.parametrize("seq,group", [(300, 17), (1024, 256), (640, 5), (384, 128), (500, 500), (700, 256)])
def test_group_tile_codes_cover_every_pair_of_a_group(seq, group, rule, full):
    """No allowed (query, key) pair of the axial calls lies in a skipped tile, and no tile is skipped that
    holds one (each skipped tile is work saved, each kept one is needed). With ``full`` (no key padding),
    exactly the tiles whose every pair is allowed are full: the kernel skips the mask_mod there."""
    tiles = -(-seq // 128)
    codes = _group_tile_codes(tiles, group, seq, rule, full)
    i = torch.arange(tiles * 128)
    allowed = (i[:, None] // group == i[None, :] // group) & (i[:, None] < seq) & (i[None, :] < seq)
    allowed = allowed & combiner_flex.RULES[rule](i[:, None] % group, i[None, :] % group)
    per_tile = allowed.view(tiles, 128, tiles, 128)
    assert torch.equal(codes > 0, per_tile.any(-1).any(1))
    assert torch.equal(codes == 2, per_tile.all(-1).all(1) if full else torch.zeros_like(codes, dtype=torch.bool))


def test_auto_keeps_the_axial_forms_on_eager_and_flex_names_them():
    """``auto`` takes FlexAttention for Combiner-Fixed only; the axial forms run it when asked by name."""
    from hopformer.ops import dispatch
    from hopformer.ops.backend import Request

    q = torch.empty(1, 2, 32768, 64, device="meta")
    for variant in AXIAL_FORMS:
        request = dataclasses.replace(Request.of("combiner", q, q, variant=variant), device="cuda")
        assert dispatch.auto_ranking(request) == [("eager", "every variant, any device")]
        assert dispatch.can_run("flex", request)
    fixed = dataclasses.replace(Request.of("combiner", q, q, variant="fixed"), device="cuda")
    assert dispatch.auto_ranking(fixed)[0][0] == "flex"


def _cuda_against_cpu_float64(
    variant: str, seq: int, block: int, causal: bool, padded: bool, backend: str = "flex"
) -> None:
    """``backend`` (default ``"flex"``) on CUDA in float32 against ``eager`` on the CPU in float64: output and
    gradients."""
    g = torch.Generator().manual_seed(seq + block)
    q, k, v = (torch.randn(2, 2, seq, 16, generator=g, dtype=torch.float64) for _ in range(3))
    mask = None
    if padded:
        mask = torch.ones(2, seq, dtype=torch.bool)
        mask[0, -37:] = False
        mask[1, block : 2 * block] = False  # an empty region (axial: an empty row)
    upstream = torch.randn(2, 2, seq, 16, generator=g, dtype=torch.float64)
    results = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        inputs = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
        chosen = backend if device == "cuda" else "eager"
        out = combiner(*inputs, variant, block, causal, None if mask is None else mask.to(device), backend=chosen)
        grads = torch.autograd.grad(out, inputs, upstream.to(device, dtype))
        results.append([t.detach().double().cpu() for t in (out, *grads)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention path)")
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq,width", AXIAL_FLEX_CASES)
@pytest.mark.parametrize("variant", ["axial", "axial_horizontal", "mixture"])
def test_axial_flex_on_cuda_matches_cpu_float64(variant, seq, width, causal, padded):
    """On CUDA the axial forms run as FlexAttention row and column calls, gradients through their
    log-sum-exps included."""
    _cuda_against_cpu_float64(variant, seq, width, causal, padded)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention path)")
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq,block", FLEX_CASES)
@pytest.mark.parametrize("group", [16, 2])
def test_fixed_on_cuda_matches_cpu_float64(seq, block, causal, padded, group, monkeypatch):
    """On CUDA, Combiner-Fixed runs as one FlexAttention call over [tokens; copies of the block
    summaries]; ``group`` 2 makes several copies at these lengths."""
    monkeypatch.setattr(combiner_flex, "SUMMARY_GROUP", group)
    _cuda_against_cpu_float64("fixed", seq, block, causal, padded)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq,block", [(1000, 2), (777, 3)])
def test_logsparse_on_cuda_matches_cpu_float64(seq, block, causal, padded):
    """Logsparse's tiles on CUDA's SDPA kernels and matmuls: levels inside the tile and above it."""
    _cuda_against_cpu_float64("logsparse", seq, block, causal, padded, backend="eager")


def test_backend_is_checked():
    q, k, v = _inputs(16)
    with pytest.raises(ValueError, match="backend='fast' is not known"):
        combiner(q, k, v, backend="fast")
    with pytest.raises(ValueError, match="backend='flex' cannot run combiner.*runs on cuda.*'eager' can"):
        combiner(q, k, v, "fixed", backend="flex")  # CPU, head_dim 5
    with pytest.raises(ValueError, match="backend"):
        build("combiner", 16, 2, backend="triton")
    eager = combiner(q, k, v, "fixed", 4, backend="eager")
    torch.testing.assert_close(combiner(q, k, v, "fixed", 4), eager)  # auto on CPU is eager


@pytest.mark.parametrize("batch", [1, 2])
def test_grouped_attention_matches_dense_masked_attention(batch):
    """Query groups on their own keys (the groups folded into SDPA's batch, the mask shared by the heads), forward
    and gradients in float64 against masked softmax attention written out, rows with no allowed key included
    (zeros)."""
    g = torch.Generator().manual_seed(batch)
    heads, groups, queries, keys, dim = 3, 4, 5, 7, 6
    q = torch.randn(batch, heads, groups, queries, dim, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(batch, heads, groups, keys, dim, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))  # fmt: skip
    mask = torch.rand(batch, groups, queries, keys, generator=g) < 0.5
    mask[0, 1, 2] = False  # a row with no key
    out = grouped_attention(q, k, v, mask, 0.3, 0.0)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask[:, None], -torch.inf)
    probs = torch.nan_to_num(scores.softmax(-1))  # the empty row: NaN -> 0
    expected = probs @ v
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(out[0, :, 1, 2], torch.zeros(heads, dim, dtype=torch.float64))
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), upstream), torch.autograd.grad(expected, (q, k, v), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("both_sides", [False, True])
@pytest.mark.parametrize("size", [1, 2, 7])
@pytest.mark.parametrize("dim", [2, 3])
def test_exclusive_max_and_its_compact_backward_match_autograd_cummax(dim, size, both_sides):
    """The max strictly before (or around) each position, and its gradient through the one winning position it
    keeps (around: the best and second best of each run), against autograd through ``cummax``; ``-inf`` entries
    (padding) included. Around, the best entry's gradient is a sum less one term: rounding, not a tie-break."""
    g = torch.Generator().manual_seed(size)
    shape = [2, 3, 4, 4, 3]
    shape[dim] = size
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[0, 0].select(dim - 2, 0).fill_(-torch.inf)  # a padded entry at the start of each run
    x[1, 1].narrow(dim - 2, 1, size - 1).fill_(-torch.inf)  # runs of one real entry, the rest padded
    x.requires_grad_()
    fill = torch.full_like(x.narrow(dim, 0, 1), -torch.inf)
    expected = torch.cat([fill, x.cummax(dim).values.narrow(dim, 0, size - 1)], dim)
    if both_sides:
        after = x.flip(dim).cummax(dim).values.flip(dim)
        expected = torch.maximum(expected, torch.cat([after.narrow(dim, 1, size - 1), fill], dim))
    got = _exclusive_max(x, dim, both_sides)
    assert torch.equal(got, expected)
    upstream = torch.where(expected.isfinite(), torch.randn(expected.shape, generator=g, dtype=torch.float64), 0.0)
    (want,) = torch.autograd.grad(expected, x, upstream)
    (have,) = torch.autograd.grad(got, x, upstream)
    torch.testing.assert_close(have, want, rtol=1e-13 if both_sides else 0, atol=1e-14 if both_sides else 1e-15)


@pytest.mark.parametrize("dim", [2, 3])
def test_max_of_others_in_bfloat16_matches_float64(dim):
    """In bfloat16 the best entry's gradient is a whole run's sum less one term (here 256 terms, summed in
    float32): within bfloat16's rounding of float64's, and the forward exact."""
    g = torch.Generator().manual_seed(dim)
    shape = [1, 2, 3, 3, 4]
    shape[dim] = 256
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64) + 1.0  # a mean, so the sum is large
    low = x.bfloat16().requires_grad_()
    high = low.detach().double().requires_grad_()
    (have,) = torch.autograd.grad(_exclusive_max(low, dim, True), low, upstream.bfloat16())
    (want,) = torch.autograd.grad(_exclusive_max(high, dim, True), high, upstream.bfloat16().double())
    assert torch.equal(_exclusive_max(low, dim, True).double(), _exclusive_max(high, dim, True))
    torch.testing.assert_close(have.double(), want, rtol=1e-2, atol=1e-2)
