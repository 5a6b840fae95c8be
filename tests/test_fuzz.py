"""Fuzz: every loader fed truncated, empty, binary and wrong-column files, every op fed wrong shapes, dtypes,
devices and non-finite scalars. Each case must fail at the door with a clear error class (``ValueError``, its
subclasses ``FileFormatError`` and ``InputTypeError``, or ``FileNotFoundError``) and a message that names the
file or the argument; never a ``UnicodeDecodeError``, a ``SafetensorError`` or a shape error from inside a kernel.

The cases are built from small tables (a loader x a damage, an op x a mutation); ``test_case_count`` keeps the
number of cases from shrinking unnoticed.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hopformer.checks import FileFormatError, InputTypeError, read_json
from hopformer.data import load_lra
from hopformer.data.corpus import load_corpus, local_corpus, write_corpus
from hopformer.data.listops import load_listops_tsv
from hopformer.graphs import bigbird
from hopformer.models.pretrained import from_pretrained, read_weights
from hopformer.ops import combiner, diffuse, diffuse_weighted, routing, sparse_attention
from hopformer.train.checkpoint import check_state, load_state
from hopformer.train.config import load_config
from hopformer.train.metrics import read_metrics

CLEAR = (ValueError, FileNotFoundError)  # FileFormatError and InputTypeError are ValueErrors
BINARY = bytes(range(256)) * 4  # not UTF-8, not a pickle, not a safetensors header, not a PNG


# ----------------------------------------------------------------------------------------------- loaders
# Each loader: (write a good file at the path it reads, read it). Each damage turns the good bytes into bad ones.


def _listops_good(path: Path) -> None:
    path.write_text("Source\tTarget\n" + "( ( ( [MAX 2 ) 9 ) ] )\t9\n( ( [MIN 4 ) 7 ] )\t4\n" * 3)


def _write_listops_release(root: Path) -> Path:
    path = root / "listops-1000" / "basic_val.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    _listops_good(path)
    return path


def _write_retrieval(root: Path) -> Path:
    path = root / "tsv_data" / "new_aan_pairs.eval.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"1\tid1\tid2\tfirst document\tsecond document\n0\ta\tb\tmore text\tother text\n")
    return path


def _write_cifar(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batch = {b"labels": [1, 2], b"data": np.zeros((2, 3072), dtype=np.uint8)}
    path = folder / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return path


def _write_pathfinder(root: Path) -> Path:
    folder = root / "pathfinder32" / "curv_contour_length_14"
    rows = []
    for i in range(10):
        image = folder / "imgs" / "0" / f"sample_{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32), i, dtype=np.uint8)).save(image)
        rows.append(f"imgs/0 sample_{i}.png {i} {i % 2} 1.0 14 4 2 0.5 1 1")
    path = folder / "metadata" / "0.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def _write_pathfinder_image(root: Path) -> Path:
    _write_pathfinder(root)
    return root / "pathfinder32" / "curv_contour_length_14" / "imgs" / "0" / "sample_3.png"


def _write_corpus(root: Path) -> Path:
    for split, size in (("train", 400), ("val", 40), ("test", 40)):
        (root / f"{split}.bin").write_bytes((bytes(range(256)) * 2)[:size])
    return root / "val.bin"


def _write_word_corpus(root: Path) -> Path:
    words = [np.arange(40, dtype=np.uint16) % 7]
    write_corpus(root, {"train": words, "val": words, "test": words}, "words", vocab_size=7, unit="word",
                 vocabulary=[f"w{i}" for i in range(7)], dtype="uint16")  # fmt: skip
    return root / "META.json"


LOADERS: dict[str, tuple[Callable[[Path], Path], Callable[[Path], object]]] = {
    "listops_tsv": (lambda root: (_listops_good(root / "basic.tsv"), root / "basic.tsv")[1],
                    lambda root: load_listops_tsv(root / "basic.tsv")),
    "lra_listops": (_write_listops_release, lambda root: load_lra("listops", root, "val")),
    "lra_retrieval": (_write_retrieval, lambda root: load_lra("retrieval", root, "val")),
    "lra_image": (_write_cifar, lambda root: load_lra("image", root, "test")),
    "pathfinder_metadata": (_write_pathfinder, lambda root: load_lra("pathfinder32", root, "val")),
    "pathfinder_png": (_write_pathfinder_image, lambda root: [load_lra("pathfinder32", root, s) for s in
                                                              ("train", "val", "test")]),
    "byte_corpus": (_write_corpus, lambda root: load_corpus(root)),
    "corpus_meta": (_write_word_corpus, lambda root: load_corpus(root)),
}  # fmt: skip


def _truncate(good: bytes) -> bytes:
    return good[: max(1, len(good) // 2 - 3)]


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "truncated": _truncate,
    "empty": lambda good: b"",
    "binary": lambda good: BINARY,
    "wrong_columns": lambda good: good.replace(b"\t", b"\t\t").replace(b" 1 1\n", b" 1\n"),
}
# Damages a format cannot show: the byte corpus holds raw bytes (binary, truncated and re-columned bytes are
# text like any other), META.json has no columns, and raw-bytes documents have no columns to get wrong in a
# pickle or a PNG.
ACCEPTED = {
    ("byte_corpus", "binary"),
    ("byte_corpus", "truncated"),
    ("byte_corpus", "wrong_columns"),
    ("corpus_meta", "wrong_columns"),
    ("lra_image", "wrong_columns"),
    ("pathfinder_png", "wrong_columns"),
}
# Damages that load with one warning naming the file instead: a zero-byte image is skipped (the release holds
# one), and a retrieval file cut inside its last document still has five columns, but no final newline.
WARNS = {("pathfinder_png", "empty"), ("lra_retrieval", "truncated")}
LOADER_CASES = [(loader, damage) for loader in LOADERS for damage in DAMAGES if (loader, damage) not in ACCEPTED]


@pytest.mark.parametrize(("loader", "damage"), LOADER_CASES)
def test_loader_names_the_file(tmp_path, loader, damage):
    write, read = LOADERS[loader]
    path = write(tmp_path)
    read(tmp_path)  # the good file loads
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    if (loader, damage) in WARNS:
        with pytest.warns(UserWarning, match=re.escape(path.name)):
            read(tmp_path)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged file may also warn (an empty metadata file does): the error counts
        with pytest.raises(CLEAR) as caught:
            read(tmp_path)
    assert path.name in str(caught.value), str(caught.value)


def test_byte_corpus_sources_are_checked(tmp_path):
    (tmp_path / "tiny.txt").write_bytes(BINARY[:50])
    with pytest.raises(ValueError, match=r"tiny\.txt: 50 bytes is too little"):
        local_corpus(tmp_path / "tiny.txt", cache=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: the folder holds no files"):
        local_corpus(tmp_path / "empty", cache=tmp_path / "cache")


def test_a_header_only_or_truncated_loader_input_says_so(tmp_path):
    path = tmp_path / "basic.tsv"
    path.write_text("Source\tTarget\n")
    with pytest.raises(FileFormatError, match=re.escape(f"{path}: holds no examples")):
        load_listops_tsv(path)
    path.write_text("")
    with pytest.raises(FileFormatError, match=re.escape(f"{path}: is empty")):
        load_listops_tsv(path)
    path.write_bytes(b"Source\tTarget\n\xff\xfe ( [MAX 2 ] )\t2\n")
    with pytest.raises(FileFormatError, match=re.escape(f"{path}: not a ListOps TSV: the text is not UTF-8")):
        load_listops_tsv(path)


def test_empty_pathfinder_metadata_warns_with_counts(tmp_path):
    _write_pathfinder(tmp_path)
    (tmp_path / "pathfinder32" / "curv_contour_length_14" / "metadata" / "1.npy").write_text("")
    with pytest.warns(UserWarning, match=r"1 of 2 metadata file\(s\) list no images: .*1\.npy"):
        assert len(load_lra("pathfinder32", tmp_path, "val")) == 1


def test_cut_inputs_are_counted_in_one_warning(tmp_path):
    path = tmp_path / "basic.tsv"
    _listops_good(path)
    cut = r"basic\.tsv: cut 6 of 6 examples to max_length=3 tokens \(the longest has 4\)"
    with pytest.warns(UserWarning, match=cut):
        load_listops_tsv(path, max_length=3)


# ----------------------------------------------------------------------------------------------- run files


def _model_folder(tmp_path: Path) -> Path:
    from hopformer.models import EncoderConfig, SequenceClassifier, TransformerEncoder

    config = EncoderConfig(vocab_size=16, max_len=32, dim=16, depth=1, heads=2, mlp_dim=32)
    model = SequenceClassifier(TransformerEncoder(config), 10)
    return model.save_pretrained(tmp_path / "model")


RUN_FILES: dict[str, tuple[Callable[[Path], Path], Callable[[Path], object]]] = {
    "model.safetensors": (lambda root: _model_folder(root) / "model.safetensors",
                          lambda path: read_weights(path)),
    "config.json": (lambda root: _model_folder(root) / "config.json", lambda path: from_pretrained(path.parent)),
    "config.yaml": (lambda root: (root / "c.yaml", (root / "c.yaml").write_text("model: {dim: 32, depth: 2}\n"))[0],
                    lambda path: load_config(path)),
    "state.pt": (lambda root: (root / "state.pt", torch.save({"step": 3, "optimizer": {}}, root / "state.pt"))[0],
                 lambda path: load_state(path.parent)),
    "results.json": (lambda root: (root / "r.json", (root / "r.json").write_text('{"step": 3, "x": [1, 2]}'))[0],
                     lambda path: read_json(path)),
}  # fmt: skip
RUN_DAMAGES = {
    "truncated": _truncate,
    "binary": lambda good: BINARY,
    "empty": lambda good: b"",
    "not_a_mapping": lambda good: b"[1, 2, 3]\n",
}
RUN_ACCEPTED = {("config.yaml", "empty")}  # an empty config file means "all defaults"
RUN_FILE_CASES = [(name, damage) for name in RUN_FILES for damage in RUN_DAMAGES if (name, damage) not in RUN_ACCEPTED]


@pytest.mark.parametrize(("name", "damage"), RUN_FILE_CASES)
def test_run_file_errors_name_the_file(tmp_path, name, damage):
    write, read = RUN_FILES[name]
    path = write(tmp_path)
    read(path)
    path.write_bytes(RUN_DAMAGES[damage](path.read_bytes()))
    with pytest.raises(CLEAR) as caught:
        read(path)
    assert str(path) in str(caught.value), str(caught.value)


STATE = {
    "step": 4,
    "optimizer": {"state": {}, "param_groups": []},
    "data": {"epoch": 0, "position": 4},
    "rng": {"python": 0, "numpy": 0, "torch": 0},
    "best_val_accuracy": 0.5,
    "window": {"loss": 1.0, "count": 2},
}
BAD_STATES = {
    "step": [-5, 2.5, "7", True, None],
    "best_val_accuracy": [float("nan"), float("inf"), "0.5"],
    "data": [{"epoch": -1, "position": 0}, [0, 1]],
    "window": [{"loss": float("nan")}, {"count": -2}],
    "optimizer": [{}, None],
    "rng": [{"python": 0}],
}
STATE_CASES = [(key, value) for key, values in BAD_STATES.items() for value in values]


@pytest.mark.parametrize(("key", "value"), STATE_CASES, ids=[f"{k}={v!r}" for k, v in STATE_CASES])
def test_checkpoint_values_are_checked(tmp_path, key, value):
    check_state(dict(STATE), tmp_path / "state.pt")
    with pytest.raises(FileFormatError, match=re.escape(f"{tmp_path / 'state.pt'}: {key} must be")):
        check_state({**STATE, key: value}, tmp_path / "state.pt")


def test_metrics_log_drops_only_a_damaged_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2, "split": "val"}\n{"step": 3, "spl')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl, line 3: dropped a damaged last record"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(FileFormatError, match=r"metrics\.jsonl, line 2: not a JSON record"):
        read_metrics(path)
    path.write_bytes(BINARY)
    with pytest.raises(FileFormatError, match=r"metrics\.jsonl: not a UTF-8 metrics log"):
        read_metrics(path)


# ----------------------------------------------------------------------------------------------- ops
GRAPH = bigbird(64, 16, seed=0)


def _qkv(dtype=torch.float32, shape=(1, 2, 64, 8)):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(3)]


OPS: dict[str, Callable[..., torch.Tensor]] = {
    "sparse_attention": lambda q, k, v, **kw: sparse_attention(q, k, v, GRAPH, **kw),
    "diffuse": lambda q, k, v, **kw: diffuse(q, k, v, GRAPH, **kw),
    "diffuse_weighted": lambda q, k, v, weights=None, **kw: diffuse_weighted(
        q, k, v, GRAPH, torch.full((6,), 1 / 6) if weights is None else weights, **kw
    ),
    "combiner": lambda q, k, v, **kw: combiner(q, k, v, **kw),
    "routing": lambda q, k, v, centroids=None, **kw: routing(
        q, k, v, torch.randn(2, 4, 8) if centroids is None else centroids, 16, **kw
    ),
}


def _replace(index: int, make: Callable[[torch.Tensor], torch.Tensor]):
    def mutate(tensors):
        tensors = list(tensors)
        tensors[index] = make(tensors[index])
        return tensors, {}

    return mutate


def _options(**options):
    return lambda tensors: (tensors, options)


# mutation -> (what it does to (q, k, v) or the options, the error class, what the message must name)
MUTATIONS: dict[str, tuple[Callable, type[BaseException], str]] = {
    "q_3d": (_replace(0, lambda q: q[0]), ValueError, r"\bq must be a 4-d"),
    "k_other_length": (_replace(1, lambda k: k[:, :, :32]), ValueError, r"q, k, v must agree"),
    "v_other_batch": (_replace(2, lambda v: torch.cat([v, v])), ValueError, r"q, k, v must agree"),
    "q_not_a_tensor": (_replace(0, lambda q: q.tolist()), ValueError, r"\bq must be a 4-d"),
    "int64": (lambda t: ([x.long() for x in t], {}), InputTypeError, r"\bq must be a floating-point tensor"),
    "bool_v": (_replace(2, lambda v: v > 0), InputTypeError, r"\bv must be a floating-point tensor"),
    "mixed_dtypes": (_replace(1, lambda k: k.double()), InputTypeError, r"q, k, v must share one dtype"),
    "meta_k": (_replace(1, lambda k: k.to("meta")), ValueError, r"q, k, v must be on one device"),
    "meta_all": (lambda t: ([x.to("meta") for x in t], {}), ValueError, r"on meta"),
    "scale_nan": (_options(scale=float("nan")), ValueError, r"\bscale must be a finite number"),
    "scale_inf": (_options(scale=float("inf")), ValueError, r"\bscale must be a finite number"),
    "dropout_nan": (_options(dropout_p=float("nan")), ValueError, r"\bdropout_p must be a number in \[0, 1\)"),
    "mask_int": (_options(key_padding_mask=torch.ones(1, 64, dtype=torch.long)), InputTypeError,
                 r"key_padding_mask must be a bool tensor"),
    "mask_shape": (_options(key_padding_mask=torch.ones(1, 63, dtype=torch.bool)), ValueError,
                   r"key_padding_mask must have shape"),
}  # fmt: skip
# op-specific arguments: the graph's and diffusion's, Combiner's and Routing's own
OWN: dict[str, dict[str, tuple[dict, type[BaseException], str]]] = {
    "sparse_attention": {
        "cuda_backend": ({"backend": "flex"}, ValueError, r"backend='flex' cannot run .* runs on cuda, not cpu"),
        "unknown_backend": ({"backend": "cudnn"}, ValueError, r"backend"),
    },
    "diffuse": {
        "alpha_nan": ({"alpha": float("nan")}, ValueError, r"\balpha must be in \(0, 1\]"),
        "alpha_zero": ({"alpha": 0.0}, ValueError, r"\balpha must be in \(0, 1\]"),
        "hops_negative": ({"hops": -1}, ValueError, r"\bhops must be"),
        "heat_inf": ({"kernel": "heat", "heat_time": float("inf")}, ValueError, r"\bheat_time must be a finite"),
        "hop_dropout_nan": ({"hop_dropout_p": float("nan")}, ValueError, r"\bhop_dropout_p must be"),
        "coefficients_nan": ({"hops": 1, "coefficients": [float("nan"), 1.0]}, ValueError, r"coefficients"),
        "cuda_backend": ({"backend": "triton"}, ValueError, r"backend='triton' cannot run .* runs on cuda, not cpu"),
    },
    "diffuse_weighted": {
        "weights_int": ({"weights": torch.ones(6, dtype=torch.long)}, InputTypeError, r"\bweights must be a float"),
        "weights_meta": ({"weights": torch.ones(6, device="meta")}, ValueError, r"\bweights are on meta"),
        "weights_shape": ({"weights": torch.ones(3, 6)}, ValueError, r"\bweights must have shape"),
        "hop_dropout_inf": ({"hop_dropout_p": float("inf")}, ValueError, r"\bhop_dropout_p must be"),
    },
    "combiner": {
        "block_size_zero": ({"block_size": 0}, ValueError, r"\bblock_size must be"),
        "variant": ({"variant": "cubic"}, ValueError, r"\bvariant='cubic' is not known"),
        "causal_str": ({"causal": "yes"}, InputTypeError, r"\bcausal must be a bool"),
        "cuda_backend": ({"backend": "flex"}, ValueError, r"backend='flex' cannot run"),
    },
    "routing": {
        "centroids_int": ({"centroids": torch.ones(2, 4, 8).long()}, InputTypeError, r"\bcentroids must be a"),
        "centroids_meta": ({"centroids": torch.ones(2, 4, 8, device="meta")}, ValueError, r"\bcentroids are on meta"),
        "centroids_shape": ({"centroids": torch.ones(3, 4, 8)}, ValueError, r"\bcentroids must be \(heads=2"),
        "causal_str": ({"causal": 1}, InputTypeError, r"\bcausal must be a bool"),
    },
}  # fmt: skip
OP_CASES = [(op, mutation) for op in OPS for mutation in MUTATIONS]
OP_CASES += [(op, mutation) for op, own in OWN.items() for mutation in own]


@pytest.mark.parametrize(("op", "mutation"), OP_CASES)
def test_op_refuses_bad_input_at_the_door(op, mutation, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a plain CPU: the triton backend runs on CUDA only
    tensors = _qkv()
    OPS[op](*tensors)  # the unmutated call runs
    if mutation in MUTATIONS:
        mutate, error, message = MUTATIONS[mutation]
        tensors, options = mutate(tensors)
    else:
        options, error, message = OWN[op][mutation]
    with pytest.raises(error, match=message):
        OPS[op](*tensors, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_float_dtype_runs(op, dtype):
    q, k, v = _qkv(dtype)
    out = OPS[op](q, k, v)
    assert out.dtype == dtype and out.shape == v.shape and torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("name", ["full", "local", "bigbird", "diffuser", "hypercube", "routing", "combiner"])
def test_modules_refuse_input_of_another_dtype_or_device(name):
    from hopformer.attention import build

    layer = build(name, 16, 2)
    x = torch.randn(2, 40, 16)  # 40 tokens: under one 64-token block, so default windows must fit short inputs
    assert layer(x).shape == x.shape
    with pytest.raises(InputTypeError, match=r"x has dtype torch\.float64 but the module's weights are torch\.float32"):
        layer(x.double())
    with pytest.raises(InputTypeError, match=r"x must be a floating-point tensor"):
        layer(x.long())
    with pytest.raises(ValueError, match=r"x is on meta but the module's weights are on cpu"):
        layer(x.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts, as for PyTorch's own modules
        assert layer(x).shape == x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(InputTypeError, match="float64"):
        layer(x.double())  # autocast leaves float64 alone, so it is refused there too


def test_case_count():
    cases = len(LOADER_CASES) + len(RUN_FILE_CASES) + len(STATE_CASES) + len(OP_CASES) + 3 * len(OPS)
    assert cases >= 150, cases
    print(f"fuzz cases: {cases}")
