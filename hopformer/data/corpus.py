"""Token corpora for language modeling: memory-mapped splits, random training windows, evaluation windows,
bits per token and the unigram baseline.

A corpus is three files of token ids (``train.bin``, ``val.bin``, ``test.bin``) in a folder, read through
``numpy.memmap``: a 100 MB corpus is never copied into Python objects, and a window is one slice. Byte corpora
are raw bytes; others (word-level, e.g. Wikitext-103) say their id type, vocabulary size and unit in
``META.json`` and their words in ``vocab.txt`` (:func:`write_corpus`). The released formats of enwik8, text8,
Wikitext-103 and PG-19 are read by :mod:`hopformer.data.corpora`.

Sources:

- :func:`stdlib_corpus`: the Python standard library's own ``.py`` files, which exist wherever Python
  does (``sysconfig``'s ``stdlib`` folder, without ``site-packages``). Each file goes to one split by a
  hash of its path relative to that folder (90% / 5% / 5% of files: ``crc32(path) % 100`` below 90 is
  train, below 95 validation, the rest test), so no file straddles two splits and the split does not
  depend on the machine. The content does depend on the Python version (3.11: 1,790 files, 31.5 MB):
  compare numbers on one version. Built once into a cache folder.
- :func:`local_corpus`: any file or folder. A folder splits by file as above (every regular file, sorted
  by path); a single file splits by offset, 90% / 5% / 5% (enwik8's convention).

Metric: bits per byte, the mean negative log-likelihood of the predicted bytes over ln 2. Evaluation
protocol (:func:`eval_windows`): non-overlapping windows of the training context, every byte predicted
once with the context it has inside its window (the first byte of a window is predicted from nothing;
the stride option gives the sliding-window protocol, where each byte has at least ``context - stride``
bytes of history). The unigram baseline (:func:`unigram_bits`) is the cross-entropy of the test bytes
under the training split's byte histogram: what a model knows from byte frequencies alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hopformer.checks import file_error, read_json

SPLITS = ("train", "val", "test")
FILE_SPLIT = (90, 95)  # crc32(path) % 100: below 90 train, below 95 validation, else test
OFFSET_SPLIT = (0.90, 0.95)  # one file: the first 90% train, the next 5% validation, the last 5% test
VOCAB_SIZE = 256


UNITS = ("byte", "character", "word")  # what one token is; a word-level corpus reports perplexity


@dataclass
class Corpus:
    """The three splits of a token corpus as read-only 1-D memory maps, and where they came from.

    ``vocab_size``: ids are in ``[0, vocab_size)`` (256 for bytes). ``unit``: what a token is (bits per byte,
    bits per character, or perplexity per word). ``vocabulary``: the word of each id, for word-level corpora.
    """

    splits: dict[str, np.ndarray]
    source: str
    vocab_size: int = VOCAB_SIZE
    unit: str = "byte"
    vocabulary: list[str] | None = None

    def __post_init__(self) -> None:
        for split in SPLITS:
            if split not in self.splits:
                raise ValueError(f"a corpus needs the splits {SPLITS}; {self.source} has {sorted(self.splits)}")
        if self.unit not in UNITS:
            raise ValueError(f"corpus unit must be one of {UNITS}, got {self.unit!r}")

    def sizes(self) -> dict[str, int]:
        return {split: int(len(data)) for split, data in self.splits.items()}

    def describe(self) -> str:
        sizes = ", ".join(f"{split} {size:,}" for split, size in self.sizes().items())
        return f"{self.source}: {sizes} {self.unit}s"


def load_corpus(folder: str | os.PathLike) -> Corpus:
    """The corpus written in ``folder`` (``train.bin``, ``val.bin``, ``test.bin``; ``META.json`` and
    ``vocab.txt`` where it is not bytes), memory-mapped."""
    folder = Path(folder)
    source_file = folder / "SOURCE"
    source = (source_file.read_text(errors="replace").strip() if source_file.is_file() else "") or str(folder)
    meta = read_json(folder / "META.json") if (folder / "META.json").is_file() else {}
    dtype = np.dtype(meta.get("dtype", "uint8"))
    splits = {}
    for split in SPLITS:
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a corpus folder holds train.bin, val.bin and test.bin")
        splits[split] = _memmap(path, dtype)
        if len(splits[split]) < 2:  # a split of 0 or 1 tokens has no next token to predict
            size = len(splits[split])
            raise file_error(path, f"the {split} split of {source} holds {size} token(s); at least 2 are needed")
    vocab_file = folder / "vocab.txt"
    vocabulary = vocab_file.read_text(encoding="utf-8").split("\n")[:-1] if vocab_file.is_file() else None
    return Corpus(splits, source, int(meta.get("vocab_size", VOCAB_SIZE)), meta.get("unit", "byte"), vocabulary)


def write_corpus(
    folder: Path,
    splits: dict[str, Iterable[np.ndarray]],
    source: str,
    *,
    vocab_size: int = VOCAB_SIZE,
    unit: str = "byte",
    vocabulary: list[str] | None = None,
    dtype: str = "uint8",
) -> Corpus:
    """Stream each split's chunks of ids into ``folder`` (every file written atomically, ``train.bin`` last
    but one and ``SOURCE`` last, so a folder with ``SOURCE`` is complete) and return it memory-mapped."""
    folder.mkdir(parents=True, exist_ok=True)
    if vocabulary is not None:
        _atomic_text(folder / "vocab.txt", "".join(word + "\n" for word in vocabulary))
    if (unit, vocab_size, dtype) != ("byte", VOCAB_SIZE, "uint8"):
        _atomic_text(folder / "META.json", json.dumps({"dtype": dtype, "vocab_size": vocab_size, "unit": unit}))
    for split in SPLITS:
        _atomic_array(folder / f"{split}.bin", splits[split], dtype)
    _atomic_text(folder / "SOURCE", source + "\n")
    return load_corpus(folder)


def is_complete(folder: Path) -> bool:
    """Whether :func:`write_corpus` finished writing ``folder``."""
    return (folder / "SOURCE").is_file()


def _memmap(path: Path, dtype: np.dtype | str = "uint8") -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


def default_cache() -> Path:
    return Path(os.environ.get("HOPFORMER_CACHE", Path.home() / ".cache" / "hopformer")).expanduser()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files (no ``site-packages``), sorted by relative path."""
    root = stdlib_root() if root is None else root
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(
        (p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)),
        key=lambda p: str(p.relative_to(root)),
    )


