"""``hopformer bench``: time and memory of dense SDPA, sparse_attention and diffuse per backend, and of
the Routing and Combiner attention cores, on the same q/k/v, with ratios to dense SDPA and to bigbird
``sparse_attention``."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace

from hopformer.bench import COMBINER_VARIANTS, OPS  # no torch: --help stays fast; run() imports the harness


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--seq-lens", default="1024,2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1, help="batch size of q, k, v (default 1)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=64, help="features per head (default 64)")
    parser.add_argument("--pattern", default="bigbird", help="graph pattern of sparse and diffuse (default bigbird)")
    parser.add_argument("--block-size", type=int, default=64, help="tokens per graph block (default 64)")
    parser.add_argument("--window", type=int, default=3, help="sliding window of the graph, in blocks (default 3)")
    parser.add_argument("--num-global", type=int, default=2, help="global blocks of the graph (default 2)")
    parser.add_argument("--num-random", type=int, default=3, help="random key blocks per query block (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of q, k, v and the graph's random blocks")
    parser.add_argument("--hops", type=int, default=5, help="diffusion hops of diffuse (default 5)")
    parser.add_argument("--alpha", type=float, default=0.1, help="PPR teleport probability of diffuse (default 0.1)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, any of {', '.join(OPS)}")
    parser.add_argument(
        "--backends",
        default=None,
        help="gather,flex,matrix,triton,dense for sparse/diffuse (default: gather on CPU, flex on CUDA); for sparse "
        "also the peers flexattention and flexattention-flash (PyTorch's flex_attention itself, CUDA)",
    )
    parser.add_argument(
        "--combiner-variants",
        default="fixed,axial",
        help=f"Combiner variants to run, any of {', '.join(COMBINER_VARIANTS)} ('axial' = vertical), or 'all'",
    )
    parser.add_argument(
        "--combiner-block-size", type=int, default=None, help="Combiner block / row length (default ceil(sqrt(L)))"
    )
    parser.add_argument(
        "--routing-local-heads", type=int, default=None, help="Routing: heads on local attention (default heads // 2)"
    )
    parser.add_argument(
        "--routing-local-window", type=int, default=128, help="Routing: local window in tokens (default 128)"
    )
    parser.add_argument("--routing-clusters", type=int, default=None, help="Routing: clusters (default round(sqrt(L)))")
    parser.add_argument(
        "--routing-window", type=int, default=None, help="Routing: members per cluster (default L // clusters)"
    )
    parser.add_argument(
        "--modes", default="fwd,fwd+bwd", help="comma-separated: fwd (forward only), fwd+bwd (with the backward)"
    )
    parser.add_argument("--sdpa-max-len", type=int, default=None, help="skip dense SDPA above this length")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time each op (not dense SDPA or the flexattention peers) under torch.compile(fullgraph=True), "
        "one graph per shape: rows labelled [backend+compile], with the first step's compile time",
    )
    parser.add_argument(
        "--case-budget-s",
        type=float,
        default=300.0,
        help="skip dense SDPA where its mask would not fit or its steps (warm-up, repeats, memory) would take "
        "longer than this, extrapolated from shorter lengths; the reason goes into the JSON (0 = never skip)",
    )
    parser.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="cases not started within this many seconds of the run are recorded as skipped, with the reason",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: PyTorch's; recorded in the JSON)"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add this run's lengths to the JSON at --out (same device, threads and settings required); rows "
        "of those lengths already there are replaced, so each length's rows and ratios come from one run",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per case before the repeats")
    parser.add_argument(
        "--out",
        default="attention_bench.json",
        help="JSON file (a PNG is written beside it; default attention_bench.json)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from hopformer.bench.harness import (
        FLEX_PEERS,
        MEASURED,
        Case,
        environment,
        floor_line,
        floors,
        inference,
        inference_line,
        label,
        plot,
        ratio_line,
        ratios,
        run_grid,
        table,
        write_json,
    )
    from hopformer.ops.combiner_flex import FLEX as FLEX_COMBINER

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    backends = (args.backends or ("flex" if device.type == "cuda" else "gather")).split(",")
    variants = COMBINER_VARIANTS if args.combiner_variants == "all" else tuple(args.combiner_variants.split(","))
    for variant in variants:
        if variant not in COMBINER_VARIANTS + ("axial_vertical",):
            raise ValueError(f"--combiner-variants: unknown variant {variant!r}; choose from {COMBINER_VARIANTS}")
    ops = args.ops.split(",")
    for op in ops:
        if op not in OPS:
            raise ValueError(f"--ops: unknown op {op!r}; choose from {', '.join(OPS)}")
    settings = {
        "dtype": dtype,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "seed": args.seed,
        "pattern": args.pattern,
        "hops": args.hops,
        "alpha": args.alpha,
        "graph_options": _graph_options(args),
        "routing": {
            "local_heads": args.routing_local_heads,
            "local_window": args.routing_local_window,
            "clusters": args.routing_clusters,
            "window": args.routing_window,
        },
        "combiner": {"variants": list(variants), "block_size": args.combiner_block_size},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "case_budget_s": args.case_budget_s,
        "time_limit_s": args.time_limit_s,
        "compile": args.compile,
    }
    cases, rows = [], []
    for seq_len in (int(x) for x in args.seq_lens.split(",")):
        for mode in args.modes.split(","):
            for op in ops:
                if op == "sdpa" and args.sdpa_max_len is not None and seq_len > args.sdpa_max_len:
                    rows.append({**asdict(Case("sdpa", "sdpa", seq_len, mode)), "skipped": "above --sdpa-max-len"})
                elif op == "sdpa":
                    cases.append(Case("sdpa", "sdpa", seq_len, mode))
                elif op in ("sparse", "diffuse"):  # FlexAttention itself is a peer of sparse attention only
                    peers = () if op == "sparse" else FLEX_PEERS
                    cases.extend(Case(op, backend, seq_len, mode) for backend in backends if backend not in peers)
                elif op == "routing":
                    cases.append(Case("routing", "eager", seq_len, mode))
                else:
                    cases.extend(Case("combiner", "eager", seq_len, mode, variant) for variant in variants)
                    if device.type == "cuda":  # the FlexAttention paths (every variant but logsparse)
                        flex_variants = [v for v in variants if v in FLEX_COMBINER.support.variants]
                        cases.extend(Case("combiner", "flex", seq_len, mode, variant) for variant in flex_variants)
    if args.compile:  # each case again, compiled, right after it (dense SDPA and the flex peers are kernels already)
        plain = [case.op == "sdpa" or case.backend in FLEX_PEERS for case in cases]
        cases = [
            twin
            for case, kernel in zip(cases, plain)
            for twin in [case, *([] if kernel else [replace(case, compiled=True)])]
        ]

    def show(row: dict) -> None:
        if "ms" in row:
            result = f"{row['ms']:10.2f} ms (min {row['ms_min']:.2f})  {row['peak_mib']:9.1f} MiB"
            if "compile_s" in row:
                result += f"  (compiled in {row['compile_s']:.1f} s)"
        else:
            result = f"skipped ({row['skipped']})" if row.get("skipped") else row["error"]
        print(f"{label(row):34s} {row['mode']:8s} L={row['seq_len']:<8d} {result}", flush=True)

    for row in rows:  # above --sdpa-max-len: recorded as skipped, not silently dropped
        show(row)
    budget = args.case_budget_s if args.case_budget_s > 0 else None
    rows += run_grid(
        cases, settings, device, args.repeats, args.warmup, show, case_budget_s=budget, time_limit_s=args.time_limit_s
    )
    rows.sort(key=lambda r: (r["seq_len"], r["mode"] != "fwd"))  # stable: the run's op order within a group
    env = environment(device)
    this_run = _run_entry(env, rows, settings)
    measured, runs = {op: MEASURED[op] for op in ops}, [this_run]
    if args.append and os.path.exists(args.out):
        rows, runs, measured = _merge(args.out, env, settings, rows, this_run, measured)
    result = {
        "environment": env,
        "settings": settings,
        "measured": measured,
        "runs": runs,
        "rows": rows,
        "ratios": ratios(rows),
        "floors": floors(rows, settings),
        "inference": inference(rows),
    }
    for entry in result["ratios"]:
        print(ratio_line(entry))
    for entry in result["floors"]:
        print(floor_line(entry))
    for entry in result["inference"]:
        print(inference_line(entry))
    for mode in args.modes.split(","):
        print(table(result, mode))
    write_json(args.out, result)  # makes the folder the PNG below goes into
    png = os.path.splitext(args.out)[0] + ".png"
    try:
        plot(result, png)
        print(f"wrote {args.out} and {png}")
    except ImportError:
        print(f"wrote {args.out} (install matplotlib for the plot)")
    return 0


def _graph_options(args: argparse.Namespace) -> dict:
    options = {"block_size": args.block_size}
    if args.pattern in ("local", "longformer", "bigbird", "diffuser"):
        options["window"] = args.window
    if args.pattern in ("longformer", "bigbird", "diffuser"):
        options["num_global"] = args.num_global
    if args.pattern in ("bigbird", "diffuser"):
        options.update(num_random=args.num_random, seed=args.seed)
    return options


def _run_entry(env: dict, rows: list[dict], settings: dict) -> dict:
    """What one run of an appended result measured and with which per-run settings."""
    entry = {"seq_lens": sorted({r["seq_len"] for r in rows})}
    entry.update({key: settings.get(key) for key in ("repeats", "warmup", "case_budget_s", "time_limit_s")})
    entry["combiner_variants"] = settings.get("combiner", {}).get("variants")
    entry.update({key: env.get(key) for key in ("command", "git_commit", "git_modified", "load_average")})
    return entry


# Settings that must agree for rows of two runs to sit in one result (the rest is per run).
_SAME = ("dtype", "batch", "heads", "head_dim", "seed", "pattern", "hops", "alpha", "graph_options", "routing")


def _merge(path: str, env: dict, settings: dict, rows: list[dict], this_run: dict, measured: dict):
    """Rows of an earlier result at ``path`` for the lengths this run did not measure, then this run's."""
    with open(path) as f:
        old = json.load(f)
    mine = {key: settings[key] for key in _SAME} | {"combiner block_size": settings["combiner"]["block_size"]}
    theirs = {key: old["settings"].get(key) for key in _SAME}
    theirs["combiner block_size"] = old["settings"].get("combiner", {}).get("block_size")
    for key in ("device", "threads"):
        mine[key], theirs[key] = env[key], old["environment"].get(key)
    differ = sorted(key for key in mine if mine[key] != theirs[key])
    if differ:
        raise ValueError(f"--append: {path} was measured with other {', '.join(differ)}; use another --out")
    runs = old.get("runs") or [_run_entry(old["environment"], old["rows"], old["settings"])]
    lengths = set(this_run["seq_lens"])
    kept = [r for r in old["rows"] if r["seq_len"] not in lengths]
    for run in runs:
        replaced = sorted(lengths & set(run.get("seq_lens", [])))
        if replaced:
            run["replaced_by_later_run"] = sorted(set(run.get("replaced_by_later_run", [])) | set(replaced))
    for row in kept:
        row.setdefault("run", 0)
    for row in rows:
        row["run"] = len(runs)
    merged = sorted(kept + rows, key=lambda r: (r["seq_len"], r["mode"] != "fwd"))
    return merged, runs + [this_run], {**old.get("measured", {}), **measured}
