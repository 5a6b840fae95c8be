"""sparse_attention and diffuse: every backend against the dense reference (float64, fresh random
inputs, odd lengths, padding including fully padded rows), and diffusion against matrix powers."""

import math

import pytest
import torch

import hopformer.graphs as G
import hopformer.ops.gather as gather_backend
from hopformer.ops import diffuse, diffuse_weighted, diffusion_coefficients, sparse_attention
from hopformer.ops.common import masked_softmax

CUDA = torch.cuda.is_available()


def _patterns(seq_len: int, block_size: int, causal: bool):
    return [
        G.full(seq_len, block_size, causal=causal),
        G.local(seq_len, block_size, window=3, causal=causal),
        G.longformer(seq_len, block_size, window=3, num_global=1, causal=causal),
        G.bigbird(seq_len, block_size, window=3, num_global=2, num_random=2, seed=5, causal=causal),
        G.diffuser(seq_len, block_size, window=3, num_global=2, num_random=2, seed=5, causal=causal),
        G.hypercube(seq_len, block_size, causal=causal),
        G.grid2d(seq_len, side=7, radius=1, num_random=2, seed=5, causal=causal),  # token level, ragged last row
    ]


def _inputs(graph, batch=2, heads=2, dim=8, padding=True, device="cpu", dtype=torch.float64, seed=None):
    generator = torch.Generator(device="cpu").manual_seed(seed if seed is not None else torch.seed() % 2**31)
    seq = graph.seq_len
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=generator, dtype=dtype).to(device) for _ in range(3))
    mask = None
    if padding:
        mask = torch.rand(batch, seq, generator=generator) > 0.25
        mask[0, seq // 2 :] = False  # a right-padded row
        if batch > 1:
            mask[1] = False  # a fully padded sequence: every query has no key
        mask = mask.to(device)
    return [t.requires_grad_() for t in (q, k, v)], mask


def _run(fn, tensors, mask, backend, **kwargs):
    q, k, v = tensors
    out = fn(q, k, v, key_padding_mask=mask, backend=backend, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    return (out, *grads)


def _bind(fn, graph):
    return lambda q, k, v, **kw: fn(q, k, v, graph, **kw)


def _sparse(q, k, v, graph, **kw):
    return sparse_attention(q, k, v, graph, **kw)


def _diffuse(q, k, v, graph, **kw):
    return diffuse(q, k, v, graph, hops=4, alpha=0.2, **kw)


@pytest.mark.parametrize("backend", ["gather", "matrix"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [37, 64, 150])
@pytest.mark.parametrize("padding", [False, True])
def test_backend_matches_dense(backend, seq_len, causal, padding):
    for graph in _patterns(seq_len, 16, causal):
        for fn in (_sparse, _diffuse):
            tensors, mask = _inputs(graph, padding=padding)
            call = _bind(fn, graph)
            expected, got = _run(call, tensors, mask, "dense"), _run(call, tensors, mask, backend)
            for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
                assert torch.isfinite(g).all(), (graph.name, name)
                torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=f"{graph.name} {fn.__name__} {name}")


def test_gather_head_chunks_and_token_granularity(monkeypatch):
    monkeypatch.setattr(gather_backend, "CHUNK_ELEMENTS", 1000)  # force one head per chunk
    graph = G.diffuser(90, 8, num_global=1, num_random=2, random_granularity="token", seed=1)
    tensors, mask = _inputs(graph, heads=3)
    expected = _run(lambda q, k, v, **kw: _diffuse(q, k, v, graph, **kw), tensors, mask, "dense")
    got = _run(lambda q, k, v, **kw: _diffuse(q, k, v, graph, **kw), tensors, mask, "gather")
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dim, inplace", [(-1, False), (-1, True), ((1, 3), True)])  # several dims: in place only
def test_masked_softmax_is_the_softmax_over_the_allowed_entries(dim, inplace):
    """``masked_softmax``'s contract, from the definition: on allowed entries ``exp(s) / sum exp(s)`` over the
    allowed entries of the reduced dims, exactly 0 elsewhere; a row (a slice over ``dim``) with nothing allowed
    is all zeros, never NaN and never uniform. Huge scores do not overflow."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 30
    allowed = torch.rand(3, 4, 5, 6, generator=g) > 0.5
    allowed[0, 1] = False  # empty rows over the last dim
    allowed[2, :, 3] = False  # an empty slice over dims (1, 3)
    dims = (dim,) if isinstance(dim, int) else dim
    top = scores.masked_fill(~allowed, -torch.inf).amax(dim=dims, keepdim=True).nan_to_num(0.0, neginf=0.0)
    exp = (scores - top).exp() * allowed
    total = exp.sum(dim=dims, keepdim=True)
    expected = exp / torch.where(total > 0, total, 1.0)
    assert (total == 0).any(), "the test has empty rows"
    got = masked_softmax(scores.clone(), allowed, dim, inplace=inplace)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    assert (got[~allowed] == 0).all()


def test_padding_gives_zeros_never_nan():
    graph = G.bigbird(64, 16, causal=True)
    (q, k, v), _ = _inputs(graph, padding=False)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1] = False
    mask[0, :5] = False  # causal: queries 0-4 have no real key before them
    for backend in ("dense", "gather", "matrix"):
        for out in (sparse_attention(q, k, v, graph, mask, backend), diffuse(q, k, v, graph, 3, 0.1, mask, backend)):
            assert torch.isfinite(out).all()
            assert (out[1] == 0).all() and (out[0, :, :5] == 0).all()


def _dense_attention_matrix(q, k, graph, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = graph.to_dense()[None, None] & mask[:, None, None, :] & mask[:, None, :, None]
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    return torch.nan_to_num(probs)


@pytest.mark.parametrize(
    "kernel, remainder", [("ppr", "keep"), ("ppr", "renormalize"), ("heat", "keep"), ("heat", "renormalize")]
)
def test_diffuse_equals_matrix_power_series(kernel, remainder):
    graph = G.bigbird(100, 16, num_random=1, seed=2)
    (q, k, v), mask = _inputs(graph, batch=1, padding=True)
    mask[0, -7:] = False
    hops, alpha, heat_time = 5, 0.15, 1.7
    matrix = _dense_attention_matrix(q, k, graph, mask)
    coefficients = diffusion_coefficients(hops, alpha, kernel=kernel, heat_time=heat_time, remainder=remainder)
    expected = sum(c * torch.linalg.matrix_power(matrix, n) @ v for n, c in enumerate(coefficients))
    expected = expected * mask[:, None, :, None]
    for backend in ("dense", "gather", "matrix"):
        got = diffuse(
            q, k, v, graph, hops, alpha, mask, backend, kernel=kernel, heat_time=heat_time, remainder=remainder
        )
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _explicit_coefficients(hops: int) -> list[list[float]]:
    """Fresh random weights on the simplex, with zeros where the Horner steps are edge cases: none on
    ``V``, none on a middle power, all on ``A^1``."""
    random = torch.rand(hops + 1, dtype=torch.float64)
    random[0] = 0.0
    random[hops // 2] = 0.0
    one_hop = [0.0, 1.0] + [0.0] * (hops - 1)
    return [(random / random.sum()).tolist(), one_hop]


@pytest.mark.parametrize("seq_len", [45, 100])
def test_diffuse_with_explicit_coefficients_is_their_power_series(seq_len):
    """``diffuse(coefficients=[...])``: output and q/k/v gradients match ``sum_k c_k A^k V`` of the dense
    matrix, float64, odd lengths and padding, on every CPU backend."""
    graph = G.diffuser(seq_len, 16, window=3, num_global=1, num_random=1, seed=int(torch.randint(100, ())))
    (q, k, v), mask = _inputs(graph, batch=2, heads=2, padding=True)
    projection = torch.randn(2, 2, seq_len, 8, dtype=torch.float64)
    for coefficients in _explicit_coefficients(4):
        matrix = _dense_attention_matrix(q, k, graph, mask)
        expected = sum(c * torch.linalg.matrix_power(matrix, n) @ v for n, c in enumerate(coefficients))
        expected = expected * mask[:, None, :, None]
        expected_grads = torch.autograd.grad((expected * projection).sum(), (q, k, v))
        for backend in ("dense", "gather", "matrix", "auto"):
            got = diffuse(q, k, v, graph, 4, key_padding_mask=mask, backend=backend, coefficients=coefficients)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
            got_grads = torch.autograd.grad((got * projection).sum(), (q, k, v))
            for name, g, e in zip(("dq", "dk", "dv"), got_grads, expected_grads):
                label = f"{backend} {name}"
                torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=lambda m, n=label: f"{n}: {m}")


def test_diffuse_bad_coefficients():
    graph = G.local(32, 16)
    (q, k, v), _ = _inputs(graph, padding=False)
    with pytest.raises(ValueError, match=r"coefficients must have hops \+ 1 = 3 entries"):
        diffuse(q, k, v, graph, 2, coefficients=[0.5, 0.5])
    with pytest.raises(ValueError, match="coefficients must sum to 1"):
        diffuse(q, k, v, graph, 1, coefficients=[0.5, 0.6])
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        diffuse(q, k, v, graph, 1, coefficients=[float("nan"), 1.0])
    assert diffuse(q, k, v, graph, 2, coefficients=[1.0, 0.0, 0.0]) is v


@pytest.mark.parametrize("backend", ["dense", "gather", "matrix", "auto"])
@pytest.mark.parametrize("seq_len", [45, 100])
def test_diffuse_weighted_equals_matrix_power_series_with_gradients(backend, seq_len):
    """``diffuse_weighted``: fresh random per-head weights (any sign), float64, odd lengths and padding
    (a fully padded sequence too): output and the gradients of q, k, v and the weights match the power
    series of the dense attention matrix."""
    graph = G.diffuser(seq_len, 16, window=3, num_global=1, num_random=1, seed=int(torch.randint(100, ())))
    (q, k, v), mask = _inputs(graph, batch=2, heads=3, padding=True)
    weights = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)  # hops = 4
    inputs = (q, k, v, weights)
    projection = torch.randn(2, 3, seq_len, 8, dtype=torch.float64)

    matrix = _dense_attention_matrix(q, k, graph, mask)
    powers = [v]
    for _ in range(4):
        powers.append(matrix @ powers[-1])
    expected = sum(weights[None, :, hop, None, None] * power for hop, power in enumerate(powers))
    expected = expected * mask[:, None, :, None]
    expected_grads = torch.autograd.grad((expected * projection).sum(), inputs)

    got = diffuse_weighted(q, k, v, graph, weights, mask, backend)
    got_grads = torch.autograd.grad((got * projection).sum(), inputs)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for name, g, e in zip(("dq", "dk", "dv", "dweights"), got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


def test_diffuse_weighted_with_the_kernels_coefficients_is_diffuse():
    """Shared (1-D) weights set to a kernel's coefficients give what the fused ``diffuse`` gives."""
    graph = G.bigbird(77, 16, num_random=1, seed=3)
    (q, k, v), mask = _inputs(graph, padding=True)
    for kernel, remainder in (("ppr", "keep"), ("heat", "renormalize")):
        weights = torch.tensor(diffusion_coefficients(5, 0.2, kernel=kernel, remainder=remainder), dtype=torch.float64)
        expected = diffuse(q, k, v, graph, 5, 0.2, mask, "gather", kernel=kernel, remainder=remainder)
        torch.testing.assert_close(diffuse_weighted(q, k, v, graph, weights, mask, "gather"), expected)


def test_diffuse_weighted_bad_weights():
    graph = G.local(32, 16)
    (q, k, v), _ = _inputs(graph, padding=False)  # 2 heads
    with pytest.raises(ValueError, match=r"weights must have shape .* got \(3, 4\)"):
        diffuse_weighted(q, k, v, graph, torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights must have shape"):
        diffuse_weighted(q, k, v, graph, torch.ones(2, 0, dtype=torch.float64))
    with pytest.raises(TypeError, match="weights must be a floating-point tensor"):
        diffuse_weighted(q, k, v, graph, [0.5, 0.5])
    with pytest.raises(ValueError, match="hop_dropout_p"):
        diffuse_weighted(q, k, v, graph, torch.ones(3, dtype=torch.float64), hop_dropout_p=1.0)
    with pytest.raises(ValueError, match="attention dropout"):
        diffuse_weighted(q, k, v, graph, torch.ones(3, dtype=torch.float64), backend="matrix", dropout_p=0.1)


def test_ppr_coefficients_match_the_reference():
    c = diffusion_coefficients(5, 0.1)
    assert c[:5] == pytest.approx([0.1, 0.09, 0.081, 0.0729, 0.06561])
    assert c[5] == pytest.approx(0.59049) and sum(c) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "hops, heat_time, remainder, expected",
    [
        (3, 2.0, "renormalize", [3 / 19, 6 / 19, 6 / 19, 4 / 19]),  # e^-2 2^k / k! = e^-2 [1, 2, 2, 4/3], rescaled
        (2, 1.0, "renormalize", [0.4, 0.4, 0.2]),  # e^-1 [1, 1, 1/2], rescaled
        (2, 1.0, "keep", [math.exp(-1), math.exp(-1), 1 - 2 * math.exp(-1)]),  # the tail on the last term
        (4, 0.5, "renormalize", [384 / 633, 192 / 633, 48 / 633, 8 / 633, 1 / 633]),  # 0.5^k / k!, rescaled
    ],
)
def test_heat_coefficients_are_the_literal_poisson_weights(hops, heat_time, remainder, expected):
    """Heat-kernel weights written out by hand (``c_k = e^-t t^k / k!``), not computed with the library's
    formula: the fused diffusion's power series must use exactly these."""
    got = diffusion_coefficients(hops, kernel="heat", heat_time=heat_time, remainder=remainder)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_heat_diffusion_is_the_hand_written_series():
    """``diffuse(kernel="heat")`` on every CPU backend equals ``(3 V + 6 A V + 6 A^2 V + 4 A^3 V) / 19`` (t = 2,
    three hops, renormalised), with the attention matrix built here."""
    graph = G.bigbird(70, 16, num_random=1, seed=4)
    (q, k, v), mask = _inputs(graph, batch=2, padding=True, seed=3)
    matrix = _dense_attention_matrix(q, k, graph, mask)
    av = matrix @ v
    a2v = matrix @ av
    expected = (3 * v + 6 * av + 6 * a2v + 4 * (matrix @ a2v)) / 19 * mask[:, None, :, None]
    for backend in ("dense", "gather", "matrix"):
        got = diffuse(q, k, v, graph, 3, key_padding_mask=mask, backend=backend, kernel="heat", heat_time=2.0,
                      remainder="renormalize")  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=backend)


def test_identity_cases():
    graph = G.local(50, 16)
    (q, k, v), _ = _inputs(graph, padding=False)
    assert diffuse(q, k, v, graph, hops=0) is v
    assert diffuse(q, k, v, graph, hops=5, alpha=1.0) is v


def test_causal_diffusion_never_sees_the_future():
    graph = G.bigbird(96, 16, num_random=2, causal=True, seed=3)
    (q, k, v), _ = _inputs(graph, batch=1, padding=False)
    for backend in ("dense", "gather", "matrix"):
        out = diffuse(q, k, v, graph, 5, 0.1, backend=backend)
        i = 40
        grads = torch.autograd.grad(out[0, :, i].sum(), (q, k, v))
        for grad in grads:
            assert (grad[0, :, i + 1 :] == 0).all()


def test_dropout_paths_have_consistent_gradients():
    graph = G.bigbird(40, 8, num_random=1, seed=0)
    (q, k, v), mask = _inputs(graph, batch=1, dim=3, padding=True, seed=0)
    for edge_dropout in ("once", "per_hop"):

        def fn(q, k, v, edge_dropout=edge_dropout):
            torch.manual_seed(0)  # the same dropout masks on every call
            return diffuse(
                q, k, v, graph, 3, 0.2, mask, "gather", dropout_p=0.3, edge_dropout=edge_dropout, hop_dropout_p=0.2
            )

        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)
        torch.manual_seed(1)
        assert not torch.allclose(fn(q, k, v), diffuse(q, k, v, graph, 3, 0.2, mask, "gather"))


