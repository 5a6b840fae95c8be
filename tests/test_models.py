"""Models: shapes on every attention, pooling and padding, save / load, helpers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from hopformer.attention import available, option_names
from hopformer.attention import build as build_attention
from hopformer.models import (
    DualEncoderClassifier,
    EncoderConfig,
    IntensityEmbedding,
    SequenceClassifier,
    TransformerEncoder,
    aux_loss,
    count_parameters,
    from_pretrained,
    pool,
)

VOCAB = 20


def encoder(attention: str = "full", **kwargs) -> TransformerEncoder:
    settings = dict(vocab_size=VOCAB, dim=16, depth=2, heads=2, mlp_dim=32, max_len=160, attention=attention)
    settings.update(kwargs)
    return TransformerEncoder(EncoderConfig(**settings))


def batch(
    lengths: list[int], width: int, seed: int = 0, pad_value: int | None = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with the given true lengths; padding filled with ``pad_value`` (None: random garbage)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    if pad_value is not None:
        ids = ids.masked_fill(~mask, pad_value)
    return ids, mask


@pytest.mark.parametrize("attention", available())
def test_every_attention_runs_forward_and_backward(attention):
    torch.manual_seed(0)
    # Graph attentions need at least a few 64-token blocks: the trainer pads batches to 128.
    model = SequenceClassifier(encoder(attention, pad_to_multiple=128), num_classes=3)
    ids, mask = batch([70, 45], 70)
    logits = model(ids, mask)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    (logits.sum() + (aux_loss(model) or 0)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    hidden = model.encoder(ids, mask)
    assert hidden.shape == (2, 70, 16)  # internal padding to 128 is trimmed away


@pytest.mark.parametrize("attention", available())
def test_padded_positions_never_leak_into_the_output(attention):
    """Whatever ids sit under a False mask, the logits of the real tokens are the same (every attention)."""
    torch.manual_seed(0)
    model = SequenceClassifier(encoder(attention), num_classes=3).eval()
    ids, mask = batch([130, 33], 140, pad_value=0)
    garbage, _ = batch([130, 33], 140, seed=1, pad_value=None)
    noisy = torch.where(mask, ids, garbage)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), model(noisy, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["local", "diffuser"])
def test_grid2d_attentions_on_padded_images(attention):
    """Pixel-neighbourhood graphs in a model: images of 9 x 9 pixels padded to 128 tokens train, and the
    garbage under padding never reaches the real pixels' logits (padding rows lie below the image)."""
    torch.manual_seed(0)
    options = dict(pattern="grid2d", side=9, radius=1)
    model = SequenceClassifier(encoder(attention, attention_options=options, pad_to_multiple=128), num_classes=2)
    ids, mask = batch([81, 81], 81)
    (model(ids, mask).sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    ids, mask = batch([81, 50], 81, pad_value=0)
    garbage, _ = batch([81, 50], 81, seed=1, pad_value=None)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), model(torch.where(mask, ids, garbage), mask))


def test_local_attention_names_its_patterns():
    with pytest.raises(ValueError, match="pattern='local' or 'grid2d'"):
        encoder("local", attention_options=dict(pattern="bigbird"))
    with pytest.raises(ValueError, match="perfect square"):
        encoder("local", attention_options=dict(pattern="grid2d"))(*batch([70], 70))


@pytest.mark.parametrize("attention", available())
def test_an_unknown_attention_option_is_named_with_the_ones_it_takes(attention):
    """A misspelt option (a config's ``attention_options``) fails in ``build`` with the attention, the option,
    its value and the accepted names, and every accepted name is taken (whatever a placeholder value does)."""
    with pytest.raises(ValueError, match=rf"attention='{attention}' has no option 'hopz' \(got hopz=3\); it takes \["):
        build_attention(attention, 16, 2, hopz=3)
    names = option_names(attention)
    assert {"dropout", "causal"} <= set(names) and "hopz" not in names
    for name in names:
        try:
            build_attention(attention, 16, 2, **{name: None})
        except Exception as error:  # a value error is fine here; an unknown name is not
            assert "has no option" not in str(error), (name, error)
    if attention == "diffuser":
        assert {"hops", "alpha", "global_blocks", "block_size"} <= set(names)
    if attention == "bigbird":
        assert "hops" not in names and "pattern" not in names  # the pattern is fixed


