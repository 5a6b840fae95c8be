"""Generation with caches: for every causal attention the logits of cached decoding equal those of a full
forward pass over the same tokens (float64, 1e-9), at odd lengths, across block boundaries and past the window;
``use_cache=False`` gives the same tokens; caches hold only what a new token can reach; sampling."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from hopformer.attention import build
from hopformer.attention.decoding import graph_safe
from hopformer.models import CausalLM, CausalLMConfig, EncoderConfig
from hopformer.models.causal_lm import sample_next

# Small blocks, windows and clusters, so that 100 tokens cross many blocks and pass every window.
CASES = [
    ("full", {}),
    ("local", {"block_size": 8, "window": 3}),
    ("local", {"pattern": "grid2d", "side": 10, "radius": 1}),
    ("longformer", {"block_size": 8, "num_global": 1}),
    ("bigbird", {"block_size": 8, "num_global": 1, "num_random": 2}),
    ("hypercube", {"block_size": 8}),
    ("diffuser", {"block_size": 8, "num_global": 1, "num_random": 2, "hops": 5}),
    ("diffuser", {"block_size": 8, "hops": 3, "kernel": "heat", "remainder": "renormalize"}),
    ("diffuser", {"block_size": 8, "hops": 3, "learned_coefficients": "free"}),
    ("routing", {"local_heads": 1, "local_window": 8, "clusters": 4, "window": 5}),
    ("routing", {"local_heads": 0, "clusters": 3, "window": 4, "share_qk": False}),
    ("combiner", {"variant": "fixed", "block_size": 7}),
    ("combiner", {"variant": "logsparse", "block_size": 2}),
    ("combiner", {"variant": "axial", "block_size": 6}),
    ("combiner", {"variant": "mixture", "block_size": 6}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items())}" for name, options in CASES]


def _model(attention: str, options: dict, positions: str = "learned", max_len: int = 112) -> CausalLM:
    torch.manual_seed(0)
    encoder = EncoderConfig(
        256, dim=32, depth=2, heads=2, mlp_dim=64, max_len=max_len, attention=attention,
        attention_options=options, pad_id=None, dropout=0.0, positions=positions,
    )  # fmt: skip
    model = CausalLM(CausalLMConfig(encoder)).double().eval()
    if options.get("learned_coefficients"):  # move the learned hop weights off their start
        with torch.no_grad():
            for block in model.encoder.blocks:
                block.attention.hop_weights.add_(0.1 * torch.randn_like(block.attention.hop_weights))
    return model


def _decoded_logits(model: CausalLM, ids: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """Prefill each prompt (right-padded to the longest), then step every sequence to the end of ``ids``:
    the logits of each position after the prompts, per sequence."""
    total = ids.shape[1]
    caches = model.encoder.new_caches(ids.shape[0], total, ids.device, torch.float64)
    prompt = int(lengths.max())
    mask = torch.arange(prompt)[None, :] < lengths[:, None]
    hidden = model.encoder(ids[:, :prompt], mask, caches=caches)
    rows = torch.arange(ids.shape[0])
    logits = [model.head(hidden[rows, lengths - 1])]
    positions = lengths.clone()
    while int(positions.max()) < total:
        step = positions.clamp(max=total - 1)
        logits.append(model.head(model.encoder.step(ids[rows, step][:, None], step, caches))[:, 0])
        positions = positions + 1
    return logits


@pytest.mark.parametrize("attention, options", CASES, ids=IDS)
def test_cached_decoding_equals_the_full_forward_pass(attention, options):
    model = _model(attention, options)
    generator = torch.Generator().manual_seed(len(IDS))
    ids = torch.randint(0, 256, (2, 100), generator=generator)
    lengths = torch.tensor([13, 38])  # odd, different prompt lengths: each sequence at its own positions
    full = model(ids)
    for step, logits in enumerate(_decoded_logits(model, ids, lengths)):
        for row in range(2):
            position = min(int(lengths[row]) - 1 + step, 99)
            torch.testing.assert_close(logits[row], full[row, position], rtol=0, atol=1e-9, msg=f"step {step}")


@pytest.mark.parametrize("attention, options", CASES[:7:3] + CASES[9:10], ids=IDS[:7:3] + IDS[9:10])
def test_rotary_positions_decode_exactly(attention, options):
    model = _model(attention, options, positions="rope")
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    for step, logits in enumerate(_decoded_logits(model, ids, torch.tensor([21]))):
        torch.testing.assert_close(logits[0], full[0, min(20 + step, 59)], rtol=0, atol=1e-9)


@pytest.mark.parametrize("attention, options", CASES, ids=IDS)
def test_generate_with_and_without_the_cache_gives_the_same_tokens(attention, options):
    model = _model(attention, options)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 30)]
    greedy = model.generate(prompts, 25)
    recomputed = model.generate(prompts, 25, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(greedy, recomputed, strict=True))
    assert [len(row) for row in greedy] == [34, 55]
    batch = torch.stack([prompts[0], prompts[1][:9]])
    sampled = model.generate(batch, 20, temperature=0.8, top_k=40, top_p=0.95, seed=7)
    assert sampled.shape == (2, 29) and torch.equal(sampled[:, :9], batch)
    assert torch.equal(
        sampled, model.generate(batch, 20, temperature=0.8, top_k=40, top_p=0.95, seed=7, use_cache=False)
    )


def test_caches_keep_only_what_a_new_token_can_reach():
    local = build("local", 32, 2, block_size=8, window=3, causal=True)
    for max_len in (64, 4096):
        cache = local.new_cache(1, max_len, torch.device("cpu"), torch.float32)
        assert cache.plan.slots == 2 and cache.k.shape[2] == 16, "a local window keeps its own and the previous block"
    diffuser = build("diffuser", 32, 2, block_size=8, hops=5, causal=True)
    cache = diffuser.new_cache(1, 256, torch.device("cpu"), torch.float32)
    assert len(cache.states) == 5, "Z_0 = V, Z_1 .. Z_4: the states a later token reads"
    routing = build("routing", 32, 2, local_heads=1, local_window=8, clusters=4, window=5, causal=True)
    cache = routing.new_cache(1, 100_000, torch.device("cpu"), torch.float32)
    assert cache.local_k.shape[2] == 16 and cache.ring_k.shape[2:4] == (4, 5), "bounded by the window, not the length"
    with pytest.raises(ValueError, match="causal"):
        build("bigbird", 32, 2, block_size=8).new_cache(1, 64, torch.device("cpu"), torch.float32)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits).item() == 1
    generator = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, top_k=1, generator=generator).item() == 1 for _ in range(20))
    assert all(sample_next(logits, 5.0, top_p=0.01, generator=generator).item() == 1 for _ in range(20))
    draws = torch.stack([sample_next(logits.expand(4000, 4), 1.0, generator=generator) for _ in range(5)]).flatten()
    frequencies = torch.bincount(draws, minlength=4).double() / len(draws)
    torch.testing.assert_close(frequencies, logits[0].double().softmax(0), atol=0.02, rtol=0)
    top2 = torch.bincount(torch.stack([sample_next(logits, 1.0, top_k=2, generator=generator) for _ in range(400)])
                          .flatten(), minlength=4)  # fmt: skip
    assert top2[0] == 0 and top2[2] == 0 and top2[1] > top2[3] > 0


def test_generate_checks_its_arguments_and_stops_at_the_stop_token():
    model = _model("full", {}, max_len=40)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="max_len=40"):
        model.generate(prompt, 31)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 3, temperature=1.0, top_p=0.0)
    first = int(model.generate(prompt, 1)[0, -1])
    stopped = model.generate(prompt, 20, stop_token=first)
    assert stopped.shape == (1, 11) and int(stopped[0, -1]) == first


def test_generate_verb_streams_the_same_text_with_and_without_the_cache(tmp_path, capsys):
    from hopformer.cli import main

    model = _model("diffuser", {"block_size": 8, "hops": 2}, max_len=64).float()
    model.save_pretrained(tmp_path / "ckpt")
    assert (
        main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "héllo", "--max-new-tokens", "20"]) == 0
    )
    cached = capsys.readouterr()
    expected = model.generate(torch.tensor([list("héllo".encode())]), 20)[0]
    assert cached.out == bytes(expected.tolist()).decode("utf-8", errors="replace") + "\n"
    assert "20 tokens in" in cached.err and "tokens/s" in cached.err
    main(
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--prompt",
            "héllo",
            "--max-new-tokens",
            "20",
            "--no-cache",
        ]
    )
    assert capsys.readouterr().out == cached.out
    args = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "héllo", "--max-new-tokens", "20"]
    main([*args, "--no-cuda-graph"])
    assert capsys.readouterr().out == cached.out
    stop = str(int(expected[len("héllo".encode())]))  # the first generated byte
    main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "héllo", "--stop", stop])
    assert "1 tokens in" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- graph-safe steps
GRAPH_SAFE = [(name, options) for name, options in CASES if name not in ("routing", "combiner")]
GRAPH_SAFE_IDS = [i for i, (name, _) in zip(IDS, CASES, strict=True) if name not in ("routing", "combiner")]
_MISSING = object()


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)


@contextlib.contextmanager
def no_host_sync():
    """Every way a step could read tensor values on the host, or make a shape from them, raises inside: what
    a CUDA graph capture (and ``torch.cuda.set_sync_debug_mode("error")``) would refuse."""

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"a decoding step called {name}: a host sync or a data-dependent shape")

        return method

    def guard(name, original):
        def method(self, index, *rest):
            if _has_bool_index(index):
                raise AssertionError(f"a decoding step indexed with a boolean mask ({name}): a data-dependent shape")
            return original(self, index, *rest)

        return method

    patches = {
        name: refuse(name)
        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "masked_select")
    }
    patches["unique"] = refuse("unique")
    patches["__getitem__"] = guard("__getitem__", torch.Tensor.__getitem__)
    patches["__setitem__"] = guard("__setitem__", torch.Tensor.__setitem__)
    functions = {name: refuse(f"torch.{name}") for name in ("nonzero", "masked_select", "unique", "argwhere")}
    saved = {name: torch.Tensor.__dict__.get(name, _MISSING) for name in patches}
    saved_functions = {name: getattr(torch, name) for name in functions}
    try:
        for name, method in patches.items():
            setattr(torch.Tensor, name, method)
        for name, function in functions.items():
            setattr(torch, name, function)
        yield
    finally:
        for name, method in saved.items():
            if method is _MISSING:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)
        for name, function in saved_functions.items():
            setattr(torch, name, function)


def test_the_no_sync_guard_catches_syncs():
    x = torch.arange(4)
    for sync in (
        lambda: x.max().item(),
        lambda: int(x.max()),
        lambda: x[x > 1],
        lambda: x.nonzero(),
        lambda: x.tolist(),
    ):
        with no_host_sync(), pytest.raises(AssertionError, match="decoding step"):
            sync()
    assert int(x.max()) == 3 and x[x > 1].tolist() == [2, 3], "restored afterwards"


@pytest.mark.parametrize("positions", ["learned", "rope", "image"])
@pytest.mark.parametrize("attention, options", GRAPH_SAFE, ids=GRAPH_SAFE_IDS)
def test_graph_safe_steps_make_no_host_sync_and_equal_the_full_pass(attention, options, positions):
    """Three prompts of odd, different lengths (one of a single token), right-padded, the prompt pass padded
    inside to a multiple of 16: every step without a host sync equals the full forward pass (float64)."""
    torch.manual_seed(0)
    encoder = EncoderConfig(
        256, dim=32, depth=2, heads=2, mlp_dim=64, max_len=80, attention=attention, attention_options=options,
        pad_id=None, dropout=0.0, positions=positions, pad_to_multiple=16,
        image_shape=(4, 4, 5) if positions == "image" else None,
    )  # fmt: skip
    model = CausalLM(CausalLMConfig(encoder)).double().eval()
    ids = torch.randint(0, 256, (3, 80), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([1, 17, 41])
    full = model(ids)
    caches = model.encoder.new_caches(3, 80, ids.device, torch.float64)
    assert all(graph_safe(cache) for cache in caches)
    mask = torch.arange(41)[None, :] < lengths[:, None]
    with torch.no_grad():
        hidden = model.encoder(ids[:, :41], mask, caches=caches)
    rows = torch.arange(3)
    torch.testing.assert_close(model.head(hidden[rows, lengths - 1]), full[rows, lengths - 1], rtol=0, atol=1e-9)
    step = model.step_function(caches, cuda_graph=False)
    positions_now = lengths.clone()
    with torch.no_grad():
        for _ in range(int(80 - lengths.min())):
            at = positions_now.clamp(max=79)  # sequences at the end repeat their last step (idempotent)
            with no_host_sync():
                logits = step(ids[rows, at], at)
            torch.testing.assert_close(logits, full[rows, at], rtol=0, atol=1e-9)
            positions_now = positions_now + 1


@pytest.mark.parametrize("attention, options", GRAPH_SAFE[:7:2], ids=GRAPH_SAFE_IDS[:7:2])
def test_a_graph_safe_step_is_idempotent(attention, options):
    """A CUDA graph's warm-up runs the first step more than once: running a step twice leaves the caches and
    gives the logits of running it once."""
    model = _model(attention, options)
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(2))
    caches = model.encoder.new_caches(2, 60, ids.device, torch.float64)
    with torch.no_grad():
        model.encoder(ids[:, :23], torch.arange(23)[None, :] < torch.tensor([[19], [23]]), caches=caches)
        step = model.step_function(caches, cuda_graph=False)
        positions = torch.tensor([19, 23])
        for _ in range(10):  # across a block boundary (block_size 8)
            token = ids[torch.arange(2), positions]
            once = copy.deepcopy(caches)
            first = model.step_function(once, cuda_graph=False)(token, positions)
            step(token, positions)
            assert torch.equal(step(token, positions), first)
            for a, b in zip(once, caches, strict=True):
                for name, value in vars(a).items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(value, getattr(b, name)), name
            positions = positions + 1


def test_which_caches_are_graph_safe_and_what_cuda_graph_true_says_where_impossible():
    for name, options in CASES[:1] + CASES[6:7] + CASES[9:10] + CASES[11:12]:
        cache = build(name, 32, 2, causal=True, **options).new_cache(1, 64, torch.device("cpu"), torch.float32)
        assert graph_safe(cache) == (name not in ("routing", "combiner")), name
    model = _model("routing", CASES[9][1])
    prompt = torch.randint(0, 256, (1, 5))
    caches = model.encoder.new_caches(1, 16, torch.device("cpu"), torch.float64)
    reason = model.cuda_graph_obstacle(caches)
    assert "CUDA device" in reason and "RoutingCache" in reason and "eagerly" in reason
    with pytest.raises(ValueError, match="cuda_graph=True.*CUDA device"):
        _model("full", {}).generate(prompt, 3, cuda_graph=True)
    with pytest.raises(ValueError, match="use_cache=True"):
        _model("full", {}).generate(prompt, 3, cuda_graph=True, use_cache=False)
    with pytest.raises(TypeError, match="cuda_graph"):
        _model("full", {}).generate(prompt, 3, cuda_graph="yes")
    assert torch.equal(model.generate(prompt, 4), model.generate(prompt, 4, cuda_graph=False))
    from hopformer.models.causal_lm import CUDAGraphStep

    captured = CUDAGraphStep(lambda ids, positions: ids, torch.device("cpu"))
    captured.graph, captured.ids, captured.positions = object(), torch.zeros(2), torch.zeros(2)  # as if captured
    with pytest.raises(ValueError, match="captured for ids and positions of shape"):
        captured(torch.zeros(1), torch.zeros(1))


# ------------------------------------------------------------------------------------------- CUDA only
# full, bigbird, diffuser (5 hops); the prompt pass on the gather backend, which compiles nothing
CUDA_CASES = [
    CASES[0],
    (CASES[4][0], {**CASES[4][1], "backend": "gather"}),
    (CASES[6][0], {**CASES[6][1], "backend": "gather"}),
]
CUDA_IDS = [IDS[0], IDS[4], IDS[6]]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _recorded_logits(monkeypatch, model, *args, **kwargs):
    """``generate``'s result and the logits it sampled from at every step."""
    from hopformer.models import causal_lm

    seen = []

    def recording(logits, *rest, **options):
        seen.append(logits.clone())
        return sample_next(logits, *rest, **options)

    monkeypatch.setattr(causal_lm, "sample_next", recording)
    try:
        return model.generate(*args, **kwargs), seen
    finally:
        monkeypatch.setattr(causal_lm, "sample_next", sample_next)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("attention, options", CUDA_CASES, ids=CUDA_IDS)
