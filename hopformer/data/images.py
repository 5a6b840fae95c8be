"""Image sets for pixel modeling, read from their released files (specs/language_modeling.md §2).

An :class:`ImageSet` holds train, validation and test images as uint8 rows of ``H * W * C`` values in the order
of the Sparse and Image Transformers: raster order over pixels, the ``C`` channel values of a pixel consecutive
(an ``(H, W, C)`` array flattened). The released files store each image planar (all red values, then green,
then blue); the loaders interleave them once and cache the result.

- :func:`cifar10_images`: CIFAR-10's python version. Train is the first 45,000 images of ``data_batch_1..5``,
  validation the last 5,000 (the end of ``data_batch_5``), test ``test_batch``.
- :func:`pathfinder_images`: generated Pathfinder images (one grey channel), for machines without the real
  sets: images ``0 .. count - 1`` of the generator's stream, the last 10% held out as validation and test.
- :func:`imagenet64_images`: downsampled ImageNet 64x64, ``train_data_batch_1..10.npz`` and ``val_data.npz``.
  Train is the training batches but their last 10,000 images, which are the validation split; test is
  ``val_data.npz`` (the released set has no labelled test split of its own).

With fewer training images than released (fixtures, a subset of the batches), validation is the last tenth
instead when that is smaller, and the loader says so through ``log``.

Cache: a folder under ``cache`` (default :func:`hopformer.data.corpus.default_cache`) named by a hash of the
source files' paths, sizes and modification times. It is a byte corpus folder (``train.bin``, ``val.bin``,
``test.bin``: the images' rows back to back) plus ``SHAPE.json`` (``{"shape": [H, W, C]}``), written by
:func:`hopformer.data.corpus.write_corpus` (every file atomically, ``SOURCE`` last), so an interrupted
conversion is redone on the next call. The splits are memory-mapped from it.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hopformer.data.corpora import _fingerprint
from hopformer.data.corpus import SPLITS, _atomic_text, default_cache, is_complete, load_corpus, write_corpus
from hopformer.data.lra import _read_cifar_batch

__all__ = ["ImageSet", "cifar10_images", "imagenet64_images", "pathfinder_images"]

CIFAR_SHAPE = (32, 32, 3)
CIFAR_VAL = 5_000
IMAGENET_SHAPE = (64, 64, 3)
IMAGENET_VAL = 10_000
IMAGENET_BATCHES = 10
SLICE = 4096  # images interleaved and written at a time


@dataclass
class ImageSet:
    """Train, validation and test images, each uint8 ``(N, H * W * C)`` in raster order with a pixel's channels
    consecutive; ``shape`` is ``(H, W, C)``."""

    splits: dict[str, np.ndarray]
    shape: tuple[int, int, int]
    source: str

    def __post_init__(self) -> None:
        if sorted(self.splits) != sorted(SPLITS):
            raise ValueError(f"an image set needs the splits {SPLITS}; {self.source} has {sorted(self.splits)}")
        row = math.prod(self.shape)
        for split, images in self.splits.items():
            if images.ndim != 2 or images.shape[1] != row:
                raise ValueError(f"{self.source}: {split} images must be (N, {row}) for shape {self.shape}")

    def sizes(self) -> dict[str, int]:
        """Images per split."""
        return {split: int(images.shape[0]) for split, images in self.splits.items()}

    def describe(self) -> str:
        """One line: the source, the images per split and their shape."""
        sizes = ", ".join(f"{split} {size:,}" for split, size in self.sizes().items())
        height, width, channels = self.shape
        return f"{self.source}: {sizes} images of {height}x{width}x{channels} ({math.prod(self.shape):,} values each)"


def _interleave(planar: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Rows of planar images (``C`` planes of ``H x W``, each row-major) -> rows of ``(H, W, C)`` images."""
    height, width, channels = shape
    return planar.reshape(-1, channels, height * width).transpose(0, 2, 1).reshape(-1, height * width * channels)


