"""The FlexAttention forward paths on the CPU, against dense references: the ``flex`` backend of sparse attention
and diffusion (``hopformer.ops.flex``: ``block_mask``, ``run_flex``, ``FlexBackend.diffuse``), the padding block
mask, Combiner-Fixed's mask (``hopformer.ops.combiner_flex``) and Routing's local heads.

hopformer declares these backends CUDA-only (it runs FlexAttention compiled, and compiled FlexAttention is a GPU
kernel); the tests widen the declaration and run them two ways:

- **eager**: PyTorch's own FlexAttention, run eagerly in place of ``run_flex``'s compiled call (forward only;
  it works on the CPU). It checks hopformer's ``mask_mod``, scale and layout. Eager FlexAttention evaluates the
  ``mask_mod`` at every position, so it cannot see a wrong tile code.
- **kernel view**: a stand-in for ``run_flex`` that applies the BlockMask as the compiled kernels do: tiles
  marked full are attended without the ``mask_mod``, partial tiles through it, the other tiles are skipped. A
  tile wrongly marked full or empty shows here. Plain PyTorch, so gradients are checked too.

Backward through real FlexAttention stays a CUDA test (``tests/test_ops.py``, ``tests/test_combiner.py``).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import hopformer.graphs as G
import hopformer.ops.combiner_flex as combiner_flex
from hopformer.attention.routing import local_attention
from hopformer.ops import combiner, diffuse, flex, sparse_attention

SEED = 20


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def flex_on_cpu(monkeypatch):
    """The flex backends accept CPU tensors (their declared support says CUDA only)."""
    for backend in (flex.FLEX, combiner_flex.FLEX):
        monkeypatch.setattr(backend, "support", dataclasses.replace(backend.support, devices=("cpu", "cuda")))


@pytest.fixture
def eager_flex(flex_on_cpu, monkeypatch):
    """``run_flex`` calls FlexAttention eagerly instead of compiled. Returns the list of BlockMasks it ran."""
    masks = []
    eager = {lse: flex._flex_call(lse) for lse in (False, True)}

    def compiled(return_lse: bool):
        def attend(q, k, v, block_mask, *args):
            masks.append(block_mask)
            return eager[return_lse](q, k, v, block_mask, *args)

        return attend

    monkeypatch.setattr(flex, "_compiled_flex", compiled)
    torch._dynamo.reset()  # eager FlexAttention still goes through Dynamo: start with a fresh count
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        yield masks
    torch._dynamo.reset()


def kernel_mask(block_mask) -> torch.Tensor:
    """``(B, Q, K)``: what a compiled FlexAttention kernel attends under ``block_mask``: full tiles whole (their
    ``mask_mod`` is never evaluated), partial tiles where the ``mask_mod`` allows, nothing in the other tiles."""
    q_len, kv_len = block_mask.seq_lengths
    tile_q, tile_kv = block_mask.BLOCK_SIZE
    batch, _, q_tiles = block_mask.kv_num_blocks.shape
    kv_tiles = -(-kv_len // tile_kv)
    codes = torch.zeros(batch, q_tiles, kv_tiles, dtype=torch.int8)
    for b in range(batch):
        for i in range(q_tiles):
            partial = block_mask.kv_indices[b, 0, i, : block_mask.kv_num_blocks[b, 0, i]].long()
            full = block_mask.full_kv_indices[b, 0, i, : block_mask.full_kv_num_blocks[b, 0, i]].long()
            assert not set(partial.tolist()) & set(full.tolist()), "a tile is both partial and full"
            codes[b, i, partial] = 1
            codes[b, i, full] = 2
    codes = codes.repeat_interleave(tile_q, 1).repeat_interleave(tile_kv, 2)[:, :q_len, :kv_len]
    b, q_idx, kv_idx = torch.arange(batch), torch.arange(q_len), torch.arange(kv_len)
    allowed = block_mask.mask_mod(b[:, None, None], torch.zeros((), dtype=torch.long), q_idx[:, None], kv_idx)
    return (codes == 2) | ((codes == 1) & allowed.expand(batch, q_len, kv_len))


@pytest.fixture
def kernel_view(flex_on_cpu, monkeypatch):
    """``run_flex`` attends densely under :func:`kernel_mask` of its BlockMask. Returns the masks it ran."""
    masks = []

    def run(q, k, v, mask, scale, kernel_options=None, *, return_lse=False):
        masks.append(mask)
        allowed = kernel_mask(mask)[:, None]  # (B, 1, Q, K)
        scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -torch.inf)
        out = scores.softmax(-1).nan_to_num(0.0) @ v  # a row with no key gives zeros, as the kernels do
        return (out, scores.logsumexp(-1)) if return_lse else out

    monkeypatch.setattr(flex, "run_flex", run)
    return masks


# ----------------------------------------------------------------------------------------- references
def _inputs(seq, batch=3, heads=2, dim=16, padding=True, seed=SEED, grad=False):
    """Random float64 q, k, v and, with ``padding``, a key padding mask: sequence 0 scattered padding and its
    second half padded (whole padded tiles), 1 nothing real, 2 left padding ending inside a tile and every
    token after it real (wholly real query tiles beside a partly padded key tile)."""
    g = torch.Generator().manual_seed(seed + seq)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g, dtype=torch.float64) for _ in range(3))
    mask = None
    if padding:
        mask = torch.rand(batch, seq, generator=g) > 0.2
        mask[0, seq // 2 :] = False
        mask[1] = False
        mask[2] = torch.arange(seq) >= seq // 3 + 5
    return [x.requires_grad_(grad) for x in (q, k, v)], mask


def _dense(q, k, v, allowed, scale=None):
    """Softmax attention on ``allowed`` (broadcast to ``(B, H, Q, K)``); rows with no key give zeros."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -torch.inf)
    return scores.softmax(-1).nan_to_num(0.0) @ v


