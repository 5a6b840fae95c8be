"""attention_operators: the matrices rebuilt for each layer reproduce what the layer's attention core returns."""

import pytest
import torch

from hopformer.analysis import attention_operators
from hopformer.attention.base import AttentionModule
from hopformer.models import EncoderConfig, TransformerEncoder

CASES = [
    ("full", {}),
    ("bigbird", {"block_size": 8}),
    ("diffuser", {"block_size": 8}),
    ("diffuser", {"block_size": 8, "hops": 3, "alpha": 0.3, "kernel": "heat", "remainder": "renormalize"}),
    ("diffuser", {"block_size": 8, "hops": 3, "learned_coefficients": True}),
]


def _encoder(attention: str, options: dict) -> TransformerEncoder:
    return TransformerEncoder(EncoderConfig(
        40, dim=16, depth=2, heads=2, mlp_dim=16, max_len=64, attention=attention, attention_options=options,
        pad_to_multiple=8, dropout=0.0,
    )).double().eval()  # fmt: skip


def _recording(attend, seen: list):
    def recorded(q, k, v, key_padding_mask):
        out = attend(q, k, v, key_padding_mask)
        seen.append((v, out))
        return out

    return recorded


@pytest.mark.parametrize(("attention", "options"), CASES)
def test_operators_applied_to_the_values_give_each_layers_output(attention, options):
    """Fresh random model and inputs, float64, an odd length padded inside the model, and padded examples:
    ``operator @ v`` equals the attention core's output for every layer; rows of real queries sum to 1,
    padded keys get no weight, padded queries get rows of zeros."""
    torch.manual_seed(sum(map(ord, attention)) + len(options))
    model = _encoder(attention, options)
    for name, parameter in model.named_parameters():
        if name.endswith("hop_logits"):  # learned hop weights: away from the kernel they start at
            parameter.data.normal_()
    input_ids = torch.randint(1, 40, (3, 45))
    mask = torch.ones(3, 45, dtype=torch.bool)
    mask[1, 30:] = False
    mask[2, 41:] = False
    layers = [m for m in model.modules() if isinstance(m, AttentionModule)]
    seen = []
    for layer in layers:  # record the values each core receives and what it returns
        layer.attend = _recording(layer.attend, seen)
    with torch.no_grad():
        model(input_ids, mask)
    for layer in layers:
        del layer.attend

    operators = attention_operators(model, input_ids, mask)
    assert len(operators) == 2
    expected_keys = {"A", "diffused"} if attention == "diffuser" else {"A"}
    padded = torch.nn.functional.pad(mask, (0, 3))  # the model pads 45 to 48
    for found, (v, out) in zip(operators, seen):
        assert set(found) == expected_keys
        applied = found["diffused" if attention == "diffuser" else "A"]
        assert applied.shape == (3, 2, 48, 48) and applied.dtype == torch.float64
        torch.testing.assert_close(applied @ v, out, rtol=1e-10, atol=1e-10)
        real_queries = padded[:, None, :].expand(3, 2, 48)
        real_keys = padded[:, None, None, :].expand(3, 2, 48, 48)
        for operator in found.values():
            assert not operator.requires_grad  # plain matrices, no autograd graph (learned weights included)
            rows = operator.sum(-1)[real_queries]
            torch.testing.assert_close(rows, torch.ones_like(rows))
            assert operator[~real_keys].abs().max() == 0  # no weight on padded keys
            assert operator[~real_queries].abs().max() == 0  # padded queries: rows of zeros


def test_uniform_operators_spread_each_query_evenly_over_its_keys():
    """``uniform=True``: every real query gives each of its graph's (real) keys the same weight."""
    torch.manual_seed(3)
    model = _encoder("bigbird", {"block_size": 8})
    found = attention_operators(model, torch.randint(1, 40, (2, 48)), uniform=True)[0]["A"]
    graph = model.blocks[0].attention.graph(48).to_dense()
    expected = graph.double() / graph.sum(-1, keepdim=True)
    torch.testing.assert_close(found, expected.expand_as(found))


def test_models_without_supported_attention_are_refused_by_name():
    with pytest.raises(TypeError, match="Linear has no attention layer"):
        attention_operators(torch.nn.Linear(3, 3), torch.zeros(1, 3))
    model = _encoder("routing", {})
    with pytest.raises(TypeError, match="RoutingAttention is none of them"):
        attention_operators(model, torch.randint(1, 40, (1, 48)))