# Attentions whose graph for the real tokens does not depend on how far the batch is padded. Graphs
# with random or scattered parts (bigbird, diffuser), length-derived structure (hypercube, combiner
# with automatic block size, routing) are drawn per padded length, so they are not in this list.
PADDING_INVARIANT = ["full", "local", "longformer"]


@pytest.mark.parametrize("attention", PADDING_INVARIANT)
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_classifier_is_invariant_to_extra_padding(attention, pooling, norm):
    torch.manual_seed(0)
    options = {} if attention == "full" else {"block_size": 16}
    model = SequenceClassifier(encoder(attention, norm=norm, attention_options=options), 4, pooling=pooling).eval()
    ids, mask = batch([40], 40)
    padded_ids, padded_mask = batch([40], 100)
    padded_ids[:, :40] = ids
    padded_ids[:, 40:] = 7  # padding content must not matter either
    with torch.no_grad():
        alone = model(ids, mask)
        padded = model(padded_ids, padded_mask)
        unmasked = model(ids)  # no mask at all = every token real
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, unmasked, rtol=1e-5, atol=1e-5)


def test_encoder_option_is_passed_to_the_attention():
    model = encoder("local", attention_options={"block_size": 16, "window": 1})
    attention = model.blocks[0].attention
    assert attention.graph_options["block_size"] == 16 and attention.graph_options["window"] == 1


def test_mean_pooling_ignores_padding():
    hidden = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = pool(hidden, mask, "mean")
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    hidden[0, 2:] = 1e6  # garbage in padded rows changes nothing
    torch.testing.assert_close(pool(hidden, mask, "mean"), pooled)
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])


def test_cls_pooling_prepends_a_vector_and_needs_room_for_it():
    model = SequenceClassifier(encoder(max_len=33), num_classes=2, pooling="cls")
    ids, mask = batch([32, 20], 32)
    assert model(ids, mask).shape == (2, 2)
    too_long, long_mask = batch([33], 33)
    with pytest.raises(ValueError, match="max_len"):
        model(too_long, long_mask)


def test_dual_encoder_features_and_shapes():
    torch.manual_seed(0)
    model = DualEncoderClassifier(encoder(), num_classes=2).eval()
    ids, mask = batch([30, 12], 30)
    ids2, mask2 = batch([9, 25], 25, seed=3)
    logits = model(ids, mask, ids2, mask2)
    assert logits.shape == (2, 2)
    # One call on both documents equals pooling each separately.
    with torch.no_grad():
        u = model.features(ids, mask)
        v = model.features(ids2, mask2)
        expected = model.head(torch.cat([u, v, u * v, u - v], dim=-1))
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_ids_2"):
        model(ids, mask)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SequenceClassifier(encoder("full", positions="sinusoidal", norm="post"), 5, pooling="cls"),
        lambda: SequenceClassifier(encoder("diffuser", attention_options={"hops": 2, "block_size": 16}), 5),
        lambda: DualEncoderClassifier(encoder("local", attention_options={"block_size": 16}), 2),
        lambda: encoder("routing", attention_options={"clusters": 2, "local_window": 16}),
    ],
)
def test_save_and_load_round_trip(tmp_path, make):
    torch.manual_seed(0)
    model = make().eval()
    folder = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())  # the transformers format (hopformer.hf reads it)
    assert config["model_type"] == "hopformer" and config["hopformer_class"] == model.model_type
    torch.manual_seed(123)  # a different init, so equal outputs must come from the loaded weights
    loaded = from_pretrained(folder).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    ids, mask = batch([40, 21], 40)
    with torch.no_grad():
        if isinstance(model, DualEncoderClassifier):
            args = (ids, mask, ids.flip(0), mask.flip(0))
        else:
            args = (ids, mask)
        torch.testing.assert_close(model(*args), loaded(*args), rtol=0, atol=0)
    assert type(model).from_pretrained(folder).config == model.config
    other = SequenceClassifier if isinstance(model, TransformerEncoder) else TransformerEncoder
    with pytest.raises(TypeError):
        other.from_pretrained(folder)


