"""What a run is built from: its checked config, the device, the seeds, and the model for its task."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hopformer.attention import available, option_names
from hopformer.attention import build as build_attention
from hopformer.checks import check_finite, check_int
from hopformer.models import (
    CausalLM,
    CausalLMConfig,
    DualEncoderClassifier,
    EncoderConfig,
    IntensityEmbedding,
    MaskedTokenModel,
    SequenceClassifier,
    TransformerEncoder,
)
from hopformer.models.pretrained import WEIGHTS_NAME, read_weights
from hopformer.train.batches import batch_multiple
from hopformer.train.checkpoint import find_checkpoint
from hopformer.train.config import Config
from hopformer.train.feeds import PIXEL_LEVELS
from hopformer.train.optim import SCHEDULES
from hopformer.train.tasks import TaskData, corpus_kind, is_corpus_task, is_image_task

OBJECTIVES = ("classify", "masked", "causal")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (initialisation, dropout)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_config(config: Config, data: TaskData) -> EncoderConfig:
    """``config.model`` with what the task decides filled in where it is None.

    ``vocab_size``: the task's vocabulary, or one more than the largest id of its training data, whichever
    is larger, plus the mask id of the masked objective. ``max_len``: the longest sequence of the data
    rounded up to 128, plus one for a CLS vector. ``pad_id``: 0 for tokens, none for pixels (0 is black).
    ``pad_to_multiple``: that of the batches (:func:`~hopformer.train.batches.batch_multiple`).
    """
    m = config.model
    masked = config.train.objective == "masked"
    vocab = max(data.spec.vocab_size, 1 + max(int(e["input_ids"].max()) for e in data.splits["train"]))
    vocab += 1 if masked else 0  # the mask token, after every id the task uses (a classifier drops its row: init_from)
    if m.vocab_size is not None and m.vocab_size < vocab:
        mask = " and the mask id" if masked else ""
        raise ValueError(f"model.vocab_size={m.vocab_size} is below the {vocab} ids of task {config.task!r}{mask}")
    cls_extra = 1 if config.head.pooling == "cls" else 0
    return replace(
        m,
        vocab_size=m.vocab_size or vocab,
        max_len=m.max_len or -(-data.longest() // 128) * 128 + cls_extra,
        pad_id=(None if data.spec.pixels else 0) if m.pad_id is None else m.pad_id,
        pad_to_multiple=m.pad_to_multiple or batch_multiple(config),
    )


def language_model_config(config: Config, data: Any) -> CausalLMConfig:
    """The :class:`CausalLM` of a corpus or image set: its vocabulary (256 bytes, a word list, or 256 grey
    levels and a start token for images; no padding id), positions for the context (``data.max_length``, or
    the whole image) unless ``model.max_len`` says more, and the attention options the length decides
    (:func:`length_options`; :func:`image_options` for images)."""
    m = config.model
    image = is_image_task(config.task)
    vocab = PIXEL_LEVELS + 1 if image else data.vocab_size
    if m.vocab_size is not None and m.vocab_size < vocab:
        raise ValueError(f"model.vocab_size={m.vocab_size} is below the {vocab} ids of task {config.task!r}")
    length = int(np.prod(data.shape)) if image else config.data.max_length
    options = length_options(m.attention, length)
    shape = None
    if image:
        options |= image_options(m.attention, data.shape)
        shape = tuple(data.shape) if m.positions == "image" else None
    encoder = replace(
        m,
        vocab_size=m.vocab_size or vocab,
        max_len=m.max_len or length,
        pad_to_multiple=m.pad_to_multiple or batch_multiple(config),
        attention_options={**options, **m.attention_options},  # what the config says wins
        causal=True,
        image_shape=m.image_shape or shape,
    )
    return CausalLMConfig(encoder, tie_embeddings=config.head.tie_embeddings)


def masked_language_model_config(config: Config, corpus: Any) -> EncoderConfig:
    """The encoder of a masked LM on a corpus: its vocabulary plus the mask id (the last), no padding id."""
    m = config.model
    vocab = corpus.vocab_size + 1
    if m.vocab_size is not None and m.vocab_size < vocab:
        raise ValueError(
            f"model.vocab_size={m.vocab_size} is below the {vocab} ids of task {config.task!r} and the mask id"
        )
    length = config.data.max_length
    return replace(
        m,
        vocab_size=m.vocab_size or vocab,
        max_len=m.max_len or length,
        pad_id=None,
        pad_to_multiple=m.pad_to_multiple or batch_multiple(config),
        attention_options={**length_options(m.attention, length), **m.attention_options},
    )


def length_options(attention: str, length: int) -> dict[str, Any]:
    """Options an attention takes from the sequence length: ``max_seq_len`` (Routing's clusters, a causal
    Combiner's one block size) is the context of the run."""
    return {"max_seq_len": length} if "max_seq_len" in option_names(attention) else {}


def image_options(attention: str, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Image-shaped defaults of a pixel model's attention (``(height, width, channels)`` in raster order):
    Diffuser diffuses over each subpixel's causal 2-D neighbourhood (``grid2d`` of radius 2, 8 random keys);
    Routing's local window and Combiner's blocks are one row of pixels. Other attentions keep their own."""
    _, width, channels = shape
    row = width * channels
    if attention == "diffuser":
        return {"pattern": "grid2d", "side": width, "channels": channels, "radius": 2, "num_random": 8}
    if attention == "routing":
        return {"local_window": row}
    if attention == "combiner":
        return {"block_size": row}
    return {}


def build_model(config: Config, data: Any) -> torch.nn.Module:
    """The model of ``config`` for ``data``: a classifier of the task's labels (a dual encoder for pair
    tasks) with the ``head`` settings; for ``train.objective="masked"`` a :class:`MaskedTokenModel` (on an
    example task or a corpus); for ``"causal"`` a :class:`CausalLM` of the corpus or image set."""
    if config.train.objective == "causal":
        return CausalLM(language_model_config(config, data))
    if config.train.objective == "masked" and is_corpus_task(config.task):
        encoder = TransformerEncoder(masked_language_model_config(config, data))
        return MaskedTokenModel(encoder, encoder.config.vocab_size)
    if config.train.objective == "masked" and data.spec.pair:
        raise ValueError(f"train.objective='masked' reads one sequence per example; {data.spec.name!r} has pairs")
    encoder = TransformerEncoder(model_config(config, data))
    if config.train.objective == "masked":
        return MaskedTokenModel(encoder, encoder.config.vocab_size)
    head = DualEncoderClassifier if data.spec.pair else SequenceClassifier
    return head(encoder, data.spec.num_classes, pooling=config.head.pooling, head_dim=config.head.head_dim)


def load_encoder_weights(model: torch.nn.Module, source: str | Path) -> Path:
    """Copy the encoder of a run (its ``best/``, else ``last/`` checkpoint) or of a checkpoint folder
    into ``model.encoder``; returns the checkpoint folder read."""
    source = Path(source).expanduser()
    found = find_checkpoint(source / "best") or find_checkpoint(source / "last")
    if found is None and (source / WEIGHTS_NAME).is_file():
        found = source
    if found is None:
        raise FileNotFoundError(
            f"train.init_from={source}: no checkpoint there (a run folder with best/ or last/, or a checkpoint "
            f"folder with {WEIGHTS_NAME})"
        )
    device = next(model.parameters()).device
    weights = read_weights(found / WEIGHTS_NAME, device)
    encoder = {name.removeprefix("encoder."): t for name, t in weights.items() if name.startswith("encoder.")}
    # A masked-token model has one more id, its mask token: a last table row, or a pixel embedding's special row.
    embed = model.encoder.embed
    if isinstance(embed, torch.nn.Embedding) and len(encoder.get("embed.weight", ())) == embed.num_embeddings + 1:
        encoder["embed.weight"] = encoder["embed.weight"][: embed.num_embeddings]
    elif isinstance(embed, IntensityEmbedding) and embed.special is None:
        encoder.pop("embed.special.weight", None)
    try:
        model.encoder.load_state_dict(encoder)
    except RuntimeError as error:
        raise ValueError(f"train.init_from={source}: its encoder does not fit this model: {error}") from error
    return found


def check_device_support(config: Config, device: torch.device) -> None:
    """Ask the backend dispatch whether the model's attention runs on ``device`` at the run's precision and
    length, before any data is loaded; if no backend can, the error names the settings and the reasons."""
    m = config.model
    options = dict(m.attention_options)
    if m.attention_dropout > 0:
        options.setdefault("dropout", m.attention_dropout)
    module = build_attention(m.attention, m.dim, m.heads, **options)
    autocast = config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")
    length = m.max_len or config.data.max_length
    verdict = module.explain(
        length, device.type, torch.bfloat16 if autocast else torch.float32, config.train.batch_size
    )
    if verdict is not None and verdict.chosen is None:
        settings = f"model.attention={m.attention!r}, head dim {m.dim // m.heads} (model.dim / model.heads)"
        if m.attention_dropout or options.get("dropout"):
            settings += f", attention dropout {options['dropout']}"
        raise ValueError(f"{settings} cannot run on {device.type}: {verdict.why}")


def check_objective(task: str, objective: str) -> None:
    """Which objectives a task trains: a corpus a causal or masked LM, an image set a causal pixel model, an
    example task a classifier or masked-token self-pretraining."""
    kind = corpus_kind(task)
    allowed = ("causal",) if is_image_task(task) else ("causal", "masked") if kind else ("classify", "masked")
    if objective not in allowed:
        what = "an image set" if is_image_task(task) else "a corpus" if kind else "an example task"
        raise ValueError(
            f"task={task!r} with train.objective={objective!r}: {what} trains with --objective {' or '.join(allowed)}"
        )


def check_config(config: Config) -> None:
    """Errors that name the setting, before any data is loaded."""
    tc, oc = config.train, config.optim
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "log_every"):
        check_int(f"train.{name}", getattr(tc, name), 1)
    if tc.batch_size % tc.grad_accum:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by train.grad_accum={tc.grad_accum}")
    if tc.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {tc.precision!r}")
    from hopformer.train.distributed import PARALLELS

    if tc.parallel not in PARALLELS:
        raise ValueError(f"train.parallel={tc.parallel!r} is not known; choose one of {list(PARALLELS)}")
    if tc.objective not in OBJECTIVES:
        raise ValueError(f"train.objective={tc.objective!r} is not known; choose one of {list(OBJECTIVES)}")
    if tc.objective == "masked" and not 0 < tc.mask_rate < 1:
        raise ValueError(f"train.mask_rate must be in (0, 1) for the masked objective, got {tc.mask_rate!r}")
    check_objective(config.task, tc.objective)
    if is_corpus_task(config.task) and not is_image_task(config.task):
        check_int(
            "data.max_length", config.data.max_length, 2, allowed="at least 2 (the context of the language model)"
        )
    if oc.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={oc.schedule!r} is not known; choose one of {list(SCHEDULES)}")
    for name in ("lr", "eps"):  # NaN and inf are refused here, not found later as a NaN loss
        check_finite(f"optim.{name}", getattr(oc, name), positive=True)
    for name in ("weight_decay", "grad_clip", "min_lr_ratio"):
        if check_finite(f"optim.{name}", getattr(oc, name)) < 0:
            raise ValueError(f"optim.{name} must be >= 0, got {getattr(oc, name)!r}")
    for beta in oc.betas:
        if not 0.0 <= check_finite("optim.betas", beta) < 1.0:
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(oc.betas)}")
    scale = oc.hop_lr_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"optim.hop_lr_scale must be a positive number, got {scale!r}")
    if oc.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {oc.warmup_steps!r}")
    limit = tc.time_limit_minutes
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < math.inf
    ):
        raise ValueError(f"train.time_limit_minutes must be a positive number of minutes or null, got {limit!r}")
    m = config.model
    for name in ("vocab_size", "pad_to_multiple", "pad_id"):  # None: from the task
        value, least = getattr(m, name), 0 if name == "pad_id" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            kind = "a non-negative" if least == 0 else "a positive"
            raise ValueError(f"model.{name} must be {kind} integer or null (from the task), got {value!r}")
    if m.attention not in available():
        raise ValueError(f"model.attention={m.attention!r} is not known; choose one of {available()}")
    if not isinstance(m.attention_options, dict):
        raise TypeError(f"model.attention_options must be a mapping, got {m.attention_options!r}")
    build_attention(m.attention, m.dim, m.heads, **m.attention_options)  # a bad option fails here, not later
