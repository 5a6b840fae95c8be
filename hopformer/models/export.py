"""Export: a model as a ``torch.export`` program or an ONNX file that onnxruntime runs.

Every attention exports on the portable backends. What makes that work:

- a graph, its token mask and gather plan depend on the pattern and the length only; they are built eagerly while
  ``torch.export`` traces (:func:`hopformer.ops.common.eager_constants`) and become constants of the program;
- the padding mask takes no data-dependent branch while exporting (an all-real mask is passed on, not dropped);
- ``backend="auto"`` picks among the exportable backends under export (:class:`hopformer.ops.backend.Support`'s
  ``exportable``), by length alone: ``matrix`` for diffusion up to 512 tokens (the attention materialised once,
  each hop a product), ``gather`` otherwise (block tiles: memory ``O(seq x keys)``), whatever device exports;
- nothing depends on the batch size (head chunks), so the batch is a dynamic dimension of the program.

The sequence length is fixed in the program (the graph is a constant): pad inputs to it and mark the padding in
``attention_mask``. A layer whose named backend cannot be traced (``flex``, ``triton``: compiled kernels) makes
:func:`check_exportable` raise an :class:`ExportError` naming the layer, its attention and the reason;
``portable=True`` (the ``hopformer export`` default) sets such layers to ``auto`` first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hopformer.models.pretrained import PretrainedModel

ONNX_ATOL = 1e-4
"""Largest absolute difference between onnxruntime's and PyTorch's outputs (float32, CPU) :func:`to_onnx` accepts;
measured differences are around 1e-6."""


class ExportError(ValueError):
    """A model that cannot be exported: the message names each attention layer at fault and the reason."""


def check_exportable(model: nn.Module, seq_len: int | None = None) -> None:
    """Raise :class:`ExportError` if an attention layer of ``model`` cannot be exported (its backend has no
    exportable implementation for it), naming the layer, the attention and the reason."""
    from hopformer.attention.base import AttentionModule
    from hopformer.attention.registry import name_of
    from hopformer.ops import dispatch

    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, AttentionModule) or module.op is None:
            continue
        request = module.request(seq_len).replace(exporting=True, device=None, batch=None)
        verdict = dispatch.explain_request(request, module.backend)
        if verdict.chosen is None:
            problems.append(
                f"{name} (attention {name_of(module)!r}, backend={module.backend!r}) cannot be exported: {verdict.why}"
            )
    if problems:
        hint = "; set the backend to 'auto' (hopformer.attention.use_portable_backends(model), or portable=True)"
        raise ExportError("; ".join(problems) + hint)


def _hopformer_model(model: nn.Module) -> PretrainedModel:
    to_hopformer = getattr(model, "to_hopformer", None)  # a hopformer.hf model: its hopformer twin
    model = to_hopformer() if callable(to_hopformer) else model
    if not isinstance(model, PretrainedModel):
        raise TypeError(f"export takes a hopformer model (or a hopformer.hf one), got {type(model).__name__}")
    return model


def input_names(model: PretrainedModel) -> list[str]:
    """The inputs of the exported program: ids and mask (twice for the dual encoder)."""
    names = ["input_ids", "attention_mask"]
    return names + ["input_ids_2", "attention_mask_2"] if model.model_type == "dual_encoder_classifier" else names


def default_length(model: PretrainedModel) -> int:
    """The longest input the model takes (its encoder's ``max_len``, less a CLS vector)."""
    encoder = model if model.model_type == "transformer_encoder" else model.encoder
    return encoder.config.max_len - (1 if getattr(model, "pooling", None) == "cls" else 0)


def example_inputs(
    model: PretrainedModel, seq_len: int, batch: int = 2, seed: int = 0, padded: bool = True
) -> tuple[torch.Tensor, ...]:
    """Random ids (never the padding id) and masks for ``model``; with ``padded`` the last row's second half is
    padding."""
    encoder = model if model.model_type == "transformer_encoder" else model.encoder
    config = encoder.config
    generator = torch.Generator().manual_seed(seed)
    low = 1 if config.pad_id == 0 else 0
    inputs = []
    for _ in range(len(input_names(model)) // 2):
        ids = torch.randint(low, config.vocab_size, (batch, seq_len), generator=generator)
        if config.pad_id not in (None, 0):
            ids = torch.where(ids == config.pad_id, (config.pad_id + 1) % config.vocab_size, ids)
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        if padded and batch > 1:
            mask[-1, seq_len // 2 :] = 0
        inputs += [ids, mask]
    device = next(model.parameters()).device
    return tuple(x.to(device) for x in inputs)


def _prepare(model: nn.Module, seq_len: int | None, portable: bool) -> tuple[PretrainedModel, int]:
    from hopformer.attention import use_portable_backends

    model = _hopformer_model(model).eval()
    if portable:
        use_portable_backends(model, exporting=True)
    seq_len = default_length(model) if seq_len is None else seq_len
    check_exportable(model, seq_len)
    return model, seq_len


def _dynamic_shapes(names: list[str], dynamic_batch: bool) -> tuple | None:
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in names)


def export(
    model: nn.Module,
    seq_len: int | None = None,
    batch: int = 2,
    dynamic_batch: bool = True,
    portable: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (in eval mode) on inputs of ``seq_len`` tokens (default: the longest
    it takes), the batch dynamic (``dynamic_batch``; an example batch of at least 2). Raises :class:`ExportError`
    for attention layers that cannot be exported (``portable=True`` sets CUDA-only backends to ``auto`` first)."""
    model, seq_len = _prepare(model, seq_len, portable)
    names = input_names(model)
    inputs = example_inputs(model, seq_len, max(batch, 2))
    try:
        with torch.no_grad():
            return torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(names, dynamic_batch))
    except Exception as error:  # say which model failed, keep torch's explanation
        raise ExportError(f"torch.export failed on {_describe(model)}: {error}") from error


@dataclass
class OnnxExport:
    """What :func:`to_onnx` wrote and how onnxruntime's outputs compared with PyTorch's."""

    path: Path
    seq_len: int
    inputs: list[str]
    outputs: list[str]
    max_abs_diff: float | None  # None: not checked (onnxruntime not installed, or check=False)


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    seq_len: int | None = None,
    batch: int = 2,
    dynamic_batch: bool = True,
    portable: bool = False,
    check: bool = True,
    atol: float = ONNX_ATOL,
) -> OnnxExport:
    """Write ``model`` as an ONNX file (``torch.onnx.export(..., dynamo=True)``) taking ``seq_len`` tokens and any
    batch size. With ``check`` (and onnxruntime installed), run it on CPU on fresh inputs (one row half padding,
    a batch other than the traced one) and raise :class:`ExportError` if any output differs from PyTorch's by more
    than ``atol``."""
    model, seq_len = _prepare(model, seq_len, portable)
    names = input_names(model)
    outputs = ["hidden_states" if model.model_type == "transformer_encoder" else "logits"]
    inputs = example_inputs(model, seq_len, max(batch, 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model,
                inputs,
                dynamo=True,
                input_names=names,
                output_names=outputs,
                dynamic_shapes=_dynamic_shapes(names, dynamic_batch),
            )
    except Exception as error:
        raise ExportError(f"ONNX export failed on {_describe(model)}: {error}") from error
    program.save(str(path))
    difference = None
    if check:
        difference = onnx_difference(model, path, seq_len, batch=3 if dynamic_batch else max(batch, 2))
        if difference is not None and not difference <= atol:
            raise ExportError(
                f"onnxruntime's outputs of {path} differ from PyTorch's by {difference:.3g} (> atol={atol:g})"
            )
    return OnnxExport(path, seq_len, names, outputs, difference)


def onnx_difference(model: PretrainedModel, path: str | os.PathLike, seq_len: int, batch: int = 3) -> float | None:
    """Largest absolute difference between onnxruntime (CPU) and PyTorch on fresh inputs; None without
    onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    inputs = example_inputs(model, seq_len, batch, seed=1)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: x.cpu().numpy() for name, x in zip(input_names(model), inputs)}
    (got,) = session.run(None, feed)
    with torch.no_grad():
        expected = model(*inputs).float().cpu().numpy()
    return float(abs(got - expected).max())


def _describe(model: PretrainedModel) -> str:
    encoder = model if model.model_type == "transformer_encoder" else model.encoder
    config = encoder.config
    return f"a {type(model).__name__} on {config.attention!r} attention {config.attention_options}"


__all__ = ["ExportError", "OnnxExport", "check_exportable", "example_inputs", "export", "to_onnx"]
