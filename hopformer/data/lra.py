"""Every Long Range Arena task behind one call: :func:`load_lra` (specs/lra.md §1-2, §5).

``root`` is the folder of the released archive (``lra_release/``), which for Text and Image also holds
the owners' distributions of IMDb and CIFAR-10::

    root/listops-1000/basic_{train,val,test}.tsv
    root/tsv_data/new_aan_pairs.{train,eval,test}.tsv
    root/pathfinder{32,64,128,256}/<difficulty>/{imgs/<batch>/sample_<i>.png, metadata/<batch>.npy}
    root/aclImdb/{train,test}/{pos,neg}/*.txt                 (ai.stanford.edu/~amaas/data/sentiment)
    root/cifar-10-batches-py/{data_batch_1..5,test_batch}      (the "python version" of CIFAR-10)

Every example is a dict with ``input_ids`` (LongTensor ``[L]``), ``attention_mask`` (BoolTensor ``[L]``,
True = real token, from the true length, never from token id 0) and ``label`` (int); Retrieval adds
``input_ids_2`` and ``attention_mask_2`` for the second document. Nothing is padded here (batching
pads); the pixel tasks have a fixed length and an all-True mask, because a black pixel is a real token.

Bad input fails early, naming the file (and line) and the reason.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from hopformer.checks import FileFormatError, file_error

__all__ = ["LRA_SPLITS", "LRA_TASKS", "PATHFINDER_DIFFICULTIES", "UnsafePickleError", "load_lra"]

LRA_TASKS: tuple[str, ...] = (
    "listops",
    "text",
    "retrieval",
    "image",
    "pathfinder32",
    "pathfinder64",
    "pathfinder128",
    "pathfinder256",
)
"""The tasks :func:`load_lra` reads (Pathfinder at four resolutions)."""
LRA_SPLITS: tuple[str, ...] = ("train", "val", "test")
PATHFINDER_DIFFICULTIES: tuple[str, ...] = ("curv_baseline", "curv_contour_length_9", "curv_contour_length_14")

Example = dict[str, object]


def load_lra(task: str, root: str | os.PathLike, split: str, **options) -> list[Example]:
    """Load one split of one LRA task from the released files.

    Args:
        task: one of :data:`LRA_TASKS`.
        root: the ``lra_release/`` folder (see the module docstring for the layout).
        split: ``"train"``, ``"val"`` or ``"test"``.
        **options (Any): per task:

            - ``listops``: ``max_length=2000`` (tokens kept, official value).
            - ``text``: ``max_length=1000`` bytes. 1000 is the official LRA config; the paper says
              4K and xformers/S4 use 4000/4096 (specs/lra.md §5.2). Pass ``max_length=4000`` for the
              4K setting, and always report the length used.
            - ``retrieval``: ``max_length=4000`` bytes per document (official value).
            - ``image``: none.
            - ``pathfinder{R}``: ``difficulty="curv_contour_length_14"`` (the LRA "hard" folder) and
              ``seed=0`` for the 80/10/10 shuffle.

    Returns:
        A list of example dicts (a map-style dataset as it is).

    Split conventions: Text has no validation set in LRA, so ``val`` is the test set (as in LRA);
    Image splits the 50,000 training images 90/10 in file order (train[:90%], train[90%:]) and tests on
    ``test_batch``; Pathfinder shuffles all examples of the folder with ``seed`` and cuts 80/10/10, as
    the PyTorch ports do; Retrieval ``val`` reads ``new_aan_pairs.eval.tsv``.

    Raises:
        ValueError: unknown task, split or option value; malformed files (with path, line, reason).
        TypeError: an option the task does not take.
        FileNotFoundError: a missing folder or file (with its path).
    """
    if task not in _LOADERS:
        raise ValueError(f"task must be one of {list(LRA_TASKS)}, got {task!r}")
    if split not in LRA_SPLITS:
        raise ValueError(f"split must be one of {list(LRA_SPLITS)}, got {split!r}")
    loader, allowed = _LOADERS[task]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"load_lra(task={task!r}) got unknown option(s) {unknown}; allowed: {sorted(allowed) or 'none'}"
        )
    return loader(Path(root), split, **options)


# ----------------------------------------------------------------------------------------------------
# helpers


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: missing folder ({what})")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing file ({what})")
    return path


def _check_length(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _byte_ids(data: bytes) -> torch.Tensor:
    """Byte-level ids shifted by one so that 0 stays free for padding (TFDS ``ByteTextEncoder``)."""
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    ids += 1
    return torch.from_numpy(ids)


def _example(ids: torch.Tensor, label: int) -> Example:
    return {"input_ids": ids, "attention_mask": torch.ones(ids.shape[0], dtype=torch.bool), "label": label}


# ----------------------------------------------------------------------------------------------------
# ListOps


def _load_listops(root: Path, split: str, max_length: int = 2000) -> list[Example]:
    """``listops-1000/basic_{split}.tsv`` through :func:`hopformer.data.listops.load_listops_tsv`."""
    path = _require_file(root / "listops-1000" / f"basic_{split}.tsv", f"ListOps {split} split")
    from hopformer.data.listops import load_listops_tsv

    return load_listops_tsv(path, max_length=_check_length("max_length", max_length))


# ----------------------------------------------------------------------------------------------------
# Text (IMDb)


def _load_text(root: Path, split: str, max_length: int = 1000) -> list[Example]:
    """IMDb reviews from the ``aclImdb`` folders, byte by byte (ids shifted by one), cut to ``max_length``.

    As TFDS ``imdb_reviews`` does, each file's bytes are stripped of surrounding whitespace. Files are
    read in sorted order, ``neg`` (label 0) before ``pos`` (label 1). ``val`` is the test set, as in LRA.
    """
    max_length = _check_length("max_length", max_length)
    folder = _require_dir(root / "aclImdb", "IMDb reviews as distributed by their owners")
    part = _require_dir(folder / ("train" if split == "train" else "test"), f"IMDb {split} reviews")
    examples, cut = [], 0
    for name, label in (("neg", 0), ("pos", 1)):
        directory = _require_dir(part / name, f"IMDb {name} reviews")
        files = sorted(directory.glob("*.txt"))
        if not files:
            raise FileFormatError(f"{directory}: no *.txt reviews found")
        for file in files:
            text = file.read_bytes().strip()
            if not text:
                raise file_error(file, "empty review")
            cut += len(text) > max_length
            examples.append(_example(_byte_ids(text[:max_length]), label))
    _warn_cut(part, cut, len(examples), f"reviews to max_length={max_length} bytes")
    return examples


def _warn_cut(where: Path, cut: int, total: int, what: str) -> None:
    """One warning line when inputs were cut (nothing is cut silently)."""
    if cut:
        warnings.warn(f"{where}: cut {cut} of {total} {what}", stacklevel=4)


# ----------------------------------------------------------------------------------------------------
# Retrieval (AAN)

_AAN_FILES = {"train": "train", "val": "eval", "test": "test"}
_AAN_TEXT_BYTES = 10_000  # the official pipeline cuts each document to 10K bytes before encoding


def _load_retrieval(root: Path, split: str, max_length: int = 4000) -> list[Example]:
    """AAN citation pairs: ``label id1 id2 text1 text2``, tab-separated, no header, no quoting."""
    max_length = _check_length("max_length", max_length)
    keep = min(max_length, _AAN_TEXT_BYTES)
    path = _require_file(root / "tsv_data" / f"new_aan_pairs.{_AAN_FILES[split]}.tsv", f"AAN retrieval {split} split")
    examples = []
    empty = cut = 0
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # the last document may be cut short, and no column shows it
        warnings.warn(f"{path}: the last line has no newline; was the file cut short?", stacklevel=3)
    # bytes all the way: the encoder works on UTF-8 bytes and no quote character is special
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            continue
        columns = line.split(b"\t")
        if len(columns) != 5:
            raise file_error(
                path,
                f"expected 5 tab-separated columns (label, id1, id2, text1, text2), got {len(columns)}",
                line=number,
            )
        try:
            value = float(columns[0])
        except ValueError:
            value = None
        if value not in (0.0, 1.0):
            raise file_error(path, f"bad label {columns[0][:20]!r}, expected 0 or 1", line=number)
        cut += (len(columns[3]) > keep) + (len(columns[4]) > keep)
        first, second = _byte_ids(columns[3][:keep]), _byte_ids(columns[4][:keep])
        empty += (len(first) == 0) + (len(second) == 0)
        example = _example(first, int(value))
        example["input_ids_2"] = second
        example["attention_mask_2"] = torch.ones(second.shape[0], dtype=torch.bool)
        examples.append(example)
    if not examples:
        raise file_error(path, "holds no examples (an empty AAN retrieval file)")
    if empty:
        warnings.warn(f"{path}: {empty} empty document(s) (zero-length sequences)", stacklevel=3)
    _warn_cut(path, cut, 2 * len(examples), f"documents to max_length={keep} bytes")
    return examples


# ----------------------------------------------------------------------------------------------------
# Image (CIFAR-10)


def _numpy_function(module: str, name: str) -> Callable:
    """A numpy internal by its pickled name, under numpy 2 (``numpy._core``) or 1 (``numpy.core``)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except ImportError:  # numpy < 2
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


