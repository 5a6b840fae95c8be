"""ListOps: the LRA generator, the released TSV format, and a loader with a frozen vocabulary.

The generator follows ``lra_benchmarks/data/listops.py`` of google-research/long-range-arena
(specs/lra.md §3). A tree is either a digit 0-9 or an operator applied to 2..``max_args`` subtrees::

    MAX(2, 9, 4)  is written  ( ( ( ( [MAX 2 ) 9 ) 4 ) ] )

that is, the left-nested pairs ``((((op, 2), 9), 4), "]")`` with every pair wrapped as ``( A B )``.
The *length* of a tree counts operators, digits and ``]`` but not the parentheses. A tree is kept only
if ``min_length < length < max_length`` (both strict); the LRA setting is 500 < length < 2000, which
rejects about 92% of the trees drawn, so generation is iterative, stops a tree as soon as it grows too
long, and builds a string only for the trees it keeps.

Released TSV (specs/lra.md §2): a header row ``Source<TAB>Target``, then one tree and its label per
row, written by ``csv.writer(delimiter="\\t")`` (so rows end in ``\\r\\n``, as in the release).

Vocabulary: the official pipeline builds its vocabulary from a Python set, so its ids change between
runs. hopformer freezes one order in :data:`LISTOPS_VOCAB`.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import random
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from hopformer.checks import file_error

OPERATORS: tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
"""The four operators of the released data (``[FIRST`` and ``[LAST`` exist upstream but are disabled)."""
END = "]"
VALUE_P = 0.25
"""A node shallower than ``max_depth`` is an operator with this probability, else a digit."""

LISTOPS_PAD_ID = 0
LISTOPS_VOCAB: MappingProxyType[str, int] = MappingProxyType(
    {
        **{str(digit): digit + 1 for digit in range(10)},  # "0" -> 1 ... "9" -> 10
        "[MIN": 11,
        "[MAX": 12,
        "[MED": 13,
        "[SM": 14,
        "X": 15,  # the closing "]" after the official cleaning (the bracket-bug fix, specs/lra.md §5.1)
    }
)
"""Token -> id for cleaned ListOps tokens. Id 0 is padding and is not a token; there is **no**
out-of-vocabulary id: an unknown token is an error, never silently mapped."""
LISTOPS_VOCAB_SIZE = 16
"""Size of an embedding table for :data:`LISTOPS_VOCAB` (15 tokens + padding)."""

# Work is cut into shards of this many kept trees, each with its own seed, so the output depends only
# on the arguments and never on how many worker processes ran the shards (changing it changes the data).
_SHARD_SIZE = 250

__all__ = [
    "LISTOPS_PAD_ID",
    "LISTOPS_VOCAB",
    "LISTOPS_VOCAB_SIZE",
    "OPERATORS",
    "encode_listops",
    "evaluate_listops",
    "generate_listops",
    "load_listops_tsv",
    "root_operator_baseline",
    "write_listops_tsv",
]


# --------------------------------------------------------------------------------------------------
# Labels


def _apply(op: str, args: list[int]) -> int:
    """The value of operator ``op`` on its argument values (exactly as the released ``to_value``)."""
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        # int(np.median(args)): with an even count the mean of the two middle values, truncated.
        ordered = sorted(args)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) // 2  # values are >= 0, so // truncates
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}; allowed: {', '.join(OPERATORS)}")


def evaluate_listops(source: str) -> int:
    """Compute the label of a ListOps expression.

    Accepts the released serialisation ``( ( ( [MAX 2 ) 9 ) ] )`` and the same tokens without
    parentheses (``[MAX 2 9 ]``); the closing token may be ``]`` or its cleaned form ``X``.
    With parentheses every pair ``( A B )`` is checked exactly as the released ``to_value`` reads it.

    Raises:
        ValueError: with the reason, on an unknown token, unbalanced parentheses or brackets, an
            operator without arguments, or anything left over after the expression.
    """
    tokens = source.split()
    if not tokens:
        raise ValueError("evaluate_listops: empty expression")
    if "(" in tokens or ")" in tokens:
        return _evaluate_pairs(tokens)
    return _evaluate_flat(tokens)


def _evaluate_flat(tokens: list[str]) -> int:
    """Evaluate the parenthesis-free form with a stack of open operators."""
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for position, token in enumerate(tokens):
        if result is not None:
            raise ValueError(f"evaluate_listops: token {token!r} at position {position} after the end")
        if token in OPERATORS:
            stack.append((token, []))
            continue
        if token in (END, "X"):
            if not stack:
                raise ValueError(f"evaluate_listops: {token!r} at position {position} closes nothing")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"evaluate_listops: operator {op} closed at position {position} has no arguments")
            value = _apply(op, args)
        elif len(token) == 1 and token.isdigit():
            value = int(token)
        else:
            raise ValueError(f"evaluate_listops: unknown token {token!r} at position {position}")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    if stack:
        raise ValueError(f"evaluate_listops: {len(stack)} operator(s) never closed")
    assert result is not None  # tokens is non-empty and every path above sets a value or raises
    return result


class _Partial:
    """An operator that has collected some of its arguments (the released ``(op, [args])``)."""

    __slots__ = ("op", "args")

    def __init__(self, op: str, first: int) -> None:
        self.op = op
        self.args = [first]


def _evaluate_pairs(tokens: list[str]) -> int:
    """Evaluate the parenthesised form: every ``( A B )`` combines as the released ``to_value`` does.

    Iterative, because a 2000-token tree nests pairs deeper than Python's recursion limit.
    """
    open_pairs: list[list[object]] = []  # the items read so far inside each open "("
    result: object = None
    for position, token in enumerate(tokens):
        if token == "(":
            open_pairs.append([])
            continue
        if token == ")":
            if not open_pairs:
                raise ValueError(f"evaluate_listops: ')' at position {position} closes nothing")
            pair = open_pairs.pop()
            if len(pair) != 2:
                raise ValueError(
                    f"evaluate_listops: the pair closed at position {position} has {len(pair)} items, not 2"
                )
            item = _combine(pair[0], pair[1], position)
        elif token in OPERATORS or token in (END, "X"):
            item = token
        elif len(token) == 1 and token.isdigit():
            item = int(token)
        else:
            raise ValueError(f"evaluate_listops: unknown token {token!r} at position {position}")
        if open_pairs:
            open_pairs[-1].append(item)
        elif result is None:
            result = item
        else:
            raise ValueError(f"evaluate_listops: token {token!r} at position {position} after the end")
    if open_pairs:
        raise ValueError(f"evaluate_listops: {len(open_pairs)} '(' never closed")
    if not isinstance(result, int):
        raise ValueError(f"evaluate_listops: the expression is incomplete (it ends in {result!r})")
    return result


def _combine(left: object, right: object, position: int) -> object:
    """One pair of the released ``to_value``: start, extend or close an operator."""
    if isinstance(right, int):
        if isinstance(left, str) and left in OPERATORS:
            return _Partial(left, right)
        if isinstance(left, _Partial):
            left.args.append(right)
            return left
    elif right in (END, "X") and isinstance(left, _Partial):
        return _apply(left.op, left.args)
    raise ValueError(f"evaluate_listops: the pair closed at position {position} is not a valid step")


# --------------------------------------------------------------------------------------------------
# Generation


def _prefixes(max_args: int) -> list[list[str]]:
    """``prefix[op][n]`` = the ``n + 1`` opening parentheses and the operator of an ``n``-ary node."""
    return [["( " * (n + 1) + op for n in range(max_args + 1)] for op in OPERATORS]


_DIGITS = tuple(str(digit) for digit in range(10))


def _draw_tree(
    rand: Callable[[], float], prefixes: list[list[str]], max_depth: int, max_args: int, max_length: int
) -> tuple[list[str], int, int] | None:
    """Draw one tree depth-first; return (string pieces, length, label), or None once length >= max_length.

    The same recursion as the released ``generate_tree``, unrolled into a stack of open operators so
    that value and length are computed in the same pass. Stopping early at max_length changes nothing
    about the kept trees: each tree is an independent draw and that one would be rejected anyway.
    """
    pieces: list[str] = []
    length = 0
    # open operators, innermost last: [operator index, arguments still to draw, argument values]
    stack: list[list] = []
    while True:
        # A node at depth len(stack) + 1 (the root is depth 1); max_depth forces a digit.
        if len(stack) + 1 < max_depth and rand() <= VALUE_P:
            n_args = 2 + int(rand() * (max_args - 1))  # uniform on 2..max_args
            op = int(rand() * 4)
            pieces.append(prefixes[op][n_args])
            length += 2  # the operator and its closing "]"
            if length >= max_length:
                return None
            stack.append([op, n_args, []])
            continue
        value = int(rand() * 10)
        pieces.append(_DIGITS[value])
        length += 1
        if length >= max_length:
            return None
        # Hand the value up; every operator this completes hands its own value further up.
        while stack:
            node = stack[-1]
            node[2].append(value)
            node[1] -= 1
            pieces.append(")")
            if node[1]:
                break
            stack.pop()
            pieces.append("] )")
            value = _apply(OPERATORS[node[0]], node[2])
        else:
            return pieces, length, value


def _shard_seed(seed: int, shard: int) -> int:
    """A well-mixed 128-bit seed for one shard, derived from the user seed and the shard index."""
    state = np.random.SeedSequence([seed, shard]).generate_state(2, dtype=np.uint64)
    return int(state[0]) << 64 | int(state[1])


def _generate_shard(task: tuple[int, int, int, int, int, int, int]) -> list[tuple[str, int]]:
    """Worker: the first ``count`` trees that pass the length filter in shard ``shard`` of ``seed``."""
    seed, shard, count, min_length, max_length, max_depth, max_args = task
    rand = random.Random(_shard_seed(seed, shard)).random
    prefixes = _prefixes(max_args)
    kept: list[tuple[str, int]] = []
    while len(kept) < count:
        tree = _draw_tree(rand, prefixes, max_depth, max_args, max_length)
        if tree is not None and tree[1] > min_length:
            kept.append((" ".join(tree[0]), tree[2]))
    return kept


def _count_trees(max_length: int, max_depth: int, max_args: int, cap: float) -> np.ndarray:
    """``counts[L]``: how many distinct trees have length ``L`` (for ``L < max_length``), capped at ``cap``.

    Built bottom-up: at ``max_depth`` only the 10 digits; one level up, a digit or one of 4 operators
    over 2..max_args subtrees of the level below (length 2 + their lengths). Capping keeps the numbers
    finite; only "at least ``cap``" matters.
    """
    size = max(max_length, 2)
    digits = np.zeros(size)
    digits[1] = 10
    counts = digits
    for _ in range(max_depth - 1):
        operators = np.zeros(size)
        tuples = counts  # sequences of k subtrees, by total length; k = 1 here
        for _ in range(2, max_args + 1):
            tuples = np.minimum(np.convolve(tuples, counts)[:size], cap)
            operators[2:] += tuples[:-2]
        counts = np.minimum(digits + 4 * operators, cap)
    return counts


def _check_generation_args(n: int, seed: int, min_length: int, max_length: int, max_depth: int, max_args: int) -> None:
    """Raise ValueError naming the argument for settings that are invalid or can never be met."""
    for name, value in (("n", n), ("seed", seed), ("min_length", min_length)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    for name, value, smallest in (("max_depth", max_depth, 1), ("max_args", max_args, 2)):
        if not isinstance(value, int) or value < smallest:
            raise ValueError(f"{name} must be an integer >= {smallest}, got {value!r}")
    if not isinstance(max_length, int) or max_length <= min_length:
        raise ValueError(f"max_length must be an integer > min_length={min_length}, got {max_length!r}")
    if n > 0:  # too few distinct trees in the bounds would make generation loop forever
        available = _count_trees(max_length, max_depth, max_args, cap=n)[min_length + 1 : max_length].sum()
        if available < n:
            raise ValueError(
                f"only {int(available)} distinct trees have min_length={min_length} < length < "
                f"max_length={max_length} with max_depth={max_depth}, max_args={max_args}; n={n} asked"
            )


def generate_listops(
    n: int,
    *,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    workers: int | None = None,
    progress: bool = True,
) -> list[tuple[str, int]]:
    """Generate ``n`` unique ListOps trees as ``(source, label)`` pairs, as the LRA release does.

    Args:
        n: number of examples.
        seed: any non-negative integer; the output depends only on the arguments other than
            ``workers`` and ``progress``.
        min_length: keep a tree only if ``min_length < length < max_length`` (strict), with length
            counted without parentheses.
        max_length: see ``min_length``.
        max_depth: the depth at which every node is a digit (the root has depth 1).
        max_args: operators take 2..``max_args`` arguments.
        workers: processes to use (default ``os.cpu_count()``); 1 runs in this process.
        progress: show a tqdm progress bar on stderr.

    Returns:
        ``n`` pairs ``(source, label)``: the released serialisation and the label 0-9, in a fixed order
        (shard by shard, duplicates dropped keeping the first).
    """
    _check_generation_args(n, seed, min_length, max_length, max_depth, max_args)
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if n == 0:
        return []

    from tqdm import tqdm

    examples: list[tuple[str, int]] = []
    seen: set[str] = set()
    next_shard = 0
    bar = tqdm(total=n, desc="ListOps", unit="tree", disable=not progress, dynamic_ncols=True)
    first_pass_shards = -(-n // _SHARD_SIZE)
    workers = min(workers, first_pass_shards)
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        # Normally one pass; another only if duplicates were dropped (very rare above a few tokens).
        while len(examples) < n:
            missing = n - len(examples)
            tasks = []
            for start in range(0, missing, _SHARD_SIZE):
                count = min(_SHARD_SIZE, missing - start)
                tasks.append((seed, next_shard, count, min_length, max_length, max_depth, max_args))
                next_shard += 1
            shards = pool.imap(_generate_shard, tasks) if pool else map(_generate_shard, tasks)
            for shard in shards:  # imap keeps the task order, so the result never depends on timing
                before = len(examples)
                for source, label in shard:
                    if source not in seen and len(examples) < n:
                        seen.add(source)
                        examples.append((source, label))
                bar.update(len(examples) - before)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    return examples


# --------------------------------------------------------------------------------------------------
# The released TSV format


def write_listops_tsv(path: str | os.PathLike, examples: Iterable[tuple[str, int]]) -> Path:
    """Write ``(source, label)`` pairs in the released TSV format, atomically; return the path.

    The header is ``Source<TAB>Target``; rows are written by ``csv.writer(delimiter="\\t")`` as in the
    release. The file appears complete or not at all (a temporary file is renamed over ``path``).
    """
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False, newline=""
    )
    try:
        with handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(["Source", "Target"])
            for index, (source, label) in enumerate(examples):
                if not isinstance(source, str) or any(c in source for c in "\t\r\n"):
                    raise ValueError(f"example {index}: source must be a one-line string without tabs")
                if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label <= 9:
                    raise ValueError(f"example {index}: label must be an integer 0-9, got {label!r}")
                writer.writerow([source, int(label)])
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


# The loader's fast path: each operator becomes one byte, then a byte table maps the whole line at
# once. Anything unusual (non-ASCII, touching tokens, stray characters) goes to the plain path, which
# is the reference and names the bad token.
_OPERATOR_BYTES = ((b"[MIN", b"\x01"), (b"[MAX", b"\x02"), (b"[MED", b"\x03"), (b"[SM", b"\x04"))
_BYTE_IDS = np.full(256, -1, dtype=np.int8)  # -1: not a whole token by itself; 0: a separator
_BYTE_IDS[list(b" \t\n\r\x0b\x0c")] = 0
for _token, _id in LISTOPS_VOCAB.items():
    _BYTE_IDS[dict(_OPERATOR_BYTES).get(_token.encode(), _token.encode())[0]] = _id
_BYTE_IDS[ord("]")] = LISTOPS_VOCAB["X"]


def _token_ids_fast(source: str) -> np.ndarray | None:
    """Token ids of one source with numpy, or None where the plain path must decide."""
    try:
        raw = source.encode("ascii")
    except UnicodeEncodeError:
        return None
    if any(code in raw for _, code in _OPERATOR_BYTES):
        return None
    for operator, code in _OPERATOR_BYTES:
        raw = raw.replace(operator, code)
    ids = _BYTE_IDS[np.frombuffer(raw.translate(None, b"()"), dtype=np.uint8)]  # cleaning deletes ( )
    if ids.size == 0 or ids.min() < 0:
        return None
    is_token = ids > 0
    if (is_token[1:] & is_token[:-1]).any():  # touching characters form one (unknown) token
        return None
    return ids[is_token].astype(np.int64)


def encode_listops(source: str) -> torch.Tensor:
    """Token ids (LongTensor) of one ListOps source after the official cleaning, without truncation.

    Raises:
        ValueError: naming the first token that is not in :data:`LISTOPS_VOCAB`.
    """
    ids = _token_ids_fast(source)
    if ids is not None:
        return torch.from_numpy(ids)
    tokens = source.replace("]", "X").replace("(", "").replace(")", "").split()
    for token in tokens:
        if token not in LISTOPS_VOCAB:
            raise ValueError(f"unknown token {token!r} (the vocabulary is {' '.join(LISTOPS_VOCAB)})")
    return torch.tensor([LISTOPS_VOCAB[token] for token in tokens], dtype=torch.long)


def load_listops_tsv(path: str | os.PathLike, max_length: int | None = 2000) -> list[dict]:
    """Load a ListOps TSV of the release into unpadded examples.

    Cleaning is the official one (specs/lra.md §2): ``]`` becomes ``X``, parentheses are deleted and
    the rest is split on whitespace; tokens map through :data:`LISTOPS_VOCAB` and sequences are cut to
    ``max_length`` tokens (None keeps them whole). Padding is left to :func:`hopformer.data.collate`.

    Returns:
        One dict per row: ``input_ids`` (LongTensor ``[L]``), ``attention_mask`` (BoolTensor ``[L]``,
        all True), ``label`` (int 0-9). A list of dicts is already a map-style dataset for a DataLoader.

    Examples longer than ``max_length`` are cut with one warning that counts them.

    Raises:
        FileFormatError: (a ``ValueError``) naming the file, the line and the reason, on an empty file, text
            that is not UTF-8, a missing header, a wrong number of columns, a label that is not an integer
            0-9, an empty source, an unknown token (tokens past ``max_length`` are checked too), or a file
            that holds no examples (only the header).
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as file:
            examples, cut, longest = _read_listops_rows(path, file, max_length)
    except UnicodeDecodeError as error:
        raise file_error(path, "not a ListOps TSV: the text is not UTF-8", error) from None
    if not examples:
        raise file_error(path, "holds no examples (only the header 'Source<TAB>Target')")
    if cut:
        warnings.warn(
            f"{path}: cut {cut} of {len(examples)} examples to max_length={max_length} tokens (the longest has "
            f"{longest})",
            stacklevel=2,
        )
    return examples