def _dropout_samples(backend, edge_dropout, dropout_p=0.0, hop_dropout_p=0.0, samples=8000):
    """``samples`` independent draws (the batch) of two PPR hops on blocks of two tokens with uniform attention
    (q = k = 0, so every ``A_ij`` is 1/2 and the self-loops weigh as much as they can), and the attention."""
    graph = G.local(8, 2, window=1)
    heads, alpha = 2, 0.3
    v = torch.randn(1, heads, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = v.expand(samples, -1, -1, -1)
    zeros = torch.zeros_like(v)
    torch.manual_seed(1)
    options = dict(dropout_p=dropout_p, edge_dropout=edge_dropout, hop_dropout_p=hop_dropout_p)
    out = diffuse(zeros, zeros, v, graph, 2, alpha, backend=backend, **options)
    matrix = graph.to_dense().double() / 2
    return out, v[0], matrix, alpha


def _assert_mean(samples, expected, what):
    """The sample mean is within 5 standard errors (per entry) of ``expected``."""
    mean, error = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    worst = ((mean - expected).abs() / error.clamp_min(1e-12)).max()
    assert worst < 5, f"{what}: the mean is {worst:.1f} standard errors from its expected value"


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_edge_dropout_has_the_expected_mean(backend):
    """Edge dropout is unbiased hop by hop: with a fresh mask per hop (``per_hop``) the mean output is the output
    without dropout. One mask for every hop (``once``) weighs each self-loop twice with the same mask, so its mean
    is off by exactly ``(1 - alpha)^2 p / (1 - p) diag(A_ii^2) v`` (two hops): worked out here, and large enough
    that a ``per_hop`` that reused its mask would fail."""
    p = 0.5
    out, v, matrix, alpha = _dropout_samples(backend, "per_hop", dropout_p=p)
    z1 = (1 - alpha) * matrix @ v + alpha * v
    clean = (1 - alpha) * matrix @ z1 + alpha * v
    _assert_mean(out, clean, f"{backend} per_hop")
    out, *_ = _dropout_samples(backend, "once", dropout_p=p)
    once = clean + (1 - alpha) ** 2 * p / (1 - p) * torch.diag(matrix.diagonal() ** 2) @ v
    assert ((once - clean).abs() / (out.std(0) / out.shape[0] ** 0.5)).max() > 20, "the test must tell them apart"
    _assert_mean(out, once, f"{backend} once")


@pytest.mark.parametrize("backend", ["dense", "gather", "matrix"])
def test_hop_dropout_has_the_expected_mean(backend):
    """Feature dropout on every hop's state is unbiased: the mean output is the output without dropout."""
    out, v, matrix, alpha = _dropout_samples(backend, "once", hop_dropout_p=0.4)
    z1 = (1 - alpha) * matrix @ v + alpha * v
    _assert_mean(out, (1 - alpha) * matrix @ z1 + alpha * v, backend)


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_per_hop_edge_dropout_draws_a_new_mask_every_hop(backend):
    """From the same seed, ``per_hop`` and ``once`` draw the same first mask; every later hop must differ. A
    ``per_hop`` that reused its mask would give ``once``'s output exactly; with one hop they agree."""
    graph = G.bigbird(40, 8, num_random=1, seed=0)
    (q, k, v), mask = _inputs(graph, batch=1, dim=4, padding=True, seed=2)
    results = {}
    for hops in (1, 3):
        for mode in ("once", "per_hop"):
            torch.manual_seed(5)
            results[hops, mode] = diffuse(q, k, v, graph, hops, 0.2, mask, backend, dropout_p=0.3, edge_dropout=mode)
    torch.testing.assert_close(results[1, "once"], results[1, "per_hop"], rtol=0, atol=0)
    assert (results[3, "once"] - results[3, "per_hop"]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["gather", "matrix"])
@pytest.mark.parametrize("kernel, remainder", [("ppr", "keep"), ("ppr", "renormalize"), ("heat", "renormalize")])
def test_backward_with_chunks_and_skipped_steps(monkeypatch, backend, kernel, remainder):
    """gather with one head per chunk (backward recomputes every chunk's attention and states) and
    matrix; renormalize also skips a step with a == 1; outputs and q/k/v gradients against dense
    in float64."""
    monkeypatch.setattr(gather_backend, "CHUNK_ELEMENTS", 1)
    for causal in (False, True):
        graph = G.bigbird(70, 8, num_global=1, num_random=2, seed=4, causal=causal)
        tensors, mask = _inputs(graph, heads=3, dim=5)

        def call(q, k, v, graph=graph, **kw):
            return diffuse(q, k, v, graph, 4, 0.3, kernel=kernel, heat_time=1.3, remainder=remainder, **kw)

        expected, got = _run(call, tensors, mask, "dense"), _run(call, tensors, mask, backend)
        for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=f"{kernel} {remainder} causal={causal} {name}")


