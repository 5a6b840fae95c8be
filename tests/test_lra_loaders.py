"""load_lra on tiny fixtures written in the released layouts, including every error path."""

from __future__ import annotations

import os
import pathlib
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from hopformer.data import LRA_TASKS, listops, load_lra
from hopformer.data.lra import UnsafePickleError

SPLITS = ("train", "val", "test")


def ids_of(data: bytes) -> list[int]:
    return [b + 1 for b in data]


def check_example(example, length=None):
    ids, mask = example["input_ids"], example["attention_mask"]
    assert ids.dtype == torch.long and ids.ndim == 1
    assert mask.dtype == torch.bool and mask.shape == ids.shape and mask.all()
    assert isinstance(example["label"], int)
    if length is not None:
        assert ids.shape == (length,)


# ----------------------------------------------------------------------------------------------------
# arguments


def test_unknown_task_split_or_option_is_refused(tmp_path):
    assert LRA_TASKS[:5] == ("listops", "text", "retrieval", "image", "pathfinder32")
    with pytest.raises(ValueError, match=r"task must be one of .*'listops'.*got 'imdb'"):
        load_lra("imdb", tmp_path, "train")
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val', 'test'\], got 'dev'"):
        load_lra("text", tmp_path, "dev")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_len'\]; allowed: \['max_length'\]"):
        load_lra("text", tmp_path, "train", max_len=10)
    with pytest.raises(TypeError, match="allowed: none"):
        load_lra("image", tmp_path, "train", max_length=10)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        load_lra("retrieval", tmp_path, "train", max_length=0)


# ----------------------------------------------------------------------------------------------------
# ListOps (delegates to hopformer.data.listops)