def test_cuda_graph_decoding_gives_exactly_the_eager_tokens_and_logits(attention, options, monkeypatch):
    from hopformer.models import causal_lm

    model = _model(attention, options).float().cuda()
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 30)]
    kinds = []
    original = causal_lm.CausalLM.step_function

    def spy(self, caches, **options):
        step = original(self, caches, **options)
        kinds.append(type(step).__name__)
        return step

    monkeypatch.setattr(causal_lm.CausalLM, "step_function", spy)
    for sampling in ({}, {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 7}):
        eager, eager_logits = _recorded_logits(monkeypatch, model, prompts, 40, cuda_graph=False, **sampling)
        graphed, graphed_logits = _recorded_logits(monkeypatch, model, prompts, 40, cuda_graph=True, **sampling)
        default, _ = _recorded_logits(monkeypatch, model, prompts, 40, **sampling)
        assert all(torch.equal(a, b) for a, b in zip(eager, graphed, strict=True)), sampling
        assert all(torch.equal(a, b) for a, b in zip(eager, default, strict=True)), sampling
        assert len(eager_logits) == len(graphed_logits) == 40
        for step, (a, b) in enumerate(zip(eager_logits, graphed_logits, strict=True)):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"step {step} {sampling}")
    assert kinds == ["function", "CUDAGraphStep", "CUDAGraphStep"] * 2, "None captures a graph on CUDA"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("attention, options", CUDA_CASES, ids=CUDA_IDS)
