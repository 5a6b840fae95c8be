"""Batching: pad a list of unpadded examples into tensors.

Every loader returns examples of their true length; this is the one place that pads. The padding
mask comes from those true lengths only, never from the token ids: pixel tasks use id 0 for black,
and masking ``ids != 0`` (as several LRA ports do) hides most of a Pathfinder image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# (ids key, mask key) of each sequence an example can hold; the second is the retrieval pair.
_SEQUENCES = (("input_ids", "attention_mask"), ("input_ids_2", "attention_mask_2"))

__all__ = ["collate", "dihedral"]


def collate(
    examples: Sequence[Mapping[str, object]],
    pad_to_multiple: int = 1,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad examples into a batch; usable as a DataLoader ``collate_fn``.

    Args:
        examples: dicts with a 1-D ``input_ids`` and optionally ``attention_mask`` (1-D, same length,
            True = real token; all True when absent), ``label``, and the retrieval pair
            ``input_ids_2`` / ``attention_mask_2``. Either every example has a key or none has.
            Other keys are ignored.
        pad_to_multiple: the padded width is the longest sequence rounded up to a multiple of this
            (e.g. the attention block size).
        max_length: cut every sequence to at most this many tokens before padding. Take a multiple of
            ``pad_to_multiple`` to bound the padded width by it too.

    Returns:
        ``input_ids`` ``[B, W]`` padded with 0 (dtype of the examples), ``attention_mask`` bool
        ``[B, W]`` False on padding, ``label`` LongTensor ``[B]`` when examples have labels, and
        ``input_ids_2`` / ``attention_mask_2`` (padded to their own width) for pairs.
    """
    if not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be a positive integer, got {pad_to_multiple!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
    if len(examples) == 0:
        raise ValueError("collate: examples is empty")

    batch: dict[str, torch.Tensor] = {}
    for ids_key, mask_key in _SEQUENCES:
        if _present(examples, ids_key):
            ids, mask = _pad(examples, ids_key, mask_key, pad_to_multiple, max_length)
            batch[ids_key] = ids
            batch[mask_key] = mask
        elif ids_key == "input_ids":
            raise ValueError("collate: examples have no 'input_ids'")
    if _present(examples, "label"):
        labels = [example["label"] for example in examples]
        batch["label"] = torch.tensor([int(label) for label in labels], dtype=torch.long)
    return batch


def _present(examples: Sequence[Mapping[str, object]], key: str) -> bool:
    """Whether the examples have ``key``; an error if only some do."""
    count = sum(key in example for example in examples)
    if 0 < count < len(examples):
        raise ValueError(f"collate: {count} of {len(examples)} examples have {key!r}; all or none must")
    return count > 0


def _pad(
    examples: Sequence[Mapping[str, object]],
    ids_key: str,
    mask_key: str,
    pad_to_multiple: int,
    max_length: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad one sequence key of every example; the mask is the example's own mask on its true length."""
    sequences = []
    masks = []
    for index, example in enumerate(examples):
        ids = torch.as_tensor(example[ids_key])
        if ids.dim() != 1:
            raise ValueError(f"collate: example {index} {ids_key!r} must be 1-D, got shape {tuple(ids.shape)}")
        mask = example.get(mask_key)
        if mask is None:
            mask = torch.ones(len(ids), dtype=torch.bool)
        else:
            mask = torch.as_tensor(mask).bool()
            if mask.shape != ids.shape:
                raise ValueError(
                    f"collate: example {index} {mask_key!r} has shape {tuple(mask.shape)}, "
                    f"but {ids_key!r} has shape {tuple(ids.shape)}"
                )
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        sequences.append(ids)
        masks.append(mask)

    longest = max(len(ids) for ids in sequences)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    padded_ids = torch.zeros(len(sequences), width, dtype=sequences[0].dtype)
    padded_mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, (ids, mask) in enumerate(zip(sequences, masks)):
        padded_ids[row, : len(ids)] = ids
        padded_mask[row, : len(mask)] = mask
    return padded_ids, padded_mask


def dihedral(example: Mapping[str, object], code: int) -> dict[str, object]:
    """One of the 8 symmetries of the square applied to a square image example (a new dict).

    ``code`` in 0..7: ``code % 4`` quarter turns, then a left-right flip when ``code >= 4``; 0 is
    the identity. ``input_ids`` and ``attention_mask`` (flattened ``side x side`` rows) move together.
    For Pathfinder, whose label (are the markers on one snake?) no symmetry changes.
    """
    if not isinstance(code, int) or not 0 <= code < 8:
        raise ValueError(f"code must be an int in 0..7, got {code!r}")
    ids = example["input_ids"]
    side = int(round(len(ids) ** 0.5))
    if side * side != len(ids):
        raise ValueError(f"dihedral needs a square image, got {len(ids)} pixels")
    out = dict(example)
    for key in ("input_ids", "attention_mask"):
        if key in example:
            image = torch.rot90(example[key].view(side, side), code % 4)
            out[key] = (image.flip(-1) if code >= 4 else image).reshape(-1)
    return out
