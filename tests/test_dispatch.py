"""The backend dispatch: declarations, auto's choice, explain, named-backend errors, the shared pieces, and
the public op names."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import hopformer.graphs as G
from hopformer.ops import dispatch, explain
from hopformer.ops.backend import CombinerBackend, DiffusionBackend, Request, Support
from hopformer.ops.common import diffusion_steps, masked_softmax


def test_every_backend_is_one_contract():
    for backend in dispatch.diffusion_backends().values():
        assert isinstance(backend, DiffusionBackend), backend.name
        assert isinstance(backend.support, Support)
    for backend in dispatch.combiner_backends().values():
        assert isinstance(backend, CombinerBackend), backend.name
    assert set(dispatch.diffusion_backends()) == {"dense", "gather", "matrix", "flex", "triton"}
    assert set(dispatch.combiner_backends()) == {"eager", "flex"}


def test_support_names_each_limit():
    support = Support(
        ops=("diffuse",),
        devices=("cuda",),
        dtypes=(torch.bfloat16,),
        attention_dropout=False,
        hop_dropout=False,
        min_head_dim=16,
        block_sizes=lambda size: size % 16 == 0,
        rule="is a multiple of 16",
        requires=lambda: "needs a thing",
    )
    request = Request(
        "sparse_attention", device="cpu", dtype=torch.float32, head_dim=8, block_size=24,
        attention_dropout=True, hop_dropout=True,
    )  # fmt: skip
    reasons = " | ".join(support.reasons(request))
    for part in (
        "does not run sparse_attention",
        "needs a thing",
        "runs on cuda, not cpu",
        "takes bfloat16, not float32",
        "no attention dropout",
        "no hop dropout",
        "head_dim >= 16, got 8",
        "block_size that is a multiple of 16, got 24",
    ):
        assert part in reasons
    ok = Request("diffuse", device="cuda", dtype=torch.bfloat16, head_dim=64, block_size=128)
    assert support.reasons(ok) == ["needs a thing"]
    # a device left unknown (a module built here, run elsewhere): what this machine has is not asked
    assert support.reasons(ok.replace(device=None)) == []


def test_explain_cpu_float32():
    graph = G.bigbird(1000, 64, seed=0)
    q = torch.randn(2, 4, 1000, 32)
    verdict = explain(q, graph, op="diffuse", hops=5)
    assert verdict.chosen == "gather"
    assert verdict.reasons["gather"] == [] and verdict.reasons["matrix"] == []
    assert "runs on cuda, not cpu" in verdict.verdicts["flex"]
    assert "512 tokens" in verdict.verdicts["matrix"]
    text = str(verdict)
    assert text.splitlines()[1].startswith("auto picks gather")
    assert all(name in text for name in ("dense", "matrix", "flex", "triton"))
    short = explain(q[:, :, :300], G.bigbird(300, 64, seed=0), op="diffuse")
    assert short.chosen == "matrix" and "auto ranks matrix first" in short.verdicts["gather"]
    assert explain(q[:, :, :300], G.bigbird(300, 64, seed=0), op="diffuse", dropout_p=0.1).chosen == "gather"
    assert explain(q, graph, op="sparse_attention").chosen == "gather"
    assert explain(q, op="combiner", variant="axial").chosen == "eager"


def test_explain_cuda_requests_without_a_gpu(monkeypatch):
    """auto's CUDA branch, on requests: bf16 at 131K goes to triton, float64 short to the matrix."""
    import hopformer.ops.triton_diffusion as triton_module

    monkeypatch.setattr(triton_module, "available", lambda: True)
    big = Request(
        "diffuse", device="cuda", dtype=torch.bfloat16, batch=1, heads=12, seq_len=131072, head_dim=64,
        value_dim=64, block_size=128, hops=5, gpu_memory=80 << 30,
    )  # fmt: skip
    verdict = dispatch.explain_request(big)
    assert verdict.chosen == "triton"
    assert "could; auto ranks triton first" in verdict.verdicts["flex"]
    assert "2,048 tokens" in verdict.verdicts["matrix"]
    assert "only off CUDA" in verdict.verdicts["gather"]
    short64 = big.replace(dtype=torch.float64, seq_len=1024)
    assert dispatch.explain_request(short64).chosen == "matrix"
    sparse = big.replace(op="sparse_attention", hops=1)
    assert dispatch.explain_request(sparse).chosen == "flex"
    assert dispatch.explain_request(sparse.replace(block_size=48)).chosen == "triton"  # flex needs 128-tiles
    with pytest.raises(ValueError, match="no fast backend.*these can: 'dense', 'gather'"):
        dispatch.choose(sparse.replace(attention_dropout=True))
    combiner = Request("combiner", device="cuda", dtype=torch.bfloat16, seq_len=65536, head_dim=64, value_dim=64)
    assert dispatch.explain_request(combiner.replace(variant="fixed")).chosen == "flex"
    assert dispatch.explain_request(combiner.replace(variant="axial")).chosen == "eager"


