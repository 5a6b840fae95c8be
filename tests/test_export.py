"""Export: torch.export of the encoder and the classifier with every attention (the batch dynamic, no guard on the
mask or the lengths), ONNX files that onnxruntime runs with PyTorch's outputs, and clear errors for what cannot be
exported."""

from __future__ import annotations

import pytest
import torch

from hopformer.attention import available
from hopformer.cli import main
from hopformer.models import EncoderConfig, SequenceClassifier, TransformerEncoder
from hopformer.models.export import ONNX_ATOL, ExportError, check_exportable, example_inputs, export, to_onnx

OPTIONS = {
    "full": {},
    "local": {"block_size": 16},
    "longformer": {"block_size": 16},
    "bigbird": {"block_size": 16},
    "hypercube": {"block_size": 16},
    "diffuser": {"block_size": 16, "hops": 3},
    "routing": {"max_seq_len": 96, "local_window": 16, "clusters": 4},
    "combiner": {},
}


def encoder(attention: str, **changes) -> TransformerEncoder:
    settings = dict(vocab_size=50, dim=32, depth=1, heads=2, mlp_dim=48, max_len=97, dropout=0.1)
    torch.manual_seed(0)
    return TransformerEncoder(EncoderConfig(attention=attention, attention_options=OPTIONS[attention], **settings))


@pytest.mark.parametrize("attention", available())
def test_torch_export_runs_the_encoder_and_the_classifier_with_every_attention(attention):
    assert attention in OPTIONS, f"add {attention!r} to OPTIONS"
    models = [SequenceClassifier(encoder(attention), 3, pooling="cls")]  # the classifier runs the encoder inside
    if attention in ("full", "diffuser"):
        models.append(encoder(attention))
    for model in models:
        program = export(model, seq_len=96)  # eval mode, the batch dynamic
        model.eval()
        for batch in (2, 3):  # the traced batch and another; the last row half padding
            inputs = example_inputs(model, 96, batch, seed=batch)
            with torch.no_grad():
                torch.testing.assert_close(program.module()(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["full", "bigbird", "diffuser", "hypercube"])
def test_onnx_export_matches_pytorch_in_onnxruntime(tmp_path, attention):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = encoder(attention)
    result = to_onnx(model, tmp_path / f"{attention}.onnx", seq_len=96)  # checked on a batch of 3 in onnxruntime
    assert result.path.is_file() and result.inputs == ["input_ids", "attention_mask"]
    assert result.max_abs_diff is not None and result.max_abs_diff <= ONNX_ATOL  # float32 on CPU: about 1e-6


def test_what_cannot_be_exported_says_which_attention_and_why():
    model = encoder("diffuser")
    for block in model.blocks:
        block.attention.backend = "triton"  # as a model trained on a GPU might be saved
    with pytest.raises(ExportError, match=r"blocks\.0\.attention \(attention 'diffuser', backend='triton'\).*compiled"):
        check_exportable(model, 96)
    program = export(model, seq_len=96, portable=True)  # the same attention on auto's portable choice
    inputs = example_inputs(model, 96, 2)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*inputs), model.eval()(*inputs), rtol=1e-5, atol=1e-5)


def test_hopformer_export_writes_a_checked_onnx_file(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    SequenceClassifier(encoder("diffuser"), 3).save_pretrained(tmp_path / "model")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "model"), "--out", str(out), "--seq-len", "64"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "onnxruntime matches PyTorch" in printed and "of 64 tokens" in printed
    program = tmp_path / "model.pt2"
    assert main(["export", "--checkpoint", str(tmp_path / "model"), "--format", "program", "--out", str(program)]) == 0
    loaded = torch.export.load(program)
    inputs = example_inputs(SequenceClassifier(encoder("diffuser"), 3), 97, 2)
    assert loaded.module()(*inputs).shape == (2, 3)
