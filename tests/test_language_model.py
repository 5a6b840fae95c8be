"""Causal byte-level language modeling: the corpora, the evaluation windows and bits per byte, the model, and
the trainer end to end (learning, exact resume, evaluation)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from hopformer.data import corpus as bc
from hopformer.models import CausalLM, CausalLMConfig, EncoderConfig, from_pretrained
from hopformer.train import load_config, train


# ------------------------------------------------------------------------------------------ corpora
def test_folder_corpus_splits_by_file_hash_and_keeps_every_byte(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    contents = {}
    for i in range(60):
        text = f"file {i}: " + "abc" * (i + 1) + "\n"
        (folder / f"f{i:02d}.txt").write_text(text)
        contents[f"f{i:02d}.txt"] = text.encode()
    corpus = bc.local_corpus(folder, cache=tmp_path / "cache", log=lambda *_: None)
    expected = {split: b"" for split in bc.SPLITS}
    for name in sorted(contents):
        bucket = zlib.crc32(name.encode()) % 100  # the documented rule, computed here
        split = "train" if bucket < 90 else "val" if bucket < 95 else "test"
        expected[split] += contents[name]
    for split in bc.SPLITS:
        assert bytes(corpus.splits[split]) == expected[split], split
        assert isinstance(corpus.splits[split], np.memmap), "splits are memory-mapped, not copied"
    again = bc.local_corpus(folder, cache=tmp_path / "cache", log=lambda *_: pytest.fail("built twice"))
    assert again.sizes() == corpus.sizes()


def test_single_file_splits_by_offset(tmp_path):
    data = bytes(range(256)) * 40
    path = tmp_path / "one.bin"
    path.write_bytes(data)
    corpus = bc.local_corpus(path, cache=tmp_path / "cache", log=lambda *_: None)
    cuts = [0, int(len(data) * 0.9), int(len(data) * 0.95), len(data)]
    for split, start, stop in zip(bc.SPLITS, cuts[:-1], cuts[1:], strict=True):
        assert bytes(corpus.splits[split]) == data[start:stop]
    with pytest.raises(FileNotFoundError, match="no such file"):
        bc.local_corpus(tmp_path / "missing")
    (tmp_path / "tiny").write_bytes(b"abc")
    with pytest.raises(ValueError, match="too little"):
        bc.local_corpus(tmp_path / "tiny", cache=tmp_path / "cache")


def test_stdlib_corpus_files_are_the_standard_library():
    files = bc.stdlib_files()
    root = bc.stdlib_root()
    assert len(files) > 100 and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.relative_to(root).parts for p in files)
    assert (root / "os.py") in files


def test_evaluation_windows_predict_every_byte_once():
    data = np.arange(1000, dtype=np.int64) % 256
    for context in (7, 64, 999, 1000, 5000):
        scored = []
        for window, first in bc.eval_windows(data, context):
            assert len(window) <= context + 1
            start = int(window[0]) if len(scored) == 0 else None
            targets = window[1:][first:]
            scored.extend(targets.tolist())
            assert start in (None, 0)
        assert scored == data[1:].tolist(), context
    # sliding: each scored byte has at least context - stride bytes of history in its window
    scored = []
    for window, first in bc.eval_windows(data, 64, stride=16):
        if first:
            assert first == 48
        scored.extend(window[1:][first:].tolist())
    assert scored == data[1:].tolist()


def test_unigram_bits_on_a_known_case():
    train = np.array([0, 0, 1, 1] * 100, dtype=np.uint8)
    test = np.array([0, 1, 1, 1], dtype=np.uint8)
    p0 = (200 + 1) / (400 + 256)
    p1 = (200 + 1) / (400 + 256)
    expected = -(np.log2(p0) + 3 * np.log2(p1)) / 4
    assert bc.unigram_bits(train, test) == pytest.approx(expected)
    assert bc.bits(math.log(2)) == pytest.approx(1.0)


def test_training_windows_are_random_contiguous_slices():
    data = np.arange(10_000, dtype=np.int64) % 251
    windows = bc.sample_windows(data, 8, 33, torch.Generator().manual_seed(0))
    assert windows.shape == (8, 33)
    steps = (windows[:, 1:] - windows[:, :-1]) % 251
    assert (steps == 1).all(), "each window is one contiguous slice"
    again = bc.sample_windows(data, 8, 33, torch.Generator().manual_seed(0))
    assert torch.equal(windows, again) and len(set(windows[:, 0].tolist())) > 1


# ------------------------------------------------------------------------------------------- model
def _model(attention="full", tie=True, **options):
    torch.manual_seed(0)
    encoder = EncoderConfig(256, dim=32, depth=2, heads=2, mlp_dim=64, max_len=80, attention=attention,
                            attention_options=options, pad_id=None, dropout=0.0)  # fmt: skip
    return CausalLM(CausalLMConfig(encoder, tie_embeddings=tie)).double().eval()


@pytest.mark.parametrize("attention, options", [
    ("full", {}), ("diffuser", {"block_size": 16}), ("routing", {"clusters": 3, "local_window": 16}),
    ("combiner", {"block_size": 8}),
])  # fmt: skip
def test_causal_lm_logits_never_see_the_future(attention, options):
    model = _model(attention, **options)
    ids = torch.randint(0, 256, (2, 77))
    logits = model(ids)
    assert logits.shape == (2, 77, 256)
    changed = ids.clone()
    changed[:, 40:] = torch.randint(0, 256, (2, 37))
    torch.testing.assert_close(model(changed)[:, :40], logits[:, :40], rtol=0, atol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_causal_lm_saves_and_loads_with_tied_or_untied_weights(tmp_path, tie):
    model = _model(tie=tie)
    assert (model.head.weight is model.encoder.embed.weight) == tie
    model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m").double().eval()
    assert (loaded.head.weight is loaded.encoder.embed.weight) == tie
    ids = torch.randint(0, 256, (1, 30))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert loaded.config.encoder.causal


def test_a_causal_lm_refuses_pixel_embeddings():
    encoder = EncoderConfig(256, dim=16, heads=2, pad_id=None, embedding="intensity")
    with pytest.raises(ValueError, match="embedding table"):
        CausalLM(CausalLMConfig(encoder))


# ----------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small repetitive corpus a tiny model learns quickly: lines of a few words in varying order."""
    generator = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "hop", "former", "graph", "diffuse"]
    lines = [" ".join(generator.choice(words, size=6)) + ".\n" for _ in range(1500)]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("".join(lines))
    return path


