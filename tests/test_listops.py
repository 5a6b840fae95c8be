"""ListOps: generator statistics and format, labels, and the TSV loader."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from hopformer.data.listops import (
    LISTOPS_VOCAB,
    LISTOPS_VOCAB_SIZE,
    OPERATORS,
    encode_listops,
    evaluate_listops,
    generate_listops,
    load_listops_tsv,
    root_operator_baseline,
    write_listops_tsv,
)

SMALL = dict(min_length=20, max_length=200, max_depth=10, max_args=10)


@pytest.fixture(scope="module")
def small_set() -> list[tuple[str, int]]:
    # 300 trees = two shards, so workers=2 really splits the work.
    return generate_listops(300, seed=3, workers=2, progress=False, **SMALL)


def _released_tree(tokens: list[str]):
    """Rebuild the released nested tuples from parenthesis-free tokens."""
    stack: list[list] = []
    for token in tokens:
        if token in OPERATORS:
            stack.append([token])
        elif token == "]":
            op, *args = stack.pop()
            tree = (op, args[0])
            for arg in args[1:]:
                tree = (tree, arg)
            tree = (tree, "]")
            if not stack:
                return tree
            stack[-1].append(tree)
        elif not stack:
            return int(token)
        else:
            stack[-1].append(int(token))
    raise AssertionError("unterminated tree")


def _released_to_string(tree) -> str:
    """``to_string`` of lra_benchmarks/data/listops.py."""
    if isinstance(tree, str):
        return tree
    if isinstance(tree, int):
        return str(tree)
    return "( " + _released_to_string(tree[0]) + " " + _released_to_string(tree[1]) + " )"


def _shape(source: str) -> tuple[int, int, list[int], list[str]]:
    """(length without parentheses, tree depth with the root at 1, argument counts, operators)."""
    tokens = [token for token in source.split() if token not in "()"]
    depth = deepest = 1
    open_args: list[int] = []
    arg_counts, ops = [], []
    for token in tokens:
        if token in OPERATORS:
            if open_args:
                open_args[-1] += 1
            ops.append(token)
            open_args.append(0)
            depth = len(open_args)
            deepest = max(deepest, depth + 1)  # its arguments sit one level below
        elif token == "]":
            arg_counts.append(open_args.pop())
        elif open_args:
            open_args[-1] += 1
    return len(tokens), deepest, arg_counts, ops


def _released_generate(rng: random.Random, depth: int, max_depth: int, max_args: int):
    """``generate_tree`` of lra_benchmarks/data/listops.py, with its own Random."""
    r = rng.random() if depth < max_depth else 1
    if r > 0.25:
        return rng.choice(range(10)), 1
    length = 2
    values = []
    for _ in range(rng.randint(2, max_args)):
        sub, sub_length = _released_generate(rng, depth + 1, max_depth, max_args)
        values.append(sub)
        length += sub_length
    tree = (rng.choice(OPERATORS), values[0])
    for value in values[1:]:
        tree = (tree, value)
    return (tree, "]"), length


# ---- generator -------------------------------------------------------------------------------------


def test_lengths_strictly_within_bounds_and_serialisation_is_the_released_one(small_set):
    assert len(small_set) == 300
    assert len({source for source, _ in small_set}) == 300, "trees must be unique"
    lengths = []
    for source, _ in small_set:
        length, _, _, _ = _shape(source)
        assert SMALL["min_length"] < length < SMALL["max_length"]
        lengths.append(length)
        tokens = [token for token in source.split() if token not in "()"]
        assert _released_to_string(_released_tree(tokens)) == source
    assert min(lengths) < 40 and max(lengths) > 150  # the whole window is used


def test_tight_bounds_are_strict():
    # 4 < length < 6 leaves only length 5: an operator over three digits.
    for source, label in generate_listops(50, seed=0, min_length=4, max_length=6, progress=False):
        assert re.fullmatch(r"\( \( \( \( \[(MIN|MAX|MED|SM) \d \) \d \) \d \) \] \)", source), source
        assert evaluate_listops(source) == label


def test_depth_and_argument_counts(small_set):
    depths, counts, ops = [], Counter(), Counter()
    for source, _ in small_set:
        _, depth, arg_counts, tree_ops = _shape(source)
        depths.append(depth)
        counts.update(arg_counts)
        ops.update(tree_ops)
    assert max(depths) <= SMALL["max_depth"]
    assert set(counts) <= set(range(2, SMALL["max_args"] + 1))
    assert {2, SMALL["max_args"]} <= set(counts)
    assert set(ops) == set(OPERATORS)
    assert max(ops.values()) / min(ops.values()) < 1.5  # operators are drawn uniformly

    shallow = generate_listops(60, seed=1, min_length=10, max_length=200, max_depth=3, max_args=4, progress=False)
    shapes = [_shape(source) for source, _ in shallow]
    assert max(depth for _, depth, _, _ in shapes) == 3  # reached, never passed
    assert {count for _, _, arg_counts, _ in shapes for count in arg_counts} == {2, 3, 4}


def test_labels_plausible_and_agree_with_evaluation(small_set):
    labels = Counter(label for _, label in small_set)
    assert set(labels) <= set(range(10)) and len(labels) >= 8
    assert max(labels.values()) < 0.4 * len(small_set)
    for source, label in small_set:
        assert isinstance(label, int)
        assert evaluate_listops(source) == label
        flat = source.replace("(", "").replace(")", "")
        assert evaluate_listops(flat) == label


def test_distribution_matches_the_released_recursion():
    rng = random.Random(0)
    released = []
    while len(released) < 300:
        tree, length = _released_generate(rng, 1, 10, 10)
        if SMALL["min_length"] < length < SMALL["max_length"]:
            released.append((length, _released_to_string(tree).count("[")))
    ours = []
    for source, _ in generate_listops(300, seed=5, progress=False, **SMALL):
        length, _, _, ops = _shape(source)
        ours.append((length, len(ops)))
    for column, name in enumerate(["length", "operators"]):
        theirs_mean = np.mean([row[column] for row in released])
        ours_mean = np.mean([row[column] for row in ours])
        assert abs(ours_mean - theirs_mean) < 0.15 * theirs_mean, name


def test_unconditional_draws_match_the_released_recursion():
    # Before the length filter: the share of bare digits (1 - VALUE_P) and the length profile.
    from hopformer.data.listops import _draw_tree, _prefixes

    bins = [1, 4, 20, 100, 500, 2000]  # the last bin is "2000 or longer"

    def profile(lengths):
        counts = np.histogram(lengths, bins=[*bins, np.inf])[0]
        return counts / len(lengths)

    rng = random.Random(0)
    released = [_released_generate(rng, 1, 10, 10)[1] for _ in range(3000)]
    rand = random.Random(1).random
    ours = []
    for _ in range(3000):
        tree = _draw_tree(rand, _prefixes(10), 10, 10, 2000)
        ours.append(2000 if tree is None else tree[1])  # None: stopped once 2000 long
    assert abs(profile(ours)[0] - 0.75) < 0.025
    np.testing.assert_allclose(profile(ours), profile(released), atol=0.025)


def test_determinism(small_set):
    again = generate_listops(300, seed=3, workers=1, progress=False, **SMALL)
    assert again == small_set  # same seed, and independent of the number of workers
    other = generate_listops(300, seed=4, workers=1, progress=False, **SMALL)
    assert other != small_set
    assert not {source for source, _ in other} & {source for source, _ in small_set}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(n=-1), "n"),
        (dict(n=5, seed=-2), "seed"),
        (dict(n=5, min_length=10, max_length=10), "max_length"),
        (dict(n=5, max_args=1), "max_args"),
        (dict(n=5, max_depth=0), "max_depth"),
        (dict(n=5, workers=0), "workers"),
        (dict(n=5, max_depth=2), "max_depth=2"),  # no tree of depth 2 is longer than 12
        (dict(n=11, min_length=0, max_length=2), "only 10 distinct trees"),  # would loop forever
    ],
)
def test_bad_arguments(kwargs, name):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=re.escape(name)):
        generate_listops(n, progress=False, **kwargs)


def test_zero_examples():
    assert generate_listops(0, progress=False) == []


# ---- labels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "label"),
    [
        ("( ( ( ( [MAX 2 ) 9 ) 4 ) ] )", 9),  # the released example
        ("[MAX 2 9 4 ]", 9),
        ("[MIN 7 3 8 ]", 3),
        ("[MED 1 2 3 4 ]", 2),  # even count: (2 + 3) / 2 = 2.5, truncated
        ("( ( ( ( ( [MED 1 ) 2 ) 3 ) 4 ) ] )", 2),
        ("[MED 1 2 ]", 1),
        ("[MED 9 0 5 ]", 5),
        ("[MED 8 9 ]", 8),
        ("[SM 9 8 7 ]", 4),  # 24 mod 10
        ("[SM 5 5 ]", 0),
        ("[MAX 2 [MIN 5 3 ] [SM 9 9 ] ]", 8),
        ("[MIN [MAX 1 2 ] [MED 4 4 [SM 3 3 ] ] X", 2),  # the cleaned closing token
        ("( ( ( [MIN ( ( ( [MAX 1 ) 2 ) ] ) ) ( ( ( ( [SM 9 ) 2 ) 1 ) ] ) ) ] )", 2),
        ("7", 7),
    ],
)
def test_evaluate_hand_made(source, label):
    assert evaluate_listops(source) == label


def test_median_matches_numpy():
    rng = random.Random(1)
    for _ in range(200):
        values = [rng.randrange(10) for _ in range(rng.randint(2, 10))]
        source = "[MED " + " ".join(map(str, values)) + " ]"
        assert evaluate_listops(source) == int(np.median(values)), values


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("", "empty"),
        ("[MAX 2 9", "never closed"),
        ("[MAX ]", "no arguments"),
        ("[MAX 2 ] 3", "after the end"),
        ("]", "closes nothing"),
        ("[FIRST 1 2 ]", "unknown token"),
        ("12", "unknown token"),
        ("( ( [MAX 2 ) 9 9 ) ] )", "3 items"),
        ("( ( [MAX 2 ) 9 ) )", "closes nothing"),
        ("( ( [MAX 2 ) 9 )", "incomplete"),
        ("( ( ( [MAX 2 ) 9 )", "never closed"),
        ("( 2 9 )", "not a valid step"),
    ],
)
def test_evaluate_malformed(source, reason):
    with pytest.raises(ValueError, match=reason):
        evaluate_listops(source)


# ---- TSV and loader ---------------------------------------------------------------------------------


def test_vocabulary_is_fixed_and_has_the_cleaned_bracket():
    assert "X" in LISTOPS_VOCAB  # the bracket-bug regression (specs/lra.md §5.1)
    assert list(LISTOPS_VOCAB) == [*map(str, range(10)), "[MIN", "[MAX", "[MED", "[SM", "X"]
    assert sorted(LISTOPS_VOCAB.values()) == list(range(1, LISTOPS_VOCAB_SIZE))  # 0 stays padding
    with pytest.raises(TypeError):
        LISTOPS_VOCAB["?"] = 16  # read-only


def test_write_and_load_round_trip(tmp_path, small_set):
    path = write_listops_tsv(tmp_path / "basic_val.tsv", small_set)
    raw = path.read_bytes()
    assert raw.startswith(b"Source\tTarget\r\n")  # csv.writer, as the released script
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    examples = load_listops_tsv(path)
    assert len(examples) == len(small_set)
    for example, (source, label) in zip(examples, small_set):
        tokens = source.replace("]", "X").replace("(", "").replace(")", "").split()
        assert example["input_ids"].dtype == torch.long
        assert example["input_ids"].tolist() == [LISTOPS_VOCAB[token] for token in tokens]
        assert example["attention_mask"].dtype == torch.bool and bool(example["attention_mask"].all())
        assert example["attention_mask"].shape == example["input_ids"].shape
        assert example["label"] == label
    with pytest.warns(UserWarning, match=r"basic_val\.tsv: cut \d+ of 300 examples to max_length=25"):
        short = load_listops_tsv(path, max_length=25)
    assert max(len(example["input_ids"]) for example in short) == 25
    assert all(len(example["attention_mask"]) == len(example["input_ids"]) for example in short)


def test_load_released_style_file(tmp_path):
    path = tmp_path / "basic_test.tsv"
    path.write_text(
        "Source\tTarget\n( ( ( ( [MAX 2 ) 9 ) 4 ) ] )\t9\n( ( ( [SM ( ( ( [MED 1 ) 2 ) ] ) ) 9 ) ] )\t0\n\n"
    )
    first, second = load_listops_tsv(path)
    v = LISTOPS_VOCAB
    assert first["input_ids"].tolist() == [v["[MAX"], v["2"], v["9"], v["4"], v["X"]]
    assert first["label"] == 9
    assert second["input_ids"].tolist() == [v["[SM"], v["[MED"], v["1"], v["2"], v["X"], v["9"], v["X"]]
    assert second["label"] == 0


def test_encode_fast_path_agrees_with_plain_cleaning():
    for source in ["( ( [MIN 1 ) 2 ) ] )", "[SM  3\t4 ]", "[MED 1 2 ] ) )", " 5 "]:
        tokens = source.replace("]", "X").replace("(", "").replace(")", "").split()
        assert encode_listops(source).tolist() == [LISTOPS_VOCAB[token] for token in tokens]
    for bad, token in [
        ("[MIN1 ]", "[MIN1"),
        ("2)3", "23"),
        ("[MINX", "[MINX"),
        ("\x01 2", "\x01"),
        ("é", "é"),
    ]:
        with pytest.raises(ValueError, match=re.escape(repr(token))):
            encode_listops(bad)


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ("( ( [MAX 2 ) 9 ) ] )\t9\n", 1, "header"),
        ("Source,Target\n( ( [MAX 2 ) 9 ) ] )\t9\n", 1, "header"),
        ("Source\tTarget\n( ( [MAX 2 ) 9 ) ] )\t9\n[MIN 1 2 ]\n", 3, "2 tab-separated columns, got 1"),
        ("Source\tTarget\n[MIN 1 2 ]\t1\textra\n", 2, "2 tab-separated columns, got 3"),
        ("Source\tTarget\n[MIN 1 2 ]\t10\n", 2, "label must be an integer 0-9"),
        ("Source\tTarget\n[MIN 1 2 ]\t-1\n", 2, "label must be an integer 0-9"),
        ("Source\tTarget\n[MIN 1 2 ]\tx\n", 2, "label must be an integer 0-9"),
        ("Source\tTarget\n[MIN 1 2 ]\t1\n[MEAN 1 2 ]\t1\n", 3, "unknown token '[MEAN'"),
        ("Source\tTarget\n( ( )\t1\n", 2, "empty source"),
    ],
)
def test_load_malformed(tmp_path, content, line, reason):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}, line {line}: ") + ".*" + re.escape(reason)):
        load_listops_tsv(path)


def test_write_rejects_bad_examples(tmp_path):
    with pytest.raises(ValueError, match="label must be an integer 0-9"):
        write_listops_tsv(tmp_path / "x.tsv", [("[MIN 1 2 ]", 12)])
    with pytest.raises(ValueError, match="without tabs"):
        write_listops_tsv(tmp_path / "x.tsv", [("[MIN 1\t2 ]", 1)])
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def _examples(rows: list[tuple[str, int]]) -> list[dict]:
    return [{"input_ids": encode_listops(source), "label": label} for source, label in rows]


def test_root_operator_baseline_hand_made():
    train = _examples(
        [("[MAX 9 1 ]", 9), ("[MAX 9 2 ]", 9), ("[MAX 3 2 ]", 3), ("[MIN 0 5 ]", 0), ("[MIN 3 4 ]", 3),
         ("[MIN 0 1 ]", 0), ("7", 7)]
    )  # fmt: skip
    # guesses: MAX -> 9, MIN -> 0, "7" -> 7, SM (never seen) -> the overall majority 0 (tie 0/9: smaller)
    evaluate = _examples([("[MAX 1 2 ]", 2), ("[MAX 9 9 ]", 9), ("[MIN 5 6 ]", 5), ("7", 7), ("[SM 5 5 ]", 0)])
    assert root_operator_baseline(train, evaluate) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="both sets"):
        root_operator_baseline(train, [])


def test_root_operator_baseline_matches_a_direct_count(small_set):
    examples = _examples(small_set)
    train, evaluate = examples[:200], examples[200:]
    by_root: dict[int, Counter] = {}
    for example in train:
        by_root.setdefault(int(example["input_ids"][0]), Counter())[example["label"]] += 1
    guess = {root: min(c, key=lambda label: (-c[label], label)) for root, c in by_root.items()}
    expected = np.mean([guess[int(e["input_ids"][0])] == e["label"] for e in evaluate])
    assert root_operator_baseline(train, evaluate) == pytest.approx(expected)
    assert root_operator_baseline(train, evaluate) > 0.2  # the root operator carries real information
