"""hopformer in Hugging Face transformers: the Auto classes load folders either library saved (a training run's
checkpoint included) with identical outputs, transformers.Trainer trains a hopformer model, generate() works, and
RoBERTa / BERT convert exactly (float64) at their length and run at a longer one with every attention."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hopformer.hf as hf  # noqa: E402  (registers the Auto classes)
from hopformer.attention import available  # noqa: E402
from hopformer.cli import main  # noqa: E402
from hopformer.models import EncoderConfig, from_pretrained  # noqa: E402
from hopformer.models.hf_format import ENCODER_DEFAULTS, HEAD_DEFAULTS  # noqa: E402
from hopformer.train import train  # noqa: E402
from hopformer.train.config import load_config  # noqa: E402

AUTO = {
    hf.HopformerModel: transformers.AutoModel,
    hf.HopformerForSequenceClassification: transformers.AutoModelForSequenceClassification,
    hf.HopformerForMaskedLM: transformers.AutoModelForMaskedLM,
    hf.HopformerForCausalLM: transformers.AutoModelForCausalLM,
}
OPTIONS = {  # small settings that run each attention at 64 tokens
    "full": {},
    "local": {"block_size": 8},
    "longformer": {"block_size": 8},
    "bigbird": {"block_size": 8},
    "hypercube": {"block_size": 8},
    "diffuser": {"block_size": 8, "hops": 2},
    "routing": {"max_seq_len": 64, "local_window": 8, "clusters": 4},
    "combiner": {},
}
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v0_1"


def output(result):
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else result.logits


def small_config(attention: str = "full", **changes) -> hf.HopformerConfig:
    settings = dict(vocab_size=40, dim=32, depth=2, heads=2, mlp_dim=48, max_len=64, dropout=0.0)
    return hf.HopformerConfig(attention=attention, attention_options=OPTIONS[attention], **{**settings, **changes})


def batch(seed: int = 0, length: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    return ids, mask


def test_the_auto_classes_know_hopformer_and_the_config_speaks_both_languages():
    config = transformers.AutoConfig.for_model("hopformer", dim=48, depth=3, heads=4, attention="diffuser")
    assert isinstance(config, hf.HopformerConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (48, 3, 4)
    config.max_position_embeddings = 4096
    assert config.encoder_config().max_len == 4096
    fresh = hf.HopformerConfig()  # its defaults are those hopformer's loader fills in for missing keys
    assert {name: getattr(fresh, name) for name in ENCODER_DEFAULTS} == ENCODER_DEFAULTS
    assert {name: getattr(fresh, name) for name in HEAD_DEFAULTS} == HEAD_DEFAULTS
    assert asdict(fresh.encoder_config()) == {**asdict(EncoderConfig(vocab_size=256))}
    for cls, auto in AUTO.items():
        assert type(auto.from_config(small_config())) is cls


@pytest.mark.parametrize("attention", ["full", "diffuser", "routing"])
@pytest.mark.parametrize("cls", list(AUTO), ids=lambda cls: cls.__name__)
def test_save_pretrained_and_auto_from_pretrained_give_identical_outputs(tmp_path, cls, attention):
    extra = {"num_labels": 3, "pooling": "cls"} if cls is hf.HopformerForSequenceClassification else {}
    if cls is hf.HopformerForCausalLM:
        extra = {"positions": "sinusoidal", "pad_id": None}  # a non-persistent buffer and tied weights
    torch.manual_seed(0)
    model = cls(small_config(attention, **extra)).eval()
    ids, mask = batch()
    with torch.no_grad():
        expected = output(model(ids, attention_mask=mask))
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)  # another initialisation: equal outputs come from the loaded weights
    loaded = AUTO[cls].from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    native = from_pretrained(tmp_path).eval()  # hopformer's own loader reads the same folder
    assert (
        type(native).__name__
        == {
            "HopformerModel": "TransformerEncoder",
            "HopformerForSequenceClassification": "SequenceClassifier",
            "HopformerForMaskedLM": "MaskedTokenModel",
            "HopformerForCausalLM": "CausalLM",
        }[cls.__name__]
    )
    with torch.no_grad():
        torch.testing.assert_close(output(loaded(ids, attention_mask=mask)), expected, rtol=0, atol=0)
        torch.testing.assert_close(native(ids, mask), expected, rtol=0, atol=0)
        back = cls.from_hopformer(native).eval()
        torch.testing.assert_close(output(back(ids, attention_mask=mask)), expected, rtol=0, atol=0)


def test_a_training_run_checkpoint_loads_with_the_auto_classes(tmp_path):
    """train -> save (the trainer's checkpoint) -> AutoModel...from_pretrained -> identical logits."""
    data = tmp_path / "data"
    assert main(["data", "listops", "--out", str(data), "--train", "64", "--val", "16", "--test", "16"]) == 0
    overrides = {
        "data.data_dir": str(data),
        "model.attention": "diffuser",
        "model.attention_options": {"hops": 2, "block_size": 16},
        **{f"model.{key}": value for key, value in dict(dim=32, depth=1, heads=2, mlp_dim=48).items()},
        **{f"train.{key}": value for key, value in dict(steps=3, batch_size=8, eval_every=3, progress=False).items()},
        "train.device": "cpu",
        "train.run_dir": str(tmp_path / "run"),
    }
    train(load_config(None, overrides), log=lambda *_: None)
    folder = tmp_path / "run" / "best"
    native = from_pretrained(folder).eval()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    encoder = transformers.AutoModel.from_pretrained(folder).eval()  # a head's folder: its encoder
    ids, mask = batch(length=40)
    ids = ids % (model.config.vocab_size - 1) + 1  # ListOps' vocabulary
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, native(ids, mask), rtol=0, atol=0)
        hidden = encoder(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(hidden, native.encoder(ids, mask), rtol=0, atol=0)
    assert model.config.attention == "diffuser" and model.config.num_labels == 10


def test_a_hopformer_0_1_folder_loads_into_the_transformers_class():
    model = hf.HopformerForSequenceClassification.from_pretrained(FIXTURE / "run" / "best").eval()
    native = from_pretrained(FIXTURE / "run" / "best").eval()
    assert (model.config.pooling, model.config.num_labels, model.config.attention) == ("cls", 10, "diffuser")
    ids = torch.randint(1, 16, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, native(ids), rtol=0, atol=0)


def test_transformers_trainer_trains_a_hopformer_model(tmp_path):
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset

    class Toy(Dataset):  # the label is whether the first token is large: learnable in a few steps
        def __init__(self, count: int) -> None:
            self.ids = torch.randint(1, 40, (count, 32), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            ids = self.ids[i]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": int(ids[0] > 20)}

    torch.manual_seed(0)
    model = hf.HopformerForSequenceClassification(small_config("diffuser", pooling="first", num_labels=2))
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        max_steps=30,
        learning_rate=3e-3,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=Toy(256))
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and logged[-1] < logged[0]
    trainer.save_model(str(tmp_path / "final"))
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    ids = Toy(4).ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["full", "local", "bigbird", "diffuser", "routing", "combiner"])
def test_generate_decodes_with_hopformers_caches_as_the_recomputed_prefix_does(attention):
    """transformers' generate() with its default use_cache=True runs the prompt once and then one new token a
    step against hopformer's caches: the same tokens as recomputing the prefix (use_cache=False), as greedy
    decoding by hand and as hopformer's own generate, and with sampling the same draws."""
    torch.manual_seed(int(torch.randint(1000, ())))
    model = hf.HopformerForCausalLM(small_config(attention, pad_id=None, max_len=64)).double().eval()
    prompt = torch.randint(0, 40, (2, 13))
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)  # fmt: skip
    cached = model.generate(prompt, max_new_tokens=9, do_sample=False)
    assert calls == [13] + [1] * 8  # the prompt once, then each new token alone
    recomputed = model.generate(prompt, max_new_tokens=9, do_sample=False, use_cache=False)
    assert cached.shape == (2, 22) and torch.equal(cached, recomputed)
    native, tokens = model.to_hopformer().eval(), prompt
    with torch.no_grad():
        for _ in range(9):
            tokens = torch.cat([tokens, native(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, tokens)
    assert torch.equal(native.generate(prompt, max_new_tokens=9), tokens)
    beams = [model.generate(prompt, max_new_tokens=5, num_beams=3, use_cache=use) for use in (True, False)]
    assert torch.equal(beams[0], beams[1])  # beam search reorders the caches
    draws = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        draws.append(model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=5, use_cache=use_cache))
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0][:, :13], prompt)


