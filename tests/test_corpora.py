"""Loaders for the released layouts of enwik8, text8, Wikitext-103, PG-19, CIFAR-10 and ImageNet 64x64.

Every fixture is written here in the released layout, and every expected split is computed here from the
documented convention, not by the code under test.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from hopformer.data import (
    ImageSet,
    cifar10_images,
    enwik8_corpus,
    imagenet64_images,
    pg19_corpus,
    text8_corpus,
    wikitext103_corpus,
)
from hopformer.data.lra import UnsafePickleError


def quiet(*_):
    pass


def no_build(*args):
    pytest.fail(f"built again: {args}")


# ---------------------------------------------------------------------------------------------- enwik8, text8
def test_enwik8_small_file_splits_90_5_5_as_views_of_the_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (tmp_path / "enwik8").write_bytes(data)
    lines = []
    corpus = enwik8_corpus(tmp_path, cache=tmp_path / "cache", log=lines.append)
    assert bytes(corpus.splits["train"]) == data[:1800]
    assert bytes(corpus.splits["val"]) == data[1800:1900]
    assert bytes(corpus.splits["test"]) == data[1900:]
    assert (corpus.unit, corpus.vocab_size) == ("byte", 256)
    for split in ("train", "val", "test"):
        assert isinstance(corpus.splits[split], np.memmap)
        assert str(corpus.splits[split].filename) == str((tmp_path / "enwik8").resolve())
    assert len(lines) == 1 and "2,000 bytes" in lines[0] and "in proportion" in lines[0]
    assert not (tmp_path / "cache").exists(), "enwik8 needs no cache folder"
    assert bytes(enwik8_corpus(tmp_path / "enwik8", log=quiet).splits["val"]) == data[1800:1900]  # the file itself


def test_enwik8_released_size_splits_at_exactly_90M_and_95M(tmp_path):
    path = tmp_path / "enwik8"
    with open(path, "wb") as file:
        file.truncate(10**8)  # sparse: nothing is written or read but the marks below
        for offset, mark in ((89_999_999, 1), (90_000_000, 2), (94_999_999, 3), (95_000_000, 4), (10**8 - 1, 5)):
            file.seek(offset)
            file.write(bytes([mark]))
    corpus = enwik8_corpus(path, log=no_build)  # the released size is not worth a log line
    assert corpus.sizes() == {"train": 90_000_000, "val": 5_000_000, "test": 5_000_000}
    train, val, test = (corpus.splits[s] for s in ("train", "val", "test"))
    assert (train[-1], val[0], val[-1], test[0], test[-1]) == (1, 2, 3, 4, 5)
    assert (train.offset, val.offset, test.offset) == (0, 90_000_000, 95_000_000)


def test_enwik8_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'enwik8'}: no such file; .*folder holding it"):
        enwik8_corpus(tmp_path)
    (tmp_path / "enwik8").write_bytes(b"")
    with pytest.raises(ValueError, match=r"enwik8: is empty; enwik8 needs at least 100 bytes"):
        enwik8_corpus(tmp_path)
    (tmp_path / "enwik8").write_bytes(b"x" * 99)
    with pytest.raises(ValueError, match=r"enwik8: holds 99 bytes, too few"):
        enwik8_corpus(tmp_path)
    with open(tmp_path / "enwik8", "wb") as file:
        file.truncate(10**8 + 1)
    with pytest.raises(ValueError, match=r"100,000,001 bytes, more than the released enwik8 \(100,000,000\)"):
        enwik8_corpus(tmp_path)


def test_text8_is_characters_and_refuses_other_bytes(tmp_path):
    rng = np.random.default_rng(1)
    alphabet = np.frombuffer(b" abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    data = alphabet[rng.integers(0, 27, 3000)].tobytes()
    (tmp_path / "text8").write_bytes(data)
    corpus = text8_corpus(tmp_path, log=quiet)
    assert bytes(corpus.splits["train"]) == data[:2700]
    assert bytes(corpus.splits["val"]) == data[2700:2850]
    assert bytes(corpus.splits["test"]) == data[2850:]
    assert (corpus.unit, corpus.vocab_size) == ("character", 256)
    assert isinstance(corpus.splits["test"], np.memmap)
    (tmp_path / "text8").write_bytes(data[:1234] + b"A" + data[1235:])
    with pytest.raises(ValueError, match=r"text8: byte 65 \(b'A'\) at offset 1234; text8 holds only lowercase a-z"):
        text8_corpus(tmp_path, log=quiet)
    with pytest.raises(FileNotFoundError, match=r"/missing: no such file; text8_corpus takes the file text8 .*folder"):
        text8_corpus(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- Wikitext-103
# the released files start lines with a space, hold blank lines of one space and <unk> in the text
TRAIN = " \n = A = \n \n the cat <unk> the dog \n the end"  # the last line has no newline
VALID = " = B = \n\n the zebra cat \n"
TEST = " end the unicorn \n"
# counts: <eos> 5, the 3, = 2, then A cat <unk> dog end once each, in order of first occurrence
VOCAB = ["<eos>", "the", "=", "A", "cat", "<unk>", "dog", "end"]


def write_wikitext(folder, train=TRAIN, valid=VALID, test=TEST, suffix="tokens"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"wiki.{name}.{suffix}").write_text(text, encoding="utf-8")
    return folder


def test_wikitext_words_eos_at_every_line_vocab_by_frequency_and_unk(tmp_path):
    folder = write_wikitext(tmp_path / "wikitext-103")
    lines = []
    corpus = wikitext103_corpus(tmp_path, cache=tmp_path / "cache", log=lines.append)  # the archive's parent
    assert corpus.vocabulary == VOCAB
    assert (corpus.unit, corpus.vocab_size) == ("word", 8)
    ids = {word: i for i, word in enumerate(VOCAB)}
    train = "<eos> = A = <eos> <eos> the cat <unk> the dog <eos> the end <eos>"
    valid = "= <unk> = <eos> <eos> the <unk> cat <eos>"  # B and zebra are not in the training vocabulary
    test = "end the <unk> <eos>"
    for split, words in (("train", train), ("val", valid), ("test", test)):
        assert corpus.splits[split].tolist() == [ids[word] for word in words.split()], split
        assert isinstance(corpus.splits[split], np.memmap) and corpus.splits[split].dtype == np.int32
    assert "wiki.valid.tokens: words outside the training vocabulary: 2 (2 distinct), now <unk>" in lines
    assert "wiki.test.tokens: words outside the training vocabulary: 1 (1 distinct), now <unk>" in lines
    again = wikitext103_corpus(folder, cache=tmp_path / "cache", log=no_build)  # the folder itself, same files
    assert again.vocabulary == VOCAB and again.splits["val"].tolist() == corpus.splits["val"].tolist()


def test_wikitext_adds_unk_last_when_training_lacks_it_and_rebuilds_half_written_cache(tmp_path):
    folder = write_wikitext(tmp_path / "wt", train="b a b\n", valid="c\n", test="a\n")
    corpus = wikitext103_corpus(folder, cache=tmp_path / "cache", log=quiet)
    assert corpus.vocabulary == ["b", "a", "<eos>", "<unk>"]  # b 2, then a 1 before <eos> 1 (first occurrence)
    assert corpus.splits["val"].tolist() == [3, 2]
    (cached,) = (tmp_path / "cache").iterdir()
    (cached / "SOURCE").unlink()  # as if the build stopped before its completion mark
    (cached / "train.bin").write_bytes(b"\xff" * 8)
    rebuilt = []
    corpus = wikitext103_corpus(folder, cache=tmp_path / "cache", log=rebuilt.append)
    assert rebuilt and corpus.splits["train"].tolist() == [0, 1, 0, 2]


def test_wikitext_raw_is_bytes_of_the_files(tmp_path):
    folder = write_wikitext(tmp_path / "wikitext-103-raw", suffix="raw")
    corpus = wikitext103_corpus(tmp_path, level="raw", cache=tmp_path / "cache", log=no_build)
    assert bytes(corpus.splits["train"]) == TRAIN.encode()
    assert bytes(corpus.splits["val"]) == VALID.encode() and bytes(corpus.splits["test"]) == TEST.encode()
    assert (corpus.unit, corpus.vocab_size) == ("byte", 256)
    assert isinstance(corpus.splits["train"], np.memmap) and not (tmp_path / "cache").exists()
    assert bytes(wikitext103_corpus(folder, level="raw").splits["test"]) == TEST.encode()


def test_wikitext_errors(tmp_path):
    with pytest.raises(ValueError, match=r"level must be one of \['raw', 'word'\], got 'chars'"):
        wikitext103_corpus(tmp_path, level="chars")
    folder = write_wikitext(tmp_path / "wt")
    (folder / "wiki.valid.tokens").unlink()
    with pytest.raises(FileNotFoundError, match=r"wt/wiki.valid.tokens: no such file; .*wiki.train.tokens, "):
        wikitext103_corpus(folder, cache=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"wt/wiki.train.raw: no such file; .* level 'raw' needs"):
        wikitext103_corpus(folder, level="raw")
    (folder / "wiki.valid.tokens").write_text("")
    with pytest.raises(ValueError, match=r"wt/wiki.valid.tokens: the file is empty"):
        wikitext103_corpus(folder, cache=tmp_path / "cache")
    (folder / "wiki.valid.tokens").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"wiki.valid.tokens: not UTF-8 text"):
        wikitext103_corpus(folder, cache=tmp_path / "cache", log=quiet)


# ---------------------------------------------------------------------------------------------- PG-19
def write_pg19(root, books):
    for folder, ids in books.items():
        (root / folder).mkdir(parents=True)
        for book in ids:
            (root / folder / f"{book}.txt").write_bytes(f"<book {book}: {'words ' * book}>\n".encode())
    (root / "metadata.csv").write_text("id,title\n")
    return root


def book(number):
    return f"<book {number}: {'words ' * number}>\n".encode()


def test_pg19_concatenates_books_in_numeric_id_order(tmp_path):
    root = write_pg19(tmp_path / "pg19", {"train": [10, 9, 200], "validation": [3], "test": [40, 5]})
    (root / "train" / "notes.md").write_text("not a book")
    corpus = pg19_corpus(root, cache=tmp_path / "cache", log=quiet)
    assert bytes(corpus.splits["train"]) == book(9) + book(10) + book(200)  # 9 before 10: numeric order
    assert bytes(corpus.splits["val"]) == book(3)
    assert bytes(corpus.splits["test"]) == book(5) + book(40)
    assert (corpus.unit, corpus.vocab_size) == ("byte", 256)
    assert all(isinstance(data, np.memmap) for data in corpus.splits.values())
    assert pg19_corpus(root, cache=tmp_path / "cache", log=no_build).sizes() == corpus.sizes()
    (root / "test" / "5.txt").write_bytes(b"changed")  # a changed book gives another cache folder
    rebuilt = []
    changed = pg19_corpus(root, cache=tmp_path / "cache", log=rebuilt.append)
    assert rebuilt and bytes(changed.splits["test"]) == b"changed" + book(40)


def test_pg19_errors_name_the_folder(tmp_path):
    root = write_pg19(tmp_path / "pg19", {"train": [1], "test": [2]})
    with pytest.raises(FileNotFoundError, match=r"pg19/validation: no such folder; PG-19 needs train/, validation/"):
        pg19_corpus(root, cache=tmp_path / "cache")
    (root / "validation").mkdir()
    (root / "validation" / "readme").write_text("no books here")
    with pytest.raises(ValueError, match=r"pg19/validation: no <id>.txt books in the folder"):
        pg19_corpus(root, cache=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- CIFAR-10
def planar(images):
    """(N, H, W, C) -> the released layout: per image, all of channel 0 row-major, then channel 1, ..."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


