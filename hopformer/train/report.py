"""Compare run folders: runs that differ only in the seed form one row, named by what sets it apart.

``hopformer lra`` tabulates a (task x attention) grid of runs named by its own scheme (:mod:`.grid`).
Variants (other hops, another learning rate, an option) fall outside it; this takes run folders as they
are. It reads each folder's ``config.yaml``, ``metrics.jsonl`` and, once the run has finished,
``results.json``. Runs whose settings differ only in the seed (and in where or how long they ran) form one
row: test accuracy as mean ± sample std over the seeds (best validation likewise), and each row's gap to
the top row with its standard error. A row is named by the settings that tell it apart from the other
rows, so ``attention=diffuser hops=1`` rather than the whole config; a setting added after a run was made
counts at its default, and one that moved (``model.pooling``) at its new place, so older runs group with
newer ones. Unfinished runs appear with the steps they reached and their best validation so far, and no
test. :func:`plot_curves` draws validation accuracy and loss against the step, one colour per row, so rows
can be compared at equal steps, with the training curves dashed (the mean over each evaluation interval),
so overfitting shows as a widening gap. A row of three or more seeds is drawn as its mean over the seeds
with a band of ± one standard deviation; a row of fewer, one line per run.

Runs of a language or pixel model are scored by their own metric instead (bits per byte or character,
masked bits per hidden byte, perplexity, bits per dimension; lower is better): the same table and curves,
with that metric in place of accuracy.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hopformer.checks import read_json
from hopformer.train.config import CONFIG_NAME, Config, migrate_legacy_keys, read_yaml_file
from hopformer.train.metrics import METRICS_NAME, RESULTS_NAME, read_metrics, training_cost

# the scores of language and pixel models (lower is better); everything else is scored by accuracy
_SCORES = ("bits_per_byte", "bits_per_character", "perplexity")
LOSS_METRICS = (*_SCORES, *(f"masked_{score}" for score in _SCORES), "bits_per_dim")

# settings that say where or how a run ran, not what was trained: never part of a row's identity
_NOT_IDENTITY = {
    "train.seed",
    "train.run_dir",
    "train.time_limit_minutes",
    "train.progress",
    "train.device",
    "train.threads",
    "train.log_every",
    "train.checkpoint_every",
    "data.data_dir",
}
_SHORT = {"model.attention_options.": "", "model.attention": "attention"}  # prefixes shortened in labels


def read_run(folder: Path) -> dict[str, Any]:
    """One run's settings (flattened, dotted keys), seed, progress and scores; ValueError naming the
    folder and the file when it is not a run folder."""
    config_path, metrics_path = folder / CONFIG_NAME, folder / METRICS_NAME
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise ValueError(f"{folder} is not a run folder: {path.name} is missing")
    config = read_yaml_file(config_path)
    # settings added since the run was made take their defaults, and moved ones their new place, so that it
    # groups with newer runs
    config = migrate_legacy_keys(config, str(config_path), warn=False)
    settings = {**_flatten(Config().to_dict()), **_flatten(config)}
    records = read_metrics(metrics_path, warn=False)
    val = [r for r in records if r.get("split") == "val"]
    train = [r for r in records if r.get("split") == "train"]
    eval_steps = [r["step"] for r in val]
    results_path = folder / RESULTS_NAME
    results = read_json(results_path) if results_path.is_file() else None
    metric = next((key for key in (val[0] if val else {}) if key in LOSS_METRICS), None)
    if metric is not None:  # a language or pixel model: bits or perplexity, lower is better
        best = min(val, key=lambda r: r[metric], default=None)
        test = None if results is None else results.get("extra", {}).get(f"test_{metric}")
        score = math.exp if "perplexity" in metric else _bits
        return {
            "folder": str(folder),
            "settings": settings,
            "seed": settings.get("train.seed"),
            "steps": settings.get("train.steps"),
            "step": max((r["step"] for r in records), default=0),
            "metric": metric,
            "best_val": None if best is None else best[metric],
            "best_val_step": None if best is None else best["step"],
            "train_accuracy_end": None if not train else score(train[-1]["loss"]),
            "val_curve": [[r["step"], r[metric]] for r in val],
            "train_curve": [[step, score(loss)] for step, loss in _interval_means(train, eval_steps, "loss", 1)],
            "val_loss_curve": [[r["step"], r["loss"]] for r in val],
            "train_loss_curve": _interval_means(train, eval_steps, "loss", 1),
            "steps_per_s": training_cost(folder).get("steps_per_s"),
            "test": test,
        }
    best = max(val, key=lambda r: r["accuracy"], default=None)
    return {
        "folder": str(folder),
        "settings": settings,
        "seed": settings.get("train.seed"),
        "steps": settings.get("train.steps"),
        "step": max((r["step"] for r in records), default=0),
        "metric": "accuracy",
        "best_val": None if best is None else 100 * best["accuracy"],
        "best_val_step": None if best is None else best["step"],
        "train_accuracy_end": 100 * train[-1]["accuracy"] if train else None,
        "val_curve": [[r["step"], 100 * r["accuracy"]] for r in val],
        "train_curve": _interval_means(train, eval_steps, "accuracy", 100),
        "val_loss_curve": [[r["step"], r["loss"]] for r in val if r.get("loss") is not None],
        "train_loss_curve": _interval_means(train, eval_steps, "loss", 1),
        "steps_per_s": training_cost(folder).get("steps_per_s"),
        "test": None if results is None or results.get("test_accuracy") is None else 100 * results["test_accuracy"],
    }


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write ``report.md``, ``report.json`` and (with matplotlib) ``curves.png`` into ``out``; returns the
    files written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(to_markdown(report))
    # one line: the per-run curves would take a line per number; report.md is the readable form
    (out / "report.json").write_text(json.dumps(report) + "\n")
    written = [out / "report.md", out / "report.json"]
    try:
        plot_curves(report, out / "curves.png")
        written.append(out / "curves.png")
    except ImportError:
        pass
    return written


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Group the runs into rows (same settings but the seed) and name each row by what sets it apart."""
    if not runs:
        raise ValueError("no run folders given")
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in runs:
        identity = {k: v for k, v in item["settings"].items() if k not in _NOT_IDENTITY}
        groups.setdefault(json.dumps(identity, sort_keys=True), []).append(item)
    identities = [json.loads(key) for key in groups]
    keys = sorted({k for identity in identities for k in identity})
    varying = [k for k in keys if len({json.dumps(identity.get(k)) for identity in identities}) > 1]
    rows = []
    for identity, members in zip(identities, groups.values()):
        members.sort(key=lambda m: (m["seed"] is None, m["seed"]))
        # runs of one seed and the same settings are repeats, not more seeds: one value per seed (their mean)
        tests, vals = _per_seed(members, "test"), _per_seed(members, "best_val")
        repeats = Counter(m["seed"] for m in members)
        rows.append(
            {
                "label": " ".join(f"{_short(k)}={_text(identity[k])}" for k in varying if k in identity) or "all runs",
                "seeds": list(repeats),
                "repeated_seeds": {str(seed): count for seed, count in repeats.items() if count > 1},
                "test_mean": statistics.fmean(tests) if tests else None,
                "test_std": statistics.stdev(tests) if len(tests) > 1 else None,
                "tests": tests,
                "best_val_mean": statistics.fmean(vals) if vals else None,
                "best_val_std": statistics.stdev(vals) if len(vals) > 1 else None,
                "best_vals": vals,
                "finished": sum(m["test"] is not None for m in members),
                "runs": members,
            }
        )
    metrics = {m["metric"] for m in runs}
    if len(metrics) > 1:
        raise ValueError(f"cannot compare runs scored differently ({', '.join(sorted(metrics))}) in one report")
    metric = metrics.pop()
    lower_is_better = metric != "accuracy"
    missing = float("inf") if lower_is_better else -1.0
    rows.sort(
        key=lambda r: (1 if lower_is_better else -1) * (r["test_mean"] if r["test_mean"] is not None else missing)
    )
    for index, row in enumerate(rows):  # the top row has no gap to itself
        row["test_gap"] = _gap(row["tests"], rows[0]["tests"]) if index else None
        row["best_val_gap"] = _gap(row["best_vals"], rows[0]["best_vals"]) if index else None
    shared = {_short(k): identities[0][k] for k in ("task", "train.steps") if k in keys and k not in varying}
    return {"shared": shared, "varying": varying, "rows": rows, "metric": metric}


