"""The objective's loss and accuracy, and evaluation of a model on a split."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hopformer.train.batches import Runtime


def objective_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean cross-entropy, number correct and number scored, for ``(N, classes)`` logits: one row per
    sequence, or per hidden token (masked objective; a batch may hide none); ``(batch, seq, vocab)`` logits
    of a language model count every position."""
    if logits.dim() > 2:
        logits, labels = logits.flatten(0, -2), labels.flatten()
    loss = F.cross_entropy(logits, labels) if len(labels) else logits.sum() * 0.0
    return loss, (logits.argmax(-1) == labels).sum(), len(labels)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: list[dict], runtime: Runtime, batch_size: int, max_batches: int | None = None
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``examples`` (sorted by length into batches: less padding).

    Returns ``{"loss", "accuracy", "count"}`` (``count``: examples scored, or hidden tokens for the masked
    objective). ``max_batches`` scores only the first that many batches' worth of examples.
    """
    if max_batches is not None:
        examples = examples[: max_batches * batch_size]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        inputs, labels, _ = runtime.batch([examples[i] for i in order[start : start + batch_size]], mask_seed=start)
        with runtime.context():
            logits = model(**inputs).float()
        loss, right, scored = objective_loss(logits, labels)
        loss_sum += loss.item() * scored
        correct += right.item()
        count += scored
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "count": count}