def test_the_encoder_is_built_from_its_config():
    """``TransformerEncoder(config)``: the model keeps its own copy of the config; ``from_config`` is the same."""
    config = EncoderConfig(VOCAB, dim=16, depth=1, heads=2, mlp_dim=32, max_len=64, attention="local",
                           attention_options={"block_size": 16})  # fmt: skip
    torch.manual_seed(0)
    model = TransformerEncoder(config)
    assert model.config == config and model.config is not config
    config.attention_options["window"] = 3  # the caller's dict is not the model's
    assert model.config.attention_options == {"block_size": 16}
    torch.manual_seed(0)
    same = TransformerEncoder.from_config(model.config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    with pytest.raises(ValueError, match="vocab_size must be a positive integer, got None"):
        TransformerEncoder(EncoderConfig(None))  # a training config's open vocabulary is filled before building


def test_the_encoder_takes_its_config_and_says_so_otherwise():
    with pytest.raises(TypeError, match=r"TransformerEncoder takes an EncoderConfig, got int"):
        TransformerEncoder(VOCAB)


def test_from_pretrained_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)


def test_count_parameters_and_aux_loss():
    model = SequenceClassifier(encoder(), num_classes=3)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.encoder.embed.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - VOCAB * 16
    assert aux_loss(model) is None
    model.encoder.blocks[0].attention.aux_loss = torch.tensor(0.5)
    model.encoder.blocks[1].attention.aux_loss = torch.tensor(0.25)
    assert aux_loss(model).item() == pytest.approx(0.75)


