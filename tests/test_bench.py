"""``hopformer bench``: Routing and Combiner rows beside bigbird, ratios and dense-SDPA skips, on tiny
sizes. No timing assertions (times only have to be positive)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from hopformer.bench.harness import Case, command_line, dense_skip_reason, floors, inference, label, positive_int
from hopformer.cli import main
from hopformer.graphs import build_graph

TINY = ["--seq-lens", "128,256", "--heads", "2", "--head-dim", "8", "--block-size", "16", "--repeats", "1"]


def _bench(tmp_path, *extra: str, device: str = "cpu") -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", device, *TINY, "--warmup", "1", *extra, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _measured(row: dict) -> None:
    assert "error" not in row and "skipped" not in row, row
    assert row["ms"] > 0 and row["ms_min"] > 0
    assert math.isfinite(row["peak_mib"]) and row["peak_mib"] >= 0


def test_routing_and_combiner_rows_beside_bigbird(tmp_path, capsys):
    result = _bench(tmp_path)
    rows = result["rows"]
    names = {label(r) for r in rows}
    assert names == {
        "sdpa [sdpa]",
        "sparse [gather]",
        "diffuse [gather]",
        "routing [eager]",
        "combiner:fixed [eager]",
        "combiner:axial [eager]",
    }
    assert len(rows) == 6 * 2 * 2  # ops x lengths x modes
    for row in rows:
        _measured(row)
        assert (row["fwd_ms"] > 0) if row["mode"] == "fwd+bwd" else ("fwd_ms" not in row)
    checked = {(e["op"], e["seq_len"]) for e in result["inference"]}
    assert checked == {(label(r), r["seq_len"]) for r in rows if r["mode"] == "fwd" and r["op"] != "sdpa"} | {
        ("sdpa [sdpa]", n) for n in (128, 256)
    }
    for row in rows:
        seq = row["seq_len"]
        if row["op"] == "routing":  # the module's defaults: sqrt(L) clusters of L // clusters, half local heads
            clusters = round(math.sqrt(seq))
            assert row["config"] == {
                "local_heads": 1,
                "routing_heads": 1,
                "local_window": 128,
                "clusters": clusters,
                "window": seq // clusters,
            }
        if row["op"] == "combiner":
            assert row["config"] == {"block_size": math.ceil(math.sqrt(seq))}

    # Every non-dense row against dense SDPA, every row but bigbird itself against bigbird.
    ratios = {(e["seq_len"], e["mode"], e["op"], e["reference"]): e for e in result["ratios"]}
    for seq in (128, 256):
        for mode in ("fwd", "fwd+bwd"):
            for name in names - {"sdpa [sdpa]"}:
                assert (seq, mode, name, "sdpa [sdpa]") in ratios
            for name in names - {"sparse [gather]", "sdpa [sdpa]"}:
                entry = ratios[(seq, mode, name, "sparse [gather]")]
                assert entry["time"] > 0 and entry["memory"] >= 0
                assert isinstance(entry["within_3x_time_2x_memory"], bool)
    assert len(ratios) == 2 * 2 * (5 + 4)

    assert set(result["measured"]) == {"sdpa", "sparse", "diffuse", "routing", "combiner"}
    assert "k-means" in result["measured"]["routing"]
    assert result["settings"]["combiner"]["variants"] == ["fixed", "axial"]
    assert result["environment"]["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "| op, fwd+bwd |" in printed and "/ sparse [gather] =" in printed


@pytest.mark.slow
def test_compile_times_each_op_again_compiled(tmp_path):
    """``--compile``: every op but dense SDPA twice, the second under torch.compile, with its compile time (what a
    compiled op computes is tested in test_compile.py)."""
    result = _bench(tmp_path, "--ops", "sdpa,combiner", "--combiner-variants", "logsparse", "--modes", "fwd+bwd",
                    "--seq-lens", "64", "--compile")  # fmt: skip
    names = [label(r) for r in result["rows"]]
    assert names == ["sdpa [sdpa]", "combiner:logsparse [eager]", "combiner:logsparse [eager+compile]"]
    compiled = result["rows"][-1]
    _measured(compiled)
    assert compiled["compiled"] and compiled["compile_s"] > 0 and result["settings"]["compile"]
    assert "compile_s" not in result["rows"][1]
    assert any(e["op"] == "combiner:logsparse [eager+compile]" for e in result["ratios"])


def test_all_combiner_variants_and_dense_skips(tmp_path):
    result = _bench(
        tmp_path,
        *("--ops", "sdpa,sparse,combiner", "--combiner-variants", "all", "--modes", "fwd+bwd"),
        *("--case-budget-s", "1e-9", "--sdpa-max-len", "200"),
    )
    rows = {(label(r), r["seq_len"]): r for r in result["rows"]}
    for variant in ("fixed", "logsparse", "axial", "axial_horizontal", "mixture"):
        for seq in (128, 256):
            _measured(rows[(f"combiner:{variant} [eager]", seq)])
    assert rows[("combiner:logsparse [eager]", 128)]["config"] == {"block_size": 2}
    # 128 tokens: nothing measured before it and too short for a probe, so it runs; 256: above the limit.
    _measured(rows[("sdpa [sdpa]", 128)])
    assert rows[("sdpa [sdpa]", 256)]["skipped"] == "above --sdpa-max-len"
    references = {(e["seq_len"], e["reference"]) for e in result["ratios"]}
    assert references == {(128, "sdpa [sdpa]"), (128, "sparse [gather]"), (256, "sparse [gather]")}


def test_append_adds_lengths_from_another_run(tmp_path):
    out = tmp_path / "bench.json"
    common = ["bench", "--device", "cpu", "--heads", "2", "--head-dim", "8", "--block-size", "16", "--repeats", "1"]
    common += ["--warmup", "0", "--modes", "fwd", "--out", str(out)]
    assert main([*common, "--seq-lens", "128,256", "--ops", "sparse,diffuse"]) == 0
    assert main([*common, "--seq-lens", "256", "--ops", "sparse,routing", "--append"]) == 0
    result = json.loads(out.read_text())
    assert [run["seq_lens"] for run in result["runs"]] == [[128, 256], [256]]
    assert result["runs"][0]["replaced_by_later_run"] == [256]
    assert {(label(r), r["seq_len"], r["run"]) for r in result["rows"]} == {
        ("sparse [gather]", 128, 0),
        ("diffuse [gather]", 128, 0),
        ("sparse [gather]", 256, 1),
        ("routing [eager]", 256, 1),
    }
    assert {(e["seq_len"], e["op"]) for e in result["ratios"]} == {(128, "diffuse [gather]"), (256, "routing [eager]")}
    with pytest.raises(ValueError, match="heads"):
        main([*common, "--seq-lens", "128", "--heads", "4", "--append", "--debug"])


def test_time_limit_and_threads(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = _bench(tmp_path, "--ops", "sparse,routing", "--time-limit-s", "0", "--threads", "1")
    finally:
        torch.set_num_threads(threads)
    assert result["environment"]["threads"] == 1
    assert result["rows"] and all(r["skipped"].startswith("run time limit") for r in result["rows"])
    assert result["ratios"] == []


def test_dense_skip_reasons():
    settings = {
        "dtype": "float32",
        "batch": 1,
        "heads": 2,
        "head_dim": 8,
        "pattern": "bigbird",
        "graph_options": {"block_size": 16, "window": 3, "num_global": 2, "num_random": 3, "seed": 0},
        "hops": 2,
        "alpha": 0.1,
    }
    cpu = torch.device("cpu")
    measured = [{"op": "sdpa", "mode": "fwd", "seq_len": 1024, "ms": 10.0}]
    reason = dense_skip_reason(Case("sdpa", "sdpa", 4096, "fwd"), settings, cpu, measured, steps=5, budget_s=0.5)
    assert reason.startswith("time: about 0.16 s per step") and "measured 10.0 ms at L=1024" in reason
    assert dense_skip_reason(Case("sdpa", "sdpa", 4096, "fwd"), settings, cpu, measured, 5, budget_s=1.0) is None
    # Nothing measured yet: a short probe at 1024 tokens stands in.
    reason = dense_skip_reason(Case("sdpa", "sdpa", 8192, "fwd+bwd"), settings, cpu, [], steps=3, budget_s=1e-9)
    assert "probe" in reason
    # A mask larger than the memory: 2**20 tokens need 1 TiB of mask.
    reason = dense_skip_reason(Case("sdpa", "sdpa", 1 << 20, "fwd"), settings, cpu, [], steps=1, budget_s=1e9)
    assert reason.startswith("memory: the dense boolean mask (1024.0 GiB)")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_routing_and_combiner_rows_on_cuda(tmp_path):
    result = _bench(
        tmp_path, "--ops", "sdpa,sparse,routing,combiner", "--modes", "fwd+bwd", "--head-dim", "16", device="cuda"
    )  # FlexAttention needs head_dim >= 16
    assert result["settings"]["dtype"] == "bfloat16"
    for row in result["rows"]:
        _measured(row)
    assert {e["op"] for e in result["ratios"] if e["reference"] == "sparse [flex]"} == {
        "routing [eager]",
        "combiner:fixed [eager]",
        "combiner:axial [eager]",
        "combiner:fixed [flex]",  # on CUDA the bench also runs Combiner on FlexAttention
        "combiner:axial [flex]",
    }


def _benchmark_script(name: str):
    """Import ``benchmarks/<name>.py`` (a script folder, not a package) as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_step_benchmark_runs_every_variant_on_the_same_batches(tmp_path):
    """benchmarks/train_step.py on CPU, tiny model: one row per variant, ratios to the first, JSON."""
    module = _benchmark_script("train_step")
    out = tmp_path / "steps.json"
    tiny = ["--seq-len", "512", "--batch", "2", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--depth", "1"]
    variants = ["--variant", "full", "--variant", "diffuser:backend=matrix,hops=2", "--variant", "bigbird"]
    result = module.main([*tiny, *variants, "--warmup", "1", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert [(r["attention"], r["options"]) for r in result["rows"]] == [
        ("full", {}),
        ("diffuser", {"backend": "matrix", "hops": 2}),
        ("bigbird", {}),
    ]
    assert result["rows"][0]["time_ratio"] == 1.0
    assert all(r["ms_per_step"] > 0 and math.isfinite(r["final_loss"]) for r in result["rows"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
@pytest.mark.parametrize("name", ["flex_tiles", "pathfinder_step_profile", "token_graph_backends"])
def test_cuda_only_benchmarks_say_so_without_a_gpu(name, tmp_path, capsys):
    """The GPU-only scripts import on any machine and, without CUDA, exit 1 with a reason, writing nothing."""
    out = tmp_path / "out.json"
    assert _benchmark_script(name).main(["--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert "CUDA" in message or "GPU" in message
    assert not out.exists()


def test_positive_int_takes_counts_and_names_what_it_refuses():
    """The argparse type of the benchmark scripts' counts: 1 and up pass, the error names the option and value."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--images", type=positive_int)
    assert parser.parse_args(["--images", "7"]).images == 7
    for bad, shown in (("0", "got 0"), ("-3", "got -3"), ("abc", "got 'abc'")):
        with pytest.raises(argparse.ArgumentError, match=f"must be a positive integer, {shown}"):
            parser.parse_args(["--images", bad])


def test_command_line_is_the_script_relative_to_here_then_the_arguments_given(monkeypatch, tmp_path):
    """What benchmark scripts record as their command: main(argv)'s arguments when given, else the command line's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [str(tmp_path / "benchmarks" / "probe.py"), "--from", "shell"])
    assert command_line(["--images", "7"]) == "benchmarks/probe.py --images 7"
    assert command_line() == "benchmarks/probe.py --from shell"


def test_floor_is_the_graphs_share_of_dense_time_per_pass():
    """A pass over a graph of density p costs p x dense attention's FLOPs: its floor is p x SDPA's time, scaled
    by (L / L_ref)^2 where SDPA did not run; diffusion makes hops + 1 passes."""
    settings = {"pattern": "bigbird", "graph_options": {"block_size": 64, "num_global": 1, "num_random": 1}, "hops": 3}
    rows = [
        {"op": "sdpa", "backend": "sdpa", "seq_len": 1024, "mode": "fwd", "ms": 10.0},
        {"op": "sparse", "backend": "triton", "seq_len": 1024, "mode": "fwd", "ms": 4.0},
        {"op": "diffuse", "backend": "triton", "seq_len": 2048, "mode": "fwd", "ms": 30.0},
        {"op": "sdpa", "backend": "sdpa", "seq_len": 2048, "mode": "fwd", "skipped": "too long"},
        {"op": "sparse", "backend": "triton", "seq_len": 1024, "mode": "fwd+bwd", "ms": 9.0},  # no SDPA in this mode
    ]
    entries = {(e["op"], e["seq_len"]): e for e in floors(rows, settings)}
    assert len(entries) == 2
    density = {n: build_graph("bigbird", n, **settings["graph_options"]).density for n in (1024, 2048)}
    sparse, diffused = entries[("sparse [triton]", 1024)], entries[("diffuse [triton]", 2048)]
    assert sparse["floor_ms"] == pytest.approx(density[1024] * 10.0)
    assert sparse["over_floor"] == pytest.approx(4.0 / (density[1024] * 10.0))
    assert diffused["passes"] == 4 and diffused["sdpa_reference_len"] == 1024
    assert diffused["floor_ms"] == pytest.approx(4 * density[2048] * 10.0 * 4)


def test_inference_is_the_forward_row_over_the_training_forward_of_the_same_op_and_length():
    rows = [
        {"op": "diffuse", "backend": "gather", "seq_len": 512, "mode": "fwd", "ms": 2.2},
        {"op": "diffuse", "backend": "gather", "seq_len": 512, "mode": "fwd+bwd", "ms": 9.0, "fwd_ms": 2.0},
        {"op": "diffuse", "backend": "triton", "seq_len": 512, "mode": "fwd", "ms": 1.0},  # no training row
        {"op": "sparse", "backend": "gather", "seq_len": 512, "mode": "fwd", "ms": 0.5},
        {"op": "sparse", "backend": "gather", "seq_len": 1024, "mode": "fwd+bwd", "ms": 3.0, "fwd_ms": 1.0},
        {"op": "sparse", "backend": "gather", "seq_len": 512, "mode": "fwd+bwd", "ms": 3.0, "fwd_ms": 0.25},
    ]
    entries = {(e["op"], e["seq_len"]): e for e in inference(rows)}
    assert set(entries) == {("diffuse [gather]", 512), ("sparse [gather]", 512)}
    assert entries[("diffuse [gather]", 512)]["ratio"] == pytest.approx(1.1)
    assert entries[("diffuse [gather]", 512)]["within_1_1x"]
    assert entries[("sparse [gather]", 512)]["ratio"] == pytest.approx(2.0)
    assert not entries[("sparse [gather]", 512)]["within_1_1x"]