@pytest.mark.parametrize("kernel, remainder", [("ppr", "renormalize"), ("heat", "keep")])
def test_matrix_backward_with_hop_dropout(kernel, remainder):
    """The matrix backend's written-out backward with hop dropout (the forward's masks reused) and,
    for renormalize, a skipped a == 1 step: gradcheck."""
    graph = G.bigbird(40, 8, num_random=1, seed=0)
    (q, k, v), mask = _inputs(graph, batch=1, heads=2, dim=3, padding=True, seed=1)

    def fn(q, k, v):
        torch.manual_seed(0)  # the same dropout masks on every call
        return diffuse(q, k, v, graph, 3, 0.2, mask, "matrix", kernel=kernel, remainder=remainder, hop_dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend", ["gather", "matrix"])
def test_values_may_be_wider_than_queries(backend):
    """v with its own last dimension (q/k 8, v 5): outputs and gradients against dense in float64."""
    graph = G.bigbird(90, 16, num_random=1, seed=7, causal=True)
    (q, k, _), mask = _inputs(graph, dim=8)
    v = torch.randn(2, 2, 90, 5, dtype=torch.float64, requires_grad=True)
    call = _bind(_diffuse, graph)
    expected, got = _run(call, (q, k, v), mask, "dense"), _run(call, (q, k, v), mask, backend)
    assert got[0].shape == (2, 2, 90, 5)
    for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=name)


