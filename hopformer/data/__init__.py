"""Task data: generators (ListOps, Pathfinder), loaders for every released LRA format, and loaders for the
language- and image-modeling datasets in their released layouts (enwik8, text8, Wikitext-103, PG-19, CIFAR-10,
ImageNet 64x64).

Names are resolved lazily so that ``import hopformer.data`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # ListOps generator, TSV writer and loader (hopformer/data/listops.py)
    "LISTOPS_VOCAB": "listops",
    "generate_listops": "listops",
    "write_listops_tsv": "listops",
    "load_listops_tsv": "listops",
    "evaluate_listops": "listops",
    "root_operator_baseline": "listops",
    # batching of examples into padded tensors (hopformer/data/batching.py)
    "collate": "batching",
    # every LRA task behind one call (hopformer/data/lra.py)
    "load_lra": "lra",
    "LRA_TASKS": "lra",
    # Pathfinder generator (hopformer/data/pathfinder.py)
    "generate_pathfinder": "pathfinder",
    # released text corpora for language modeling (hopformer/data/corpora.py)
    "enwik8_corpus": "corpora",
    "text8_corpus": "corpora",
    "wikitext103_corpus": "corpora",
    "pg19_corpus": "corpora",
    # released image sets for pixel modeling (hopformer/data/images.py)
    "ImageSet": "images",
    "cifar10_images": "images",
    "imagenet64_images": "images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hopformer.data' has no attribute {name!r}")
    module = importlib.import_module(f"hopformer.data.{_EXPORTS[name]}")
    return getattr(module, name)
