"""Batches: the seeded order of training examples, their augmentation, and how batches reach the model.

:class:`BatchStream` draws the training order from the seed and saves its position in checkpoints, and
the augmentation of a batch is drawn from that position, so a resumed run sees the same batches as an
unbroken one. :class:`Runtime` collates, pads and moves batches, and hides tokens for the masked objective.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hopformer.data.batching import collate, dihedral
from hopformer.models import MaskedTokenModel
from hopformer.train.config import Config


class BatchStream:
    """An endless, seeded sequence of batches of example indices; ``(epoch, position)`` is its state.

    Each epoch is a permutation drawn from ``seed + epoch``. With ``bucket``, the permutation is cut
    into pools of 50 batches, each pool sorted by length and cut into batches, and the batches shuffled
    again: batches hold similar lengths (little padding) but their order stays random.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, bucket: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not lengths:
            raise ValueError("BatchStream needs at least one example")
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = min(batch_size, len(lengths))
        self.seed, self.bucket = seed, bucket
        self.epoch, self.position = 0, 0
        self._batches: list[list[int]] | None = None

    def _epoch_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        size = self.batch_size
        whole = len(order) - len(order) % size  # drop the ragged tail: every step sees a full batch
        if not self.bucket:
            return order[:whole].view(-1, size).tolist()
        batches = []
        pool = 50 * size
        for start in range(0, whole, pool):
            chunk = order[start : min(start + pool, whole)]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches.extend(chunk.view(-1, size).tolist())
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def next(self) -> list[int]:
        """Indices of the next batch."""
        if self._batches is None:
            self._batches = self._epoch_batches()
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = None


def training_stream(examples: list[dict], config: Config) -> BatchStream:
    """The stream of micro-batches (``train.batch_size / train.grad_accum`` examples) of a run."""
    tc = config.train
    micro_batch = tc.batch_size // tc.grad_accum
    return BatchStream([len(e["input_ids"]) for e in examples], micro_batch, tc.seed, config.data.bucket)


def next_training_batch(examples: list[dict], stream: BatchStream, config: Config) -> list[dict]:
    """The stream's next batch, each image under a seeded random symmetry when ``data.augment`` asks.

    The symmetries are drawn from (seed, epoch, position), the stream's saved state, so a resumed run
    sees the same images as an uninterrupted one.
    """
    indices = stream.next()
    if config.data.augment == "none":
        return [examples[i] for i in indices]
    epoch, position = stream.epoch, stream.position - 1  # of the batch next() just returned
    key = (config.train.seed * 1_000_003 + epoch) * 1_000_003 + position
    generator = torch.Generator().manual_seed(key % (1 << 63))
    codes = torch.randint(8, (len(indices),), generator=generator).tolist()
    return [dihedral(examples[i], code) for i, code in zip(indices, codes, strict=True)]


def batch_multiple(config: Config) -> int:
    """Batch widths are rounded up to this: ``data.pad_to_multiple``, or 1 for full attention and 128
    (FlexAttention tiles) for graph attentions."""
    return config.data.pad_to_multiple or (1 if config.model.attention == "full" else 128)


