"""Routing: the op against a dense per-cluster reference, membership, causality, k-means, module."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import hopformer.ops.routing_attention as routing_ops
from hopformer.attention import build
from hopformer.attention.routing import local_attention
from hopformer.ops.reference import causal_routing_reference, routing_reference
from hopformer.ops.routing_attention import (
    clustered_attention,
    commitment_loss,
    memberships,
    nearest_with_error,
    normalise,
    rank,
    routing,
    similarity,
)


def _inputs(batch=2, heads=3, seq=17, dim=4, clusters=4, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g, dtype=torch.float64) for _ in range(3))
    centroids = normalise(torch.randn(heads, clusters, dim, generator=g, dtype=torch.float64))
    return [x.requires_grad_(grad) for x in (q, k, v)] + [centroids]


def _padding(batch, seq):
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, -4:] = False
    mask[1, :12] = False  # fewer real tokens than the window: pads get picked and must be inert
    return mask


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("qk_norm", ["layernorm", "l2"])
def test_matches_dense_reference_forward_and_gradients(shared_qk, padded, qk_norm):
    causal = False
    q, k, v, centroids = _inputs(grad=True, seed=int(causal) + 2 * int(padded))
    mask = _padding(2, 17) if padded else None
    keys = q if shared_qk else k
    out = routing(q, keys, v, centroids, 6, causal, mask, shared_qk=shared_qk, qk_norm=qk_norm)
    query_idx, key_idx = memberships(q, keys, centroids, 6, mask, shared_qk=shared_qk, qk_norm=qk_norm)
    ref = routing_reference(q, keys, v, query_idx, key_idx, causal, mask, shared_qk=shared_qk)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(out)
    inputs = (q, v) if shared_qk else (q, k, v)
    for a, b in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    if padded:
        assert (out[0, :, -4:] == 0).all() and (out[1, :, :12] == 0).all()


def _nearest_in_test(x, centroids, qk_norm):
    """Each token's nearest centroid, computed here from the definitions (not with the library's code)."""
    unit = F.normalize(x, dim=-1) if qk_norm == "l2" else F.layer_norm(x, x.shape[-1:])
    return torch.einsum("bhld,hcd->bhlc", unit, centroids).argmax(-1)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("qk_norm", ["layernorm", "l2"])
@pytest.mark.parametrize("window", [1, 3, 40])
def test_causal_matches_dense_reference_forward_and_gradients(shared_qk, padded, qk_norm, window):
    """Causal routing (nearest-centroid clusters, the last ``window`` keys of the cluster before each
    query) against a one-query-at-a-time reference, clusters computed in the test; float64, odd length,
    padding with a wholly padded row's start."""
    q, k, v, centroids = _inputs(grad=True, seed=7 + int(padded), clusters=3)
    mask = _padding(2, 17) if padded else None
    keys = q if shared_qk else k
    out = routing(q, keys, v, centroids, window, True, mask, shared_qk=shared_qk, qk_norm=qk_norm)
    query_cluster = _nearest_in_test(q.detach(), centroids, qk_norm)
    key_cluster = query_cluster if shared_qk else _nearest_in_test(k.detach(), centroids, qk_norm)
    ref = causal_routing_reference(q, keys, v, query_cluster, key_cluster, window, mask, shared_qk=shared_qk)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(out)
    inputs = (q, v) if shared_qk else (q, k, v)
    for a, b in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _members_in_test(x, centroids, window, mask, qk_norm):
    """Every cluster's ``window`` members, from the definitions (not with the library's code): the tokens whose
    normalised vectors have the largest dot product with the centroid; padded tokens only when a cluster has
    more slots than there are real tokens. Returns per (batch, head, cluster) the set of real members."""
    if qk_norm == "l2":
        unit = x / x.norm(dim=-1, keepdim=True)
    else:  # LayerNorm without affine: zero mean, unit (biased) variance
        centred = x - x.mean(-1, keepdim=True)
        unit = centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    batch, heads, seq, _ = x.shape
    real = torch.ones(batch, seq, dtype=torch.bool) if mask is None else mask
    members = {}
    for b in range(batch):
        for h in range(heads):
            for c in range(centroids.shape[1]):
                scores = [(float(unit[b, h, i] @ centroids[h, c]), i) for i in range(seq) if real[b, i]]
                members[b, h, c] = {i for _, i in sorted(scores, reverse=True)[:window]}
    return members


