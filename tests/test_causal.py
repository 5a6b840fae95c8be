"""Causal attention, every mechanism: changing any input after position t changes no output at or before t
(forward values exactly, in float64) and sends no gradient to it, at odd lengths and with padding."""

from __future__ import annotations

import pytest
import torch

from hopformer.attention import available, build

# Small settings so every mechanism has several blocks, clusters or rows at these lengths.
OPTIONS = {
    "full": {},
    "local": {"block_size": 8, "window": 3},
    "longformer": {"block_size": 8, "window": 3, "num_global": 1},
    "bigbird": {"block_size": 8, "window": 3, "num_global": 1, "num_random": 2},
    "hypercube": {"block_size": 8},
    "diffuser": {"block_size": 8, "window": 3, "num_global": 1, "num_random": 2, "hops": 4},
    "routing": {"local_heads": 1, "local_window": 8, "clusters": 3, "window": 4},
    "combiner": {"variant": "fixed", "block_size": 6},
}
MORE = [
    ("combiner", {"variant": "logsparse", "block_size": 3}),
    ("combiner", {"variant": "axial", "block_size": 6}),
    ("combiner", {"variant": "axial_horizontal", "block_size": 6}),
    ("combiner", {"variant": "mixture", "block_size": 6}),
    ("routing", {"local_heads": 0, "clusters": 2, "window": 3, "share_qk": False}),
    ("diffuser", {"block_size": 8, "hops": 3, "learned_coefficients": True}),
    ("local", {"pattern": "grid2d", "side": 7, "radius": 1}),
]
CASES = list(OPTIONS.items()) + MORE


def test_every_registered_attention_is_covered():
    assert set(OPTIONS) == set(available())


def _module(name, options):
    torch.manual_seed(0)
    return build(name, 16, 2, causal=True, **options).double().eval()


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("padded", [False, True])
def test_outputs_never_depend_on_later_inputs(name, options, padded):
    module = _module(name, options)
    seq = 49
    generator = torch.Generator().manual_seed(seq + padded)
    x = torch.randn(2, seq, 16, generator=generator, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.ones(2, seq, dtype=torch.bool)
        mask[1, 40:] = False  # right padding
        mask[0, 5] = False  # and a hole
    base = module(x, mask)
    assert torch.isfinite(base).all()
    for t in (0, 8, 23, 47):
        later = x.clone()
        later[:, t + 1 :] = torch.randn(2, seq - t - 1, 16, generator=generator, dtype=torch.float64)
        changed = module(later, mask)
        torch.testing.assert_close(changed[:, : t + 1], base[:, : t + 1], rtol=0, atol=0, msg=f"{name} at t={t}")
        assert not torch.equal(changed[:, t + 1 :], base[:, t + 1 :]), "the perturbation must reach the future"
        # gradients: no output at or before t depends on an input after t
        leaf = later.clone().requires_grad_()
        (grad,) = torch.autograd.grad(module(leaf, mask)[:, : t + 1].sum(), leaf)
        assert (grad[:, t + 1 :] == 0).all(), f"{name}: gradient from outputs <= {t} reaches a later input"
