"""``hopformer generate``: continue a prompt with a causal language model a run trained, printing as it goes.

    hopformer generate --checkpoint runs/bytes-diffuser-20261207 --prompt "def main(" --max-new-tokens 200
    hopformer generate --checkpoint runs/lm --prompt-file prompt.txt --temperature 0.8 --top-p 0.95 --seed 0

``--checkpoint`` is a run folder (its ``best/`` checkpoint, ``--which last`` for the other) or a checkpoint
folder. Byte models read the prompt as UTF-8 bytes and print the text as it streams (bytes decoded as UTF-8,
invalid sequences replaced), then the number of tokens and tokens/s on standard error. On CUDA the cached step is
replayed from a CUDA graph where the attention allows it (``--no-cuda-graph``: eager steps).
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hopformer generate``."""
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder of a causal LM")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint of a run (default best)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text (UTF-8)")
    source.add_argument("--prompt-file", help="a file whose bytes are the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="sample among the smallest set of tokens reaching probability p")
    parser.add_argument("--seed", type=int, help="seed of the sampling")
    parser.add_argument("--stop", help="stop after this byte (a character, e.g. '\\n', or a number 0-255)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the full forward pass at every token")
    parser.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="on CUDA, run every cached step eagerly instead of replaying it from a CUDA graph (same tokens)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")


def stop_byte(text: str | None) -> int | None:
    """``--stop``: one character (escapes such as ``\\n`` allowed) or a byte value 0-255."""
    if text is None:
        return None
    if text.isdigit():
        value = int(text)
    else:
        decoded = text.encode().decode("unicode_escape").encode()
        if len(decoded) != 1:
            raise ValueError(f"--stop must be one byte (a character or a number 0-255), got {text!r}")
        value = decoded[0]
    if not 0 <= value <= 255:
        raise ValueError(f"--stop must be one byte (0-255), got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Load the model, stream the continuation, report the speed."""
    import codecs
    import sys
    import time
    from pathlib import Path

    import torch

    from hopformer.attention import use_portable_backends
    from hopformer.cli.eval import checkpoint_folder
    from hopformer.models import CausalLM, from_pretrained
    from hopformer.train.build import resolve_device

    folder = checkpoint_folder(Path(args.checkpoint), args.which)
    device = resolve_device(args.device)
    model = from_pretrained(folder, device)
    if not isinstance(model, CausalLM):
        raise ValueError(f"{folder} holds a {type(model).__name__}; hopformer generate needs a causal LM")
    if device.type != "cuda":
        use_portable_backends(model)
    prompt = Path(args.prompt_file).read_bytes() if args.prompt_file else args.prompt.encode()
    if not prompt:
        raise ValueError("the prompt is empty: give at least one byte")
    room = model.config.encoder.max_len - len(prompt)
    if room < 1:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model takes {model.config.encoder.max_len} in all")
    steps = args.max_new_tokens
    if steps > room:
        print(f"note: --max-new-tokens {steps} lowered to {room}: the model takes {room + len(prompt)} tokens in all",
              file=sys.stderr)  # fmt: skip
        steps = room
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout

    def show(tokens: torch.Tensor) -> None:
        out.write(decoder.decode(bytes([int(tokens[0])])))
        out.flush()

    out.write(decoder.decode(prompt))
    began = time.perf_counter()
    result = model.generate(
        ids, steps, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        use_cache=not args.no_cache, seed=args.seed, stop_token=stop_byte(args.stop), on_token=show,
        cuda_graph=False if args.no_cuda_graph else None,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    out.write(decoder.decode(b"", final=True) + "\n")
    new = result.shape[1] - len(prompt)
    print(f"{new} tokens in {seconds:.2f} s: {new / max(seconds, 1e-9):.1f} tokens/s", file=sys.stderr)
    return 0