def test_matrix_bf16_is_close_to_float64():
    """In bf16 (the GPU training dtype) the matrix backend stays within bf16 rounding of float64
    (worst relative error seen over many seeds: 0.014 for dq and dk, causal)."""
    for causal in (False, True):
        graph = G.diffuser(300, 64, window=3, num_global=2, num_random=2, seed=1, causal=causal)
        tensors, mask = _inputs(graph, heads=2, dim=32)
        expected = _run(_bind(_diffuse, graph), tensors, mask, "dense")
        low = [t.detach().bfloat16().requires_grad_() for t in tensors]
        got = _run(_bind(_diffuse, graph), low, mask, "matrix")
        for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
            assert g.dtype == torch.bfloat16, name
            error = (g.double() - e).norm() / e.norm()
            assert error < 0.03, (causal, name, float(error))


@pytest.mark.parametrize("dropout_p, edge_dropout", [(0.0, "once"), (0.3, "per_hop")])
def test_dropout_gradients_across_chunks_and_skipped_steps(monkeypatch, dropout_p, edge_dropout):
    """Hop dropout alone (chunks recomputed in backward with the forward's masks), and per-hop edge
    dropout with a skipped (a == 1) step."""
    monkeypatch.setattr(gather_backend, "CHUNK_ELEMENTS", 1)
    graph = G.bigbird(40, 8, num_random=1, seed=0)
    (q, k, v), mask = _inputs(graph, batch=1, heads=2, dim=3, padding=True, seed=1)

    def fn(q, k, v):
        torch.manual_seed(0)  # the same dropout masks on every call
        options = {"dropout_p": dropout_p, "edge_dropout": edge_dropout, "hop_dropout_p": 0.3}
        return diffuse(q, k, v, graph, 3, 0.2, mask, "gather", remainder="renormalize", **options)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"hops": -1}, "hops"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"kernel": "heat", "heat_time": 0.0}, "heat_time"),
        ({"kernel": "wave"}, "kernel"),
        ({"remainder": "drop"}, "remainder"),
        ({"backend": "cuda"}, "backend"),
        ({"edge_dropout": "sometimes"}, "edge_dropout"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"dropout_p": 0.1, "backend": "matrix"}, "attention dropout"),
    ],
)
def test_bad_arguments(kwargs, name):
    graph = G.local(32, 16)
    (q, k, v), _ = _inputs(graph, padding=False)
    with pytest.raises(ValueError, match=name):
        diffuse(q, k, v, graph, **kwargs)