def _graph_mask(graph, mask):
    """The graph's edges between real tokens, built from the block lists here."""
    allowed = torch.zeros(graph.seq_len, graph.seq_len, dtype=torch.bool)
    bs = graph.block_size
    for qb, keys in enumerate(graph.block_lists()):
        for kb in keys:
            allowed[qb * bs : (qb + 1) * bs, kb * bs : (kb + 1) * bs] = True
    if graph.is_causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :] & mask[:, None, :, None]
    return allowed


def _patterns(seq, block, causal):
    return [
        G.local(seq, block, window=3, causal=causal),
        G.bigbird(seq, block, window=3, num_global=1, num_random=2, seed=5, causal=causal),
        G.diffuser(seq, block, window=3, num_global=2, num_random=1, seed=5, causal=causal),
        G.hypercube(seq, block, causal=causal),
    ]


# ------------------------------------------------------------------------------ sparse attention, diffusion
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq, block", [(300, 16), (390, 256)])
def test_eager_flex_sparse_attention_and_diffusion_match_dense(eager_flex, seq, block, causal):
    """``sparse_attention`` and ``diffuse`` with ``backend="flex"``: block_mask, run_flex and FlexBackend.diffuse
    with PyTorch's FlexAttention (eager), float64, an odd length (padded to whole tiles), key padding with a
    wholly padded sequence; against the dense backend and the power series of the attention built here."""
    graph = G.bigbird(seq, block, window=3, num_global=1, num_random=2, seed=7, causal=causal)
    (q, k, v), mask = _inputs(seq)
    attention = _dense(q, k, torch.eye(seq, dtype=torch.float64).expand(*q.shape[:2], -1, -1), _graph_mask(graph, mask))
    out = sparse_attention(q, k, v, graph, mask, "flex")
    torch.testing.assert_close(out, attention @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, sparse_attention(q, k, v, graph, mask, "dense"), rtol=1e-10, atol=1e-12)
    hops, alpha = 3, 0.2
    series = sum(alpha * (1 - alpha) ** n * torch.linalg.matrix_power(attention, n) @ v for n in range(hops))
    series = (series + (1 - alpha) ** hops * torch.linalg.matrix_power(attention, hops) @ v) * mask[:, None, :, None]
    torch.testing.assert_close(diffuse(q, k, v, graph, hops, alpha, mask, "flex"), series, rtol=1e-10, atol=1e-12)
    assert len(eager_flex) == 1 + hops, "every call went through run_flex"


