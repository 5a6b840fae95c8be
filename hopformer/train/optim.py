"""AdamW and the learning-rate schedule: linear warmup, then ``optim.schedule`` decay."""

from __future__ import annotations

import math

import torch

from hopformer.train.config import Config

SCHEDULES = ("linear", "cosine", "constant", "rsqrt")
HOP_PARAMETERS = ("hop_logits", "hop_weights")  # Diffuser's learned hop weights (softmax logits or free)


def learning_rate(step: int, config: Config) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then the configured decay."""
    optim, total = config.optim, config.train.steps
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    warmup = optim.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "rsqrt":
        return max(floor, peak * math.sqrt(max(warmup, 1) / (step + 1)))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if optim.schedule == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Give every parameter group ``lr`` times its ``lr_scale`` (1 unless set); returns ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices only (not biases, LayerNorm gains, the CLS vector, nor
    Diffuser's learned hop logits or weights, which decay would pull towards equal or zero weights).

    With ``optim.hop_lr_scale != 1`` the hop weights form a third group whose ``lr_scale`` the loop
    multiplies into the scheduled rate (only then, so checkpoints of two groups still resume).
    """
    separate = config.optim.hop_lr_scale != 1.0
    decay, other, hop = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hop = name.endswith(HOP_PARAMETERS)
        if is_hop and separate:
            hop.append(p)
        elif p.dim() >= 2 and not is_hop:
            decay.append(p)
        else:
            other.append(p)
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if hop:
        groups.append({"params": hop, "weight_decay": 0.0, "lr_scale": config.optim.hop_lr_scale})
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=tuple(config.optim.betas), eps=config.optim.eps)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    """Clip the global gradient norm to ``grad_clip`` (0 = no clipping), step, and clear the gradients."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
