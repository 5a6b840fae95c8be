"""The ``triton`` backend against the dense reference: outputs and q/k/v gradients in float64 on fresh
random inputs, every pattern, causal or not, odd lengths, padding (including fully padded rows), split
work (atomic adds), hop dropout and reset steps; and bf16 / fp16 within 16-bit rounding of float64.

The kernel tests (marked ``triton``) run on CUDA, or on CPU through Triton's interpreter (``TRITON_INTERPRET=1``,
set in conftest.py before triton is first imported), and skip where Triton is not installed (the ``dev`` extra
installs it, so CI runs them in the interpreter); the tile plan, the index guard and the input checks need no
Triton and always run. The kernel tests keep the ``cuda`` marker too, so ``pytest -m cuda`` on a GPU runs them."""

import os

import pytest
import torch

import hopformer.graphs as G
from hopformer.ops import diffuse, sparse_attention
from hopformer.ops import triton_diffusion as T

CUDA = torch.cuda.is_available()  # without CUDA, tests/conftest.py has turned Triton's interpreter on
DEVICE = "cuda" if CUDA else "cpu"
KERNELS = pytest.mark.skipif(
    not T.available() or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="runs Triton kernels: needs triton, and CUDA or the interpreter",
)


# Triton's interpreter runs every program in Python: one head (the batch of two, with its wholly padded
# sequence, still offsets the (batch * heads) layout) keeps the kernel tests to a few minutes on two CPU cores.
HEADS = 2 if CUDA else 1