def test_listops_reads_the_released_tsv(tmp_path):
    folder = tmp_path / "listops-1000"
    folder.mkdir()
    for split in SPLITS:
        (folder / f"basic_{split}.tsv").write_text(
            "Source\tTarget\n( ( ( ( [MAX 2 ) 9 ) 4 ) ] )\t9\n( ( ( [SM 3 ) 4 ) ] )\t7\n"
        )
    examples = load_lra("listops", tmp_path, "val")
    assert [e["label"] for e in examples] == [9, 7]
    for example in examples:
        check_example(example)
    assert examples[0]["input_ids"].tolist() == [listops.LISTOPS_VOCAB[t] for t in "[MAX 2 9 4 X".split()]
    assert len(load_lra("listops", tmp_path, "train", max_length=3)[0]["input_ids"]) == 3
    (folder / "basic_test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"basic_test\.tsv: missing file"):
        load_lra("listops", tmp_path, "test")


# ----------------------------------------------------------------------------------------------------
# Retrieval (AAN)

LONG = ("x" * 4999 + "é").encode()  # 5001 bytes


def write_aan(root, rows: dict[str, bytes]):
    folder = root / "tsv_data"
    folder.mkdir(exist_ok=True)
    for name, content in rows.items():
        (folder / f"new_aan_pairs.{name}.tsv").write_bytes(content)


@pytest.fixture
def aan(tmp_path):
    train = (
        b'1.0\tP01\tP02\tSome "quoted" text\tSecond doc \xc3\xa9\n'
        + b"0\tP03\tP04\t"
        + LONG
        + b"\tshort\n"
        + b"1\tP05\tP06\tabc\tdef\r\n"
    )
    write_aan(tmp_path, {"train": train, "eval": b"0.0\ta\tb\tval one\tval two\n", "test": b"1\tc\td\tt1\tt2\n"})
    return tmp_path


def test_retrieval_pairs_are_byte_encoded_and_truncated(aan):
    examples = load_lra("retrieval", aan, "train")
    assert [e["label"] for e in examples] == [1, 0, 1]
    first = examples[0]
    assert first["input_ids"].tolist() == ids_of(b'Some "quoted" text')  # quotes are plain bytes
    assert first["input_ids_2"].tolist() == ids_of("Second doc é".encode())
    assert first["attention_mask_2"].dtype == torch.bool and first["attention_mask_2"].all()
    assert first["attention_mask_2"].shape == first["input_ids_2"].shape
    assert examples[1]["input_ids"].shape == (4000,)  # default max_length
    assert examples[1]["input_ids"].tolist() == ids_of(LONG[:4000])
    assert examples[2]["input_ids_2"].tolist() == ids_of(b"def")  # the \r of \r\n is not text
    for example in examples:
        check_example(example)
    assert load_lra("retrieval", aan, "train", max_length=8)[1]["input_ids"].shape == (8,)
    assert load_lra("retrieval", aan, "val")[0]["input_ids"].tolist() == ids_of(b"val one")  # eval file
    assert load_lra("retrieval", aan, "test")[0]["input_ids_2"].tolist() == ids_of(b"t2")
    # the 10,000-byte cut comes first: a longer max_length still keeps 10,000 bytes
    write_aan(aan, {"test": b"1\tc\td\t" + b"y" * 12_000 + b"\tz\n"})
    assert load_lra("retrieval", aan, "test", max_length=20_000)[0]["input_ids"].shape == (10_000,)


def test_retrieval_errors_name_file_line_and_reason(aan):
    write_aan(aan, {"train": b"1\ta\tb\tx\ty\n0\ta\tb\tonly four\n"})
    with pytest.raises(ValueError, match=r"new_aan_pairs\.train\.tsv, line 2: expected 5 tab-separated .* got 4"):
        load_lra("retrieval", aan, "train")
    write_aan(aan, {"train": b"2.0\ta\tb\tx\ty\n"})
    with pytest.raises(ValueError, match=r"train\.tsv, line 1: bad label b'2\.0', expected 0 or 1"):
        load_lra("retrieval", aan, "train")
    write_aan(aan, {"train": b"yes\ta\tb\tx\ty\n"})
    with pytest.raises(ValueError, match="bad label"):
        load_lra("retrieval", aan, "train")
    (aan / "tsv_data" / "new_aan_pairs.eval.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"new_aan_pairs\.eval\.tsv: missing file"):
        load_lra("retrieval", aan, "val")


# ----------------------------------------------------------------------------------------------------
# Text (IMDb)

LONG_REVIEW = b"A" * 1500


@pytest.fixture
def imdb(tmp_path):
    reviews = {
        "train/pos/0_9.txt": b"  Great film!\n",
        "train/pos/1_7.txt": LONG_REVIEW,
        "train/neg/0_3.txt": "Mauvais, très mauvais.".encode(),
        "train/neg/1_1.txt": b"Boring<br />",
        "test/pos/0_10.txt": b"Loved it",
        "test/pos/1_8.txt": b"Fine",
        "test/neg/0_2.txt": b"Bad",
        "test/neg/1_4.txt": b"Meh",
    }
    for name, content in reviews.items():
        path = tmp_path / "aclImdb" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (tmp_path / "aclImdb" / "train" / "unsup").mkdir()  # present in the archive, ignored
    return tmp_path


def test_text_reads_aclimdb_bytes_sorted_neg_then_pos(imdb):
    examples = load_lra("text", imdb, "train")
    assert [e["label"] for e in examples] == [0, 0, 1, 1]
    assert examples[0]["input_ids"].tolist() == ids_of("Mauvais, très mauvais.".encode())
    assert examples[1]["input_ids"].tolist() == ids_of(b"Boring<br />")
    assert examples[2]["input_ids"].tolist() == ids_of(b"Great film!")  # stripped, as TFDS does
    assert examples[3]["input_ids"].shape == (1000,)  # official max_length
    for example in examples:
        check_example(example)
    assert load_lra("text", imdb, "train", max_length=4000)[3]["input_ids"].shape == (1500,)
    val, test = load_lra("text", imdb, "val"), load_lra("text", imdb, "test")
    assert [e["input_ids"].tolist() for e in val] == [e["input_ids"].tolist() for e in test]  # val = test
    assert [e["input_ids"].tolist() for e in test] == [ids_of(t) for t in (b"Bad", b"Meh", b"Loved it", b"Fine")]


def test_text_errors(imdb, tmp_path_factory):
    for path in (imdb / "aclImdb" / "test" / "pos").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"test/pos: no \*\.txt reviews found"):
        load_lra("text", imdb, "test")
    (imdb / "aclImdb" / "train" / "neg" / "1_1.txt").write_bytes(b" \n")
    with pytest.raises(ValueError, match=r"1_1\.txt: empty review"):
        load_lra("text", imdb, "train")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=r"aclImdb: missing folder"):
        load_lra("text", empty, "train")


# ----------------------------------------------------------------------------------------------------
# Image (CIFAR-10)

# (R, G, B) -> value of TF rgb_to_grayscale on uint8 (float32, * 255.5, truncated)
KNOWN_PIXELS = [
    ((255, 0, 0), 76),
    ((0, 255, 0), 149),  # 149.98: truncated, not rounded
    ((0, 0, 255), 29),
    ((255, 255, 255), 255),
    ((0, 0, 0), 0),  # black is a real token
    ((128, 128, 128), 128),
    ((10, 200, 30), 124),
]


