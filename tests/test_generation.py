"""Generation with caches: for every causal attention the logits of cached decoding equal those of a full
forward pass over the same tokens (float64, 1e-9), at odd lengths, across block boundaries and past the window;
``use_cache=False`` gives the same tokens; caches hold only what a new token can reach; sampling."""

from __future__ import annotations

import pytest
import torch

from hopformer.attention import build
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
    stop = str(int(expected[len("héllo".encode())]))  # the first generated byte
    main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "héllo", "--stop", stop])
    assert "1 tokens in" in capsys.readouterr().err