def test_a_cached_forward_gives_the_full_passs_logits_and_refuses_what_it_cannot_take():
    torch.manual_seed(0)
    model = hf.HopformerForCausalLM(small_config("diffuser", pad_id=None, max_len=24)).double().eval()
    ids = torch.randint(0, 40, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :15], use_cache=True)
        assert first.cache is not None and first.cache.get_seq_length() == 15
        torch.testing.assert_close(first.logits, full[:, :15], rtol=0, atol=1e-9)
        swapped = model(ids[:, :15], use_cache=True).cache
        swapped.reorder_cache(torch.tensor([1, 0]))  # beam search: row 0 continues sequence 1
        step = model(ids[[1, 0], 15:16], cache=swapped)
        torch.testing.assert_close(step.logits[:, 0], full[[1, 0], 15], rtol=0, atol=1e-9)
        cache = first.cache
        for t in range(15, 20):
            step = model(ids[:, t : t + 1], cache=cache)
            torch.testing.assert_close(step.logits[:, 0], full[:, t], rtol=0, atol=1e-9)
        padded = torch.ones_like(ids).index_fill(1, torch.tensor([19]), 0)
        assert model(ids, attention_mask=padded, use_cache=True).cache is None  # padded prompts recompute
        assert model(ids, labels=ids, use_cache=True).cache is None  # training calls keep no cache
        with pytest.raises(ValueError, match=r"one new token, shape \(2, 1\)"):
            model(ids[:, :2], cache=cache)
        for _ in range(20, 24):  # up to max_len
            model(ids[:, :1], cache=cache)
        with pytest.raises(ValueError, match="max_len=24"):
            model(ids[:, :1], cache=cache)