def _inputs(graph, dim=16, vdim=None, padding=True, batch=2, heads=HEADS, dtype=torch.float64):
    seq = graph.seq_len
    q, k = (torch.randn(batch, heads, seq, dim, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, heads, seq, vdim or dim, dtype=dtype, device=DEVICE, requires_grad=True)
    mask = None
    if padding:
        mask = torch.rand(batch, seq, device=DEVICE) > 0.25
        mask[0, seq // 2 :] = False  # a right-padded row
        mask[1] = False  # a fully padded sequence: no query has a key
    return (q, k, v), mask


def _outputs_and_grads(fn, tensors):
    out = fn(*tensors)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    return (out, *torch.autograd.grad((out * weights).sum(), tensors))


def _assert_matches_dense(call, tensors, what):
    expected = _outputs_and_grads(lambda q, k, v: call(q, k, v, "dense"), tensors)
    got = _outputs_and_grads(lambda q, k, v: call(q, k, v, "triton"), tensors)
    for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
        assert torch.isfinite(g).all(), f"{what} {name}"
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=f"{what} {name}")


@pytest.mark.cuda
@pytest.mark.triton
@KERNELS
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len, block_size", [(37, 16), (150, 32), (200, 64)])
@pytest.mark.parametrize("padding", [False, True])
def test_matches_dense(seq_len, block_size, causal, padding):
    patterns = [
        G.full(seq_len, block_size, causal=causal),
        G.local(seq_len, block_size, window=1, causal=causal),
        G.longformer(seq_len, block_size, window=1, num_global=1, causal=causal),
        G.bigbird(seq_len, block_size, window=1, num_global=1, num_random=1, seed=3, causal=causal),
        G.diffuser(seq_len, block_size, window=1, num_global=1, num_random=1, seed=3, causal=causal),
        G.hypercube(seq_len, block_size, causal=causal),
    ]
    for graph in patterns:
        tensors, mask = _inputs(graph, padding=padding)

        def sparse(q, k, v, backend, graph=graph, mask=mask):
            return sparse_attention(q, k, v, graph, mask, backend)

        def diffusion(q, k, v, backend, graph=graph, mask=mask):
            return diffuse(q, k, v, graph, hops=3, alpha=0.2, key_padding_mask=mask, backend=backend)

        _assert_matches_dense(sparse, tensors, f"{graph.name} sparse")
        _assert_matches_dense(diffusion, tensors, f"{graph.name} diffuse")


@pytest.mark.cuda
@pytest.mark.triton
@KERNELS
@pytest.mark.parametrize("tile, split", [(16, 1), (16, 3), (32, 2)])
def test_split_rows_and_columns_add_up(tile, split, monkeypatch):
    """Cut every row and column into short segments: their partial results add atomically."""
    graph = G.bigbird(300, 32, window=1, num_global=2, num_random=2, seed=1)
    monkeypatch.setattr(T, "DEFAULT_SPLIT", split)
    monkeypatch.setattr(T, "DEFAULT_TILE", tile)
    plan = T.tile_plan(graph, torch.device(DEVICE), tile, split)
    assert plan.rows.num_slots > 0 and plan.cols.num_slots > 0
    tensors, mask = _inputs(graph)

    def call(q, k, v, backend):
        return diffuse(q, k, v, graph, hops=2, alpha=0.3, key_padding_mask=mask, backend=backend)

    def sparse(q, k, v, backend):
        return sparse_attention(q, k, v, graph, mask, backend)

    _assert_matches_dense(call, tensors, f"tile {tile} split {split}")
    _assert_matches_dense(sparse, tensors, f"sparse, tile {tile} split {split}")


@pytest.mark.cuda
@pytest.mark.triton
@KERNELS
@pytest.mark.parametrize("kernel, remainder", [("ppr", "renormalize"), ("heat", "keep"), ("heat", "renormalize")])
def test_kernels_and_reset_steps(kernel, remainder):
    """Heat kernel and renormalised remainders (a first step of weight 1 resets the state to v)."""
    graph = G.bigbird(130, 16, window=1, num_global=1, num_random=1, seed=2)
    tensors, mask = _inputs(graph, dim=24, vdim=40)  # head dims padded to powers of two inside

    def call(q, k, v, backend):
        return diffuse(q, k, v, graph, 4, 0.3, mask, backend, kernel=kernel, remainder=remainder, heat_time=1.5)

    _assert_matches_dense(call, tensors, f"{kernel} {remainder}")


@pytest.mark.cuda
@pytest.mark.triton
@KERNELS
@pytest.mark.parametrize("remainder", ["keep", "renormalize"])
def test_hop_dropout_gradient_matches_finite_differences(remainder):
    """With hop dropout, the adjoint backward equals the directional derivative of the forward
    (same random masks in every call: the generator is reseeded)."""
    graph = G.bigbird(96, 16, window=1, num_global=1, num_random=1, seed=4)
    (q, k, v), mask = _inputs(graph)

    def forward(q, k, v):
        torch.manual_seed(7)
        out = diffuse(q, k, v, graph, 3, 0.2, mask, "triton", remainder=remainder, hop_dropout_p=0.3)
        return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)).sum()

    grads = torch.autograd.grad(forward(q, k, v), (q, k, v))
    assert all(g.abs().sum() > 0 for g in grads)
    eps = 1e-6
    for i, g in enumerate(grads):
        direction = torch.randn_like(g)
        plus, minus = [[t.detach().clone() for t in (q, k, v)] for _ in range(2)]
        plus[i] += eps * direction
        minus[i] -= eps * direction
        with torch.no_grad():
            numeric = (forward(*plus) - forward(*minus)) / (2 * eps)
        torch.testing.assert_close((g * direction).sum(), numeric, rtol=1e-6, atol=1e-8, msg=f"input {i}")