def _config(tmp_path, text_file, steps=40, attention="full", **settings):
    overrides = {
        "task": f"bytes:{text_file}",
        "data.max_length": 64,
        "model.dim": 32,
        "model.heads": 2,
        "model.mlp_dim": 64,
        "model.attention": attention,
        "train.steps": steps,
        "train.batch_size": 8,
        "train.eval_every": 20,
        "train.eval_batches": 4,
        "train.progress": False,
        "train.run_dir": str(tmp_path / "run"),
        "optim.warmup_steps": 5,
        **settings,
    }
    return load_config(None, overrides)


@pytest.mark.slow
def test_training_a_byte_lm_beats_the_unigram_baseline(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("HOPFORMER_CACHE", str(tmp_path / "cache"))
    lines = []
    result = train(_config(tmp_path, text_file, steps=150, **{"optim.lr": 5e-3}), log=lines.append)
    extra = result.extra
    assert extra["test_bits_per_byte"] < extra["unigram_bits_per_byte"] - 0.5, extra
    assert "bits per byte" in lines[-1] and "unigram baseline" in lines[-1]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    model = from_pretrained(tmp_path / "run" / "last")
    assert isinstance(model, CausalLM) and model.config.encoder.causal
    from hopformer.train.report import read_run, summarise, to_markdown

    report = summarise([read_run(tmp_path / "run")])
    assert report["metric"] == "bits_per_byte"
    assert report["rows"][0]["test_mean"] == pytest.approx(extra["test_bits_per_byte"])
    assert "test bits per byte" in to_markdown(report)


@pytest.mark.slow
def test_byte_lm_resumes_exactly(tmp_path, text_file, monkeypatch):
    """A real SIGINT once step 10 is logged (between two evaluations), then a resume: the same metrics and
    weights as a run that never stopped (the windows come from the seed and the step)."""
    import json
    import os
    import signal

    from hopformer.train import metrics

    monkeypatch.setenv("HOPFORMER_CACHE", str(tmp_path / "cache"))
    whole = train(_config(tmp_path / "a", text_file, attention="diffuser"), log=lambda *_: None)
    real_write = metrics.MetricsLog.write

    def interrupt_after_10(self, record):
        real_write(self, record)
        if record["step"] == 10 and record["split"] == "train":
            os.kill(os.getpid(), signal.SIGINT)  # honoured at the end of the step being run

    monkeypatch.setattr(metrics.MetricsLog, "write", interrupt_after_10)
    first = train(_config(tmp_path / "b", text_file, attention="diffuser"), log=lambda *_: None)
    assert first.interrupted and 0 < first.step < 40
    monkeypatch.setattr(metrics.MetricsLog, "write", real_write)
    resumed = train(resume=tmp_path / "b" / "run", log=lambda *_: None)
    assert resumed.step == whole.step == 40
    assert resumed.extra["test_bits_per_byte"] == whole.extra["test_bits_per_byte"]

    def records(run):
        lines = (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "steps_per_s")} for line in lines
        ]

    assert records("a") == records("b")
    a, b = (from_pretrained(tmp_path / x / "run" / "last").state_dict() for x in ("a", "b"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_task_and_objective_must_agree(tmp_path, text_file):
    config = _config(tmp_path, text_file)
    config.train.objective = "classify"
    with pytest.raises(ValueError, match="a corpus trains with --objective causal or masked"):
        train(config, log=lambda *_: None)
    config = load_config(None, {"train.objective": "causal", "train.run_dir": str(tmp_path / "x")})
    with pytest.raises(ValueError, match="an example task trains with --objective classify or masked"):
        train(config, log=lambda *_: None)
    config = load_config(None, {"task": "cifar10-pixels:/x", "train.objective": "masked"})
    with pytest.raises(ValueError, match="an image set trains with --objective causal"):
        train(config, log=lambda *_: None)


def test_packaged_bytes_default_equals_the_repository_config():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1] / "configs" / "bytes_small.yaml"
    assert load_config(None, {"task": "bytes"}) == load_config(repo)