def test_bad_shapes_and_masks():
    graph = G.local(32, 16)
    (q, k, v), _ = _inputs(graph, padding=False)
    with pytest.raises(ValueError, match="seq_len"):
        sparse_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], graph)
    with pytest.raises(ValueError, match="4-d"):
        sparse_attention(q[0], k, v, graph)
    with pytest.raises(TypeError, match="key_padding_mask"):
        sparse_attention(q, k, v, graph, torch.ones(2, 32))
    with pytest.raises(ValueError, match="flex"):
        sparse_attention(q, k, v, graph, backend="flex")


@pytest.mark.parametrize(
    ("head_dim", "dtype", "major", "prefixes", "tuned"),
    [
        (64, torch.bfloat16, 9, True, True),  # measured: 0.27-0.50x Inductor's time
        (48, torch.float16, 9, True, True),
        (32, torch.bfloat16, 9, True, False),  # measured: 1.0x unpadded, 1.8-2.1x with key padding
        (16, torch.bfloat16, 9, True, False),
        (128, torch.bfloat16, 9, True, False),  # never measured
        (64, torch.float32, 9, True, False),
        (64, torch.bfloat16, 8, True, False),  # not Hopper
        (64, torch.bfloat16, 9, False, False),  # PyTorch < 2.9: no fwd_/bwd_ options
    ],
)
def test_tuned_flex_tiles_only_where_measured_to_win(head_dim, dtype, major, prefixes, tuned):
    from hopformer.ops.flex import tuned_tiles_apply

    assert tuned_tiles_apply(head_dim, dtype, major, prefixes) is tuned


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [300, 1024])
def test_flex_tile_plan_describes_every_graph(seq_len, causal):
    """The FlexAttention plan, built on the CPU: a tile marked empty holds no edge, a tile marked full
    holds only edges, and the mask_mod's lookup is the graph (token-level grid2d included)."""
    from hopformer.ops.flex import TILE, _tile_codes

    for graph in _patterns(seq_len, 16, causal):
        codes, lookup = _tile_codes(graph, "cpu")
        padded = codes.shape[0] * TILE
        dense = torch.zeros(padded, padded, dtype=torch.bool)
        dense[:seq_len, :seq_len] = graph.to_dense()
        tiles = dense.view(codes.shape[0], TILE, codes.shape[0], TILE)
        assert torch.equal(codes > 0, tiles.any(3).any(1)), graph.name
        assert not ((codes == 2) & ~tiles.all(3).all(1)).any(), graph.name
        token = torch.arange(seq_len) // graph.block_size
        allowed = lookup[token[:, None], token[None, :]]
        if causal:  # the mask_mod cuts inside blocks by position
            allowed = allowed.tril()
        assert torch.equal(allowed, graph.to_dense()), graph.name