def _codecs_encode() -> Callable:
    import _codecs

    return _codecs.encode


# Exactly what the CIFAR-10 python batches hold: ndarray reconstruction, dtypes and the bytes codec
# used by Python-2 pickles; plus ``_frombuffer``, which numpy uses when re-pickling at protocol 5.
_CIFAR_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_function("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_function("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_function("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_function("numeric", "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A CIFAR-10 batch names a global outside the allow-list (both an ``UnpicklingError`` and a
    ``ValueError``, so it fits either way of catching bad input)."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches and nothing else: any other global raises ``UnpicklingError``.

    A pickle can name any importable callable (``os.system`` included) and have it called while it
    loads, so the batches are read with an allow-list rather than ``pickle.load``.
    """

    def find_class(self, module: str, name: str) -> object:
        make = _CIFAR_GLOBALS.get((module, name))
        if make is None:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: a CIFAR-10 batch holds only numpy arrays"
            )
        return make()


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data uint8 (N, 3072), labels int64 (N,))`` from one CIFAR-10 python batch."""
    _require_file(path, "CIFAR-10 python batch")
    try:
        with open(path, "rb") as file:
            batch = _CifarUnpickler(file, encoding="bytes").load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}") from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise FileFormatError(f"{path}: corrupt pickle ({type(error).__name__}: {error})") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise FileFormatError(f"{path}: expected a dict with b'data' and b'labels'")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise FileFormatError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {shape}")
    labels = np.asarray(batch[b"labels"])
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise FileFormatError(f"{path}: b'labels' must be {data.shape[0]} integers, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise FileFormatError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def _tf_grayscale(data: np.ndarray) -> np.ndarray:
    """RGB rows ``(N, 3072)`` (planes R, G, B, each 32x32 row-major) -> grayscale ``(N, 1024)`` uint8.

    As ``tf.image.rgb_to_grayscale`` on uint8 images: scale to [0, 1] in float32 (x * (1/255)), weigh
    0.2989 R + 0.5870 G + 0.1140 B, scale back by 255.5 and cast, which **truncates** (so pure green
    becomes 149, not 150). The LRA pipeline then casts these 0..255 values to int32.
    """
    rgb = data.reshape(-1, 3, 1024).astype(np.float32) * np.float32(1 / 255)
    weights = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
    gray = rgb[:, 0] * weights[0] + rgb[:, 1] * weights[1] + rgb[:, 2] * weights[2]
    return (gray * np.float32(255.5)).astype(np.uint8)


def _load_image(root: Path, split: str) -> list[Example]:
    """CIFAR-10 in grayscale, 1024 pixel tokens (0..255) per image, all real (mask all True).

    ``train`` is the first 90% of the 50,000 training images (45,000), ``val`` the last 10%, ``test``
    the ``test_batch`` file, as LRA's ``train[:90%]`` / ``train[90%:]`` / ``test``.
    """
    folder = _require_dir(root / "cifar-10-batches-py", "CIFAR-10 python version as distributed by its owners")
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    parts = [_read_cifar_batch(folder / name) for name in names]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    if split != "test":
        cut = round(0.9 * len(data))
        rows = slice(0, cut) if split == "train" else slice(cut, None)
        data, labels = data[rows], labels[rows]
    gray = _tf_grayscale(data)
    return [_example(torch.from_numpy(row.astype(np.int64)), int(label)) for row, label in zip(gray, labels)]


# ----------------------------------------------------------------------------------------------------
# Pathfinder

_PATHFINDER_COLUMNS = 11  # subdir, file, index, label, continuity, contour/distractor/paddle lengths...


def _read_metadata(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, columns)`` rows of one metadata file.

    Released files are plain text despite the ``.npy`` extension; a real ``.npy`` array of strings
    (what ``np.save`` in the original generator writes) is read too.
    """
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):
        try:
            with open(path, "rb") as file:
                table = np.load(file, allow_pickle=False)
        except (ValueError, EOFError, OSError) as error:
            raise file_error(path, "unreadable .npy metadata (truncated or damaged)", error) from error
        return [(n, [str(c) for c in np.atleast_1d(row)]) for n, row in enumerate(np.atleast_2d(table), 1)]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise file_error(path, "metadata is neither text nor .npy", error) from error
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _metadata_order(path: Path) -> tuple[int, int | str]:
    # batches in numeric order (0, 1, 2, ..., 10), anything else after them by name
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.stem)


def _decode_png(path: Path, resolution: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
            if size != (resolution, resolution):
                raise FileFormatError(f"{path}: expected a {resolution}x{resolution} image, got {size[0]}x{size[1]}")
            pixels = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise FileFormatError(f"{path}: corrupt or unreadable image ({error})") from error
    return pixels.reshape(-1)


def _load_pathfinder(
    root: Path, split: str, resolution: int, difficulty: str = "curv_contour_length_14", seed: int = 0
) -> list[Example]:
    """Pathfinder PNGs listed by the metadata files; pixels 0..255 are the tokens (mask all True).

    The split is a seeded shuffle of every example in the folder, then 80/10/10 (the PyTorch ports
    shuffle unseeded). Zero-byte images (the release's ``pathfinder32/curv_baseline/imgs/0/
    sample_172.png`` is one) are skipped with a warning before shuffling.

    Folders of at least :data:`PATHFINDER_CACHE_MIN` images are decoded once into a pixel cache
    (see :func:`pathfinder_cache_path`): a 200,000-image folder then loads in seconds, not minutes.
    """
    if difficulty not in PATHFINDER_DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {list(PATHFINDER_DIFFICULTIES)}, got {difficulty!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    folder = _require_dir(root / f"pathfinder{resolution}" / difficulty, f"Pathfinder {resolution} {difficulty}")
    metadata_dir = _require_dir(folder / "metadata", "Pathfinder metadata")
    files = sorted(metadata_dir.glob("*.npy"), key=_metadata_order)
    if not files:
        raise FileNotFoundError(f"{metadata_dir}: no metadata files (*.npy)")

    cache = pathfinder_cache_path(folder, resolution)
    table = _read_cache(cache, resolution)
    if table is None:
        paths, labels = _pathfinder_listing(folder, files)
        if len(paths) >= PATHFINDER_CACHE_MIN:
            table = _build_cache(cache, paths, labels, resolution)
    if table is not None:  # the cached folder: pixels (N, R*R) uint8, labels in the last column
        count = len(table)
        chosen = _pathfinder_split(count, seed, split, folder)
        pixels = torch.from_numpy(table[chosen, :-1].astype(np.int64))
        labels_of = table[chosen, -1].tolist()
        return [_example(pixels[row], int(label)) for row, label in enumerate(labels_of)]

    chosen = _pathfinder_split(len(paths), seed, split, folder)
    # reading many small files is I/O-bound: a few threads overlap it (Pillow decodes without the GIL)
    chosen_paths = [paths[k] for k in chosen.tolist()]
    with ThreadPoolExecutor(max_workers=8) as pool:
        pixels = pool.map(_decode_png, chosen_paths, [resolution] * len(chosen_paths))
        return [_example(torch.from_numpy(row.astype(np.int64)), labels[k]) for row, k in zip(pixels, chosen.tolist())]


PATHFINDER_CACHE_MIN = 10_000
"""Folders with at least this many images get a decoded pixel cache (smaller ones load fast anyway)."""


def _pathfinder_split(count: int, seed: int, split: str, folder: Path | None = None) -> np.ndarray:
    """Indices of ``split`` among ``count`` examples: a seeded permutation cut 80/10/10; an empty split (too
    few examples) is an error naming ``folder``."""
    order = np.random.default_rng(seed).permutation(count)
    cut80, cut90 = int(count * 0.8), int(count * 0.9)
    chosen = {"train": order[:cut80], "val": order[cut80:cut90], "test": order[cut90:]}[split]
    if len(chosen) == 0:
        raise FileFormatError(
            f"{folder}: the {split} split of its {count} image(s) is empty (splits are 80/10/10; at least 10 needed)"
        )
    return chosen


def _pathfinder_listing(folder: Path, files: list[Path]) -> tuple[list[Path], list[int]]:
    """Image paths and labels of every metadata row, in metadata order; zero-byte images skipped (warned)."""
    paths: list[Path] = []
    labels: list[int] = []
    skipped: list[Path] = []
    empty: list[Path] = []
    for meta in files:
        rows = _read_metadata(meta)
        if not rows:
            empty.append(meta)
        for number, columns in rows:
            where = f"{meta}, line {number}"
            if len(columns) != _PATHFINDER_COLUMNS:
                raise file_error(
                    meta, f"expected {_PATHFINDER_COLUMNS} space-separated columns, got {len(columns)}", line=number
                )
            if columns[3] not in ("0", "1"):
                raise file_error(meta, f"bad label {columns[3][:20]!r}, expected 0 or 1", line=number)
            image = folder / columns[0] / columns[1]
            try:
                size = image.stat().st_size
            except FileNotFoundError:
                raise FileNotFoundError(f"{image}: missing image (listed in {where})") from None
            if size == 0:
                skipped.append(image)
                continue
            paths.append(image)
            labels.append(int(columns[3]))
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        warnings.warn(f"skipped {len(skipped)} empty (zero-byte) image file(s): {shown}", stacklevel=5)
    if empty:
        shown = ", ".join(str(p) for p in empty[:3]) + (" ..." if len(empty) > 3 else "")
        warnings.warn(f"{len(empty)} of {len(files)} metadata file(s) list no images: {shown}", stacklevel=5)
    if not paths:
        reason = "list no images" if not skipped else f"list only empty (zero-byte) images ({len(skipped)})"
        names = ", ".join(p.name for p in files[:3]) + (" ..." if len(files) > 3 else "")
        raise FileFormatError(f"{folder}: its metadata files ({names}) {reason}; no examples")
    return paths, labels


def pathfinder_cache_path(folder: str | os.PathLike, resolution: int) -> Path:
    """Where the decoded pixels of a Pathfinder difficulty folder are cached.

    ``$HOPFORMER_CACHE`` (default ``~/.cache/hopformer``) ``/pathfinder/<hash>.npy``; the hash covers the
    folder's absolute path, the resolution, and the name, size and modification time of every metadata
    file and every ``imgs/<batch>`` folder, so regenerating or adding images makes a new cache. The file
    is a uint8 array ``(N, R*R + 1)``: the pixels of each listed (non-empty) image in metadata order,
    then its label.
    """
    import hashlib

    folder = Path(folder).resolve()
    digest = hashlib.sha256(f"v1 {folder} {resolution}".encode())
    for sub in ("metadata", "imgs"):
        entries = sorted((folder / sub).iterdir()) if (folder / sub).is_dir() else []
        for entry in entries:
            info = entry.stat()
            digest.update(f"|{sub}/{entry.name} {info.st_size} {info.st_mtime_ns}".encode())
    cache = Path(os.environ.get("HOPFORMER_CACHE", Path.home() / ".cache" / "hopformer")).expanduser()
    return cache / "pathfinder" / f"{digest.hexdigest()[:20]}.npy"


def _read_cache(path: Path, resolution: int) -> np.ndarray | None:
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError):  # absent, or unreadable: decode the PNGs instead
        return None
    if table.dtype != np.uint8 or table.ndim != 2 or table.shape[1] != resolution * resolution + 1:
        return None
    return table


def _build_cache(path: Path, paths: list[Path], labels: list[int], resolution: int) -> np.ndarray:
    """Decode every image into one table and save it (atomically; one process builds, the others wait)."""
    import fcntl

    table = None
    lock = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "w")  # held until the cache is written
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = _read_cache(path, resolution)  # another process may have built it meanwhile
    except OSError:
        pass  # an unwritable cache folder: decode without caching
    try:
        if table is None:
            table = np.empty((len(paths), resolution * resolution + 1), dtype=np.uint8)
            table[:, -1] = labels
            with ThreadPoolExecutor(max_workers=8) as pool:
                for row, pixels in enumerate(pool.map(_decode_png, paths, [resolution] * len(paths))):
                    table[row, :-1] = pixels
            if lock is not None:
                temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                try:
                    with open(temporary, "wb") as file:
                        np.save(file, table)
                    os.replace(temporary, path)
                except OSError:
                    temporary.unlink(missing_ok=True)
    finally:
        if lock is not None:
            lock.close()  # releases the lock
    return table


def _pathfinder_loader(resolution: int) -> Callable[..., list[Example]]:
    def load(root: Path, split: str, **options) -> list[Example]:
        return _load_pathfinder(root, split, resolution, **options)

    return load


_LOADERS: dict[str, tuple[Callable[..., list[Example]], tuple[str, ...]]] = {
    "listops": (_load_listops, ("max_length",)),
    "text": (_load_text, ("max_length",)),
    "retrieval": (_load_retrieval, ("max_length",)),
    "image": (_load_image, ()),
    **{f"pathfinder{r}": (_pathfinder_loader(r), ("difficulty", "seed")) for r in (32, 64, 128, 256)},
}
