"""torch.compile: a whole model with every attention traces as one graph (``fullgraph=True``, no graph break) and
gives eager's outputs, gradients and state updates; the custom ops pass ``torch.library.opcheck``.

Models are compiled with the ``aot_eager`` backend (Dynamo's trace and AOTAutograd's joint graph, fake tensors and
functionalisation included, without Inductor's C++ build time) in float64; one case runs Inductor itself."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from hopformer.attention import available
from hopformer.graphs import bigbird, local
from hopformer.graphs.tracing import exporting
from hopformer.models import CausalLM, CausalLMConfig, EncoderConfig, TransformerEncoder, aux_loss
from hopformer.ops import diffuse, sparse_attention
from hopformer.ops import triton_diffusion as triton_backend
from hopformer.ops.coefficients import diffusion_coefficients, mixing_weights

# PyTorch's own compile and opcheck machinery touches torch.jit.script_method, which PyTorch deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*script_method. is deprecated:DeprecationWarning")

SEQ = 96

# name -> (attention, options): every registered attention, and the backends and variants behind them
CASES = {
    "full": ("full", {}),
    "local": ("local", {"block_size": 16}),
    "grid2d": ("local", {"pattern": "grid2d", "side": 8, "radius": 1}),
    "longformer": ("longformer", {"block_size": 16}),
    "bigbird": ("bigbird", {"block_size": 16}),
    "hypercube": ("hypercube", {"block_size": 16}),
    "diffuser": ("diffuser", {"block_size": 16, "hops": 3}),  # auto: the matrix backend at this length
    "diffuser_gather": ("diffuser", {"block_size": 16, "hops": 3, "backend": "gather"}),
    "diffuser_dense": ("diffuser", {"block_size": 16, "hops": 2, "backend": "dense"}),
    "diffuser_learned": ("diffuser", {"block_size": 16, "hops": 2, "learned_coefficients": True}),
    "routing": ("routing", {"max_seq_len": SEQ, "local_window": 16, "clusters": 4}),
    "routing_shared": ("routing", {"max_seq_len": SEQ, "local_window": 16, "clusters": 4, "share_qk": True}),
    "combiner": ("combiner", {}),
    "combiner_logsparse": ("combiner", {"variant": "logsparse"}),
    "combiner_axial": ("combiner", {"variant": "axial"}),
    "combiner_axial_horizontal": ("combiner", {"variant": "axial_horizontal"}),
    "combiner_mixture": ("combiner", {"variant": "mixture"}),
}
CAUSAL = ["full", "local", "bigbird", "diffuser_gather", "routing", "combiner", "combiner_logsparse"]
SLOW = {"diffuser_dense", "routing_shared", "combiner_axial_horizontal", "combiner_mixture", "hypercube"}
SLOW_CAUSAL = {"combiner_logsparse", "local"}


def _param(name: str, slow: set[str] = SLOW):
    return pytest.param(name, marks=pytest.mark.slow) if name in slow else name


def test_every_attention_has_a_case():
    assert {attention for attention, _ in CASES.values()} == set(available())


def _encoder(name: str, causal: bool = False) -> torch.nn.Module:
    attention, options = CASES[name]
    torch.manual_seed(0)
    config = EncoderConfig(vocab_size=50, dim=32, depth=2, heads=2, mlp_dim=48, max_len=SEQ + 1, dropout=0.0,
                           attention=attention, attention_options=options)  # fmt: skip
    if causal:
        return CausalLM(CausalLMConfig(config)).double()
    return TransformerEncoder(config).double()


def _inputs(batch: int = 2, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, SEQ), generator=generator)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[-1, SEQ // 2 + 3 :] = 0  # the last row is partly padding
    return ids.to(device), mask.to(device)


def _step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    out = model(ids, mask)
    weights = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=out.device)
    loss = (out * weights).sum() + (aux_loss(model) or 0.0)
    loss.backward()
    module = getattr(model, "_orig_mod", model)  # a compiled module's parameters are its original's
    return out.detach(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles its own models: Dynamo's caches start empty (another model's cached code would make
    the next one's settings recompile, and the recompile limit counts across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_matches_eager(model: torch.nn.Module, steps: int = 2) -> None:
    eager, compiled = model, copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    run = torch.compile(compiled, fullgraph=True, backend=counter)
    device = next(model.parameters()).device.type
    for step in range(steps):  # the second step sees the state the first left (k-means statistics and EMA)
        ids, mask = _inputs(seed=step, device=device)
        torch.manual_seed(step)  # the same random draws (k-means initialisation) in both
        expected, expected_grads = _step(eager, ids, mask)
        torch.manual_seed(step)
        got, got_grads = _step(run, ids, mask)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        assert got_grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-8, atol=1e-9, msg=name)
        for module in (eager, compiled):
            module.zero_grad(set_to_none=True)
    for (name, buffer), other in zip(eager.named_buffers(), compiled.buffers()):
        torch.testing.assert_close(other, buffer, rtol=1e-9, atol=1e-9, msg=name)
    assert counter.frame_count == 1, f"one graph, no graph break (got {counter.frame_count} frames)"


@pytest.mark.parametrize("name", [_param(name) for name in CASES])
def test_compiled_encoder_matches_eager_with_every_attention(name):
    _compiled_matches_eager(_encoder(name))


@pytest.mark.parametrize("name", [_param(name, SLOW_CAUSAL) for name in CAUSAL])
def test_compiled_causal_lm_matches_eager(name):
    _compiled_matches_eager(_encoder(name, causal=True))


@pytest.mark.slow
@pytest.mark.skipif(not triton_backend.available(), reason="needs triton")
def test_compiled_model_on_the_triton_backend_matches_eager():
    """The Triton kernels' op inside a compiled model: on CUDA, or on the CPU through Triton's interpreter."""
    if not (torch.cuda.is_available() or triton_backend.interpreting()):
        pytest.skip("needs CUDA or Triton's interpreter")
    device = "cpu" if triton_backend.interpreting() else "cuda"
    options = {"block_size": 16, "hops": 2, "backend": "triton"}
    torch.manual_seed(0)
    config = EncoderConfig(vocab_size=50, dim=32, depth=1, heads=2, mlp_dim=48, max_len=SEQ + 1, dropout=0.0,
                           attention="diffuser", attention_options=options)  # fmt: skip
    model = TransformerEncoder(config).double().to(device)
    _compiled_matches_eager(model, steps=1)


def test_flex_backend_traces_into_a_compiled_function(monkeypatch):
    """FlexAttention's calls and block masks (graph plans as constants, the padding's built in the trace) inside a
    compiled function. On CPU FlexAttention runs forward only, so the backend is let onto the CPU here."""
    from hopformer.ops import flex
    from hopformer.ops.backend import Support

    monkeypatch.setattr(flex.FLEX, "support", Support(ops=flex.FLEX.support.ops, devices=("cuda", "cpu")))
    graph = bigbird(256, block_size=64, window=3, num_global=1, num_random=1)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    padding = torch.ones(1, 256, dtype=torch.bool)
    padding[0, 200:] = False

    def both(q, k, v, padding, backend="flex"):
        return diffuse(q, k, v, graph, 3, backend=backend) + diffuse(q, k, v, graph, 2, key_padding_mask=padding,
                                                                  backend=backend)  # fmt: skip

    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        got = torch.compile(both, fullgraph=True, backend=counter)(q, k, v, padding)
        torch.testing.assert_close(got, both(q, k, v, padding, "dense"), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_two_models_with_different_settings_compile_in_one_process():
    """Dynamo's caches are shared by every model of a process: a second model with other settings recompiles,
    and floats that differ between the two (diffusion weights, rates) must not break the trace."""
    ids, mask = _inputs()
    for hops, alpha, dropout in ((3, 0.1, 0.0), (2, 0.3, 0.1), (4, 0.2, 0.2)):
        torch.manual_seed(0)
        options = {"block_size": 16, "hops": hops, "alpha": alpha, "backend": "gather"}
        config = EncoderConfig(vocab_size=50, dim=32, depth=1, heads=2, mlp_dim=48, max_len=SEQ + 1, dropout=dropout,
                               attention="diffuser", attention_options=options)  # fmt: skip
        model = TransformerEncoder(config).double()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        compiled(ids, mask).sum().backward()  # training: dropout rates differ too
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, mask), model(ids, mask))


def test_eval_mode_compiles_and_matches():
    model = _encoder("diffuser_gather").eval()
    run = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, mask = _inputs(3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(run(ids, mask), model(ids, mask), rtol=1e-9, atol=1e-9)


def test_inductor_compiles_the_gather_op_into_a_model():
    """Inductor itself (C++ kernels around the opaque custom op), float32."""
    model = _encoder("diffuser_gather").float()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    ids, mask = _inputs()
    expected, expected_grads = _step(model, ids, mask)
    got, got_grads = _step(compiled, ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_exporting_is_true_under_export_only():
    """Export-only paths (plain operators, one chunk, device-free backend choice) key on ``exporting()``, never on
    ``torch.compiler.is_exporting()``, which Dynamo before PyTorch 2.13 folds to True in every compile."""

    class Probe(torch.nn.Module):
        def forward(self, x):
            return x + 1 if exporting() else x - 1

    x = torch.zeros(2)
    assert torch.equal(Probe()(x), x - 1)
    assert torch.equal(torch.compile(Probe(), fullgraph=True, backend="aot_eager")(x), x - 1)
    assert torch.equal(torch.export.export(Probe(), (x,)).module()(x), x + 1)


# ------------------------------------------------------------------------------------------- the custom ops
def _qkv(seq: int = 40, dim: int = 8, batch: int = 2, heads: int = 2, dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=generator, dtype=dtype, requires_grad=True) for _ in "qkv"]


def test_opcheck_gather_diffusion():
    from hopformer.ops.gather import gather_plan

    q, k, v = _qkv()
    graph = bigbird(40, block_size=8, window=3, num_global=1, num_random=1)
    plan = gather_plan(graph, q.device)
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[1, 30:] = False
    steps = mixing_weights(diffusion_coefficients(3, 0.1))
    for real, graph_steps in ((None, [0.0]), (padding, steps)):
        args = (q, k, v, *plan.tensors(), real, graph_steps, 0.35, *plan.statics(), 0.0, False, 0.0)
        torch.library.opcheck(torch.ops.hopformer.gather_diffusion.default, args)
        out, *keeps = torch.ops.hopformer.gather_diffusion(*args)
        grad = torch.randn_like(out)
        backward = (grad, q.detach(), k.detach(), v.detach(), out.detach(), *plan.tensors(), real, *keeps, graph_steps,
                    0.35, *plan.statics(), 0.0, False, 0.0)  # fmt: skip
        torch.library.opcheck(torch.ops.hopformer.gather_diffusion_backward.default, backward)


def test_opcheck_routing_kmeans():
    from hopformer.attention import build

    module = build("routing", 16, 2, local_heads=0, clusters=3, max_seq_len=24)
    q, k = (torch.randn(2, 2, 24, 8) for _ in "qk")
    for causal, key in ((False, k), (True, None)):
        args = (q, key, None, *module._state(), 6, causal, "layernorm", True, True, 0.9, module.radius, 2)
        torch.library.opcheck(torch.ops.hopformer.routing_kmeans.default, args)


@pytest.mark.skipif(not triton_backend.available(), reason="needs triton")
def test_opcheck_triton_diffusion():
    if not (torch.cuda.is_available() or triton_backend.interpreting()):
        pytest.skip("needs CUDA or Triton's interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (x.detach().to(device).requires_grad_() for x in _qkv(seq=32, dim=16, batch=1, dtype=torch.float32))
    graph = local(32, block_size=16, window=3)
    for steps in ([0.0], [0.1, 0.1]):
        args = triton_backend.op_arguments(q, k, v, graph, None, steps, 0.25)
        torch.library.opcheck(torch.ops.hopformer.triton_diffusion.default, args)
        q_, k_, v_, z0, real, plan, *settings = args
        saved = [x.detach() for x in torch.ops.hopformer.triton_diffusion(*args)]  # out, lse, states, keep-masks
        backward = (torch.randn_like(saved[0]), q_.detach(), k_.detach(), v_.detach(), z0, *saved, real, plan,
                    *settings)  # fmt: skip
        torch.library.opcheck(torch.ops.hopformer.triton_diffusion_backward.default, backward)


class _ZerosMade(TorchDispatchMode):
    """Records the shape of every tensor of zeros created outside hopformer's ops (autograd's materialised
    gradients for outputs that have none)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.zeros.default:
            self.shapes.append(tuple(out.shape))
        return out