def _read_listops_rows(path: Path, file, max_length: int | None) -> tuple[list[dict], int, int]:
    """The examples of an open ListOps TSV, how many were cut to ``max_length`` and the longest length."""
    examples, cut, longest = [], 0, 0
    first = file.readline()
    if not first:
        raise file_error(path, "is empty (expected the header 'Source<TAB>Target', then one tree per line)")
    header = first.rstrip("\r\n").split("\t")
    if header != ["Source", "Target"]:
        raise file_error(path, f"expected the header 'Source<TAB>Target', got {header!r}", line=1)
    for line_number, line in enumerate(file, start=2):
        line = line.rstrip("\r\n")
        if not line:
            continue  # a trailing blank line is harmless
        columns = line.split("\t")
        if len(columns) != 2:
            raise file_error(path, line=line_number, reason=f"expected 2 tab-separated columns, got {len(columns)}")
        source, target = columns
        target = target.strip()
        if not (target.isascii() and target.isdigit() and len(target) == 1):
            raise file_error(path, line=line_number, reason=f"label must be an integer 0-9, got {target[:20]!r}")
        try:
            input_ids = encode_listops(source)
        except ValueError as error:
            raise file_error(path, str(error), line=line_number) from None
        if len(input_ids) == 0:
            raise file_error(path, "empty source", line=line_number)
        longest = max(longest, len(input_ids))
        if max_length is not None and len(input_ids) > max_length:
            input_ids = input_ids[:max_length].clone()  # a copy, so the cut tail is freed
            cut += 1
        examples.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones(len(input_ids), dtype=torch.bool),
                "label": int(target),
            }
        )
    return examples, cut, longest


