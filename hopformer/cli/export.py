"""``hopformer export``: a saved model as an ONNX file (checked with onnxruntime) or a ``torch.export`` program.

    hopformer export --checkpoint runs/listops-diffuser-20250101-120000 --out listops.onnx
    hopformer export --checkpoint converted/ --format program --out model.pt2 --seq-len 4096

``--checkpoint`` is a run folder (its ``best/``, or ``--which last``) or a model folder (hopformer's or
``transformers``'); the program takes ``--seq-len`` tokens (default: the longest the model takes; pad shorter
inputs and mark the padding in ``attention_mask``) and any batch size. Attention layers trained on a CUDA-only
backend (``flex``, ``triton``) are exported on ``auto``'s portable choice, which computes the same attention.
An ONNX file is run with onnxruntime on fresh inputs and compared with PyTorch (``--no-check`` skips it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hopformer export``."""
    parser.add_argument("--checkpoint", required=True, help="run folder or model folder")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint of a run (default best)")
    parser.add_argument("--out", required=True, help="the file written (.onnx, or .pt2 for --format program)")
    parser.add_argument("--format", choices=("onnx", "program"), default="onnx", help="ONNX (default) or torch.export")
    parser.add_argument("--seq-len", type=int, help="tokens per input (default: the longest the model takes)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size (default: any)")
    parser.add_argument("--batch-size", type=int, default=2, help="example batch traced (default 2)")
    parser.add_argument("--no-check", action="store_true", help="do not compare onnxruntime's outputs with PyTorch's")


def run(args: argparse.Namespace) -> int:
    """Load, export, print what was written and how it compared."""
    import torch

    from hopformer.attention import use_portable_backends
    from hopformer.cli.eval import checkpoint_folder
    from hopformer.models import from_pretrained
    from hopformer.models.export import ExportError, export, to_onnx

    model = from_pretrained(checkpoint_folder(Path(args.checkpoint), args.which)).eval()
    replaced = use_portable_backends(model)
    if replaced:
        print(f"backends {sorted(replaced)} run on CUDA only: exported on auto's portable choice instead")
    dynamic = not args.static_batch
    try:
        if args.format == "program":
            program = export(model, args.seq_len, args.batch_size, dynamic_batch=dynamic)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            torch.export.save(program, args.out)
            print(f"torch.export program written to {args.out}")
            return 0
        result = to_onnx(model, args.out, args.seq_len, args.batch_size, dynamic_batch=dynamic, check=not args.no_check)
    except ExportError as error:
        print(f"hopformer export: {error}", file=sys.stderr)
        return 1
    checked = (
        "not checked" if result.max_abs_diff is None else f"onnxruntime matches PyTorch to {result.max_abs_diff:.2g}"
    )
    print(
        f"ONNX written to {result.path}: inputs {result.inputs} of {result.seq_len} tokens, outputs {result.outputs}; "
        f"{checked}"
    )
    return 0
