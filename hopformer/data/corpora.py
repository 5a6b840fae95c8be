"""The language-modeling papers' text corpora, read from their released files (specs/language_modeling.md §2).

Each loader returns a :class:`hopformer.data.corpus.Corpus`: three read-only, memory-mapped 1-D splits.

- :func:`enwik8_corpus`: the file ``enwik8`` (10^8 bytes of Wikipedia XML), split by byte offset: the first
  90,000,000 bytes train, the next 5,000,000 validation, the last 5,000,000 test. Bytes, vocabulary 256, bits
  per byte. The splits are views of the file itself: nothing is copied and nothing is cached.
- :func:`text8_corpus`: the file ``text8`` (10^8 characters, lowercase a-z and space), split like enwik8. The
  ids stay the byte values (so the vocabulary is 256, of which 27 occur): the splits can be views of the file,
  and a generated sequence decodes as text. Bits per character.
- :func:`wikitext103_corpus`: ``wiki.{train,valid,test}.tokens`` at word level, or the raw variant
  ``wiki.{train,valid,test}.raw`` as bytes (views of the files, like enwik8).
- :func:`pg19_corpus`: the folders ``train/``, ``validation/`` and ``test/`` of ``<id>.txt`` books, as bytes:
  each split is its books concatenated in increasing id order, without separators.

Word-level Wikitext-103 follows Transformer-XL (``utils/vocabulary.py``) and fairseq: each line of a file is
split on whitespace and ``<eos>`` is appended to **every** line, empty lines included (they become a lone
``<eos>``), and to a last line without a newline. The vocabulary is the training split's words, ``<eos>``
included, ordered by descending frequency, ties in order of first occurrence; ``<unk>`` (already in the
released text) is appended last if the training file lacks it. Validation and test words outside the
vocabulary become ``<unk>``, counted and logged. Unlike Transformer-XL, ``<eos>`` gets no reserved id 0: it
takes its place by frequency like any word. On the released files the vocabulary has 267,735 words.

Word-level Wikitext-103 and PG-19 are encoded once, streaming (no file is read whole), into a cache folder
under ``cache`` (default :func:`hopformer.data.corpus.default_cache`) named by a hash of the source files'
paths, sizes and modification times, and memory-mapped from there on. :func:`hopformer.data.corpus.write_corpus`
writes the folder, ``SOURCE`` last, so an interrupted build is redone on the next call.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from hopformer.data.corpus import SPLITS, Corpus, default_cache, is_complete, load_corpus, write_corpus

__all__ = ["enwik8_corpus", "pg19_corpus", "text8_corpus", "wikitext103_corpus"]

RELEASED_BYTES = 100_000_000  # enwik8 and text8 as released: 10^8 bytes each
OFFSET_PERCENT = (90, 95)  # train below 90% of the bytes, validation below 95%, test the rest
MIN_BYTES = 100  # a smaller file cannot give every split a few bytes
EOS, UNK = "<eos>", "<unk>"
TEXT8_ALLOWED = b"abcdefghijklmnopqrstuvwxyz "
WIKITEXT_NAMES = {"train": "train", "val": "valid", "test": "test"}  # our split -> its name in wiki.<name>.*
WIKITEXT_LEVELS = {"word": ("tokens", "wikitext-103"), "raw": ("raw", "wikitext-103-raw")}  # suffix, archive folder
PG19_FOLDERS = {"train": "train", "val": "validation", "test": "test"}
CHUNK = 1 << 24  # bytes scanned at a time when validating text8
ENCODE_CHUNK = 1 << 20  # word ids buffered before they are written


# ---------------------------------------------------------------------------------------------- enwik8, text8
def enwik8_corpus(path: str | os.PathLike, cache: str | os.PathLike | None = None, log: Callable = print) -> Corpus:
    """enwik8 as bytes, split 90M / 5M / 5M by offset.

    Args:
        path: the file ``enwik8`` or a folder holding it (unzipped).
        cache: unused; the splits are memory-mapped views of the file (kept so every loader is called alike).
        log: receives a line when the file is not the released 10^8 bytes and is split 90/5/5 in proportion.
    """
    file = _dataset_file(path, "enwik8")
    return _offset_corpus(file, "enwik8", "byte", log)


def text8_corpus(path: str | os.PathLike, cache: str | os.PathLike | None = None, log: Callable = print) -> Corpus:
    """text8 as characters (ids are the byte values: vocabulary 256, 27 used), split 90M / 5M / 5M by offset.

    Every byte is checked to be a-z or space (about a second for the released file); the error names the
    first offending offset. ``path``, ``cache`` and ``log`` as in :func:`enwik8_corpus`.
    """
    file = _dataset_file(path, "text8")
    corpus = _offset_corpus(file, "text8", "character", log)
    _check_text8(file)
    return corpus


def _dataset_file(path: str | os.PathLike, name: str) -> Path:
    """``path`` itself, or ``path/name`` when ``path`` is a folder; it must exist."""
    path = Path(path).expanduser()
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: no such file; {name}_corpus takes the file {name} (unzipped from {name}.zip) "
            "or a folder holding it"
        )
    return file


def _offset_corpus(file: Path, name: str, unit: str, log: Callable) -> Corpus:
    """Train, validation and test as memory-mapped views of ``file`` at the offsets of :data:`OFFSET_PERCENT`."""
    size = file.stat().st_size
    if size < MIN_BYTES:
        what = "is empty" if size == 0 else f"holds {size} bytes, too few"
        raise ValueError(f"{file}: {what}; {name} needs at least {MIN_BYTES} bytes (the released file has 10^8)")
    if size > RELEASED_BYTES:
        raise ValueError(
            f"{file}: {size:,} bytes, more than the released {name} ({RELEASED_BYTES:,}); is it another file? "
            "Use --task bytes:<file> for any other text"
        )
    if size != RELEASED_BYTES:
        log(f"{file}: {size:,} bytes, not the released {RELEASED_BYTES:,}; splitting it 90/5/5 in proportion")
    # integer arithmetic, so the released file is cut at exactly 90,000,000 and 95,000,000
    cuts = [0, size * OFFSET_PERCENT[0] // 100, size * OFFSET_PERCENT[1] // 100, size]
    splits = {
        split: np.memmap(file, dtype=np.uint8, mode="r", offset=start, shape=(stop - start,))
        for split, start, stop in zip(SPLITS, cuts[:-1], cuts[1:], strict=True)
    }
    return Corpus(splits, f"{name} ({file}, split by offset 90/5/5)", unit=unit)


def _check_text8(file: Path) -> None:
    allowed = np.zeros(256, dtype=bool)
    allowed[np.frombuffer(TEXT8_ALLOWED, dtype=np.uint8)] = True
    data = np.memmap(file, dtype=np.uint8, mode="r")
    for start in range(0, len(data), CHUNK):
        bad = np.flatnonzero(~allowed[data[start : start + CHUNK]])
        if bad.size:
            offset = start + int(bad[0])
            raise ValueError(
                f"{file}: byte {data[offset]} ({bytes([data[offset]])!r}) at offset {offset}; text8 holds only "
                "lowercase a-z and space"
            )


# ---------------------------------------------------------------------------------------------- Wikitext-103
def wikitext103_corpus(
    path: str | os.PathLike, level: str = "word", cache: str | os.PathLike | None = None, log: Callable = print
) -> Corpus:
    """Wikitext-103 at word level (perplexity per word) or, with ``level="raw"``, as bytes.

    Args:
        path: the folder holding ``wiki.train.tokens``, ``wiki.valid.tokens`` and ``wiki.test.tokens``
            (``wiki.*.raw`` for the raw level), or the folder above it holding ``wikitext-103/``
            (``wikitext-103-raw/``), as the released archives unpack.
        level: ``"word"``: ids of the words and ``<eos>`` (see the module docstring), int32, built once into
            ``cache``. ``"raw"``: the bytes of the raw files, memory-mapped views, nothing cached.
        cache: the folder that holds built corpora (default ``$HOPFORMER_CACHE`` or ``~/.cache/hopformer``).
        log: receives progress lines and the count of validation and test words mapped to ``<unk>``.
    """
    if level not in WIKITEXT_LEVELS:
        raise ValueError(f"level must be one of {sorted(WIKITEXT_LEVELS)}, got {level!r}")
    files = _wikitext_files(Path(path).expanduser(), level)
    if level == "raw":
        splits = {split: np.memmap(file, dtype=np.uint8, mode="r") for split, file in files.items()}
        return Corpus(splits, f"wikitext-103-raw ({files['train'].parent})", unit="byte")
    folder = Path(cache or default_cache()).expanduser() / f"wikitext103-word-{_fingerprint(files.values())}"
    if not is_complete(folder):
        log(f"encoding Wikitext-103 at word level from {files['train'].parent} into {folder}")
        _write_wikitext_words(folder, files, log)
    return load_corpus(folder)


def _wikitext_files(path: Path, level: str) -> dict[str, Path]:
    suffix, archive_folder = WIKITEXT_LEVELS[level]
    folder = path
    if not (path / f"wiki.train.{suffix}").exists() and (path / archive_folder).is_dir():
        folder = path / archive_folder  # the folder above, as the released archive unpacks
    files = {split: folder / f"wiki.{name}.{suffix}" for split, name in WIKITEXT_NAMES.items()}
    for file in files.values():
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: no such file; Wikitext-103 at level {level!r} needs wiki.train.{suffix}, "
                f"wiki.valid.{suffix} and wiki.test.{suffix} in one folder"
            )
        if file.stat().st_size == 0:
            raise ValueError(f"{file}: the file is empty")
    return files


def _line_words(file: Path) -> Iterator[list[str]]:
    """Each line's whitespace-separated words and ``<eos>``, one line at a time (as Transformer-XL reads the
    files: text mode, so ``\\r\\n`` and ``\\r`` end lines too)."""
    number = 0
    with open(file, encoding="utf-8") as lines:
        try:
            for line in lines:
                number += 1
                yield line.split() + [EOS]
        except UnicodeDecodeError as error:
            raise ValueError(f"{file}: not UTF-8 text after line {number} ({error})") from error


def _write_wikitext_words(folder: Path, files: dict[str, Path], log: Callable) -> None:
    counts: Counter[str] = Counter()
    for words in _line_words(files["train"]):
        counts.update(words)
    # sorted() is stable and a Counter keeps first-occurrence order, so ties stay in order of first occurrence
    vocabulary = sorted(counts, key=lambda word: -counts[word])
    if UNK not in counts:
        vocabulary.append(UNK)
    ids = {word: index for index, word in enumerate(vocabulary)}
    log(f"vocabulary of {len(vocabulary):,} words from {files['train'].name} ({sum(counts.values()):,} tokens)")
    unknown = {split: Counter() for split in SPLITS}
    chunks = {split: _encode_words(file, ids, unknown[split]) for split, file in files.items()}
    source = f"wikitext-103 ({files['train'].parent}, words, <eos> at every line end)"
    write_corpus(folder, chunks, source, unit="word", vocab_size=len(vocabulary), vocabulary=vocabulary, dtype="int32")
    for split in ("val", "test"):
        if unknown[split]:
            total, distinct = sum(unknown[split].values()), len(unknown[split])
            name = files[split].name
            log(f"{name}: words outside the training vocabulary: {total:,} ({distinct:,} distinct), now {UNK}")


def _encode_words(file: Path, ids: dict[str, int], unknown: Counter) -> Iterator[np.ndarray]:
    """The ids of ``file``'s words, in int32 chunks; words without an id count in ``unknown`` and become
    ``<unk>``."""
    unk = ids[UNK]
    buffer: list[int] = []
    for words in _line_words(file):
        for word in words:
            if word not in ids:
                unknown[word] += 1
        buffer.extend(ids.get(word, unk) for word in words)
        if len(buffer) >= ENCODE_CHUNK:
            yield np.array(buffer, dtype=np.int32)
            buffer = []
    yield np.array(buffer, dtype=np.int32)


# ---------------------------------------------------------------------------------------------- PG-19
def pg19_corpus(path: str | os.PathLike, cache: str | os.PathLike | None = None, log: Callable = print) -> Corpus:
    """PG-19 as bytes: each split is its books concatenated in increasing id order, built once into ``cache``.

    Args:
        path: the folder holding ``train/``, ``validation/`` and ``test/`` of ``<id>.txt`` books
            (``metadata.csv`` beside them is not needed). Other files in those folders are ignored.
        cache: the folder that holds built corpora (default ``$HOPFORMER_CACHE`` or ``~/.cache/hopformer``).
        log: receives a line when the corpus is built.
    """
    root = Path(path).expanduser()
    books = {split: _pg19_books(root / name) for split, name in PG19_FOLDERS.items()}
    every_book = [book for split in SPLITS for book in books[split]]
    folder = Path(cache or default_cache()).expanduser() / f"pg19-{_fingerprint(every_book)}"
    if not is_complete(folder):
        log(f"building the byte corpus of PG-19 ({len(every_book):,} books under {root}) in {folder}")
        chunks = {split: (np.fromfile(book, dtype=np.uint8) for book in books[split]) for split in SPLITS}
        counts = ", ".join(f"{split} {len(books[split]):,}" for split in SPLITS)
        write_corpus(folder, chunks, f"pg19 ({root}, bytes; books: {counts})")
    return load_corpus(folder)


def _pg19_books(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such folder; PG-19 needs train/, validation/ and test/ folders of <id>.txt books"
        )
    books = sorted(folder.glob("*.txt"), key=_book_order)
    if not books:
        raise ValueError(f"{folder}: no <id>.txt books in the folder")
    return books


def _book_order(book: Path) -> tuple[int, int, str]:
    """Numeric ids in numeric order (9 before 10), then any other names alphabetically."""
    return (0, int(book.stem), "") if book.stem.isdigit() else (1, 0, book.stem)


# ---------------------------------------------------------------------------------------------- helpers
def _fingerprint(files: Iterable[Path]) -> str:
    """A short hash of the files' absolute paths, sizes and modification times: the name of a cache folder that
    changes when any source file does."""
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]
