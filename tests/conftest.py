"""Shared pytest setup."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def fresh_compile_cache():
    """Each test module starts with an empty torch.compile cache on CUDA machines.

    Every FlexAttention call goes through one compiled function, and Dynamo counts its variants (shapes,
    masks, dtypes) per process against ``hopformer.ops.flex.RECOMPILE_LIMIT``. A training run needs a
    few; the CUDA suite compiles well over a hundred across its modules (Combiner, sparse ops, routing),
    so without a reset the first test past the limit fails with hopformer's recompile-limit error.
    """
    if torch.cuda.is_available():
        torch._dynamo.reset()
    yield