def test_routing_aux_loss_reaches_the_model():
    model = SequenceClassifier(encoder("routing", attention_options={"clusters": 2, "local_window": 16}), 2)
    ids, mask = batch([64, 50], 64)
    model.train()
    model(ids, mask)
    loss = aux_loss(model)
    assert loss is not None and loss.requires_grad and loss.item() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = SequenceClassifier(encoder(dropout=0.0, gradient_checkpointing=flag), num_classes=3)
        ids, mask = batch([30, 18], 30)
        model(ids, mask).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_pixel_models_train_the_zero_embedding():
    model = encoder(pad_id=None)
    assert model.embed.padding_idx is None and model.embed.weight[0].abs().sum() > 0
    assert encoder().embed.weight[0].abs().sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 15}, "heads"),
        ({"norm": "sandwich"}, "norm"),
        ({"positions": "rotary"}, "positions"),
        ({"attention": "nope"}, "attention"),
        ({"dropout": 1.5}, "dropout"),
        ({"depth": 0}, "depth"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        encoder(**kwargs)


def test_bad_pooling_and_classes():
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassifier(encoder(), 3, pooling="max")
    with pytest.raises(ValueError, match="num_classes"):
        SequenceClassifier(encoder(), 0)


def test_init_schemes():
    """``normal``: every Linear N(0, 0.02); ``torch``: PyTorch's uniform(+-1/sqrt(fan_in)) default."""
    torch.manual_seed(0)
    normal = TransformerEncoder(EncoderConfig(20, dim=64, mlp_dim=256, init="normal"))
    default = TransformerEncoder(EncoderConfig(20, dim=64, mlp_dim=256, init="torch"))
    for name, module in default.named_modules():
        if isinstance(module, torch.nn.Linear):
            bound = module.in_features**-0.5
            assert module.weight.abs().max() <= bound
            assert abs(module.weight.std().item() - bound / 3**0.5) < 0.15 * bound, name
            ours = normal.get_submodule(name).weight
            assert abs(ours.std().item() - 0.02) < 0.003 and (normal.get_submodule(name).bias == 0).all()
    for model in (normal, default):
        assert abs(model.embed.weight[1:].std().item() - 0.02) < 0.005 and (model.embed.weight[0] == 0).all()
    classifier = SequenceClassifier(default, 3)
    first = classifier.head[0]
    assert first.weight.abs().max() <= first.in_features**-0.5 and first.weight.std() > 0.05
    # "lra": the JAX LRA encoder's Glorot-uniform weights, zero biases, N(0, 1) token embeddings
    lra = TransformerEncoder(EncoderConfig(300, dim=64, mlp_dim=256, init="lra"))
    for name, module in lra.named_modules():
        if isinstance(module, torch.nn.Linear):
            bound = (6 / (module.in_features + module.out_features)) ** 0.5
            assert module.weight.abs().max() <= bound and module.weight.std() > 0.45 * bound, name
            assert module.bias is None or (module.bias == 0).all()
    assert abs(lra.embed.weight[1:].std().item() - 1.0) < 0.05 and (lra.embed.weight[0] == 0).all()
    with pytest.raises(ValueError, match="init='xavier' is not known"):
        TransformerEncoder(EncoderConfig(20, init="xavier"))


def test_list_graph_options_from_a_config_work():
    """A list option (``global_blocks`` as YAML gives it) builds, caches and uses the graph it names."""
    from hopformer.attention import build
    from hopformer.attention.sparse import cached_graph

    module = build("diffuser", dim=16, heads=2, block_size=16, global_blocks=[0, 5], hops=2)
    x = torch.randn(2, 100, 16)
    out = module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    graph = cached_graph("diffuser", 100, block_size=16, global_blocks=[0, 5])
    assert graph is cached_graph("diffuser", 100, block_size=16, global_blocks=(0, 5))
    dense = graph.to_dense()
    assert dense[:, 0].all() and dense[0, :].all()  # block 0 is global: every token sees it, it sees every token


def test_diffuser_learned_coefficients():
    """``learned_coefficients=True``: starts as the fixed kernel (same output, float64), keeps each head's
    weights on the simplex, learns them (a gradient reaches the logits and a step moves them), saves and
    loads them; bad settings fail with the argument named."""
    from hopformer.attention import build

    torch.manual_seed(int(torch.randint(1000, ())))
    options = dict(dim=16, heads=2, block_size=16, hops=3, alpha=0.3)
    fixed = build("diffuser", **options).double()
    learned = build("diffuser", **options, learned_coefficients=True).double()
    learned.load_state_dict(fixed.state_dict(), strict=False)  # the same projections; the logits stay
    x = torch.randn(2, 45, 16, dtype=torch.float64)
    mask = torch.rand(2, 45) > 0.2
    torch.testing.assert_close(learned(x, mask), fixed(x, mask))
    torch.testing.assert_close(learned.coefficients(), fixed.coefficients())
    assert "learned_coefficients='softmax'" in repr(learned) and "hop_logits" not in fixed.state_dict()

    optimizer = torch.optim.SGD([learned.hop_logits], lr=1.0)
    learned(x, mask).square().sum().backward()
    assert learned.hop_logits.grad.abs().max() > 0
    optimizer.step()
    weights = learned.coefficients()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, dtype=torch.float64))
    assert not torch.allclose(weights, fixed.coefficients())
    copy_ = build("diffuser", **options, learned_coefficients=True).double()
    copy_.load_state_dict(learned.state_dict())
    torch.testing.assert_close(copy_.coefficients(), weights)

    with pytest.raises(ValueError, match="learned_coefficients must be False, True, 'softmax' or 'free', got 'yes'"):
        build("diffuser", **options, learned_coefficients="yes")
    with pytest.raises(ValueError, match="edge_dropout='per_hop'"):
        build("diffuser", **options, learned_coefficients=True, dropout=0.1)
    assert build("diffuser", **options, learned_coefficients=True, dropout=0.1, edge_dropout="per_hop").training


