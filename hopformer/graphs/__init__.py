"""Attention graphs: static patterns at block granularity (pure tensors, no nn.Module)."""

from hopformer.graphs.block_graph import BlockGraph
from hopformer.graphs.patterns import (
    PATTERNS,
    bigbird,
    build_graph,
    diffuser,
    full,
    grid2d,
    hypercube,
    local,
    longformer,
)

__all__ = [
    "BlockGraph",
    "PATTERNS",
    "bigbird",
    "build_graph",
    "diffuser",
    "full",
    "grid2d",
    "hypercube",
    "local",
    "longformer",
]
