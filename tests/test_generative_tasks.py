"""The papers' generative tasks on the training side: BERT masking, masked LM on a corpus (bits per hidden
byte), word-level perplexity, pixel modeling (start token, bits per dimension, image positions, causal image
graphs), end to end on tiny data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hopformer.data.images import ImageSet
from hopformer.graphs import grid2d
from hopformer.models import CausalLM, CausalLMConfig, EncoderConfig, MaskedTokenModel, from_pretrained
from hopformer.train import load_config, train
from hopformer.train.batches import Runtime, hide_tokens
from hopformer.train.feeds import PixelFeed


# ------------------------------------------------------------------------------------------ masking
def test_bert_masking_statistics():
    """15% of the maskable tokens hidden; of those 80% show the mask id, 10% a random id, 10% themselves."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 200, (64, 4096), generator=generator)
    maskable = torch.rand(ids.shape, generator=generator) < 0.9
    inputs, hidden = hide_tokens(ids, maskable, 0.15, 200, torch.Generator().manual_seed(1), "bert", first_id=1)
    assert not (hidden & ~maskable).any()
    assert hidden.sum() / maskable.sum() == pytest.approx(0.15, abs=0.003)
    shown = inputs[hidden]
    masked = shown == 200
    kept = shown == ids[hidden]
    replaced = ~masked & ~kept  # random ids that happen to equal the token count as kept (1 in 199)
    count = hidden.sum().item()
    assert masked.sum() / count == pytest.approx(0.8, abs=0.01)
    assert kept.sum() / count == pytest.approx(0.1 + 0.1 / 199, abs=0.008)
    assert replaced.sum() / count == pytest.approx(0.1 - 0.1 / 199, abs=0.008)
    random_ids = shown[replaced]
    assert random_ids.min() >= 1 and random_ids.max() < 200  # real ids: never padding, never the mask
    assert torch.equal(inputs[~hidden], ids[~hidden])
    again, hidden_again = hide_tokens(ids, maskable, 0.15, 200, torch.Generator().manual_seed(1), "bert", 1)
    assert torch.equal(again, inputs) and torch.equal(hidden_again, hidden)  # the seed decides everything
    everything, _ = hide_tokens(ids, maskable, 0.15, 200, torch.Generator().manual_seed(1), "mask")
    assert (everything[hidden] == 200).all()
    with pytest.raises(ValueError, match="mask_policy='random' is not known"):
        hide_tokens(ids, maskable, 0.15, 200, generator, "random")