def _per_seed(members: list[dict[str, Any]], key: str) -> list[float]:
    """``key`` of the runs, one value per seed in seed order: the mean over the runs of a seed that have it."""
    by_seed: dict[Any, list[float]] = {}
    for m in members:
        if m[key] is not None:
            by_seed.setdefault(m["seed"], []).append(m[key])
    return [statistics.fmean(values) for values in by_seed.values()]


def _seed_count(row: dict[str, Any]) -> str:
    """``3 seeds``, or with repeats ``1 seed, 2 runs``."""
    seeds, runs = len(row["seeds"]), len(row["runs"])
    text = f"{seeds} seed{'s' if seeds != 1 else ''}"
    return text if runs == seeds else f"{text}, {runs} runs"


def _gap(values: list[float], top: list[float]) -> list[float] | None:
    """``[difference of the means, its standard error]`` of ``values`` against the top row's ``top``
    (Welch: sqrt(s1^2/n1 + s2^2/n2)), or None when either has fewer than two seeds. A gap within about two
    standard errors is within the seed-to-seed noise."""
    if len(values) < 2 or len(top) < 2:
        return None
    error = (statistics.variance(values) / len(values) + statistics.variance(top) / len(top)) ** 0.5
    return [statistics.fmean(values) - statistics.fmean(top), error]


