"""Shared pytest setup."""

from __future__ import annotations

import os
import tempfile

# Inductor's on-disk cache is shared by every process of the machine (/tmp/torchinductor_<user>) and its keys
# do not cover a custom op's fake implementation (pytorch/pytorch#160472): a cache filled by an older checkout
# of hopformer's ops hands a newer one stale output strides. The suite compiles into a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="hopformer-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA, the Triton kernels' tests run under Triton's CPU interpreter. It must be chosen before triton is
# first imported (transformers and torch.export import it), or triton's own helper functions stay compiled-only.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