def test_diffuser_explicit_and_free_coefficients():
    """``coefficients=[...]`` fixes the hop weights (``[0, 1]`` at one hop is plain sparse attention on the
    graph); ``learned_coefficients="free"`` starts there and learns unconstrained weights that may turn
    negative; bad lists fail with the argument named."""
    from hopformer.attention import build
    from hopformer.attention.sparse import SparseAttention

    torch.manual_seed(int(torch.randint(1000, ())))
    options = dict(dim=16, heads=2, block_size=16)
    x = torch.randn(2, 45, 16, dtype=torch.float64)
    mask = torch.rand(2, 45) > 0.2
    mask[:, 0] = True
    one_hop = build("diffuser", **options, hops=1, coefficients=[0, 1]).double()
    sparse = SparseAttention(**options, pattern="diffuser").double()
    sparse.load_state_dict(one_hop.state_dict())
    torch.testing.assert_close(one_hop(x, mask), sparse(x, mask))
    assert "coefficients=[0, 1]" in repr(one_hop)

    weights = [0.05, 0.8, 0.05, 0.1]
    fixed = build("diffuser", **options, hops=3, coefficients=weights).double()
    free = build("diffuser", **options, hops=3, coefficients=weights, learned_coefficients="free").double()
    free.load_state_dict(fixed.state_dict(), strict=False)
    torch.testing.assert_close(free(x, mask), fixed(x, mask))
    torch.testing.assert_close(free.coefficients(), torch.tensor([weights] * 2, dtype=torch.float64))
    optimizer = torch.optim.SGD([free.hop_weights], lr=1.0)
    free(x, mask).sum().backward()
    optimizer.step()
    free.hop_weights.data[0, 0] = -0.5  # any sign is allowed: the output follows the weights exactly
    expected = sum(
        free.hop_weights[None, :, hop, None, None].detach() * power
        for hop, power in enumerate(_powers(free, x, mask, hops=3))
    )
    torch.testing.assert_close(free.attend(*_qkv(free, x), mask), expected * mask[:, None, :, None])

    for bad, message in (
        ([0.5, 0.5], "coefficients must have hops \\+ 1 = 4 entries"),
        ([0.5, 0.6, -0.1, 0.0], "coefficients must be finite numbers >= 0"),
        ([0.5, 0.5, 0.5, 0.5], "coefficients must sum to 1"),
        ("0.25", "coefficients must be a list of hops \\+ 1 = 4 numbers"),
    ):
        with pytest.raises(ValueError, match=message):
            build("diffuser", **options, hops=3, coefficients=bad)