def test_eager_flex_token_level_graph_without_padding(eager_flex):
    """A token-level graph (``block_size=1``, grid2d) without key padding: the cached plan is reused."""
    graph = G.grid2d(17 * 17, side=17, radius=1, num_random=3, seed=1, causal=False)
    (q, k, v), _ = _inputs(graph.seq_len, padding=False)
    expected = _dense(q, k, v, _graph_mask(graph, None))
    for _ in range(2):
        torch.testing.assert_close(sparse_attention(q, k, v, graph, None, "flex"), expected, rtol=1e-10, atol=1e-12)
    assert eager_flex[0] is eager_flex[1], "the graph's plan is cached"


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq, block", [(300, 16), (390, 128), (300, 256)])
def test_kernel_view_of_sparse_attention_and_diffusion_matches_dense(kernel_view, seq, block, causal, padding):
    """What the compiled kernels compute under hopformer's BlockMasks (tile codes included): outputs and q/k/v
    gradients of ``sparse_attention`` and ``diffuse`` on every pattern against the dense backend, float64."""
    for graph in _patterns(seq, block, causal):
        (q, k, v), mask = _inputs(seq, heads=1, padding=padding, grad=True)
        weights = torch.randn(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)

        def sparse(backend, q=q, k=k, v=v, graph=graph, mask=mask):
            return sparse_attention(q, k, v, graph, mask, backend)

        def diffusion(backend, q=q, k=k, v=v, graph=graph, mask=mask):
            return diffuse(q, k, v, graph, 2, 0.3, mask, backend, kernel="heat")

        for call in (sparse, diffusion):
            results = []
            for backend in ("dense", "flex"):
                out = call(backend)
                results.append((out, *torch.autograd.grad((out * weights).sum(), (q, k, v))))
            for name, e, g in zip(("out", "dq", "dk", "dv"), *results):
                label = f"{graph.name} {call.__name__} {name}"
                torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=lambda m, n=label: f"{n}: {m}")
    assert kernel_view, "run_flex was called"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq, block", [(300, 16), (517, 128), (700, 256), (129, 1)])
def test_padding_block_mask_is_the_graph_between_real_tokens(seq, block, causal):
    """``block_mask`` with key padding, as the kernels read it: exactly the graph's edges between real tokens
    (padded keys never attended, padded queries attend nowhere), tiles past the sequence empty; scattered
    padding, a wholly padded sequence, and left and right padding that ends inside a tile."""
    graph = G.bigbird(seq, block, window=3, num_global=1, num_random=2, seed=3, causal=causal)
    g = torch.Generator().manual_seed(seq)
    mask = torch.rand(4, seq, generator=g) > 0.3
    mask[1] = False
    mask[2] = torch.arange(seq) >= seq // 2 + 3  # left padding ending inside a tile, real after it
    mask[3] = torch.arange(seq) < seq - 45  # right padding starting inside a tile
    plan = flex.block_mask(graph, mask, torch.device("cpu"))
    assert plan.seq == seq and plan.padded == -(-seq // flex.TILE) * flex.TILE
    seen = kernel_mask(plan.mask)
    expected = torch.zeros(4, plan.padded, plan.padded, dtype=torch.bool)
    expected[:, :seq, :seq] = _graph_mask(graph, mask)[:, 0]
    assert torch.equal(seen, expected)
    unpadded = kernel_mask(flex.block_mask(graph, None, torch.device("cpu")).mask)
    assert torch.equal(unpadded[0, :seq, :seq], _graph_mask(graph, None)[0, 0])
    assert not unpadded[0, :, seq:].any(), "keys past the sequence are never attended"  # (rows past it are cut)


# ------------------------------------------------------------------------------------------ Combiner-Fixed
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq, block, padded", [(300, 48, True), (517, 128, True), (700, 256, True), (256, 16, False)])
def test_eager_flex_combiner_fixed_matches_eager_backend(eager_flex, monkeypatch, seq, block, causal, padded):
    """Combiner-Fixed's one FlexAttention call over ``[tokens ; block summaries]`` (its mask_mod, layout and
    summary copies), run by PyTorch's FlexAttention eagerly, against the ``eager`` Combiner backend."""
    monkeypatch.setattr(combiner_flex, "SUMMARY_GROUP", 2)  # several copies of the summaries
    (q, k, v), _ = _inputs(seq, batch=2, padding=False)
    mask = None
    if padded:
        mask = torch.ones(2, seq, dtype=torch.bool)
        mask[0, -37:] = False
        mask[1, block : 2 * block] = False  # an empty region
    expected = combiner(q, k, v, "fixed", block, causal, mask, backend="eager")
    got = combiner(q, k, v, "fixed", block, causal, mask, backend="flex")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert len(eager_flex) == 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "seq, block, group, padded",
    [(300, 48, 2, True), (517, 128, 16, True), (700, 256, 2, True), (256, 16, 16, False), (768, 256, 2, False)],
)
def test_kernel_view_of_combiner_fixed_matches_eager_backend(
    kernel_view, monkeypatch, seq, block, causal, group, padded
):
    """Combiner-Fixed under its tile codes as the kernels read them (without padding, whole tiles of a block are
    full): outputs and gradients against ``eager``."""
    monkeypatch.setattr(combiner_flex, "SUMMARY_GROUP", group)
    (q, k, v), _ = _inputs(seq, batch=2, padding=False, grad=True)
    mask = None
    if padded:
        mask = torch.ones(2, seq, dtype=torch.bool)
        mask[0, -21:] = False
    weights = torch.randn(q.shape, dtype=torch.float64)
    results = []
    for backend in ("eager", "flex"):
        out = combiner(q, k, v, "fixed", block, causal, mask, backend=backend)
        results.append((out, *torch.autograd.grad((out * weights).sum(), (q, k, v))))
    for name, e, g in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    assert len(kernel_view) == 1


