"""collate: padding, masks from true lengths, pad_to_multiple, retrieval pairs."""

from __future__ import annotations

import pytest
import torch

from hopformer.data import collate


def _example(ids, label=0, **extra):
    ids = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones(len(ids), dtype=torch.bool), "label": label, **extra}


def test_pads_to_the_longest_with_zero_and_false():
    batch = collate([_example([5, 6, 7], label=3), _example([8], label=9)])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.bool
    assert batch["label"].tolist() == [3, 9] and batch["label"].dtype == torch.long


def test_mask_comes_from_lengths_not_from_token_zero():
    # Pixel tasks: id 0 is a black pixel, a real token.
    batch = collate([_example([0, 0, 0, 0]), _example([0, 0])])
    assert batch["attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]


def test_example_mask_is_kept_and_missing_mask_means_all_real():
    masked = {"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.tensor([1, 1, 0]), "label": 1}
    bare = {"input_ids": torch.tensor([4]), "label": 0}
    batch = collate([masked, bare])
    assert batch["attention_mask"].tolist() == [[True, True, False], [True, False, False]]


def test_pad_to_multiple_and_max_length():
    examples = [_example(list(range(1, 6))), _example([1, 2])]
    batch = collate(examples, pad_to_multiple=4)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 2]
    assert collate(examples, pad_to_multiple=5)["input_ids"].shape == (2, 5)  # already a multiple
    cut = collate(examples, max_length=3)
    assert cut["input_ids"].tolist() == [[1, 2, 3], [1, 2, 0]]
    assert cut["attention_mask"].sum(dim=1).tolist() == [3, 2]
    assert collate(examples, pad_to_multiple=4, max_length=3)["input_ids"].shape == (2, 4)


def test_retrieval_pair_keys_are_padded_separately():
    first = _example(
        [1, 2], label=1, input_ids_2=torch.tensor([3, 4, 5, 6]), attention_mask_2=torch.ones(4, dtype=torch.bool)
    )
    second = _example(
        [7, 8, 9], label=0, input_ids_2=torch.tensor([1]), attention_mask_2=torch.ones(1, dtype=torch.bool)
    )
    batch = collate([first, second], pad_to_multiple=2)
    assert batch["input_ids"].shape == (2, 4) and batch["input_ids_2"].shape == (2, 4)
    assert batch["input_ids_2"].tolist() == [[3, 4, 5, 6], [1, 0, 0, 0]]
    assert batch["attention_mask_2"].tolist() == [[True] * 4, [True, False, False, False]]
    assert batch["attention_mask"].tolist() == [[True, True, False, False], [True, True, True, False]]
    assert "input_ids_2" not in collate([_example([1])])


def test_works_as_a_dataloader_collate_fn():
    data = [_example([1] * n, label=n % 10) for n in range(1, 6)]
    batches = list(torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate))
    assert [b["input_ids"].shape[1] for b in batches] == [2, 4, 5]


@pytest.mark.parametrize(
    ("examples", "kwargs", "message"),
    [
        ([], {}, "empty"),
        ([{"label": 1}], {}, "input_ids"),
        ([_example([1]), {"input_ids": torch.tensor([1])}], {}, "1 of 2 examples have 'label'"),
        ([{"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([1])}], {}, "attention_mask"),
        ([{"input_ids": torch.zeros(2, 2)}], {}, "1-D"),
        ([_example([1])], {"pad_to_multiple": 0}, "pad_to_multiple"),
        ([_example([1])], {"max_length": 0}, "max_length"),
    ],
)
def test_bad_input(examples, kwargs, message):
    with pytest.raises(ValueError, match=message):
        collate(examples, **kwargs)