@pytest.mark.cuda
@pytest.mark.triton
@KERNELS
@pytest.mark.parametrize("real_fraction", [1.0, 0.22])
@pytest.mark.parametrize("op", ["sparse", "diffuse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_is_close_to_float64(dtype, op, real_fraction):
    """In bf16 (the GPU training dtype) and fp16 the kernels stay within 16-bit rounding of float64 dense,
    as the matrix backend does (tests/test_ops.py), with all tokens real or with a lit-pixel-like mask (22%
    real, scattered), and with sharper-than-unit scores, as trained models have. Pathfinder's length on
    CUDA; 256 tokens, fp16 only, in the interpreter, whose bfloat16 is wrong even for a plain load and dot."""
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("needs CUDA: Triton's interpreter gets bfloat16 wrong")
    seq = 1024 if CUDA else 256
    graph = G.diffuser(seq, 64, window=1, num_global=1, num_random=1, seed=3)
    (q, k, v), _ = _inputs(graph, dim=32, padding=False, batch=4 if CUDA else 2)
    mask = torch.rand(q.shape[0], seq, device=DEVICE) < real_fraction
    mask[:, 0] = True
    weights = torch.randn_like(v)

    def outputs_and_grads(backend, precision):
        tensors = [t.detach().to(precision).requires_grad_() for t in (2 * q, 2 * k, v)]
        if op == "sparse":
            out = sparse_attention(*tensors, graph, mask, backend)
        else:
            out = diffuse(*tensors, graph, 5, 0.1, mask, backend)
        return (out, *torch.autograd.grad((out.double() * weights).sum(), tensors))

    expected = outputs_and_grads("dense", torch.float64)
    for name, e, g in zip(("out", "dq", "dk", "dv"), expected, outputs_and_grads("triton", dtype)):
        assert g.dtype == dtype, name
        error = (g.double() - e).norm() / e.norm()
        assert error < 0.03, f"{name}: relative error {error:.2e}"


def test_tile_plan_covers_every_tile_pair_once():
    graph = G.bigbird(1000, 64, window=3, num_global=2, num_random=3, seed=0, causal=True)
    plan = T.tile_plan(graph, torch.device("cpu"), tile=32, split=5)
    expected = graph.block_adjacency().repeat_interleave(2, 0).repeat_interleave(2, 1)
    expected = expected[: plan.padded_len // 32, : plan.padded_len // 32].tril()
    for segs, transpose in ((plan.rows, False), (plan.cols, True)):
        seen = torch.zeros_like(expected, dtype=torch.int64)
        for tile, begin, end in zip(segs.tile.tolist(), segs.begin.tolist(), segs.end.tolist()):
            assert end - begin <= 5
            for loop in segs.loop_tiles[begin:end].tolist():
                seen[(loop, tile) if transpose else (tile, loop)] += 1
        assert torch.equal(seen, expected.long())
        assert segs.row_segments[-1] == segs.count  # every tile has at least one segment
        assert torch.equal(segs.tile.bincount(minlength=len(segs.row_segments) - 1), segs.row_segments.diff())


def test_bad_inputs_name_the_argument():
    graph = G.local(96, 24)
    q = torch.randn(1, 1, 96, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block_size"):
        sparse_attention(q, q, q, graph, backend="triton")
    with pytest.raises(ValueError, match="dropout"):
        diffuse(q, q, q, G.local(96, 32), backend="triton", dropout_p=0.1)
    with pytest.raises(ValueError, match="tile"):
        T.tile_plan(G.local(96, 32), torch.device("cpu"), tile=64)
    with pytest.raises(ValueError, match="split"):
        T.tile_plan(G.local(96, 32), torch.device("cpu"), split=0)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA or not T.available(), reason="needs CUDA and triton (too large for the interpreter)")
def test_offsets_past_2_31_elements_match_head_chunks():
    """The backward's hop-state stacks hold (hops, batch * heads, seq, 64) elements: here 10 x 1024 x 4096 x
    64, past 2^31 from hop 8. The whole call must equal the same kernels run on slices of heads whose
    offsets all stay far below 2^31 (float32: exact products, only the order of atomic adds differs)."""
    graph = G.bigbird(4096, 128, window=3, num_global=2, num_random=3, seed=0)
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 128, 4096, 64, device="cuda") for _ in range(3))
    grad = torch.randn_like(v)
    assert 9 * q.shape[0] * q.shape[1] * 4096 * 64 >= 2**31

    def run(q, k, v, grad):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = diffuse(q, k, v, graph, hops=10, backend="triton")
        out.backward(grad)
        return out.detach(), q.grad, k.grad, v.grad

    whole = run(q, k, v, grad)
    chunks = [run(*(x[b : b + 1, h : h + 32] for x in (q, k, v, grad))) for b in range(8) for h in range(0, 128, 32)]
    for index, name in enumerate(("out", "dq", "dk", "dv")):
        rows = [torch.cat([chunks[b * 4 + c][index] for c in range(4)], dim=1) for b in range(8)]
        joined = torch.cat(rows)
        torch.testing.assert_close(whole[index], joined, rtol=1e-4, atol=1e-5, msg=name)


def test_index_guard_raises_before_any_kernel(monkeypatch):
    """Within one head the kernels index (position, dim) in int32: a slice past that raises a clear error
    before launch (shown here with a lowered limit, so it needs no Triton and no GPU)."""
    T.check_index_range(4_194_304, 128)  # 4M tokens x 128: fine
    with pytest.raises(ValueError, match="past 2\\^31"):
        T.check_index_range(2**24, 128)
    monkeypatch.setattr(T, "INT32_LIMIT", 1000)
    graph = G.local(64, 16)
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="64 x 16 elements is past 2\\^31; use backend='flex'"):
        T.triton_diffusion(q, q, q, graph, None, [0.0], 0.25)
