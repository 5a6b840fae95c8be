"""Tasks: what the trainer needs to know about each dataset, and where its examples come from.

- ``listops``: ``basic_{train,val,test}.tsv`` from ``data.data_dir`` (or its ``listops-1000/``). With
  no data folder, a small set is generated once into ``~/.cache/hopformer/listops-<hash>/`` (the hash
  covers the generation settings; ``$HOPFORMER_CACHE`` moves the cache), and a data folder given
  but empty (or missing) is filled the same way, e.g. ``--data-dir data/listops_lra`` with
  ``configs/lra/listops.yaml`` generates the LRA-sized set there. A fresh machine can therefore train
  with no download; runs started together on one empty folder generate it once (a lock file).
- ``text``, ``retrieval``, ``image``, ``pathfinder32`` (64, 128, 256): the LRA release through
  :func:`hopformer.data.load_lra`; ``data.data_dir`` must be the ``lra_release/`` folder. Pathfinder
  can be generated instead: ``hopformer data pathfinder --out DIR --n 200000`` writes
  ``DIR/pathfinder32/curv_contour_length_14/``, which ``--data-dir DIR`` then reads.

- Corpora for language modeling (``train.objective`` ``"causal"`` or ``"masked"``), loaded by
  :func:`load_corpus_task` (:mod:`hopformer.data.corpus`, :mod:`hopformer.data.corpora`): ``bytes`` (the
  Python standard library's sources) or ``bytes:PATH`` (any file or folder), ``enwik8:DIR``, ``text8:DIR``,
  ``wikitext103:DIR`` (words, the released vocabulary), ``wikitext103-raw:DIR`` (bytes) and ``pg19:DIR``.
- Image sets for pixel modeling (``train.objective="causal"`` over subpixels, bits per dimension), loaded by
  the same function (:mod:`hopformer.data.images`): ``cifar10-pixels:DIR``, ``imagenet64-pixels:DIR`` and
  ``pathfinder-pixels`` (generated 32 x 32 Pathfinder images, for machines without the real ones).

``lra-<name>`` is accepted for every name.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hopformer.train.config import Config

SPLITS = ("train", "val", "test")
LISTOPS_FILES = {split: f"basic_{split}.tsv" for split in SPLITS}
AUGMENTATIONS = ("none", "dihedral")  # data.augment (training examples only)


@dataclass(frozen=True)
class TaskSpec:
    """Fixed facts of a task: label count, vocabulary, pair input (Retrieval), pixel tokens."""

    name: str
    num_classes: int
    vocab_size: int
    pair: bool = False
    pixels: bool = False  # id 0 is a black pixel, not padding: no padding_idx in the embedding


TASKS: dict[str, TaskSpec] = {
    "listops": TaskSpec("listops", 10, 16),
    "text": TaskSpec("text", 2, 257),  # bytes shifted by one, 0 = pad
    "retrieval": TaskSpec("retrieval", 2, 257, pair=True),
    "image": TaskSpec("image", 10, 256, pixels=True),
    **{f"pathfinder{r}": TaskSpec(f"pathfinder{r}", 2, 256, pixels=True) for r in (32, 64, 128, 256)},
}


@dataclass
class TaskData:
    """The examples of every split, where they came from, and the task's facts."""

    spec: TaskSpec
    splits: dict[str, list[dict]]
    source: Path

    def longest(self) -> int:
        """Longest sequence over all splits (either document for pairs)."""
        keys = ("input_ids", "input_ids_2") if self.spec.pair else ("input_ids",)
        return max(len(example[key]) for examples in self.splits.values() for example in examples for key in keys)

    def majority_rate(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent label of ``split``."""
        counts = Counter(int(example["label"]) for example in self.splits[split])
        return max(counts.values()) / sum(counts.values())

    def baselines(self, split: str = "test") -> dict[str, float]:
        """Accuracy on ``split`` of every trivial rule of the task, as a model must beat them: the majority
        class (``majority_rate``) and, for ListOps, the label guessed from the root operator alone
        (``root_operator_rate``, :func:`hopformer.data.listops.root_operator_baseline`, counted on train)."""
        rates = {"majority_rate": self.majority_rate(split)}
        if self.spec.name == "listops":
            from hopformer.data.listops import root_operator_baseline

            rates["root_operator_rate"] = root_operator_baseline(self.splits["train"], self.splits[split])
        return rates


TEXT_CORPORA = ("bytes", "enwik8", "text8", "wikitext103", "wikitext103-raw", "pg19")
IMAGE_SETS = ("cifar10-pixels", "imagenet64-pixels", "pathfinder-pixels")
NO_PATH_NEEDED = ("bytes", "pathfinder-pixels")  # built on any machine


def corpus_kind(name: str) -> str | None:
    """The corpus or image set a task name reads (``"enwik8"`` of ``"enwik8:/data"``), or None for the
    example tasks (LRA, ListOps)."""
    kind = name.partition(":")[0]
    return kind if kind in TEXT_CORPORA + IMAGE_SETS else None


def is_corpus_task(name: str) -> bool:
    """Whether ``name`` trains a language or pixel model on a corpus (``bytes``, ``enwik8:DIR``, ...)."""
    return corpus_kind(name) is not None


def is_image_task(name: str) -> bool:
    """Whether ``name`` is pixel modeling on an image set (``cifar10-pixels:DIR``, ...)."""
    return corpus_kind(name) in IMAGE_SETS


def load_corpus_task(config: Config, log: Any = print):
    """The :class:`~hopformer.data.corpus.Corpus` or :class:`~hopformer.data.images.ImageSet` of a corpus
    task, built once into the cache (``$HOPFORMER_CACHE``) where its release needs converting, then
    memory-mapped."""
    from hopformer.data import corpus

    kind = corpus_kind(config.task)
    path = config.task.partition(":")[2]
    if not path and kind not in NO_PATH_NEEDED:
        raise ValueError(f"task={config.task!r} needs the folder of the released files: --task {kind}:DIR")
    if kind == "bytes":
        return corpus.local_corpus(path, log=log) if path else corpus.stdlib_corpus(log=log)
    from hopformer.data import corpora, images  # the released formats

    if kind == "pathfinder-pixels":
        return images.pathfinder_images(resolution=int(path or 32), log=log)
    loaders = {
        "enwik8": corpora.enwik8_corpus,
        "text8": corpora.text8_corpus,
        "wikitext103": lambda p, log: corpora.wikitext103_corpus(p, level="word", log=log),
        "wikitext103-raw": lambda p, log: corpora.wikitext103_corpus(p, level="raw", log=log),
        "pg19": corpora.pg19_corpus,
        "cifar10-pixels": images.cifar10_images,
        "imagenet64-pixels": images.imagenet64_images,
    }
    return loaders[kind](path, log=log)


def task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name`` (``lra-`` prefix allowed)."""
    key = name.removeprefix("lra-")
    if key not in TASKS:
        known = ", ".join(sorted(TASKS))
        raise ValueError(
            f"task={name!r} is not known; choose one of {known} (optionally as lra-<name>), a corpus "
            f"({', '.join(k + ':DIR' for k in TEXT_CORPORA)}), or an image set ({', '.join(IMAGE_SETS)}, with :DIR)"
        )
    return TASKS[key]


def load_task(config: Config, progress: bool = True, log: Any = print) -> TaskData:
    """Load (generating ListOps if needed) every split of ``config.task``."""
    spec = task_spec(config.task)
    if config.data.mask_black_pixels and not spec.pixels:
        raise ValueError(
            f"data.mask_black_pixels=true applies to pixel tasks (image, pathfinder*), not task {spec.name!r}"
        )
    if config.data.augment not in AUGMENTATIONS:
        raise ValueError(f"data.augment={config.data.augment!r} is not known; choose one of {list(AUGMENTATIONS)}")
    if config.data.augment == "dihedral" and not spec.name.startswith("pathfinder"):
        raise ValueError(
            f"data.augment='dihedral' applies to Pathfinder (its label survives turns and flips), "
            f"not task {spec.name!r}"
        )
    if spec.name == "listops":
        return _load_listops(config, spec, progress, log)
    generate = (
        f"; or generate it: hopformer data pathfinder --out DIR --resolution {spec.name[10:]}, then --data-dir DIR"
        if spec.name.startswith("pathfinder")
        else ""
    )
    if config.data.data_dir is None:
        raise ValueError(
            f"task {spec.name!r} reads the LRA release: pass --data-dir pointing at the lra_release/ folder "
            f"(https://storage.googleapis.com/long-range-arena/lra_release.gz; see specs/lra.md §2){generate}"
        )
    from hopformer.data import load_lra

    root = Path(config.data.data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"--data-dir {root} does not exist; it must be the LRA release folder (lra_release/){generate}"
        )
    options = {"max_length": config.data.max_length} if spec.name in ("text", "retrieval") else {}
    if spec.name.startswith("pathfinder"):
        options = {"difficulty": config.data.pathfinder_difficulty}
    splits = {split: list(load_lra(spec.name, root, split, **options)) for split in SPLITS}
    check_splits(splits, root)
    if config.data.mask_black_pixels:
        for examples in splits.values():
            for example in examples:
                example["attention_mask"] = example["attention_mask"] & (example["input_ids"] != 0)
    return TaskData(spec, splits, root)


def check_splits(splits: dict[str, list[dict]], source: Path) -> None:
    """Every split must hold examples: training on an empty one would report made-up scores."""
    empty = [split for split in SPLITS if not splits.get(split)]
    if empty:
        counts = ", ".join(f"{split} {len(splits.get(split, []))}" for split in SPLITS)
        raise ValueError(
            f"{source}: the {' and '.join(empty)} split(s) hold no examples ({counts}); a run needs all three"
        )


def warn_truncation(splits: dict[str, list[dict]], limit: int, setting: str) -> None:
    """One warning line when examples are longer than the model takes (``limit`` tokens, set by ``setting``):
    they are cut to it, and the counts say how many, per split."""
    keys = ("input_ids", "input_ids_2")
    cut = {
        split: sum(any(len(e.get(key, ())) > limit for key in keys) for e in examples)
        for split, examples in splits.items()
    }
    if any(cut.values()):
        longest = max(len(e[key]) for examples in splits.values() for e in examples for key in keys if key in e)
        counts = ", ".join(f"{split} {cut[split]} of {len(splits[split])}" for split in splits)
        warnings.warn(
            f"{setting} cuts inputs longer than {limit} tokens (the longest has {longest}): {counts} examples",
            stacklevel=2,
        )


def listops_cache_dir(config: Config) -> Path:
    """``$HOPFORMER_CACHE`` (default ``~/.cache/hopformer``) ``/listops-<hash of the generation settings>``."""
    settings = asdict(config.data.generate)
    for key in (
        "max_depth",
        "max_args",
    ):  # added later: at the released value they leave the hash (and cache) as it was
        if settings[key] == 10:
            del settings[key]
    settings = json.dumps(settings, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
    cache = Path(os.environ.get("HOPFORMER_CACHE", Path.home() / ".cache" / "hopformer")).expanduser()
    return cache / f"listops-{digest}"


def find_listops_dir(folder: Path) -> Path | None:
    """``folder`` or ``folder/listops-1000`` if it holds the three ListOps files."""
    for candidate in (folder, folder / "listops-1000"):
        if all((candidate / name).is_file() for name in LISTOPS_FILES.values()):
            return candidate
    return None


def generate_listops_files(folder: Path, config: Config, progress: bool = True) -> Path:
    """Generate ``basic_{train,val,test}.tsv`` into ``folder`` with ``config.data.generate``."""
    from hopformer.data.listops import generate_listops, write_listops_tsv

    settings = config.data.generate
    examples = generate_listops(
        settings.train + settings.val + settings.test,
        seed=settings.seed,
        min_length=settings.min_length,
        max_length=settings.max_length,
        max_depth=settings.max_depth,
        max_args=settings.max_args,
        progress=progress,
    )
    folder.mkdir(parents=True, exist_ok=True)
    cuts = {"train": (0, settings.train), "val": (settings.train, settings.train + settings.val)}
    cuts["test"] = (settings.train + settings.val, len(examples))
    for split, (start, stop) in cuts.items():  # in order, as the released script splits its set
        write_listops_tsv(folder / LISTOPS_FILES[split], examples[start:stop])
    return folder


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block."""
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_listops(config: Config, spec: TaskSpec, progress: bool, log: Any) -> TaskData:
    from hopformer.data.listops import load_listops_tsv

    folder = Path(config.data.data_dir).expanduser() if config.data.data_dir else listops_cache_dir(config)
    found = find_listops_dir(folder)
    if found is None:
        folder.mkdir(parents=True, exist_ok=True)
        # Runs started together on one empty folder: one generates, the others wait and read its files.
        with _exclusive(folder / ".hopformer-generate.lock"):
            found = find_listops_dir(folder)
            if found is None:
                if any(folder.glob("basic_*.tsv")):
                    raise FileNotFoundError(f"{folder} has only some of {sorted(LISTOPS_FILES.values())}")
                g = config.data.generate
                shape = (
                    f", depth <= {g.max_depth}, <= {g.max_args} arguments"
                    if (g.max_depth, g.max_args) != (10, 10)
                    else ""
                )
                log(
                    f"No ListOps files in {folder}: generating {g.train}/{g.val}/{g.test} trees with "
                    f"{g.min_length} < length < {g.max_length}{shape} (seed {g.seed})"
                )
                found = generate_listops_files(folder, config, progress)
    splits = {
        split: load_listops_tsv(found / LISTOPS_FILES[split], max_length=config.data.max_length) for split in SPLITS
    }
    check_splits(splits, found)
    return TaskData(spec, splits, found)