def _real_members(idx, mask):
    """Per (batch, head, cluster), the set of real tokens among the members ``idx``."""
    batch, heads, clusters, _ = idx.shape
    real = torch.ones(batch, int(idx.max()) + 1, dtype=torch.bool) if mask is None else mask
    return {
        (b, h, c): {int(i) for i in idx[b, h, c] if real[b, i]}
        for b in range(batch)
        for h in range(heads)
        for c in range(clusters)
    }


def _indices(members, shape, seq):
    """Member sets back to ``(batch, heads, clusters, window)`` indices, filled up with other (padded) positions."""
    out = torch.zeros(shape, dtype=torch.long)
    for (b, h, c), chosen in members.items():
        fill = [i for i in range(seq) if i not in chosen][: shape[-1] - len(chosen)]
        out[b, h, c] = torch.tensor(sorted([*chosen, *fill]))
    return out


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("qk_norm", ["layernorm", "l2"])
def test_memberships_and_output_match_memberships_computed_here(qk_norm, shared_qk, padded):
    """Bidirectional routing: the clusters are the top-w by similarity of the *normalised* q (queries) and
    k (keys) to each centroid, computed in this test; the output is the dense reference on those clusters.
    The vectors get very different norms and offsets, so ranking raw vectors, or by the other norm, picks
    other members."""
    q, k, v, centroids = _inputs(grad=True, seed=11 + int(padded), clusters=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for x in (q, k):
            x.mul_(torch.rand(2, 3, 17, 1, generator=g, dtype=torch.float64) * 4 + 0.1)
            x.add_(torch.randn(2, 3, 17, 1, generator=g, dtype=torch.float64))
    mask = _padding(2, 17) if padded else None
    keys = q if shared_qk else k
    window = 6
    expected_q = _members_in_test(q.detach(), centroids, window, mask, qk_norm)
    expected_k = expected_q if shared_qk else _members_in_test(k.detach(), centroids, window, mask, qk_norm)
    query_idx, key_idx = memberships(q, keys, centroids, window, mask, shared_qk=shared_qk, qk_norm=qk_norm)
    assert _real_members(query_idx, mask) == expected_q
    assert _real_members(key_idx, mask) == expected_k
    other = "layernorm" if qk_norm == "l2" else "l2"
    assert _members_in_test(k.detach(), centroids, window, mask, other) != expected_k, "inputs must tell norms apart"

    out = routing(q, keys, v, centroids, window, False, mask, shared_qk=shared_qk, qk_norm=qk_norm)
    shape = query_idx.shape
    ref = routing_reference(
        q, keys, v, _indices(expected_q, shape, 17), _indices(expected_k, shape, 17), False, mask, shared_qk=shared_qk
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(out)
    inputs = (q, v) if shared_qk else (q, k, v)
    for a, b in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gradcheck_tiny():
    q, k, v, centroids = _inputs(batch=1, heads=1, seq=6, dim=3, clusters=2, grad=True)
    mask = torch.tensor([[True, True, False, True, True, True]])
    fn = lambda q, k, v: routing(q, k, v, centroids, 3, True, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_clusters_are_balanced_top_window():
    q, k, _, centroids = _inputs(seq=19, clusters=5)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[0, 3] = mask[0, 10] = False
    query_idx, key_idx = memberships(q, k, centroids, 7, mask)
    for idx, x in ((query_idx, q), (key_idx, k)):
        assert idx.shape == (2, 3, 5, 7)
        assert (idx.diff(dim=-1) > 0).all(), "exactly window distinct members, sorted by position"
        assert mask.gather(1, idx.reshape(2, -1)).all(), "padding is never selected"
        sim = torch.einsum("bhld,hcd->bhcl", normalise(x), centroids).masked_fill(~mask[:, None, None], -1e9)
        chosen = sim.gather(-1, idx)
        others = sim.scatter(-1, idx, -1e9)
        assert (chosen.min(-1).values >= others.max(-1).values).all(), "members are the most similar tokens"
    shared_q, shared_k = memberships(q, k, centroids, 7, mask, shared_qk=True)
    assert torch.equal(shared_q, shared_k)


def test_scatter_mean_hand_made():
    # Zero queries: uniform attention inside each cluster, so each cluster output is a mean of values.
    v = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64).view(1, 1, 4, 1)
    q = torch.zeros(1, 1, 4, 1, dtype=torch.float64)
    idx = torch.tensor([[[[0, 1], [1, 2]]]])  # cluster 0 = {0, 1}, cluster 1 = {1, 2}; token 3 in none
    out = clustered_attention(q, q, v, idx, idx).flatten()
    eps = 1e-5
    expected = torch.tensor([1.5 / (1 + eps), (1.5 + 3.0) / (2 + eps), 3.0 / (1 + eps), 0.0], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("shared_qk", [False, True])
def test_causal_no_future_gradient_for_fixed_centroids(shared_qk):
    seq = 15
    q, k, v, centroids = _inputs(batch=1, seq=seq, clusters=3, grad=True, seed=5)
    keys = q if shared_qk else k
    out = routing(q, keys, v, centroids, 6, True, shared_qk=shared_qk)
    for i in range(seq):
        grads = torch.autograd.grad(out[:, :, i].sum(), (q, k, v), retain_graph=True, allow_unused=True)
        for name, g in zip("qkv", grads):
            if g is not None:
                assert (g[:, :, i + 1 :] == 0).all(), f"d out_{i} / d {name}_j != 0 for some j > {i}"


def test_shared_qk_suppresses_self_unless_only_key():
    q, _, v, centroids = _inputs(batch=1, heads=1, seq=8, clusters=1)
    out = routing(q, q, v, centroids, 8, True, shared_qk=True)
    # Position 0 has only itself; position 1 has only position 0 once itself is suppressed (causal routing
    # puts each token in one cluster: its output is that cluster's attention, with no mean over clusters).
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 0])


def test_bad_arguments_raise_value_error_naming_them():
    q, k, v, centroids = _inputs(seq=8)
    with pytest.raises(ValueError, match="window"):
        routing(q, k, v, centroids, 9)
    with pytest.raises(ValueError, match="window"):
        routing(q, k, v, centroids, 0)
    with pytest.raises(ValueError, match="centroids"):
        routing(q, k, v, centroids[:, :0], 2)
    with pytest.raises(ValueError, match="qk_norm"):
        routing(q, k, v, centroids, 2, qk_norm="rms")
    with pytest.raises(ValueError, match="clusters"):
        build("routing", 16, 2, clusters=0)
    with pytest.raises(ValueError, match="local_heads"):
        build("routing", 16, 2, local_heads=3)
    with pytest.raises(ValueError, match="window"):
        build("routing", 16, 2, clusters=2, window=9)(torch.randn(1, 8, 16))


# --------------------------------------------------------------------------------------------
# Local heads


@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_matches_dense_mask(causal):
    q, k, v, _ = _inputs(seq=13, seed=8)
    mask = _padding(2, 13)
    out = local_attention(q, k, v, 4, causal, mask)
    i = torch.arange(13)
    block = i // 4
    allowed = (block[None, :] - block[:, None]).abs() <= 1
    if causal:
        allowed = allowed & (i[None, :] <= i[:, None])
    allowed = allowed & mask[:, None, None, :]
    ok = allowed.any(-1, keepdim=True)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~ok) * (ok & mask[:, None, :, None])
    torch.testing.assert_close(out, dense)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention path)")
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_on_cuda_matches_cpu(block, causal):
    """On CUDA local heads run FlexAttention on the local block graph; the CPU path is batched SDPA."""
    g = torch.Generator().manual_seed(block + int(causal))
    q, k, v = (torch.randn(2, 3, 300, 16, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[0, -50:] = False
    mask[1, :140] = False
    upstream = torch.randn(2, 3, 300, 16, generator=g, dtype=torch.float64)
    results = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        inputs = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
        out = local_attention(*inputs, block, causal, mask.to(device))
        grads = torch.autograd.grad(out, inputs, upstream.to(device, dtype))
        results.append([t.detach().double().cpu() for t in (out, *grads)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Commitment loss


@pytest.mark.parametrize("given_error", [False, True])
@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("qk_norm", ["layernorm", "l2"])
def test_commitment_loss_matches_formula_with_gradient(padded, qk_norm, chunk, given_error, monkeypatch):
    """``chunk=1``: rank and the loss work one head at a time (the path long sequences take). ``given_error``: the
    forward sums the ranking's errors (||x||^2 - 2 x.mu + ||mu||^2) instead of normalising again."""
    if chunk is not None:
        monkeypatch.setattr(routing_ops, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(routing_ops, "TABLE_ELEMENTS", chunk)
    q, _, _, centroids = _inputs(seq=17, clusters=4, seed=11, grad=True)
    centroids = centroids * 1.3  # off the sphere: the error's ||mu||^2 term must be the centroid's own
    mask = _padding(2, 17) if padded else None
    with torch.no_grad():
        _, assign, ranked_error = rank(normalise(q, qk_norm), centroids, 5, mask)
    loss = commitment_loss(q, centroids, assign, mask, qk_norm, ranked_error if given_error else None)
    x = normalise(q, qk_norm)
    target = centroids[torch.arange(3)[:, None], assign]  # (B, H, L, d)
    error = (x - target).pow(2).mean(-1)
    torch.testing.assert_close(ranked_error, error.detach(), rtol=1e-10, atol=1e-12)
    real = torch.ones(2, 17, dtype=torch.float64) if mask is None else mask.double()
    expected = (error * real[:, None]).sum() / (real.sum() * 3)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, q)[0], torch.autograd.grad(expected, q)[0])
    assert torch.equal(assign, similarity(x.detach(), centroids).argmax(2))
    assert torch.equal(nearest_with_error(x.detach(), centroids)[0], assign)
    torch.testing.assert_close(nearest_with_error(x.detach(), centroids)[1], error.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("qk_norm", ["layernorm", "l2"])
def test_commitment_loss_gradient_in_bfloat16_matches_float64(qk_norm):
    """The closed-form backward works in float32 on bfloat16 inputs: within bfloat16's rounding of the float64
    gradient of the same (rounded) inputs."""
    q, _, _, centroids = _inputs(seq=33, clusters=4, seed=5)
    low = q.bfloat16().requires_grad_()
    high = low.detach().double().requires_grad_()
    with torch.no_grad():
        _, assign, _ = rank(normalise(high, qk_norm), centroids, 5, None)
    (have,) = torch.autograd.grad(commitment_loss(low, centroids, assign, None, qk_norm), low)
    (want,) = torch.autograd.grad(commitment_loss(high, centroids, assign, None, qk_norm), high)
    assert have.dtype == torch.bfloat16
    torch.testing.assert_close(have.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


# --------------------------------------------------------------------------------------------
# Module and k-means


def _module(**options):
    torch.manual_seed(0)
    defaults = dict(clusters=3, local_heads=1, local_window=4)
    return build("routing", 16, 4, **{**defaults, **options})


def test_module_shapes_and_mixed_heads():
    x = torch.randn(2, 11, 16)
    mask = torch.ones(2, 11)
    mask[1, 6:] = 0
    for local_heads in (0, 2, 4):
        for causal in (False, True):
            module = _module(local_heads=local_heads, causal=causal)
            y = module(x, mask)
            assert y.shape == x.shape and torch.isfinite(y).all()
            assert (module.aux_loss is not None) == (local_heads < 4)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance_with_one_cluster_over_the_whole_sequence(causal):
    module = _module(clusters=1, causal=causal).double().eval()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    y = module(x, mask)
    longer = torch.cat([x, torch.randn(2, 5, 16, dtype=torch.float64)], dim=1)
    y_long = module(longer, torch.cat([mask, torch.zeros(2, 5)], dim=1))
    torch.testing.assert_close(y_long[0, :10], y[0])
    torch.testing.assert_close(y_long[1, :7], y[1, :7])


def test_eval_before_training_works_and_does_not_depend_on_the_batch():
    module = _module().eval()
    before = module.centroids.clone()
    x = torch.randn(3, 12, 16)
    y = module(x)
    assert torch.isfinite(y).all() and not bool(module.initialised)
    assert torch.equal(module.centroids, before)
    torch.testing.assert_close(module(x[1:2]), y[1:2])


def test_first_training_batch_initialises_from_data_and_eval_never_updates():
    module = _module(decay=0.5)
    random = module.centroids.clone()
    x = torch.randn(2, 12, 16)
    module(x)
    assert bool(module.initialised)
    assert not torch.allclose(module.centroids, random)
    radius = module.head_dim**0.5  # layernorm sphere
    torch.testing.assert_close(module.centroids.norm(dim=-1), torch.full((3, 3), radius))
    after_init = module.centroids.clone()
    module(torch.randn(2, 12, 16))  # applies the first batch's statistics (a k-means fixed point)
    module(torch.randn(2, 12, 16))  # applies the second batch's
    assert not torch.allclose(module.centroids, after_init)
    torch.testing.assert_close(module.centroids.norm(dim=-1), torch.full((3, 3), radius))
    module.eval()
    frozen = module.centroids.clone()
    module(torch.randn(2, 12, 16))
    module(torch.randn(2, 12, 16))
    assert torch.equal(module.centroids, frozen)
    assert module.pending_batches == 1, "eval records nothing (the last training batch stays pending)"


def test_ema_math_on_a_tiny_example():
    module = build("routing", 2, 1, local_heads=0, clusters=2, qk_norm="l2", decay=0.75, update="manual")
    module.initialised.fill_(True)
    module.ema_counts.copy_(torch.tensor([[2.0, 0.0]]))
    module.ema_sums.copy_(torch.tensor([[[2.0, 0.0], [0.0, 0.0]]]))
    module.centroids.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    # One recorded batch: two tokens to cluster 0, one token to cluster 1.
    x = torch.tensor([[[[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]]])
    assign = torch.tensor([[[0, 1, 0]]])
    module._record([(x, assign)], None)
    module.update_centroids()
    counts = torch.tensor([[0.75 * 2 + 0.25 * 2, 0.25 * 1]])
    sums = torch.tensor([[[0.75 * 2 + 0.25 * 1.6, 0.25 * 0.8], [0.0, 0.25]]])
    torch.testing.assert_close(module.ema_counts, counts)
    torch.testing.assert_close(module.ema_sums, sums)
    torch.testing.assert_close(module.centroids, F.normalize(sums / (counts[..., None] + 1e-5), dim=-1))


def test_manual_update_averages_the_recorded_forwards():
    module = _module(update="manual", decay=0.5)
    module(torch.randn(2, 12, 16))  # initialises and records
    module(torch.randn(2, 12, 16))
    assert module.pending_batches == 2
    expected = (module.pending_counts / 2) * 0.5 + module.ema_counts * 0.5
    module.update_centroids()
    torch.testing.assert_close(module.ema_counts, expected)
    assert module.pending_batches == 0


@pytest.mark.parametrize("share_qk", [False, True])
def test_commitment_loss_reaches_the_q_and_k_projections(share_qk):
    module = _module(share_qk=share_qk, local_heads=0)
    module(torch.randn(2, 12, 16), torch.ones(2, 12))
    assert module.aux_loss is not None and module.aux_loss.item() > 0
    module.aux_loss.backward()
    grad = module.qkv.weight.grad
    assert grad[:16].abs().sum() > 0, "commitment gradient reaches the query projection"
    assert (grad[16:32].abs().sum() > 0) != share_qk, "and the key projection unless keys are the queries"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("share_qk", [False, True])
def test_module_commitment_loss_matches_formula_on_first_and_later_batches(causal, share_qk, monkeypatch):
    """The loss's forward takes the ranking's errors; they must measure against the centroids the loss sees (the
    first causal batch moves them after routing) and match the formula on every batch."""
    from hopformer.attention import routing as routing_module

    module = _module(causal=causal, share_qk=share_qk, local_heads=2, commitment=0.5).double().train()
    seen = []

    def recording(x, centroids, assignment, padding, qk_norm, error):
        seen.append((x.detach(), centroids.clone(), assignment, padding))
        return routing_ops.commitment_loss(x, centroids, assignment, padding, qk_norm, error)

    monkeypatch.setattr(routing_module, "commitment_loss", recording)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    for _ in range(3):  # the first batch initialises the centroids, the next ones take EMA steps
        seen.clear()
        module(torch.randn(2, 12, 16, dtype=torch.float64), mask)
        assert len(seen) == (1 if share_qk else 2)
        expected = 0.0
        for x, centroids, assign, padding in seen:
            target = centroids[torch.arange(2)[:, None], assign]
            error = (normalise(x) - target).pow(2).mean(-1)
            real = padding.double()
            expected = expected + (error * real[:, None]).sum() / (real.sum() * 2)
        torch.testing.assert_close(module.aux_loss, 0.5 * expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputation_does_not_update(use_reentrant):
    module = _module(update="manual")
    x = torch.randn(2, 12, 16, requires_grad=True)
    module(x)  # initialise outside the checkpoint
    module.pending_batches = 0
    module.pending_counts = module.pending_sums = None
    y = checkpoint(module, x, use_reentrant=use_reentrant)
    y.sum().backward()
    assert module.pending_batches == 1, "recorded by the forward, not by the recomputation"
    grad = x.grad.clone()
    x.grad = None
    module(x).sum().backward()
    torch.testing.assert_close(x.grad, grad)


def test_distributed_statistics_are_all_reduced(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        module = _module(decay=0.5)
        module(torch.randn(2, 12, 16))
        module(torch.randn(2, 12, 16))
        assert bool(module.initialised) and module.pending_batches == 1
    finally:
        dist.destroy_process_group()


def test_state_dict_round_trip_and_float32_tables():
    trained = _module(decay=0.5)
    trained(torch.randn(2, 12, 16))
    fresh = _module(decay=0.5).eval()
    fresh.load_state_dict(trained.state_dict())
    assert bool(fresh.initialised) and torch.equal(fresh.centroids, trained.centroids)
    x = torch.randn(2, 12, 16)
    torch.testing.assert_close(fresh(x), trained.eval()(x))
    half = _module().bfloat16()
    assert half.centroids.dtype == half.ema_sums.dtype == torch.float32  # the EMA must not stall
    assert half.train()(torch.randn(2, 12, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