@pytest.fixture
def cifar(tmp_path):
    """CIFAR-10's python version with 4 images per training batch and 3 test images; returns the images."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)
    images[0] = 0
    images[0, 0, 1] = (255, 0, 0)  # pixel (row 0, column 1) of the first image is red
    images[0, 2, 5] = (10, 20, 30)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        part = images[4 * i : 4 * i + 4]
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(label) for label in rng.integers(0, 10, len(part))],
            b"data": planar(part),
            b"filenames": [f"{name}_{j}.png".encode() for j in range(len(part))],
        }
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)
    return folder, images


def test_cifar_interleaves_pixels_and_holds_out_the_last_training_images(cifar, tmp_path):
    folder, images = cifar
    lines = []
    data = cifar10_images(folder.parent, cache=tmp_path / "cache", log=lines.append)  # the parent folder
    assert isinstance(data, ImageSet) and data.shape == (32, 32, 3)
    first = data.splits["train"][0]
    assert first[3 * 1 : 3 * 1 + 3].tolist() == [255, 0, 0]  # pixel 1 in raster order, channels consecutive
    assert first[3 * (2 * 32 + 5) : 3 * (2 * 32 + 5) + 3].tolist() == [10, 20, 30]
    assert np.count_nonzero(first) == 4
    flat = images.reshape(23, -1)
    # 20 training images: validation is their last tenth (2), as the last 5,000 of 50,000 in the real set
    assert np.array_equal(data.splits["train"], flat[:18])
    assert np.array_equal(data.splits["val"], flat[18:20])
    assert np.array_equal(data.splits["test"], flat[20:])
    assert data.sizes() == {"train": 18, "val": 2, "test": 3}
    assert all(isinstance(split, np.memmap) and split.dtype == np.uint8 for split in data.splits.values())
    assert any("last tenth (2), not 5,000" in line for line in lines)
    assert "train 18, val 2, test 3 images of 32x32x3 (3,072 values each)" in data.describe()
    again = cifar10_images(folder, cache=tmp_path / "cache", log=no_build)  # the folder itself
    assert np.array_equal(again.splits["val"], flat[18:20])


def test_cifar_rebuilds_a_half_written_cache(cifar, tmp_path):
    folder, images = cifar
    cifar10_images(folder, cache=tmp_path / "cache", log=quiet)
    (cached,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in cached.iterdir()) == ["SHAPE.json", "SOURCE", "test.bin", "train.bin", "val.bin"]
    (cached / "SOURCE").unlink()
    (cached / "test.bin").write_bytes(b"")
    rebuilt = []
    data = cifar10_images(folder, cache=tmp_path / "cache", log=rebuilt.append)
    assert rebuilt and np.array_equal(data.splits["test"], images[20:].reshape(3, -1))


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_a_pickle_that_would_run_code(cifar, tmp_path):
    folder, _ = cifar
    marker = tmp_path / "ran"
    with open(folder / "data_batch_2", "wb") as file:
        pickle.dump({b"data": RunsACommand(marker), b"labels": []}, file)
    with pytest.raises(UnsafePickleError, match=r"data_batch_2: refusing to unpickle global (posix|nt|os)\.system"):
        cifar10_images(folder, cache=tmp_path / "cache", log=quiet)
    assert not marker.exists()


def test_cifar_errors(cifar, tmp_path):
    folder, _ = cifar
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_4: no such file; CIFAR-10 .*needs data_batch_1, "):
        cifar10_images(folder.parent, cache=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- ImageNet 64x64
@pytest.fixture
def imagenet(tmp_path):
    """Training batches 1, 2 and 4 (3 is absent) of 10, 18 and 2 images and a val_data of 3: the 3 validation
    images are the last of batch 2 and both of batch 4."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (33, 64, 64, 3), dtype=np.uint8)
    images[0] = 0
    images[0, 0, 1] = (255, 0, 0)
    folder = tmp_path / "imagenet64"
    folder.mkdir()
    parts = {
        "train_data_batch_1": images[:10],
        "train_data_batch_2": images[10:28],
        "train_data_batch_4": images[28:30],
    }
    for name, part in parts.items():
        labels = rng.integers(1, 1001, len(part))
        np.savez(folder / f"{name}.npz", data=planar(part), labels=labels, mean=np.zeros(12288))
    np.savez(folder / "val_data.npz", data=planar(images[30:]), labels=rng.integers(1, 1001, 3))
    return folder, images


