"""Convert a small RoBERTa to a 4K-token Diffuser model and train it (masked LM on bytes): tokens/s and peak memory.

    python experiments/convert_train_4k.py --out OUT [--steps 300] [--length 4096] [--batch 8] [--attention diffuser]

No download: a small RoBERTa (byte vocabulary: ids 0-255 are bytes, then <s>, <pad>, </s>, <mask>; 514 positions)
is built at random and saved with transformers, converted with ``hopformer convert`` semantics
(``hopformer.hf.convert_roberta``: positions tiled to the new length) and fine-tuned with masked-LM on windows of
the Python standard library's sources, as Longformer continued RoBERTa's pretraining at 4K. The numbers are the
training step's speed and memory at 4K, not the model's quality (it starts from a random RoBERTa). Writes
``OUT/convert_train_4k.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BYTES, BOS, PAD, EOS, MASK = 256, 256, 257, 258, 259
VOCAB = 260


def small_roberta(folder: Path, hidden: int, layers: int, heads: int) -> Path:
    """A RoBERTa with a byte vocabulary, saved by transformers (what a pretrained checkpoint folder holds)."""
    import transformers

    config = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=514,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(config).save_pretrained(folder)
    return folder


def masked_batch(windows: torch.Tensor, rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa's masking: ``rate`` of the bytes chosen, 80% of them replaced by <mask>, 10% by a random byte."""
    chosen = torch.rand(windows.shape, generator=generator) < rate
    labels = torch.where(chosen, windows, torch.full_like(windows, -100))
    draw = torch.rand(windows.shape, generator=generator)
    inputs = torch.where(chosen & (draw < 0.8), torch.full_like(windows, MASK), windows)
    random_bytes = torch.randint(0, BYTES, windows.shape, generator=generator)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_bytes, inputs)
    return inputs, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--attention", default="diffuser")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="attention option")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    import hopformer.hf as hf
    from hopformer.data.corpus import sample_windows, stdlib_corpus
    from hopformer.hf.convert import save_converted
    from hopformer.train.config import parse_assignment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = small_roberta(out / "roberta_small", args.hidden, args.layers, args.heads)
    options = dict(parse_assignment(text) for text in args.option)
    began = time.perf_counter()
    model = hf.convert_roberta(source, attention=args.attention, max_length=args.length, **options)
    convert_s = time.perf_counter() - began
    save_converted(model, out / "converted", tokenizer_from=source)
    device = torch.device(args.device)
    model = model.to(device).train()
    print(f"converted in {convert_s:.1f} s: {type(model).__name__}, {args.attention} {model.config.attention_options}")
    for name, module in model.named_modules():  # which backend runs the attention, and why
        if hasattr(module, "explain") and getattr(module, "op", None):
            verdict = str(module.explain(args.length, device.type, torch.bfloat16, args.batch)).splitlines()
            print(f"{name}: " + "; ".join(verdict[:2]))
            break

    corpus = stdlib_corpus(log=print)
    train = corpus.splits["train"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(args.steps):
        windows = sample_windows(train, args.batch, args.length, generator).long()
        inputs, labels = masked_batch(windows, 0.15, generator)
        inputs, labels = inputs.to(device), labels.to(device)
        lr = args.lr * min(1.0, (step + 1) / max(1, args.steps // 10))
        for group in optimizer.param_groups:
            group["lr"] = lr
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {losses[-1]:.4f}, {args.batch * args.length / times[-1]:,.0f} tokens/s")

    steady = times[min(10, len(times) - 1) :]  # after the first steps (kernel compilation, allocator warm-up)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attention": args.attention,
        "attention_options": model.config.attention_options,
        "length": args.length,
        "batch": args.batch,
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "vocab": VOCAB},
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "tokens_per_s": args.batch * args.length / statistics.median(steady),
        "step_ms_median": 1000 * statistics.median(steady),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "loss_first": losses[0],
        "loss_last_10": statistics.mean(losses[-10:]),
        "convert_s": convert_s,
    }
    (out / "convert_train_4k.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