def test_token_types_other_than_zero_are_refused():
    model = hf.HopformerModel(small_config())
    ids, _ = batch()
    model(ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="token_type_ids"):
        model(ids, token_type_ids=torch.ones_like(ids))


# ----------------------------------------------------------------------------------------- conversion
SOURCE = dict(
    vocab_size=60,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=66,
    num_labels=3,
)
FAMILIES = {
    "roberta": ("RobertaConfig", ("RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification")),
    "bert": ("BertConfig", ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")),
}


def source_model(family: str, name: str):
    config_class, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, name)(getattr(transformers, config_class)(**SOURCE)).double().eval()
    with torch.no_grad():  # LayerNorms and biases away from their initial 1 and 0, so each copy is checked
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def convert(family: str):
    return hf.convert_roberta if family == "roberta" else hf.convert_bert


@pytest.mark.parametrize("name", ["Model", "ForMaskedLM", "ForSequenceClassification"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_conversion_reproduces_the_original_at_its_length(family, name):
    source = source_model(family, ("Roberta" if family == "roberta" else "Bert") + name)
    converted = convert(family)(source, attention="full").eval()
    expected_class = {"Model": hf.HopformerModel, "ForMaskedLM": hf.HopformerForMaskedLM}.get(
        name, hf.HopformerForSequenceClassification
    )
    assert type(converted) is expected_class
    usable = SOURCE["max_position_embeddings"] - (source.config.pad_token_id + 1 if family == "roberta" else 0)
    assert converted.config.max_len == usable  # RoBERTa's positions start after its padding id
    ids = torch.randint(3, 60, (2, usable), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    ids[1, 40:] = source.config.pad_token_id
    with torch.no_grad():
        original, ours = source(input_ids=ids, attention_mask=mask), converted(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    if name == "ForSequenceClassification":
        torch.testing.assert_close(ours.logits, original.logits, rtol=0, atol=1e-6)
    elif name == "ForMaskedLM":
        torch.testing.assert_close(ours.logits[real], original.logits[real], rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(ours.last_hidden_state[real], original.last_hidden_state[real], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_models_run_long_inputs_with_every_attention(family):
    source = source_model(family, "RobertaModel" if family == "roberta" else "BertModel").float()
    ids = torch.randint(3, 60, (2, 256), generator=torch.Generator().manual_seed(0))
    for attention in available():
        options = {k: v for k, v in OPTIONS[attention].items() if k != "max_seq_len"}
        if attention == "routing":
            options["max_seq_len"] = 256
        model = convert(family)(source, attention=attention, max_length=256, **options).eval()
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state
        assert hidden.shape == (2, 256, 32) and torch.isfinite(hidden).all(), attention
        positions = model.encoder.positions
        usable = len(positions) // 4 if family == "bert" else None
        if usable:  # BERT's 66 learned positions tiled: row t is row t mod 66
            torch.testing.assert_close(positions[66:132], positions[:66], rtol=0, atol=0)


def test_hopformer_convert_writes_the_model_and_the_tokenizer(tmp_path, capsys):
    source = source_model("roberta", "RobertaForMaskedLM")
    source.save_pretrained(tmp_path / "roberta")
    settings = {"model_max_length": 64, "tokenizer_class": "RobertaTokenizer"}
    (tmp_path / "roberta" / "tokenizer_config.json").write_text(json.dumps(settings))
    (tmp_path / "roberta" / "vocab.json").write_text("{}")
    command = ["convert", "--from", str(tmp_path / "roberta"), "--attention", "diffuser", "--max-length", "256"]
    command += ["--attention-option", "block_size=16", "--attention-option", "hops=2", "--out", str(tmp_path / "out")]
    assert main(command) == 0
    assert "HopformerForMaskedLM" in capsys.readouterr().out
    model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out")
    assert (model.config.attention, model.config.max_len) == ("diffuser", 256)
    assert model.config.attention_options == {"block_size": 16, "hops": 2}
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 256
    assert (tmp_path / "out" / "vocab.json").is_file()
    assert main(["convert", "--from", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # no config.json there