def test_imagenet64_streams_batches_into_interleaved_splits(imagenet, tmp_path):
    folder, images = imagenet
    lines = []
    data = imagenet64_images(folder, cache=tmp_path / "cache", log=lines.append)
    flat = images.reshape(33, -1)
    assert data.shape == (64, 64, 3)
    assert data.splits["train"][0, 3:6].tolist() == [255, 0, 0] and np.count_nonzero(data.splits["train"][0]) == 1
    assert np.array_equal(data.splits["train"], flat[:27])
    assert np.array_equal(data.splits["val"], flat[27:30])  # 30 training images: the last tenth, across batches
    assert np.array_equal(data.splits["test"], flat[30:])
    assert all(isinstance(split, np.memmap) for split in data.splits.values())
    assert any("last tenth (3), not 10,000" in line for line in lines)
    assert imagenet64_images(folder, cache=tmp_path / "cache", log=no_build).sizes() == data.sizes()


def test_imagenet64_errors(imagenet, tmp_path):
    folder, _ = imagenet
    (folder / "val_data.npz").rename(folder / "val.npz")
    with pytest.raises(FileNotFoundError, match=r"val_data.npz: no such file; ImageNet 64x64 needs train_data_batch_1"):
        imagenet64_images(folder, cache=tmp_path / "cache")
    (folder / "val.npz").rename(folder / "val_data.npz")
    (folder / "train_data_batch_1.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_data_batch_1.npz: no such file; ImageNet 64x64 needs"):
        imagenet64_images(folder, cache=tmp_path / "cache")
    np.savez(folder / "train_data_batch_1.npz", data=np.zeros((2, 3072), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"batch_1.npz: 'data' must be a uint8 array of shape \(N, 12288\), got uint8"):
        imagenet64_images(folder, cache=tmp_path / "cache")
    np.savez(folder / "train_data_batch_1.npz", data=np.array([[object()]] * 2, dtype=object))
    with pytest.raises(ValueError, match=r"batch_1.npz: 'data' must be a uint8 array .* got object"):
        imagenet64_images(folder, cache=tmp_path / "cache")
    np.savez(folder / "train_data_batch_1.npz", pixels=np.zeros((2, 12288), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"batch_1.npz: no 'data' array in the archive"):
        imagenet64_images(folder, cache=tmp_path / "cache")
    (folder / "train_data_batch_1.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"batch_1.npz: not an .npz archive"):
        imagenet64_images(folder, cache=tmp_path / "cache")


def test_too_few_training_images_for_validation(tmp_path):
    folder = tmp_path / "imagenet64"
    folder.mkdir()
    np.savez(folder / "train_data_batch_1.npz", data=np.zeros((9, 12288), dtype=np.uint8))
    np.savez(folder / "val_data.npz", data=np.zeros((1, 12288), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"imagenet64: 9 training images are too few to hold out validation"):
        imagenet64_images(folder, cache=tmp_path / "cache", log=quiet)


def test_image_set_checks_its_rows():
    with pytest.raises(ValueError, match=r"test images must be \(N, 12\) for shape \(2, 2, 3\)"):
        ImageSet({"train": np.zeros((1, 12)), "val": np.zeros((1, 12)), "test": np.zeros((1, 3))}, (2, 2, 3), "toy")
    with pytest.raises(ValueError, match=r"an image set needs the splits"):
        ImageSet({"train": np.zeros((1, 12))}, (2, 2, 3), "toy")