def test_graph_safe_eager_steps_do_not_synchronise_on_cuda(attention, options, positions):
    model = _model(attention, options, positions=positions).float().cuda()
    ids = torch.randint(0, 256, (2, 80), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    lengths = torch.tensor([13, 38], device="cuda")
    caches = model.encoder.new_caches(2, 80, ids.device, torch.float32)
    with torch.no_grad():
        model.encoder(ids[:, :38], torch.arange(38, device="cuda")[None, :] < lengths[:, None], caches=caches)
    step = model.step_function(caches, cuda_graph=False)
    rows, positions_now = torch.arange(2, device="cuda"), lengths.clone()
    with torch.no_grad():
        step(ids[rows, positions_now], positions_now)  # the first call may set things up (handles, tables)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(20):
                positions_now = positions_now + 1
                step(ids[rows, positions_now], positions_now)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    expected = model(ids)[rows, positions_now]
    torch.testing.assert_close(step(ids[rows, positions_now], positions_now), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_true_names_the_attention_that_decodes_eagerly():
    model = _model("combiner", {"variant": "fixed", "block_size": 7, "backend": "eager"}).float().cuda()
    prompt = torch.randint(0, 256, (1, 9), device="cuda")
    with pytest.raises(ValueError, match="CombinerCache"):
        model.generate(prompt, 5, cuda_graph=True)
    assert torch.equal(model.generate(prompt, 5), model.generate(prompt, 5, cuda_graph=False))