def to_markdown(report: dict[str, Any]) -> str:
    """Rows best first: test mean ± std over the finished seeds, then each run's details."""
    metric = report.get("metric", "accuracy")
    unit = "%" if metric == "accuracy" else metric.replace("_", " ")
    lines = [
        f"| row | seeds | test {unit} (mean ± std) | per seed | best validation {unit} (mean ± std) | gap to the top "
        "row: test / validation (± SE) | runs finished |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        test = _mean_std(row["test_mean"], row["test_std"])
        per_seed = " / ".join(f"{t:.2f}" for t in row["tests"]) or "–"
        val = _mean_std(row["best_val_mean"], row["best_val_std"])
        gaps = (row["test_gap"], row["best_val_gap"])
        gap = " / ".join("–" if g is None else f"{g[0]:+.2f} ± {g[1]:.2f}" for g in gaps)
        repeated = row.get("repeated_seeds", {})
        seeds = ", ".join(f"{s} ({repeated[str(s)]} runs)" if str(s) in repeated else str(s) for s in row["seeds"])
        finished = f"{row['finished']} of {len(row['runs'])}"
        lines.append(f"| {row['label']} | {seeds} | {test} | {per_seed} | {val} | {gap} | {finished} |")
    lines += [
        "",
        f"| run | seed | step (of) | best validation {unit} (step) | test {unit} | training "
        f"{unit if unit != '%' else 'accuracy %'} at end | steps/s |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        for m in row["runs"]:
            val = "–" if m["best_val"] is None else f"{m['best_val']:.2f} ({m['best_val_step']})"
            test = "–" if m["test"] is None else f"{m['test']:.2f}"
            digits = 1 if unit == "%" else 2
            train = "–" if m["train_accuracy_end"] is None else f"{m['train_accuracy_end']:.{digits}f}"
            speed = "–" if m["steps_per_s"] is None else f"{m['steps_per_s']:.1f}"
            lines.append(
                f"| {m['folder']} | {m['seed']} | {m['step']} ({m['steps']}) | {val} | {test} | {train} | {speed} |"
            )
    shared = ", ".join(f"{k}={_text(v)}" for k, v in report["shared"].items())
    note = (
        "\nTest: the run's results.json (the best-validation checkpoint); mean ± sample std over the seeds that "
        "finished. Runs with the same seed and settings are repeats, not more seeds: a seed's runs count as one "
        "value, their mean (the seeds column says how many runs a repeated seed has). Gap: the difference of the "
        "means from the top row's, ± its standard error (Welch; shown for "
        "rows of two or more seeds); within about two standard errors, the seeds cannot rank the two rows. "
        "Rows are named by the settings that differ between them"
        + (f"; shared: {shared}" if shared else "")
        + ". steps/s: median over the logged windows (runs sharing a GPU run slower).\n"
    )
    return "\n".join(lines) + "\n" + note


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """Validation accuracy (%) and loss against the step for the rows of ``report`` (from
    :func:`summarise`), one colour per row, training curves dashed; saved as a PNG at ``path``. A row of
    three or more seeds is its mean with a ± std band (:func:`seed_mean`), fewer are one line per run.
    Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12.0, 4.4 + 0.2 * len(report["rows"])), dpi=110)
    metric = report.get("metric", "accuracy")
    score = "accuracy (%)" if metric == "accuracy" else metric.replace("_", " ")
    panels = [("val_curve", "train_curve", score), ("val_loss_curve", "train_loss_curve", "loss")]
    for ax, (val_key, train_key, name) in zip(axes, panels):
        plotted = []
        for index, row in enumerate(report["rows"]):
            colour, runs = f"C{index % 10}", row["runs"]
            label = f"{row['label']} ({_seed_count(row)})" if len(runs) > 1 else row["label"]
            if len(runs) >= 3:  # one mean line: a dozen overlapping seeds hide the comparison
                for key, style in ((val_key, "-"), (train_key, "--")):
                    steps, means, stds = seed_mean([m.get(key) or [] for m in runs])
                    if not steps:
                        continue
                    low = [mean - (std or 0.0) for mean, std in zip(means, stds)]
                    high = [mean + (std or 0.0) for mean, std in zip(means, stds)]
                    solid = style == "-"
                    ax.plot(
                        steps, means, color=colour, lw=1.4 if solid else 0.9, ls=style, label=label if solid else None
                    )
                    if solid:
                        ax.fill_between(steps, low, high, color=colour, alpha=0.15, lw=0)
                    plotted += list(zip(steps, low)) + list(zip(steps, high))
                continue
            for number, m in enumerate(runs):
                alpha = 0.9 if number == 0 else 0.6
                if m.get(val_key):
                    ax.plot(*zip(*m[val_key]), color=colour, lw=1.2, alpha=alpha, label=None if number else label)
                    plotted += m[val_key]
                if m.get(train_key):
                    ax.plot(*zip(*m[train_key]), color=colour, lw=0.8, ls="--", alpha=alpha * 0.6)
                    plotted += m[train_key]
        _zoom_past_warmup(ax, plotted)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{name}: validation solid, training dashed")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), frameon=False)  # labels are long
    shared = ", ".join(f"{k}={_text(v)}" for k, v in report["shared"].items())
    if shared:
        figure.suptitle(shared, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def seed_mean(curves: list[list[list[float]]]) -> tuple[list[float], list[float], list[float | None]]:
    """Mean and sample std over the runs' curves (each ``[[step, value], ...]``) at every step any run
    reached, over the runs that reached it (std None where only one did): ``(steps, means, stds)``."""
    at: dict[float, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            at.setdefault(step, []).append(value)
    steps = sorted(at)
    means = [statistics.fmean(at[s]) for s in steps]
    stds = [statistics.stdev(at[s]) if len(at[s]) > 1 else None for s in steps]
    return steps, means, stds


def _zoom_past_warmup(ax: Any, points: list[Sequence[float]]) -> None:
    """Fit the y-axis to the points after the first tenth of the steps: the first evaluations (chance
    accuracy, the initial loss) would otherwise squeeze the part where the rows differ into a sliver."""
    if not points:
        return
    last = max(step for step, _ in points)
    late = [value for step, value in points if step >= 0.1 * last] or [value for _, value in points]
    low, high = min(late), max(late)
    pad = 0.05 * (high - low) or 0.5
    ax.set_ylim(low - pad, high + pad)


def _bits(nats: float) -> float:
    return nats / 0.6931471805599453


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _interval_means(train: list[dict[str, Any]], eval_steps: list[int], key: str, scale: float) -> list[list[float]]:
    """Training ``key`` (times ``scale``) averaged over the logs in each interval ending at an evaluation
    step: the per-batch values are too noisy to plot one by one."""
    curve, start = [], 0
    for end in eval_steps:
        window = [r[key] for r in train if start < r["step"] <= end and r.get(key) is not None]
        if window:
            curve.append([end, scale * sum(window) / len(window)])
        start = end
    return curve


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):  # an empty mapping (no attention options) adds no setting
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(key: str) -> str:
    for prefix, replacement in _SHORT.items():
        if key.startswith(prefix):
            return replacement + key[len(prefix) :]
    return key


def _text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)