def _zeros_made_in_backward(out: torch.Tensor) -> list[tuple[int, ...]]:
    with _ZerosMade() as mode:
        out.backward(torch.ones_like(out))
    return mode.shapes


def test_gather_op_side_outputs_get_no_gradients():
    """The keep-masks are outputs of the op for its backward only: autograd must not make zero gradients for
    them (a mask-sized block of zeros each, per backward)."""
    from hopformer.ops.gather import gather_plan

    q, k, v = _qkv()
    graph = bigbird(40, block_size=8, window=3, num_global=1, num_random=1)
    plan = gather_plan(graph, q.device)
    args = (q, k, v, *plan.tensors(), None, [0.0, 0.1], 0.35, *plan.statics(), 0.2, True, 0.2)  # dropout: masks
    out, *keeps = torch.ops.hopformer.gather_diffusion(*args)
    assert any(keep.numel() for keep in keeps)
    assert out.requires_grad and not any(keep.requires_grad for keep in keeps)
    assert _zeros_made_in_backward(out) == []
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))


@pytest.mark.skipif(not triton_backend.available(), reason="needs triton")
def test_triton_op_side_outputs_get_no_gradients():
    """lse, the hop states and the keep-masks are saved for the backward only: autograd must not make zero
    gradients for them (the states alone are (hops - 1) x the output's size)."""
    if not (torch.cuda.is_available() or triton_backend.interpreting()):
        pytest.skip("needs CUDA or Triton's interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (x.detach().to(device).requires_grad_() for x in _qkv(seq=32, dim=16, batch=1, dtype=torch.float32))
    args = triton_backend.op_arguments(q, k, v, local(32, block_size=16, window=3), None, [0.1, 0.1, 0.1], 0.25)
    out, lse, states, keeps = torch.ops.hopformer.triton_diffusion(*args)
    assert out.requires_grad and not any(x.requires_grad for x in (lse, states, keeps))
    assert _zeros_made_in_backward(out) == []
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))


def test_ops_compile_on_their_own():
    """The functional ops with a graph made outside the compiled function (a user's own graph)."""
    graph = bigbird(40, block_size=8, window=3, num_global=1, num_random=1)
    q, k, v = _qkv()

    def both(q, k, v):
        return sparse_attention(q, k, v, graph, backend="gather") + diffuse(q, k, v, graph, 3, backend="gather")

    counter = CompileCounterWithBackend("aot_eager")
    out = torch.compile(both, fullgraph=True, backend=counter)(q, k, v)
    torch.testing.assert_close(out, both(q, k, v), rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(both(q, k, v).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert counter.frame_count == 1
