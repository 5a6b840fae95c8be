"""``hopformer eval``: evaluate a saved run on a data file or on one of its task's splits.

    hopformer eval --checkpoint runs/listops-diffuser-20250101-120000 --data other/basic_test.tsv
    hopformer eval --checkpoint runs/listops-diffuser-20250101-120000 --split val --which last

``--checkpoint`` is a run folder (its ``best/`` by default, ``--which last`` for the last one) or a
checkpoint folder itself (one holding ``model.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hopformer eval``."""
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint of a run (default best)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a ListOps TSV in the released format (Source<TAB>Target)")
    source.add_argument("--split", choices=("train", "val", "test"), help="a split of the run's own task data")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto (CUDA when available)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def checkpoint_folder(path: Path, which: str) -> Path:
    """The folder holding ``model.safetensors``: ``path`` itself, or ``path/<which>`` of a run."""
    from hopformer.models.pretrained import WEIGHTS_NAME
    from hopformer.train.checkpoint import find_checkpoint

    if (path / WEIGHTS_NAME).is_file():
        return path
    found = find_checkpoint(path / which)
    if found is None:
        raise FileNotFoundError(f"{path} has no {which}/ checkpoint (and is not a checkpoint folder itself)")
    return found


def run(args: argparse.Namespace) -> int:
    """Load the model, evaluate, print the accuracy."""
    from hopformer.attention import use_portable_backends
    from hopformer.models import CausalLM, MaskedTokenModel, from_pretrained
    from hopformer.train.batches import Runtime, masking, max_tokens, prefix_length
    from hopformer.train.build import resolve_device
    from hopformer.train.config import CONFIG_NAME, load_config
    from hopformer.train.evaluation import evaluate
    from hopformer.train.tasks import is_corpus_task, warn_truncation

    path = Path(args.checkpoint)
    folder = checkpoint_folder(path, args.which)
    device = resolve_device(args.device)
    model = from_pretrained(folder, device)
    if device.type != "cuda":
        replaced = use_portable_backends(model)
        if replaced:
            print(f"note: backend {sorted(replaced)} needs CUDA; evaluating with backend='auto'", file=sys.stderr)
    limit = max_tokens(model)
    run_dir = path if (path / CONFIG_NAME).is_file() else folder.parent
    run_config = run_dir / CONFIG_NAME
    if isinstance(model, CausalLM) or (run_config.is_file() and is_corpus_task(load_config(run_config).task)):
        return _evaluate_language_model(model, run_dir, folder, device, args)
    if isinstance(model, MaskedTokenModel) and args.data:
        raise ValueError("a masked-token model is evaluated on its own task's splits: use --split, not --data")
    if args.data:
        from hopformer.data.listops import load_listops_tsv

        examples = load_listops_tsv(args.data, max_length=None)
        source, hiding = args.data, {}
    else:
        from hopformer.train.tasks import load_task

        run_dir = path if (path / CONFIG_NAME).is_file() else folder.parent
        config = load_config(run_dir / CONFIG_NAME)
        examples = load_task(config, progress=False).splits[args.split]
        source, hiding = f"{config.task} {args.split}", masking(model, config)
    warn_truncation({source: examples}, limit, f"the model's max_len={model.encoder.config.max_len}")
    pad = model.encoder.config.pad_to_multiple
    runtime = Runtime(device, device.type == "cuda", pad, limit, prefix_length(model), **hiding)
    result = evaluate(model, examples, runtime, args.batch_size)
    if args.json:
        print(json.dumps({"checkpoint": str(folder), "data": source, **result}))
    else:
        accuracy, loss, count = result["accuracy"], result["loss"], result["count"]
        unit = "hidden tokens" if isinstance(model, MaskedTokenModel) else "examples"
        print(f"{folder} on {source}: accuracy {accuracy:.4f}, loss {loss:.4f} ({count} {unit})")
    return 0


def _evaluate_language_model(model, run_dir: Path, folder: Path, device, args: argparse.Namespace) -> int:
    """A language or pixel model on a split of its run's corpus or image set, scored as in training (bits per
    byte or character, perplexity, bits per dimension; masked LMs over their hidden tokens)."""
    from hopformer.train.batches import Runtime
    from hopformer.train.config import CONFIG_NAME, load_config
    from hopformer.train.feeds import make_feed, metric_label
    from hopformer.train.tasks import load_corpus_task

    if args.data:
        raise ValueError("a language model is evaluated on a split of its run's corpus: use --split, not --data")
    config = load_config(run_dir / CONFIG_NAME)
    config.train.eval_batch_size = args.batch_size
    runtime = Runtime(device, device.type == "cuda", 1, model.encoder.config.max_len)
    feed = make_feed(load_corpus_task(config, log=lambda *_: None), config, runtime)
    result = feed.evaluate(model, args.split)
    baseline = next(iter(feed.baseline().values()))
    if args.json:
        record = {"checkpoint": str(folder), "data": f"{config.task} {args.split}", **result, "unigram": baseline}
        print(json.dumps(record))
    else:
        label = metric_label(feed.metric)
        print(
            f"{folder} on {config.task} {args.split}: {label} {result[feed.metric]:.4f} (unigram baseline "
            f"{baseline:.4f} on test; {result['count']:,} predictions)"
        )
    return 0