# ------------------------------------------------------------------------------- CUDA (flex)
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len, block_size", [(300, 16), (1000, 64), (1024, 128), (700, 256)])
def test_flex_matches_dense(seq_len, block_size, causal):
    _check_flex_against_dense(_patterns(seq_len, block_size, causal))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_flex_matches_dense_on_the_token_random_diffuser_graph(causal):
    """The paper's token-level Diffuser graph (what ``auto`` now diffuses with flex on CUDA), odd length."""
    graph = G.diffuser(1000, 32, num_global=1, num_random=1, random_granularity="token", seed=5, causal=causal)
    _check_flex_against_dense([graph])


def _check_flex_against_dense(graphs):
    """float32 flex against float64 dense: outputs and q/k/v gradients, with and without padding."""
    for graph in graphs:
        for fn in (_sparse, _diffuse):
            for padding in (False, True):
                tensors, mask = _inputs(graph, heads=2, dim=32, padding=padding, device="cuda")
                call = _bind(fn, graph)
                expected = _run(call, tensors, mask, "dense")
                low = [t.detach().float().requires_grad_() for t in tensors]
                got = _run(call, low, mask, "flex")
                for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
                    assert torch.isfinite(g).all(), (graph.name, name)
                    error = (g.double() - e).norm() / e.norm().clamp_min(1e-12)
                    assert error < 1e-3, f"{graph.name} {fn.__name__} {name} padding={padding}: {error:.2e}"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "triton", "matrix"])