# ------------------------------------------------------------------------------------------ pixels
class _FixedDistribution(torch.nn.Module):
    """A stand-in pixel model: the same next-subpixel distribution everywhere, whatever the input."""

    def __init__(self, probabilities: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", probabilities.log())
        self.seen = []

    def forward(self, input_ids):
        self.seen.append(input_ids.clone())
        return self.logits.expand(*input_ids.shape, -1)


def _images(splits, shape=(2, 3, 3)):
    return ImageSet({name: np.asarray(rows, dtype=np.uint8) for name, rows in splits.items()}, shape, "test images")


def _pixel_config(**settings):
    return load_config(None, {"task": "pathfinder-pixels", "train.objective": "causal", **settings})


def test_bits_per_dimension_on_known_cases():
    """Uniform over the 256 levels is 8 bits per dimension; half the mass on the true level (every image is
    black) is 1 bit; every subpixel is predicted, the first one from the start token."""
    dims = 18
    black = np.zeros((5, dims))
    feed = PixelFeed(_images({"train": black, "val": black, "test": black}), _pixel_config(), _runtime(), "px")
    uniform = torch.cat([torch.full((256,), 1 / 256), torch.zeros(1)])
    assert feed.evaluate(_FixedDistribution(uniform), "test")["bits_per_dim"] == pytest.approx(8.0)
    half = torch.cat([torch.tensor([0.5]), torch.full((255,), 0.5 / 255), torch.zeros(1)])
    model = _FixedDistribution(half)
    result = feed.evaluate(model, "test")
    assert result["bits_per_dim"] == pytest.approx(1.0) and result["count"] == 5 * dims
    first = model.seen[0]
    assert (first[:, 0] == 256).all() and (first[:, 1:] == 0).all()  # the start token, then the image


def test_pixel_batches_are_the_start_token_then_the_image_in_raster_order():
    rows = np.arange(4 * 12).reshape(4, 12) % 256
    feed = PixelFeed(_images({"train": rows, "val": rows, "test": rows}, (2, 2, 3)), _pixel_config(), _runtime(), "px")
    inputs, targets, tokens = feed.next_batch(step=3, micro=0)
    assert tokens == targets.numel()
    assert (inputs["input_ids"][:, 0] == 256).all()
    assert torch.equal(inputs["input_ids"][:, 1:], targets[:, :-1])
    assert all(any(torch.equal(t, torch.as_tensor(r, dtype=torch.long)) for r in rows) for t in targets)
    again = feed.next_batch(step=3, micro=0)[1]
    assert torch.equal(again, targets)  # from (seed, step, micro-batch): exact resume


def _runtime():
    return Runtime(torch.device("cpu"), False, 1, 10_000)


def test_image_positions_name_row_column_and_channel():
    config = EncoderConfig(
        257, dim=8, depth=1, heads=2, mlp_dim=8, max_len=24, positions="image", image_shape=(2, 4, 3)
    )
    model = CausalLM(CausalLMConfig(config))
    positions = model.encoder.image_positions
    index = torch.arange(24)
    expected = torch.stack(
        [positions.row[p // 12] + positions.column[(p // 3) % 4] + positions.channel[p % 3] for p in range(24)]
    )
    torch.testing.assert_close(positions(index), expected)
    with pytest.raises(ValueError, match="positions='image' and image_shape"):
        EncoderConfig_check = EncoderConfig(257, dim=8, heads=2, max_len=24, positions="image")  # noqa: N806
        CausalLM(CausalLMConfig(EncoderConfig_check))
    with pytest.raises(ValueError, match="image_shape width must be"):
        CausalLM(CausalLMConfig(EncoderConfig(257, dim=8, heads=2, positions="image", image_shape=(2, 0, 3))))


@pytest.mark.parametrize("attention", ["full", "diffuser"])
def test_a_pixel_model_decodes_exactly_with_image_positions(attention):
    """Cached decoding equals the full forward pass with image positions (and Diffuser's causal grid)."""
    torch.manual_seed(0)
    options = (
        {"pattern": "grid2d", "side": 4, "channels": 3, "radius": 1, "num_random": 2} if attention != "full" else {}
    )
    config = EncoderConfig(
        257, dim=16, depth=2, heads=2, mlp_dim=16, max_len=48, attention=attention, attention_options=options,
        positions="image", image_shape=(4, 4, 3), causal=True, pad_id=None, dropout=0.0,
    )  # fmt: skip
    model = CausalLM(CausalLMConfig(config)).double().eval()
    ids = torch.randint(0, 257, (2, 37))
    full = model(ids)
    caches = model.encoder.new_caches(2, 37, torch.device("cpu"), torch.float64)
    model.encoder(ids[:, :20], None, caches=caches)
    for position in range(20, 37):
        step = model.head(model.encoder.step(ids[:, position : position + 1], torch.tensor([position] * 2), caches))
        torch.testing.assert_close(step[:, 0], full[:, position], atol=1e-9, rtol=1e-9)


def test_causal_pixel_graph_is_the_earlier_part_of_each_subpixel_neighbourhood():
    side, channels, radius = 5, 3, 1
    n = side * side * channels
    graph = grid2d(n, side=side, channels=channels, radius=radius, causal=True).to_dense().bool()
    for i in range(n):
        for j in range(n):
            (ri, ci), (rj, cj) = divmod(i // channels, side), divmod(j // channels, side)
            near = abs(ri - rj) <= radius and abs(ci - cj) <= radius
            assert bool(graph[i, j]) == (near and j <= i), (i, j)


def test_a_pixel_model_is_causal_in_every_subpixel():
    """Perturbing subpixels after t leaves the logits at and before t unchanged (float64, Diffuser on the grid)."""
    torch.manual_seed(0)
    options = {"pattern": "grid2d", "side": 4, "channels": 3, "radius": 1, "num_random": 2}
    config = EncoderConfig(
        257, dim=16, depth=2, heads=2, mlp_dim=16, max_len=48, attention="diffuser", attention_options=options,
        positions="image", image_shape=(4, 4, 3), causal=True, pad_id=None, dropout=0.0,
    )  # fmt: skip
    model = CausalLM(CausalLMConfig(config)).double().eval()
    ids = torch.randint(0, 257, (1, 48))
    base = model(ids)
    for t in (0, 13, 29, 46):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, 257, (1, 47 - t))
        torch.testing.assert_close(model(changed)[:, : t + 1], base[:, : t + 1], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ end to end
def _tiny(tmp_path, task, **settings):
    overrides = {
        "task": task,
        "data.max_length": 64,
        "model.dim": 32,
        "model.heads": 2,
        "model.mlp_dim": 64,
        "train.steps": 30,
        "train.batch_size": 8,
        "train.eval_every": 50,
        "train.eval_batches": 2,
        "train.progress": False,
        "train.run_dir": str(tmp_path / "run"),
        "optim.warmup_steps": 3,
        "optim.lr": 5e-3,
        **settings,
    }
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    generator = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "hop", "former", "graph", "diffuse"]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("".join(" ".join(generator.choice(words, size=6)) + ".\n" for _ in range(800)))
    return path


def test_a_masked_lm_on_a_corpus_learns_and_reports_bits_per_hidden_byte(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("HOPFORMER_CACHE", str(tmp_path / "cache"))
    lines = []
    settings = {"train.objective": "masked", "train.mask_rate": 0.3, "train.steps": 200, "train.batch_size": 16}
    settings |= {"model.dropout": 0.0}
    result = train(_tiny(tmp_path, f"bytes:{text_file}", **settings), log=lines.append)
    extra = result.extra
    assert extra["test_masked_bits_per_byte"] < extra["unigram_masked_bits_per_byte"] - 0.3, extra
    assert "masked bits per byte" in lines[-1] and "30% of the bytes hidden (bert)" in lines[-1]
    model = from_pretrained(tmp_path / "run" / "last")
    assert isinstance(model, MaskedTokenModel) and model.config.vocab_size == 257  # the bytes and the mask id
    assert model.encoder.config.pad_id is None  # byte 0 is text


def test_word_level_corpus_reports_perplexity(tmp_path, monkeypatch):
    monkeypatch.setenv("HOPFORMER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "wikitext-103"
    folder.mkdir()
    generator = np.random.default_rng(1)
    words = ["the", "a", "graph", "hop", "<unk>", "token", "of", "diffusion"]

    def sentence():  # mostly the next word in the list: a chain a model can learn
        start = generator.integers(len(words))
        return " ".join(words[(start + i + (generator.random() < 0.2)) % len(words)] for i in range(7))

    for split, lines in (("train", 600), ("valid", 80), ("test", 80)):
        (folder / f"wiki.{split}.tokens").write_text("".join(f" {sentence()} \n" for _ in range(lines)))
    log = []
    result = train(_tiny(tmp_path, f"wikitext103:{folder}", **{"train.objective": "causal"}), log=log.append)
    perplexity = result.extra["test_perplexity"]
    assert 1 < perplexity < result.extra["unigram_perplexity"], result.extra
    assert "perplexity" in log[-1] and "words predicted" in log[-1]
    model = from_pretrained(tmp_path / "run" / "last")
    assert model.config.encoder.vocab_size == len(words) + 1  # the words and <eos>


def test_pixel_modeling_runs_end_to_end_in_bits_per_dimension(tmp_path, monkeypatch):
    """An image set (small colour images standing in for the generated Pathfinder set, which is 32 x 32): a
    causal Diffuser on the image grid with image positions learns below the unigram bits per dimension."""
    from hopformer.data import images

    generator = np.random.default_rng(0)
    base = np.linspace(0, 255, 6 * 6 * 3).astype(np.uint8)  # a colour gradient, shifted per image
    rows = np.stack([np.roll(base, 3 * generator.integers(6)) for _ in range(200)])
    small = ImageSet({"train": rows[:160], "val": rows[160:180], "test": rows[180:]}, (6, 6, 3), "gradients")
    calls = []
    monkeypatch.setattr(images, "pathfinder_images", lambda **kwargs: calls.append(kwargs) or small)
    log = []
    settings = {"train.objective": "causal", "model.attention": "diffuser", "model.positions": "image"}
    result = train(_tiny(tmp_path, "pathfinder-pixels", **settings, **{"train.steps": 60}), log=log.append)
    assert calls and calls[0]["resolution"] == 32
    bits = result.extra["test_bits_per_dim"]
    assert bits < result.extra["unigram_bits_per_dim"] - 1.0, result.extra
    assert "bits per dim" in log[-1]
    model = from_pretrained(tmp_path / "run" / "last")
    encoder = model.config.encoder
    assert encoder.max_len == 108 and encoder.vocab_size == 257 and encoder.image_shape == (6, 6, 3)
    options = encoder.attention_options
    assert options["pattern"] == "grid2d" and options["side"] == 6 and options["channels"] == 3


def test_every_corpus_task_name_reaches_its_loader(tmp_path, monkeypatch):
    """``--task NAME:DIR`` for each released layout gives the loader's corpus, with the unit it reports in."""
    from hopformer.train.tasks import load_corpus_task

    monkeypatch.setenv("HOPFORMER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "enwik8").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "text8").write_bytes(b"the quick brown fox jumps over the lazy dog " * 50)
    raw = tmp_path / "wikitext-103-raw"
    raw.mkdir()
    for split in ("train", "valid", "test"):
        (raw / f"wiki.{split}.raw").write_text(f" = {split} = \n some text of the {split} split \n" * 20)
    books = tmp_path / "pg19"
    for split in ("train", "validation", "test"):
        (books / split).mkdir(parents=True)
        (books / split / "1.txt").write_text(f"a book of the {split} split. " * 40)
    expected = {
        f"enwik8:{tmp_path}": "byte",
        f"text8:{tmp_path}": "character",
        f"wikitext103-raw:{raw}": "byte",
        f"pg19:{books}": "byte",
    }
    for task, unit in expected.items():
        corpus = load_corpus_task(load_config(None, {"task": task}), log=lambda *_: None)
        assert corpus.unit == unit and all(len(split) for split in corpus.splits.values()), task
    with pytest.raises(ValueError, match="needs the folder of the released files: --task enwik8:DIR"):
        load_corpus_task(load_config(None, {"task": "enwik8"}))