# ---------------------------------------------------------------------------------------------- CIFAR-10
def cifar10_images(path: str | os.PathLike, cache: str | os.PathLike | None = None, log: Callable = print) -> ImageSet:
    """CIFAR-10 (python version) as 32x32x3 images: train 45,000, validation 5,000, test 10,000.

    Args:
        path: the folder ``cifar-10-batches-py`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) or the
            folder holding it. The pickles are read with the LRA loader's restricted unpickler, which refuses
            anything but numpy arrays.
        cache: the folder that holds converted sets (default ``$HOPFORMER_CACHE`` or ``~/.cache/hopformer``).
        log: receives a line when the set is converted.
    """
    path = Path(path).expanduser()
    folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    files = [folder / name for name in names]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: no such file; CIFAR-10 (python version) needs {', '.join(names)} in one folder"
            )
    out = Path(cache or default_cache()).expanduser() / f"cifar10-{_fingerprint(files)}"
    if not is_complete(out):
        log(f"converting CIFAR-10 from {folder} to interleaved pixels in {out}")
        train = np.concatenate([_interleave(_read_cifar_batch(file)[0], CIFAR_SHAPE) for file in files[:-1]])
        test = _interleave(_read_cifar_batch(files[-1])[0], CIFAR_SHAPE)
        cut = len(train) - _val_count(len(train), CIFAR_VAL, folder, log)
        chunks = {"train": [train[:cut]], "val": [train[cut:]], "test": [test]}
        _write_images(out, chunks, CIFAR_SHAPE, f"cifar10 ({folder}, interleaved RGB)")
    return _load_images(out)


# ---------------------------------------------------------------------------------------------- ImageNet 64x64
def imagenet64_images(
    path: str | os.PathLike, cache: str | os.PathLike | None = None, log: Callable = print
) -> ImageSet:
    """Downsampled ImageNet 64x64 as 64x64x3 images: validation is the last 10,000 training images, test is
    ``val_data.npz``.

    Args:
        path: the folder holding ``train_data_batch_1.npz`` .. ``train_data_batch_10.npz`` and
            ``val_data.npz`` (each with ``data``, uint8 ``(N, 12288)`` planar). Any subset of the training
            batches is used, in batch order, but batch 1 is required.
        cache: the folder that holds converted sets (default ``$HOPFORMER_CACHE`` or ``~/.cache/hopformer``).
        log: receives a line when the set is converted.

    The conversion streams: one batch is in memory at a time (the batch holding the train/validation boundary
    is read twice). Files are opened with ``allow_pickle=False``.
    """
    folder = Path(path).expanduser()
    batches = [folder / f"train_data_batch_{i}.npz" for i in range(1, IMAGENET_BATCHES + 1)]
    batches = [batch for batch in batches if batch.is_file()]
    for required in (folder / "train_data_batch_1.npz", folder / "val_data.npz"):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required}: no such file; ImageNet 64x64 needs train_data_batch_1.npz (2..10 optional) and "
                "val_data.npz in one folder"
            )
    test = folder / "val_data.npz"
    counts = [_npz_rows(batch, IMAGENET_SHAPE) for batch in batches]
    test_count = _npz_rows(test, IMAGENET_SHAPE)
    out = Path(cache or default_cache()).expanduser() / f"imagenet64-{_fingerprint([*batches, test])}"
    if not is_complete(out):
        log(f"converting ImageNet 64x64 ({len(batches)} training batches) from {folder} to interleaved pixels in {out}")
        total = sum(counts)
        cut = total - _val_count(total, IMAGENET_VAL, folder, log)
        chunks = {
            "train": _batch_rows(batches, counts, 0, cut),
            "val": _batch_rows(batches, counts, cut, total),
            "test": _batch_rows([test], [test_count], 0, test_count),
        }
        _write_images(out, chunks, IMAGENET_SHAPE, f"imagenet64 ({folder}, {len(batches)} training batches)")
    return _load_images(out)