def stdlib_corpus(cache: str | os.PathLike | None = None, log=print) -> Corpus:
    """The standard-library corpus, built into ``cache`` (default ``$HOPFORMER_CACHE`` or
    ``~/.cache/hopformer``) on first use and memory-mapped."""
    root = stdlib_root()
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError(f"{root}: no .py files; this Python has no standard library sources to train on")
    listing = "\n".join(f"{p.relative_to(root)} {p.stat().st_size}" for p in files)
    digest = hashlib.sha256(listing.encode()).hexdigest()[:10]
    version = ".".join(map(str, __import__("sys").version_info[:2]))
    folder = Path(cache or default_cache()) / f"bytes-stdlib-{version}-{digest}"
    if not is_complete(folder):
        log(f"building the byte corpus of Python {version}'s standard library ({len(files)} files) in {folder}")
        _write_by_file(folder, root, files, f"Python {version} standard library ({len(files)} .py files)")
    return load_corpus(folder)


def local_corpus(path: str | os.PathLike, cache: str | os.PathLike | None = None, log=print) -> Corpus:
    """A corpus of any local file (split by offset) or folder (split by file), built into ``cache``."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"--task bytes:{path}: no such file or folder")
    if path.is_dir() and all((path / f"{split}.bin").is_file() for split in SPLITS):
        return load_corpus(path)  # already a corpus folder
    if path.is_file():
        size = path.stat().st_size
        if size < 100:
            raise ValueError(f"{path}: {size} bytes is too little to split into train, validation and test")
        stat = f"{path} {size} {path.stat().st_mtime_ns}"
        folder = Path(cache or default_cache()) / f"bytes-{hashlib.sha256(stat.encode()).hexdigest()[:10]}"
        if not is_complete(folder):
            log(f"splitting {path} ({size:,} bytes) by offset 90/5/5 into {folder}")
            cuts = [0, int(size * OFFSET_SPLIT[0]), int(size * OFFSET_SPLIT[1]), size]
            source = np.memmap(path, dtype=np.uint8, mode="r")
            parts = {split: [source[a:b]] for split, a, b in zip(SPLITS, cuts[:-1], cuts[1:], strict=True)}
            write_corpus(folder, parts, f"{path} (split by offset 90/5/5)")
        return load_corpus(folder)
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: str(p.relative_to(path)))
    if not files:
        raise ValueError(f"--task bytes:{path}: the folder holds no files")
    listing = "\n".join(f"{p.relative_to(path)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
    folder = Path(cache or default_cache()) / f"bytes-{hashlib.sha256((str(path) + listing).encode()).hexdigest()[:10]}"
    if not is_complete(folder):
        log(f"building a byte corpus of {len(files)} files under {path} in {folder}")
        _write_by_file(folder, path, files, f"{path} ({len(files)} files, split by file)")
    return load_corpus(folder)


def file_split(relative_path: str) -> str:
    """The split a file goes to: by ``crc32`` of its relative path (:data:`FILE_SPLIT`)."""
    bucket = zlib.crc32(relative_path.encode()) % 100
    return "train" if bucket < FILE_SPLIT[0] else "val" if bucket < FILE_SPLIT[1] else "test"


def _write_by_file(folder: Path, root: Path, files: list[Path], source: str) -> None:
    groups: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for path in files:
        groups[file_split(path.relative_to(root).as_posix())].append(path)
    empty = [split for split, paths in groups.items() if not paths]
    if empty:
        raise ValueError(
            f"{root}: {len(files)} files leave no file for the {', '.join(empty)} split (files go to splits by a hash "
            "of their path, 90/5/5); use a folder of more files, or one file (split by offset)"
        )
    chunks = {split: (np.fromfile(p, dtype=np.uint8) for p in paths) for split, paths in groups.items()}
    write_corpus(folder, chunks, source)


def _atomic_array(path: Path, chunks: Iterable[np.ndarray], dtype: str) -> None:
    """Stream ``chunks`` into ``path`` as ``dtype`` through a temporary file renamed at the end."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as out:
        for chunk in chunks:
            out.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
    os.replace(temp, path)


