"""The ``hopformer`` command: one verb per job, one module of this package per verb.

Verb modules are imported only when their verb runs, so ``hopformer --help`` stays fast; a verb module
imports torch (and the library) inside ``run``, so ``hopformer VERB --help`` is fast too. Each verb
module defines ``configure(parser)`` (its arguments) and ``run(args) -> int`` (the exit status); it
parses and prints, and leaves the work to the library.

Errors: a user error (:data:`USER_ERRORS`: a bad value, a missing or unreadable file, a wrong dtype, a
diverged run) prints one line ``hopformer: error: ...`` on stderr and exits with status 2, as argparse
does for bad flags. ``--debug`` (anywhere on the command line) or ``HOPFORMER_DEBUG=1`` lets the
exception through instead, traceback and all. Anything else (a bug) always shows its traceback. The
library's warnings (inputs cut to a length, skipped files) print as one line ``hopformer: warning: ...``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# verb -> one-line help; the verb's module is hopformer.cli.<verb>
VERBS: dict[str, str] = {
    "train": "train a model on a task (ListOps by default)",
    "eval": "evaluate a saved run on a data file",
    "generate": "continue a prompt with a trained causal language model",
    "bench": "time and measure memory of the attention kernels",
    "graph": "analyse attention graphs: density, spectral gap, NIP, pictures",
    "data": "generate task data (ListOps, Pathfinder) in the released LRA layout",
    "lra": "run or collect a grid of LRA runs and write one results table",
    "report": "one comparison table from any run folders, seeds grouped",
    "convert": "a pretrained RoBERTa or BERT folder as a long-sequence hopformer model on any attention",
    "export": "a saved model as a torch.export program or an ONNX file (checked with onnxruntime)",
}


# Errors that mean "the input is wrong", not "hopformer is broken": one line, exit status 2. ValueError covers
# the library's own classes (hopformer.checks.InputTypeError, FileFormatError, the data loaders' errors);
# FloatingPointError is a diverged run, whose message says what to change.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    FloatingPointError,
)
DEBUG_FLAG = "--debug"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--version`` and the verbs (each verb parses its own arguments)."""
    parser = argparse.ArgumentParser(
        prog="hopformer",
        description="Transformers on long sequences: Diffuser, Routing, Combiner, Hypercube and baselines.",
    )
    from hopformer import __version__

    parser.add_argument("--version", action="version", version=f"hopformer {__version__}")
    _add_debug(parser)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, help_text in VERBS.items():
        verbs.add_parser(name, help=help_text, add_help=False)
    return parser


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help="on an error, show the full traceback instead of one line (also: HOPFORMER_DEBUG=1)",
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``hopformer VERB ARGS...`` (``argv`` default: the command line); returns the exit status.

    A user error (:data:`USER_ERRORS`) prints ``hopformer: error: ...`` and returns 2; with ``--debug`` in
    ``argv`` (or ``HOPFORMER_DEBUG=1``) it is raised instead.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in argv or os.environ.get("HOPFORMER_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return _run(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"hopformer: error: {describe_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("hopformer: interrupted", file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hopformer's own warnings (a cut input, a skipped file) as one line ``hopformer: warning: ...``; others as
    Python shows them."""
    if issubclass(category, UserWarning) and f"{os.sep}hopformer{os.sep}" in filename:
        print(f"hopformer: warning: {message}", file=file or sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=file or sys.stderr)


def describe_error(error: BaseException) -> str:
    """One line for a user error: an OS error as ``FILE: reason``, anything else its message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = str(error) or type(error).__name__
    return " ".join(text.split()) if "\n" in text else text


def _run(argv: list[str]) -> int:
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
    _add_debug(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)