class Sneaky:
    """Any custom class must be refused by the CIFAR unpickler."""


class Touches:
    """Pickles as a call to Path.touch: plain pickle.load would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def cifar_batch(rng, n, first_label):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return {b"batch_label": b"fixture", b"labels": [(first_label + i) % 10 for i in range(n)], b"data": data}


@pytest.fixture
def cifar(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for b in range(1, 6):
        batch = cifar_batch(rng, 2, first_label=2 * (b - 1))
        if b == 1:
            for pixel, (rgb, _) in enumerate(KNOWN_PIXELS):
                batch[b"data"][0, [pixel, 1024 + pixel, 2048 + pixel]] = rgb
        # protocol 2, as the Python-2 pickles of the real files (ndarray via _reconstruct)
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch, protocol=2))
    # the default protocol (5) goes through numpy's _frombuffer instead
    (folder / "test_batch").write_bytes(pickle.dumps(cifar_batch(rng, 3, first_label=7)))
    return tmp_path


def test_image_is_tf_grayscale_split_90_10(cifar):
    train = load_lra("image", cifar, "train")
    val = load_lra("image", cifar, "val")
    test = load_lra("image", cifar, "test")
    assert (len(train), len(val), len(test)) == (9, 1, 3)  # 10 training images: first 90% / last 10%
    assert [e["label"] for e in train] == list(range(9))
    assert [e["label"] for e in val] == [9]
    assert [e["label"] for e in test] == [7, 8, 9]
    for example in train + val + test:
        check_example(example, length=1024)
    first = train[0]["input_ids"]
    assert first[: len(KNOWN_PIXELS)].tolist() == [gray for _, gray in KNOWN_PIXELS]
    assert first.min() >= 0 and first.max() <= 255
    assert train[0]["attention_mask"][4]  # the black pixel is not masked

    # every pixel: the documented formula, computed independently in float64 (truncation)
    with open(cifar / "cifar-10-batches-py" / "data_batch_5", "rb") as file:
        raw = pickle.load(file, encoding="bytes")[b"data"][1].reshape(3, 1024).astype(np.float64)
    expected = np.floor((0.2989 * raw[0] + 0.5870 * raw[1] + 0.1140 * raw[2]) / 255 * 255.5)
    assert np.abs(val[0]["input_ids"].numpy() - expected).max() <= 1  # float32 vs float64 ties only


def test_image_unpickler_refuses_anything_but_arrays(cifar, tmp_path):
    target = cifar / "cifar-10-batches-py" / "data_batch_3"
    target.write_bytes(pickle.dumps({b"data": os.system, b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3: refusing to unpickle global (posix|nt)\.system"):
        load_lra("image", cifar, "train")
    target.write_bytes(pickle.dumps({b"data": Sneaky(), b"labels": []}))
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle global .*Sneaky"):
        load_lra("image", cifar, "val")
    flag = tmp_path / "pwned"
    target.write_bytes(pickle.dumps({b"data": Touches(flag), b"labels": []}))
    with pytest.raises(ValueError, match=r"refusing to unpickle global pathlib\.Path\.touch"):
        load_lra("image", cifar, "train")
    assert not flag.exists()  # the payload never ran


def test_image_errors(cifar, tmp_path_factory):
    folder = cifar / "cifar-10-batches-py"
    good = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"test_batch: corrupt pickle"):
        load_lra("image", cifar, "test")
    bad = cifar_batch(np.random.default_rng(1), 2, 0)
    bad[b"data"] = bad[b"data"][:, :100]
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch: b'data' must be a uint8 array of shape \(N, 3072\)"):
        load_lra("image", cifar, "test")
    bad = cifar_batch(np.random.default_rng(1), 2, 0)
    bad[b"labels"] = [3, 10]
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch: labels must lie in 0\.\.9"):
        load_lra("image", cifar, "test")
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_4: missing file"):
        load_lra("image", cifar, "train")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py: missing folder"):
        load_lra("image", tmp_path_factory.mktemp("none"), "test")


# ----------------------------------------------------------------------------------------------------
# Pathfinder (released files)

HARD = "curv_contour_length_14"


def write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def metadata_row(batch, i, label):
    return f"imgs/{batch} sample_{i}.png {i} {label} 1.0 14 4 2 0.5 1 1"


@pytest.fixture
def pathfinder(tmp_path):
    """Ten images in two metadata files plus one zero-byte image; pixel (0, 0) of image k is 10 k + 5."""
    folder = tmp_path / "pathfinder32" / HARD
    rng = np.random.default_rng(0)
    rows = {0: [], 1: []}
    for k in range(10):
        batch, i = (0, k) if k < 6 else (1, k - 6)
        pixels = np.where(rng.random((32, 32)) < 0.8, 0, 255).astype(np.uint8)  # mostly black
        pixels[0, 0] = 10 * k + 5
        write_png(folder / "imgs" / str(batch) / f"sample_{i}.png", pixels)
        rows[batch].append(metadata_row(batch, i, k % 2))
    (folder / "imgs" / "0" / "sample_6.png").write_bytes(b"")  # like curv_baseline/imgs/0/sample_172.png
    rows[0].append(metadata_row(0, 6, 1))
    (folder / "metadata").mkdir()
    for batch, lines in rows.items():
        (folder / "metadata" / f"{batch}.npy").write_text("\n".join(lines) + "\n")
    return tmp_path


def load_all(root, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {split: load_lra("pathfinder32", root, split, **options) for split in SPLITS}


def test_pathfinder_reads_pngs_split_80_10_10(pathfinder):
    with pytest.warns(UserWarning, match=r"skipped 1 empty \(zero-byte\) image.*imgs/0/sample_6\.png"):
        load_lra("pathfinder32", pathfinder, "val")
    splits = load_all(pathfinder)
    assert [len(splits[s]) for s in SPLITS] == [8, 1, 1]
    keys = []
    for example in (e for s in SPLITS for e in splits[s]):
        check_example(example, length=1024)
        k = (int(example["input_ids"][0]) - 5) // 10
        assert example["label"] == k % 2
        assert (example["input_ids"] == 0).sum() > 500  # black pixels are tokens ...
        assert example["attention_mask"].all()  # ... and none is masked
        keys.append(k)
    assert sorted(keys) == list(range(10))  # every image once, the empty one skipped
    again = load_all(pathfinder)
    assert [int(e["input_ids"][0]) for e in again["train"]] == [int(e["input_ids"][0]) for e in splits["train"]]
    other = load_all(pathfinder, seed=1)
    assert [int(e["input_ids"][0]) for s in SPLITS for e in other[s]] != [
        int(e["input_ids"][0]) for s in SPLITS for e in splits[s]
    ]


def test_pathfinder_reads_binary_npy_metadata(pathfinder):
    meta = pathfinder / "pathfinder32" / HARD / "metadata" / "1.npy"
    table = np.array([line.split() for line in meta.read_text().splitlines()])
    with open(meta, "wb") as file:
        np.save(file, table)  # what np.save in the original generator writes
    assert sum(len(v) for v in load_all(pathfinder).values()) == 10


@pytest.mark.parametrize(
    ("line", "error", "message"),
    [
        ("imgs/1 sample_0.png 0 1 1.0 14 4 2 0.5 1", ValueError, r"1\.npy, line 2: expected 11 space-separated"),
        ("imgs/1 sample_0.png 0 2 1.0 14 4 2 0.5 1 1", ValueError, r"1\.npy, line 2: bad label '2'"),
        ("imgs/1 sample_9.png 9 1 1.0 14 4 2 0.5 1 1", FileNotFoundError, r"sample_9\.png: missing image .*1\.npy"),
    ],
)
def test_pathfinder_metadata_errors(pathfinder, line, error, message):
    meta = pathfinder / "pathfinder32" / HARD / "metadata" / "1.npy"
    lines = meta.read_text().splitlines()
    lines.insert(1, line)
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(error, match=message):
        load_all(pathfinder)


def test_pathfinder_image_and_folder_errors(pathfinder, tmp_path_factory):
    image = pathfinder / "pathfinder32" / HARD / "imgs" / "1" / "sample_2.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"sample_2\.png: corrupt or unreadable image"):
        load_all(pathfinder)
    write_png(image, np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"sample_2\.png: expected a 32x32 image, got 16x16"):
        load_all(pathfinder)
    with pytest.raises(ValueError, match=r"difficulty must be one of .*curv_baseline.*got 'hard'"):
        load_lra("pathfinder32", pathfinder, "train", difficulty="hard")
    with pytest.raises(FileNotFoundError, match=r"pathfinder32/curv_baseline: missing folder"):
        load_lra("pathfinder32", pathfinder, "train", difficulty="curv_baseline")
    with pytest.raises(FileNotFoundError, match=r"pathfinder64/curv_contour_length_14: missing folder"):
        load_lra("pathfinder64", pathfinder, "train")
    for path in (pathfinder / "pathfinder32" / HARD / "metadata").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"metadata: no metadata files"):
        load_lra("pathfinder32", pathfinder, "test")
