"""The ``hopformer`` command: one verb per job, one module of this package per verb.

Verb modules are imported only when their verb runs, so ``hopformer --help`` stays fast. Each verb
module defines ``configure(parser)`` (its arguments) and ``run(args) -> int`` (the exit status); it
parses and prints, and leaves the work to the library.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> one-line help; the verb's module is hopformer.cli.<verb>
VERBS: dict[str, str] = {
    "train": "train a model on a task (ListOps by default)",
    "eval": "evaluate a saved run on a data file",
    "bench": "time and measure memory of the attention kernels",
    "graph": "analyse attention graphs: density, spectral gap, NIP, pictures",
    "data": "generate task data (ListOps, Pathfinder) in the released LRA layout",
    "lra": "run or collect a grid of LRA runs and write one results table",
    "report": "one comparison table from any run folders, seeds grouped",
    "convert": "a pretrained RoBERTa or BERT folder as a long-sequence hopformer model on any attention",
    "export": "a saved model as a torch.export program or an ONNX file (checked with onnxruntime)",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--version`` and the verbs (each verb parses its own arguments)."""
    parser = argparse.ArgumentParser(
        prog="hopformer",
        description="Transformers on long sequences: Diffuser, Routing, Combiner, Hypercube and baselines.",
    )
    from hopformer import __version__

    parser.add_argument("--version", action="version", version=f"hopformer {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, help_text in VERBS.items():
        verbs.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``hopformer VERB ARGS...`` (``argv`` default: the command line); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in VERBS:
        parser.parse_args(argv)  # prints help / errors / version
        parser.print_help()
        return 0 if not argv else 2
    name = argv[0]
    module_name, help_text = f"{__name__}.{name}", VERBS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            print(f"hopformer {name}: this verb is not available in this build", file=sys.stderr)
            return 2
        raise
    sub = argparse.ArgumentParser(prog=f"hopformer {name}", description=help_text)
    module.configure(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)