# --------------------------------------------------------------------------------------------------
# A floor for models


def root_operator_baseline(train: Sequence[dict], evaluate: Sequence[dict]) -> float:
    """Accuracy on ``evaluate`` of guessing each label from the tree's first token alone.

    The guess for a root operator is the label most common under that operator in ``train`` (a
    one-token tree is its own label). No model is involved, so this is the floor a ListOps model
    must clear to show it reads anything beyond the root: on the LRA-size generated data it scores
    about 35-36%, the level where transformers trained on the LRA budget plateau. Ties go to the
    smaller label; a root never seen in ``train`` gets the overall most common label.

    Args:
        train: examples as :func:`load_listops_tsv` returns them (``input_ids``, ``label``); the
            guesses are counted here.
        evaluate: examples in the same form; the guesses are scored here.

    Returns:
        The fraction of ``evaluate`` whose label the root operator's guess gets right.
    """
    if not train or not evaluate:
        raise ValueError(f"root_operator_baseline needs examples in both sets, got {len(train)} and {len(evaluate)}")
    counts: dict[int, np.ndarray] = {}
    overall = np.zeros(10, dtype=np.int64)
    for example in train:
        root = int(example["input_ids"][0])
        counts.setdefault(root, np.zeros(10, dtype=np.int64))[example["label"]] += 1
        overall[example["label"]] += 1
    guess = {root: int(np.argmax(c)) for root, c in counts.items()}
    fallback = int(np.argmax(overall))
    hits = sum(guess.get(int(example["input_ids"][0]), fallback) == example["label"] for example in evaluate)
    return hits / len(evaluate)