def _atomic_text(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


# ---------------------------------------------------------------------------------------- windows
def sample_windows(data: np.ndarray, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``length`` bytes (``int64 (batch, length)``), by random access."""
    if len(data) < length:
        raise ValueError(f"a split of {len(data):,} bytes is shorter than one window of {length:,}")
    starts = torch.randint(0, len(data) - length + 1, (batch,), generator=generator).tolist()
    return torch.from_numpy(np.stack([data[s : s + length] for s in starts]).astype(np.int64))


def eval_windows(data: np.ndarray, length: int, stride: int | None = None) -> Iterator[tuple[torch.Tensor, int]]:
    """Evaluation windows over a whole split: ``(window, first_scored)`` pairs, where the window is
    ``int64 (<= length,)`` bytes and the targets from ``first_scored`` on are the ones this window scores.

    Without ``stride``, non-overlapping windows score every byte after the first of the split once. With
    ``stride < length`` windows move by ``stride`` and score only their last ``stride`` bytes (each with
    at least ``length - stride`` bytes of history), as Transformer-XL evaluates.
    """
    stride = length if stride is None else stride
    if not 0 < stride <= length:
        raise ValueError(f"stride must be in [1, context={length}], got {stride}")
    total = len(data)
    if total < 2:
        raise ValueError(f"a split of {total} bytes has nothing to predict")
    # windows hold length + 1 bytes: inputs are the first length, targets the last length
    start = 0
    while start < total - 1:
        stop = min(start + length + 1, total)
        first = 0 if start == 0 else length - stride
        yield torch.from_numpy(np.asarray(data[start:stop], dtype=np.int64)), first
        if stop == total:
            break
        start += stride


def histogram(data: np.ndarray, vocab_size: int = VOCAB_SIZE, chunk: int = 1 << 24) -> np.ndarray:
    """Counts of each token id, read in chunks."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(data), chunk):
        counts += np.bincount(np.asarray(data[start : start + chunk]), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_bits(train: np.ndarray, test: np.ndarray, vocab_size: int = VOCAB_SIZE) -> float:
    """Bits per token of ``test`` under the add-one-smoothed token histogram of ``train``."""
    probabilities = (histogram(train, vocab_size) + 1) / (len(train) + vocab_size)
    counts = histogram(test, vocab_size)
    return float(-(counts * np.log2(probabilities)).sum() / max(counts.sum(), 1))


def bits(nats: float) -> float:
    """Nats to bits."""
    return nats / math.log(2)