def _qkv(layer, x):
    """A Diffuser layer's per-head queries, keys and values, ``(batch, heads, seq, head_dim)`` each."""
    batch, seq, _ = x.shape
    q, k, v = layer.qkv(x).view(batch, seq, 3, layer.heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def _powers(layer, x, mask, hops):
    """``A^0 V .. A^hops V`` from the dense attention matrix of ``layer`` on its graph."""
    q, k, v = _qkv(layer, x)
    allowed = layer.graph(x.shape[1]).to_dense() & mask[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
    matrix = scores.softmax(-1).nan_to_num()
    powers = [v]
    for _ in range(hops):
        powers.append(matrix @ powers[-1])
    return powers


def test_intensity_embedding_reads_grey_levels():
    """``embedding="intensity"``: one line through the grey levels, a learned row for the mask token, clear errors."""
    torch.manual_seed(0)
    model = TransformerEncoder(
        EncoderConfig(257, dim=8, depth=1, heads=2, mlp_dim=8, max_len=64, pad_id=None, embedding="intensity")
    )
    embed = model.embed
    ids = torch.randint(0, 256, (2, 20))
    ids[0, :3] = torch.tensor([0, 255, 256])  # black, white, the masked objective's mask token
    expected = embed.proj.weight[:, 0] * (ids[..., None].double() / 127.5 - 1.0) + embed.proj.bias
    got = embed(ids)
    torch.testing.assert_close(got[0, 3:], expected[0, 3:].float())
    torch.testing.assert_close(got[1], expected[1].float())
    torch.testing.assert_close(got[0, 0], embed.proj.bias - embed.proj.weight[:, 0])
    torch.testing.assert_close(got[0, 1], embed.proj.bias + embed.proj.weight[:, 0])
    torch.testing.assert_close(got[0, 2], embed.special.weight[0])
    out = model(ids)
    out.sum().backward()
    assert out.shape == (2, 20, 8)
    assert embed.proj.weight.grad.abs().sum() > 0 and embed.special.weight.grad.abs().sum() > 0
    assert TransformerEncoder(EncoderConfig(256, dim=8, pad_id=None, embedding="intensity")).embed.special is None
    with pytest.raises(ValueError, match="embedding='intensity'.*pad_id=0"):
        TransformerEncoder(EncoderConfig(256, dim=8, embedding="intensity"))
    with pytest.raises(ValueError, match="vocab_size >= 256.*got 20"):
        TransformerEncoder(EncoderConfig(20, dim=8, pad_id=None, embedding="intensity"))
    with pytest.raises(ValueError, match="embedding='linear' is not known"):
        TransformerEncoder(EncoderConfig(20, dim=8, embedding="linear"))


def test_conv_embedding_is_a_3x3_convolution_of_the_grey_levels():
    """``embedding="conv"`` equals a 3 x 3 convolution of the image padded with black; a mask token reads as black."""
    torch.manual_seed(1)
    model = TransformerEncoder(
        EncoderConfig(257, dim=8, depth=1, heads=2, mlp_dim=8, max_len=64, pad_id=None, embedding="conv")
    )
    embed = model.embed
    ids = torch.randint(0, 256, (2, 49))
    image = (ids.double() / 127.5 - 1.0).view(2, 1, 7, 7)
    weight = embed.proj.weight.double().view(8, 1, 3, 3)
    expected = F.conv2d(F.pad(image, (1, 1, 1, 1), value=-1.0), weight, embed.proj.bias.double())
    torch.testing.assert_close(embed(ids), expected.flatten(2).transpose(1, 2).float())
    # gradients of the map's weights, in float64, against the same through conv2d
    stem = copy.deepcopy(embed).double()
    upstream = torch.randn(2, 49, 8, dtype=torch.float64)
    (stem(ids) * upstream).sum().backward()
    weight, bias = (t.detach().clone().requires_grad_() for t in (stem.proj.weight.view(8, 1, 3, 3), stem.proj.bias))
    direct = F.conv2d(F.pad(image, (1, 1, 1, 1), value=-1.0), weight, bias).flatten(2).transpose(1, 2)
    (direct * upstream).sum().backward()
    torch.testing.assert_close(stem.proj.weight.grad, weight.grad.view(8, 9))
    torch.testing.assert_close(stem.proj.bias.grad, bias.grad)
    hidden = ids.clone()
    hidden[0, 24] = 256  # the centre pixel hidden by the masked objective
    black = ids.clone()
    black[0, 24] = 0
    out, reference = embed(hidden), embed(black)
    torch.testing.assert_close(out[0, 24], embed.special.weight[0])
    keep = torch.ones(2, 49, dtype=torch.bool)
    keep[0, 24] = False
    torch.testing.assert_close(out[keep], reference[keep])  # neighbours see black, nothing of the hidden value
    assert model(ids).shape == (2, 49, 8)
    with pytest.raises(ValueError, match="embedding='conv' reads a square image.*48 tokens"):
        model(ids[:, :48])


def test_a_deeper_conv_stem_is_a_stack_of_3x3_convolutions_with_a_7x7_view():
    """``stem_depth=3``: two 16-channel 3 x 3 convolutions with GELU, then the 3 x 3 map to ``dim``, the image
    padded with black and the hidden maps with zeros; float64, forward and gradients against ``F.conv2d``."""
    torch.manual_seed(2)
    model = TransformerEncoder(
        EncoderConfig(256, dim=8, depth=1, heads=2, mlp_dim=8, max_len=81, pad_id=None, embedding="conv", stem_depth=3)
    ).double()
    embed = model.embed
    ids = torch.randint(0, 256, (2, 81))
    params = [p for conv in embed.hidden for p in (conv.weight, conv.bias)] + [embed.proj.weight, embed.proj.bias]
    copies = [p.detach().clone().requires_grad_() for p in params]
    image = (ids.double() / 127.5 - 1.0).view(2, 1, 9, 9)
    x = F.gelu(F.conv2d(F.pad(image, (1, 1, 1, 1), value=-1.0), copies[0], copies[1]))
    x = F.gelu(F.conv2d(F.pad(x, (1, 1, 1, 1)), copies[2], copies[3]))
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1)), copies[4].view(8, 16, 3, 3), copies[5]).flatten(2).transpose(1, 2)
    upstream = torch.randn(2, 81, 8, dtype=torch.float64)
    (embed(ids) * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(embed(ids), expected)
    for param, copy_ in zip(params, copies):
        torch.testing.assert_close(param.grad, copy_.grad.view_as(param.grad))
    # each token sees the 7 x 7 square around it: a change 3 pixels away reaches it, 4 pixels away does not
    changed = ids.clone()
    changed[0, 4 * 9 + 4] = 255 - ids[0, 4 * 9 + 4]
    moved = (embed(changed) - embed(ids))[0].abs().sum(-1).view(9, 9) > 0
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    assert torch.equal(moved, ((rows - 4).abs() <= 3) & ((cols - 4).abs() <= 3))
    assert sum(p.numel() for p in embed.parameters()) == (16 * 9 + 16) + (16 * 16 * 9 + 16) + (16 * 9 * 8 + 8)
    with pytest.raises(ValueError, match="stem_depth=2 .* needs embedding='conv', got embedding='intensity'"):
        TransformerEncoder(EncoderConfig(256, dim=8, pad_id=None, embedding="intensity", stem_depth=2))
    with pytest.raises(ValueError, match="stem_depth must be a positive integer, got 0"):
        TransformerEncoder(EncoderConfig(256, dim=8, pad_id=None, embedding="conv", stem_depth=0))
    with pytest.raises(ValueError, match="depth=2 needs kernel_size=3.*got kernel_size=1"):
        IntensityEmbedding(256, 8, kernel_size=1, depth=2)


def test_use_portable_backends_lets_a_gpu_backend_checkpoint_run_anywhere(monkeypatch):
    """Layers saved with a CUDA-only backend (triton, flex) fail on the CPU with the backend named; after
    ``use_portable_backends`` they run on ``auto`` and give what a model built with ``auto`` gives."""
    from hopformer.attention import build, use_portable_backends

    # tests/test_triton_backend.py turns Triton's CPU interpreter on for the session, where Triton is
    # installed; with it the triton backend takes CPU tensors, so it must be off here
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(int(torch.randint(1000, ())))
    # head_dim 16: FlexAttention's smallest, so the flex layer can be built at all
    model = torch.nn.Sequential(
        build("diffuser", dim=32, heads=2, block_size=16, backend="triton", learned_coefficients=True),
        build("bigbird", dim=32, heads=2, block_size=16, backend="flex"),
    ).double()
    reference = torch.nn.Sequential(
        build("diffuser", dim=32, heads=2, block_size=16, learned_coefficients=True),
        build("bigbird", dim=32, heads=2, block_size=16),
    ).double()
    reference.load_state_dict(model.state_dict())
    x, mask = torch.randn(2, 40, 32, dtype=torch.float64), torch.rand(2, 40) > 0.3
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="triton"):
            model[0](x, mask)
    assert use_portable_backends(model) == {"triton", "flex"}
    assert use_portable_backends(model) == set()
    for layer, expected in zip(model, reference):
        assert layer.backend == "auto"
        torch.testing.assert_close(layer(x, mask), expected(x, mask))