# --------------------------------------------------------------------------------- Combiner's axial forms
AXIAL_CASES = [(300, 17, True), (517, 23, True), (400, 160, False), (640, 128, True)]


def _axial_padding(seq: int, width: int) -> torch.Tensor:
    mask = torch.ones(2, seq, dtype=torch.bool)
    mask[0, -37:] = False
    mask[1, width : 2 * width] = False  # an empty row: empty horizontal regions
    return mask


@pytest.mark.parametrize("variant", ["axial", "axial_horizontal", "mixture"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq, width, padded", AXIAL_CASES)
def test_eager_flex_combiner_axial_matches_eager_backend(eager_flex, seq, width, padded, causal, variant):
    """The axial forms' FlexAttention calls (mask_mods, layouts, the log-sum-exps FlexAttention returns and their
    merge), run by PyTorch's FlexAttention eagerly, against the ``eager`` backend."""
    (q, k, v), _ = _inputs(seq, batch=2, padding=False)
    mask = _axial_padding(seq, width) if padded else None
    expected = combiner(q, k, v, variant, width, causal, mask, backend="eager")
    got = combiner(q, k, v, variant, width, causal, mask, backend="flex")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the row and column calls, then per form one for the summaries' values and one reading them
    assert len(eager_flex) == 2 + 2 * len(combiner_flex.AXIAL_FORMS[variant])


@pytest.mark.parametrize("variant", ["axial", "axial_horizontal", "mixture"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq, width, padded", AXIAL_CASES)
def test_kernel_view_of_combiner_axial_matches_eager_backend(kernel_view, seq, width, padded, causal, variant):
    """The axial calls under their tile codes as the kernels read them: outputs and gradients against ``eager``
    (a tile wrongly skipped shows here)."""
    (q, k, v), _ = _inputs(seq, batch=2, padding=False, grad=True)
    mask = _axial_padding(seq, width) if padded else None
    weights = torch.randn(q.shape, dtype=torch.float64)
    results = []
    for backend in ("eager", "flex"):
        out = combiner(q, k, v, variant, width, causal, mask, backend=backend)
        results.append((out, *torch.autograd.grad((out * weights).sum(), (q, k, v))))
    for name, e, g in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    assert len(kernel_view) == 2 + 2 * len(combiner_flex.AXIAL_FORMS[variant])


# ---------------------------------------------------------------------------------------- Routing's local heads
def _local_reference(q, k, v, block, causal, mask):
    seq = q.shape[2]
    i = torch.arange(seq)
    allowed = (i[None, :] // block - i[:, None] // block).abs() <= 1
    if causal:
        allowed = allowed & (i[None, :] <= i[:, None])
    allowed = allowed[None, None] & mask[:, None, None, :] & mask[:, None, :, None]
    return _dense(q, k, v, allowed)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [64, 128])
def test_eager_flex_local_heads_match_the_dense_band(eager_flex, block, causal):
    """Routing's local heads take FlexAttention on the ``local(window=3)`` block graph where flex runs."""
    (q, k, v), mask = _inputs(300)
    got = local_attention(q, k, v, block, causal, mask)
    torch.testing.assert_close(got, _local_reference(q, k, v, block, causal, mask), rtol=1e-10, atol=1e-12)
    assert len(eager_flex) == 1, "the flex path ran"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [32, 128, 256])
def test_kernel_view_of_local_heads_matches_the_sdpa_path(kernel_view, monkeypatch, block, causal):
    """The local heads' flex path under its tile codes against their batched-SDPA path: outputs and gradients."""
    (q, k, v), mask = _inputs(300, grad=True)
    weights = torch.randn(q.shape, dtype=torch.float64)
    got = local_attention(q, k, v, block, causal, mask)
    assert len(kernel_view) == 1, "the flex path ran"
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    kernel_view.clear()
    monkeypatch.setattr(flex.FLEX, "support", dataclasses.replace(flex.FLEX.support, devices=("cuda",)))  # SDPA path
    expected = local_attention(q, k, v, block, causal, mask)
    assert not kernel_view
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for name, a, b in zip("qkv", grads, torch.autograd.grad((expected * weights).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"d{n}: {m}")