def test_diffuse_with_explicit_coefficients_on_cuda(backend):
    """float32 ``diffuse(coefficients=[...])`` on the CUDA backends against float64 dense, zeros included
    (no weight on ``V``, on a middle power; all on ``A^1``), with padding: output and q/k/v gradients."""
    graph = G.diffuser(1000, 64, num_global=1, num_random=2, seed=5)
    (q, k, v), mask = _inputs(graph, heads=2, dim=32, padding=True, device="cuda")
    projection = torch.randn(2, 2, 1000, 32, dtype=torch.float64, device="cuda")
    for coefficients in _explicit_coefficients(5):

        def run(tensors, backend, coefficients=coefficients):
            out = diffuse(*tensors, graph, 5, key_padding_mask=mask, backend=backend, coefficients=coefficients)
            return (out, *torch.autograd.grad((out.double() * projection).sum(), tensors))

        expected = run((q, k, v), "dense")
        got = run([t.detach().float().requires_grad_() for t in (q, k, v)], backend)
        for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
            assert torch.isfinite(g).all(), name
            error = (g.double() - e).norm() / e.norm().clamp_min(1e-12)
            assert error < 1e-3, f"{backend} {name} {coefficients}: {error:.2e}"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "triton", "matrix", "auto"])
def test_diffuse_weighted_on_cuda_matches_dense(backend):
    """float32 ``diffuse_weighted`` on the CUDA backends against float64 dense: output and the gradients
    of q, k, v and the per-head weights, odd length, with and without padding."""
    graph = G.diffuser(1000, 64, num_global=1, num_random=2, seed=4)
    for padding in (False, True):
        (q, k, v), mask = _inputs(graph, heads=2, dim=32, padding=padding, device="cuda")
        weights = torch.randn(2, 6, dtype=torch.float64, device="cuda", requires_grad=True)
        projection = torch.randn(2, 2, 1000, 32, dtype=torch.float64, device="cuda")

        def run(tensors, backend, mask=mask, projection=projection):
            out = diffuse_weighted(*tensors[:3], graph, tensors[3], mask, backend)
            return (out, *torch.autograd.grad((out.double() * projection).sum(), tensors))

        expected = run((q, k, v, weights), "dense")
        got = run([t.detach().float().requires_grad_() for t in (q, k, v, weights)], backend)
        for name, e, g in zip(("out", "dq", "dk", "dv", "dweights"), expected, got):
            assert torch.isfinite(g).all(), name
            error = (g.double() - e).norm() / e.norm().clamp_min(1e-12)
            assert error < 1e-3, f"{backend} {name} padding={padding}: {error:.2e}"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_flex_varying_padding_does_not_fall_back():
    from torch._dynamo.utils import counters

    graph = G.bigbird(2048, 128)
    q, k, v = (torch.randn(2, 2, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for i in range(12):
        mask = torch.arange(2048, device="cuda")[None] < torch.randint(100, 2048, (2, 1), device="cuda")
        sparse_attention(q, k, v, graph, mask, "flex").sum().backward()
        if i == 1:
            graphs_after_two = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs_after_two, "new padding values must not recompile"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_flex_refuses_dropout_and_narrow_heads():
    graph = G.local(256, 128)
    q = torch.randn(1, 1, 256, 32, device="cuda")
    with pytest.raises(ValueError, match="dropout"):
        sparse_attention(q, q, q, graph, backend="flex", dropout_p=0.1)
    narrow = torch.randn(1, 1, 256, 8, device="cuda")  # FlexAttention needs 16: say so, not an InductorError
    with pytest.raises(ValueError, match="head_dim >= 16"):
        sparse_attention(narrow, narrow, narrow, graph, backend="flex")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_matrix_on_cuda_matches_dense(causal):
    """The matrix backend on the GPU: float64 against dense exactly, bf16 within bf16 rounding."""
    for graph in _patterns(300, 64, causal):
        tensors, mask = _inputs(graph, heads=2, dim=32, device="cuda")
        call = _bind(_diffuse, graph)
        expected = _run(call, tensors, mask, "dense")
        for name, e, g in zip(("out", "dq", "dk", "dv"), expected, _run(call, tensors, mask, "matrix")):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=f"{graph.name} {name}")
        low = [t.detach().bfloat16().requires_grad_() for t in tensors]
        for name, e, g in zip(("out", "dq", "dk", "dv"), expected, _run(call, low, mask, "matrix")):
            error = (g.double() - e).norm() / e.norm().clamp_min(1e-12)
            assert error < 0.03, f"{graph.name} {name}: {error:.2e}"


def test_auto_diffusion_on_cpu_picks_matrix_for_short_sequences(monkeypatch):
    """auto diffusion off CUDA = matrix up to CPU_MATRIX_AUTO_MAX_LEN tokens without attention
    dropout, gather beyond it or with dropout; the result is the same as gather's."""
    import hopformer.ops.gather as gather_module
    import hopformer.ops.matrix as matrix_module
    from hopformer.ops import dispatch

    graph = G.bigbird(200, 32, seed=3)
    (q, k, v), mask = _inputs(graph)
    expected = diffuse(q, k, v, graph, key_padding_mask=mask, backend="gather")
    calls = []
    for module, name in ((matrix_module, "matrix_diffusion"), (gather_module, "gather_diffusion")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=real, _n=name, **kw: calls.append(_n[:6]) or _f(*a, **kw))
    got = diffuse(q, k, v, graph, key_padding_mask=mask)
    torch.testing.assert_close(got, expected)
    diffuse(q, k, v, graph, key_padding_mask=mask, dropout_p=0.1)
    monkeypatch.setattr(dispatch, "CPU_MATRIX_AUTO_MAX_LEN", 199)
    diffuse(q, k, v, graph, key_padding_mask=mask)
    assert calls == ["matrix", "gather", "gather"]


def test_auto_diffusion_choice_on_cuda_without_a_gpu(monkeypatch):
    """The CUDA branch of auto's choice, on requests (no tensors): a token-level graph (no 16-token tiles)
    takes flex up to FLEX_AUTO_MAX_HOPS hops and matrix beyond; float64 and narrow heads keep matrix;
    block graphs keep triton; too large a matrix gives flex."""
    import hopformer.ops.triton_diffusion as triton_module
    from hopformer.ops import dispatch
    from hopformer.ops.backend import Request

    def choose(dtype, graph, hops, head_dim=32, seq=1024):
        request = Request(
            "diffuse", device="cuda", dtype=dtype, batch=2, heads=2, seq_len=seq, head_dim=head_dim,
            value_dim=head_dim, block_size=graph.block_size, hops=hops,
        )  # fmt: skip
        return dispatch.choose(request).name

    monkeypatch.setattr(triton_module, "available", lambda: True)
    token = G.diffuser(1024, 32, num_global=1, num_random=1, random_granularity="token")
    block = G.diffuser(1024, 64)
    limit = dispatch.FLEX_AUTO_MAX_HOPS
    assert choose(torch.bfloat16, token, hops=limit) == "flex"
    assert choose(torch.bfloat16, token, hops=limit + 1) == "matrix"
    assert choose(torch.float64, token, hops=1) == "matrix"
    assert choose(torch.bfloat16, token, hops=1, head_dim=8) == "matrix"
    assert choose(torch.bfloat16, token, hops=limit + 1, seq=4096) == "flex"
    assert choose(torch.bfloat16, block, hops=limit + 1) == "triton"
    assert choose(torch.float64, block, hops=1) == "matrix"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_diffusion_on_cuda_picks_triton_then_matrix(monkeypatch):
    """auto diffusion = triton where Triton runs (not float64); matrix for float64 where one
    attention matrix fits the limit, or without Triton beyond FLEX_AUTO_MAX_HOPS hops; flex up to
    that many hops without Triton, and whenever the matrix does not fit."""
    import hopformer.ops.flex as flex_module
    import hopformer.ops.matrix as matrix_module
    import hopformer.ops.triton_diffusion as triton_module
    from hopformer.ops import dispatch

    calls = []
    monkeypatch.setattr(matrix_module, "matrix_diffusion", lambda *a, **kw: calls.append("matrix") or a[2])
    monkeypatch.setattr(flex_module, "run_diffusion", lambda *a, **kw: calls.append("flex") or a[1])
    monkeypatch.setattr(triton_module, "triton_diffusion", lambda *a, **kw: calls.append("triton") or a[2])
    graph = G.bigbird(512, 128)
    (q, k, v), _ = _inputs(graph, dim=16, padding=False, device="cuda", dtype=torch.bfloat16)
    (q64, k64, v64), _ = _inputs(graph, dim=16, padding=False, device="cuda", dtype=torch.float64)
    has_triton = triton_module.available()
    diffuse(q, k, v, graph)
    diffuse(q64, k64, v64, graph)
    monkeypatch.setattr(dispatch, "MATRIX_AUTO_BYTES", 2 * 2 * 512 * 512 * 8 - 1)  # float64: one byte short
    diffuse(q64, k64, v64, graph)
    monkeypatch.setattr(triton_module, "available", lambda: False)
    monkeypatch.setattr(dispatch, "MATRIX_AUTO_BYTES", 2 * 2 * 512 * 512 * 2)  # the bf16 matrix fits exactly
    many = dispatch.FLEX_AUTO_MAX_HOPS + 1
    diffuse(q, k, v, graph, hops=many)
    diffuse(q, k, v, graph, hops=dispatch.FLEX_AUTO_MAX_HOPS)
    monkeypatch.setattr(dispatch, "MATRIX_AUTO_BYTES", 2 * 2 * 512 * 512 * 2 - 1)
    diffuse(q, k, v, graph, hops=many)
    expected = ["triton" if has_triton else "matrix", "matrix", "triton" if has_triton else "flex"]
    assert calls == expected + ["matrix", "flex", "flex"]