def test_a_named_backend_that_cannot_run_says_why_and_who_can():
    graph = G.bigbird(256, 64, seed=0)
    q = torch.randn(1, 2, 256, 16)
    from hopformer.ops import diffuse, sparse_attention

    with pytest.raises(ValueError, match=r"backend='flex' cannot run diffuse.*runs on cuda, not cpu.*'gather'"):
        diffuse(q, q, q, graph, backend="flex")
    with pytest.raises(ValueError, match=r"backend='matrix' cannot run .*no attention dropout.*'dense', 'gather'"):
        sparse_attention(q, q, q, graph, backend="matrix", dropout_p=0.1)
    with pytest.raises(ValueError, match="backend='fast' is not known"):
        sparse_attention(q, q, q, graph, backend="fast")
    verdict = explain(q, graph, op="diffuse", backend="flex")
    assert verdict.chosen is None and str(verdict).splitlines()[1].startswith("backend='flex' cannot run it")


def test_modules_ask_the_dispatch():
    from hopformer.attention import build

    with pytest.raises(ValueError, match="backend='flex' cannot run .*no attention dropout"):
        build("bigbird", 64, 2, backend="flex", dropout=0.1)
    with pytest.raises(ValueError, match="backend='flex' cannot run combiner.*only, not 'logsparse'"):
        build("combiner", 64, 2, variant="logsparse", backend="flex")
    module = build("diffuser", 64, 2, hops=3, hop_dropout=0.1)
    verdict = module.explain(4096, device="cpu")
    assert verdict.chosen == "gather" and verdict.request.hops == 3 and verdict.request.hop_dropout
    assert build("full", 64, 2).explain(4096) is None


def test_masked_softmax_and_the_hop_loop():
    scores = torch.randn(3, 5, 7, dtype=torch.float64)
    allowed = torch.rand(3, 5, 7) > 0.4
    allowed[0, 0] = False  # a row with nothing allowed
    probs = masked_softmax(scores, allowed)
    assert (probs[~allowed] == 0).all() and (probs[0, 0] == 0).all()
    rows = allowed.any(-1)
    torch.testing.assert_close(probs.sum(-1)[rows], torch.ones_like(probs.sum(-1)[rows]))
    expected = torch.where(allowed, scores, -torch.inf).softmax(-1).nan_to_num(0.0)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(masked_softmax(scores.clone(), allowed, inplace=True), expected)
    both = masked_softmax(scores.clone(), allowed, (1, 2), inplace=True)
    flat = torch.where(allowed, scores, -torch.inf).flatten(1).softmax(-1).view_as(scores)
    torch.testing.assert_close(both, flat)

    matrix = torch.rand(6, 6, dtype=torch.float64)
    v = torch.randn(6, 2, dtype=torch.float64)
    steps = [0.0, 0.3, 1.0, 0.5]
    states = list(diffusion_steps(lambda z, _: matrix @ z, v, steps))
    z, manual = v, []
    for a in steps:
        z = v if a == 1.0 else (1 - a) * (matrix @ z) + a * v
        manual.append(z)
    for got, want in zip(states, manual, strict=True):
        torch.testing.assert_close(got, want)


def test_public_op_names_are_the_functions_whatever_was_imported_first():
    """Importing every public module first (Combiner's and Routing's implementation modules included)
    leaves ``hopformer.ops.combiner`` and ``hopformer.ops.routing`` the functions, and they run."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil
        import torch
        import hopformer
        for info in pkgutil.walk_packages(hopformer.__path__, "hopformer."):
            if info.name.endswith(("__main__", "_triton_kernels")):
                continue
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as error:  # an optional extra that is not installed
                if not error.name or error.name.split(".")[0] == "hopformer":
                    raise
        import hopformer.ops
        q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
        out = hopformer.ops.combiner(q, k, v, "fixed", 4)
        centroids = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
        routed = hopformer.ops.routing(q, k, v, centroids, window=4)
        print(callable(hopformer.ops.combiner), callable(hopformer.ops.routing), tuple(out.shape), tuple(routed.shape))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "(1,", "2,", "16,", "8)", "(1,", "2,", "16,", "8)"]