@dataclass
class Runtime:
    """Where and how batches run: device, autocast, padding multiple, length cut.

    ``prefix``: positions the model puts before the tokens (1 for a CLS vector). Batches are padded so
    that prefix + tokens is a multiple of ``pad_to_multiple`` (within ``max_length``): the encoder then
    adds no padding of its own, and a graph attention sees whole tiles, not one CLS position more.
    """

    device: torch.device
    autocast: bool
    pad_to_multiple: int
    max_length: int
    prefix: int = 0
    mask_rate: float = 0.0  # > 0: masked-token objective
    mask_id: int = 0
    mask_policy: str = "bert"
    first_id: int = 0  # the smallest real token id (1 where 0 pads): BERT's random replacements come from here

    def batch(
        self, examples: list[dict], mask_seed: int = 0, rows: slice | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """Collate and move to the device; returns (model inputs, labels, number of real tokens).

        With ``mask_rate``, each real token is hidden with that probability (:func:`hide_tokens`, drawn
        from ``mask_seed``); the inputs then carry ``select`` (where tokens are hidden) and the labels are
        the hidden tokens' ids, in row-major order. ``rows``: keep these rows of the
        collated batch (a process's share of a distributed micro-batch: padded and masked as the whole batch is).
        """
        batch = collate(examples, max_length=self.max_length)
        for ids_key, mask_key in (("input_ids", "attention_mask"), ("input_ids_2", "attention_mask_2")):
            if ids_key in batch:
                width = batch[ids_key].shape[1]
                multiple = self.pad_to_multiple
                target = min(-(-(width + self.prefix) // multiple) * multiple - self.prefix, self.max_length)
                if target > width:
                    batch[ids_key] = F.pad(batch[ids_key], (0, target - width))
                    batch[mask_key] = F.pad(batch[mask_key], (0, target - width), value=False)
        tokens = sum(int(mask.sum()) for key, mask in batch.items() if key.startswith("attention_mask"))
        if self.mask_rate > 0:
            ids = batch["input_ids"]
            generator = torch.Generator().manual_seed(mask_seed)
            batch["input_ids"], hidden = hide_tokens(
                ids, batch["attention_mask"], self.mask_rate, self.mask_id, generator, self.mask_policy, self.first_id
            )
            batch["label"], batch["select"] = ids[hidden], hidden
        if rows is not None:
            batch, tokens = select_rows(batch, rows)
        batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        return batch, batch.pop("label"), tokens

    def context(self):
        """bf16 autocast when ``autocast`` is on, else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()

    @classmethod
    def for_training(cls, model: torch.nn.Module, config: Config, device: torch.device) -> Runtime:
        """The runtime of a training run: autocast by ``train.precision`` (``auto``: bf16 on CUDA only)."""
        precision = config.train.precision
        autocast = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        multiple = batch_multiple(config)
        return cls(device, autocast, multiple, max_tokens(model), prefix_length(model), **masking(model, config))


MASK_POLICIES = ("bert", "mask")


def hide_tokens(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    rate: float,
    mask_id: int,
    generator: torch.Generator,
    policy: str = "bert",
    first_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the tokens a masked-LM predicts and what the model sees in their place: ``(inputs, hidden)``.

    Each ``maskable`` token is hidden with probability ``rate``. ``policy="bert"`` (Devlin et al. 2019) shows
    the mask id at 80% of the hidden tokens, a random id in ``[first_id, mask_id)`` at 10% and the token itself
    at 10%, so the model cannot rely on the mask id to know where to predict; ``"mask"`` shows the mask id at
    every hidden token. Every draw comes from ``generator`` (a seeded batch hides the same tokens again).
    """
    if policy not in MASK_POLICIES:
        raise ValueError(f"train.mask_policy={policy!r} is not known; choose one of {list(MASK_POLICIES)}")
    hidden = (torch.rand(ids.shape, generator=generator) < rate) & maskable.cpu()
    if policy == "mask":
        return torch.where(hidden, mask_id, ids), hidden
    kind = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(first_id, mask_id, ids.shape, generator=generator)
    inputs = torch.where(hidden & (kind < 0.8), mask_id, ids)
    inputs = torch.where(hidden & (kind >= 0.8) & (kind < 0.9), random_ids, inputs)
    return inputs, hidden


def select_rows(batch: dict[str, torch.Tensor], rows: slice) -> tuple[dict[str, torch.Tensor], int]:
    """``rows`` of a collated batch, and their real tokens; a masked batch's labels (the hidden tokens, row-major)
    keep those of these rows."""
    label = batch["label"]
    if "select" in batch:  # one label per hidden token: keep the tokens hidden in these rows
        row_of_label = batch["select"].nonzero()[:, 0]
        label = label[(row_of_label >= rows.start) & (row_of_label < rows.stop)]
    else:
        label = label[rows]
    kept = {key: value[rows] for key, value in batch.items() if key != "label"}
    kept["label"] = label
    tokens = sum(int(mask.sum()) for key, mask in kept.items() if key.startswith("attention_mask"))
    return kept, tokens


def max_tokens(model: torch.nn.Module) -> int:
    """Longest input the model takes (the encoder's ``max_len`` less the CLS vector)."""
    return model.encoder.config.max_len - prefix_length(model)


def masking(model: torch.nn.Module, config: Config) -> dict[str, float | int]:
    """:class:`Runtime` settings of the masked objective for a :class:`MaskedTokenModel` (its mask is the
    last row of the embedding table, see :func:`hopformer.train.build.build_model`); none for a classifier."""
    if not isinstance(model, MaskedTokenModel):
        return {}
    first_id = 1 if model.encoder.config.pad_id == 0 else 0  # the example tasks pad with id 0
    return {
        "mask_rate": config.train.mask_rate,
        "mask_id": model.config.vocab_size - 1,
        "mask_policy": config.train.mask_policy,
        "first_id": first_id,
    }


def prefix_length(model: torch.nn.Module) -> int:
    """Positions the classifier puts before the tokens: 1 for the CLS vector, else 0."""
    return 1 if getattr(model, "pooling", None) == "cls" else 0


def mask_seed(config: Config, step: int, micro: int) -> int:
    """Seed of the tokens hidden in micro-batch ``micro`` of step ``step`` (masked objective): drawn from
    (seed, step, micro-batch), so resume is exact."""
    return (config.train.seed * 1_000_003 + step) * config.train.grad_accum + micro