def _npz_rows(path: Path, shape: tuple[int, int, int]) -> int:
    """How many images ``path``'s ``data`` holds, from the array's header: checks every file's shape and dtype
    before a long conversion starts, without loading the 1.5 GB arrays."""
    row = math.prod(shape)
    try:
        with zipfile.ZipFile(path) as archive, archive.open("data.npy") as member:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            array_shape, _, dtype = read(member)
    except KeyError as error:
        raise ValueError(f"{path}: no 'data' array in the archive") from error
    except (zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"{path}: not an .npz archive of numpy arrays ({error})") from error
    if dtype != np.uint8 or len(array_shape) != 2 or array_shape[1] != row:
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, {row}), got {dtype} {array_shape}")
    return int(array_shape[0])


def _batch_rows(files: list[Path], counts: list[int], start: int, stop: int) -> Iterator[np.ndarray]:
    """Interleaved images ``start:stop`` of ``files`` taken one after another, loading one file at a time."""
    offset = 0
    for file, count in zip(files, counts, strict=True):
        first, last = max(start - offset, 0), min(stop - offset, count)
        if first < last:
            with np.load(file, allow_pickle=False) as archive:
                data = archive["data"]
            for at in range(first, last, SLICE):
                yield _interleave(data[at : min(at + SLICE, last)], IMAGENET_SHAPE)
            del data  # before the next batch loads
        offset += count


# ---------------------------------------------------------------------------------------------- cache
def _val_count(total: int, released: int, folder: Path, log: Callable) -> int:
    """The size of the validation split: ``released``, or a tenth of ``total`` when that is smaller."""
    count = min(released, total // 10)
    if count < 1:
        raise ValueError(f"{folder}: {total} training images are too few to hold out validation (at least 10)")
    if count != released:
        log(f"{folder}: {total:,} training images; validation is their last tenth ({count:,}), not {released:,}")
    return count


def pathfinder_images(
    resolution: int = 32,
    count: int = 12_000,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    log: Callable = print,
) -> ImageSet:
    """``count`` generated Pathfinder images (:func:`hopformer.data.pathfinder.make_sample`, shape
    ``(resolution, resolution, 1)``): the first 90% train, then 5% validation and 5% test. Rendered once, on
    every core, into the cache."""
    if count < 20:
        raise ValueError(f"count={count}: pathfinder_images needs at least 20 images to split 90/5/5")
    folder = Path(cache or default_cache()) / f"pathfinder-pixels-{resolution}-{count}-{seed}"
    if not is_complete(folder):
        log(f"rendering {count:,} Pathfinder images of {resolution} x {resolution} into {folder}")
        render = functools.partial(_pathfinder_pixels, resolution, seed)
        with multiprocessing.Pool(max(1, min(os.cpu_count() or 1, 16))) as pool:
            rows = np.stack(pool.map(render, range(count), chunksize=64))
        cuts = [0, count * 90 // 100, count * 95 // 100, count]
        chunks = {split: [rows[a:b]] for split, a, b in zip(SPLITS, cuts[:-1], cuts[1:], strict=True)}
        source = f"{count:,} generated Pathfinder images ({resolution} x {resolution}, seed {seed})"
        _write_images(folder, chunks, (resolution, resolution, 1), source)
    return _load_images(folder)


def _pathfinder_pixels(resolution: int, seed: int, index: int) -> np.ndarray:
    from hopformer.data.pathfinder import make_sample

    return make_sample(resolution, seed=seed, index=index).image.reshape(-1)


def _write_images(
    folder: Path, chunks: dict[str, Iterable[np.ndarray]], shape: tuple[int, int, int], source: str
) -> None:
    """``SHAPE.json`` first, then the rows as a byte corpus (``SOURCE`` last marks the folder complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_text(folder / "SHAPE.json", json.dumps({"shape": list(shape)}))
    write_corpus(folder, chunks, source)


def _load_images(folder: Path) -> ImageSet:
    shape = tuple(json.loads((folder / "SHAPE.json").read_text())["shape"])
    corpus = load_corpus(folder)
    row = math.prod(shape)
    return ImageSet({split: data.reshape(-1, row) for split, data in corpus.splits.items()}, shape, corpus.source)
