"""A pretrained RoBERTa or BERT as a long-sequence hopformer model on any attention, as Longformer was made.

:func:`convert_roberta` and :func:`convert_bert` take a ``transformers`` model object or a local folder and return
the hopformer model holding the same weights: ``HopformerModel`` for a base model (its output has
``last_hidden_state``), ``HopformerForMaskedLM`` for a masked-LM model, ``HopformerForSequenceClassification`` for
a sequence classifier (any other head is left behind and the encoder converted). What is copied, exactly:

- token embeddings; the position embeddings, extended to ``max_length`` by tiling the pretrained ones (Longformer's
  initialisation; RoBERTa's first real position is ``padding_idx + 1``, so its table is read from there); the
  embedding of token type 0, added into every position (hopformer has no token types: inputs of other types are
  refused); the embedding LayerNorm;
- every layer, post-norm as the original: the separate query, key and value projections into hopformer's fused
  ``qkv`` (rows ``[q; k; v]``), the attention output, both LayerNorms (the original's epsilon), the GELU MLP;
- the heads: RoBERTa's classification head and BERT's pooler + classifier (a dense layer and tanh on the first
  token: ``pooling="first"``, ``head_activation="tanh"``); the masked-LM heads (dense, GELU, LayerNorm, output
  layer with its bias; the output layer's weight is copied, not tied).

With ``attention="full"`` at the original length the converted model computes what the original computes (the
test checks hidden states and logits in float64). Attention dropout is not carried over by default: the fast
sparse kernels have none (pass ``attention_dropout=`` to keep it where the backend allows). The tokenizer is the
original's: ``hopformer convert`` copies its files next to the model, with the new length.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hopformer.hf.configuration import HopformerConfig
from hopformer.hf.modeling import (
    HopformerForMaskedLM,
    HopformerForSequenceClassification,
    HopformerModel,
    HopformerPreTrainedModel,
)

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
BERT_TYPES = ("bert",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "added_tokens.json",
)


def convert_roberta(
    model_or_path: Any, attention: str = "full", max_length: int | None = None, **attention_options: Any
) -> HopformerPreTrainedModel:
    """A RoBERTa (or XLM-R, CamemBERT) model, a ``transformers`` object or a local folder, as a hopformer model
    on ``attention`` taking up to ``max_length`` tokens (default: the original's 512 - 2 = 510 for RoBERTa).

    ``attention_options`` are the attention's options (``hops``, ``block_size``...), and also the encoder's
    ``dropout`` (default the original's hidden dropout) and ``attention_dropout`` (default 0). Returns
    ``HopformerModel``, ``HopformerForMaskedLM`` or ``HopformerForSequenceClassification`` by the source's class.
    """
    return _convert(model_or_path, ROBERTA_TYPES, attention, max_length, attention_options)


def convert_bert(
    model_or_path: Any, attention: str = "full", max_length: int | None = None, **attention_options: Any
) -> HopformerPreTrainedModel:
    """A BERT model as a hopformer model, as :func:`convert_roberta` does (BERT's positions start at 0). The
    pooler of a bare ``BertModel`` is not converted (``last_hidden_state`` is); a classifier's is its head."""
    return _convert(model_or_path, BERT_TYPES, attention, max_length, attention_options)


def load_source(model_or_path: Any) -> Any:
    """The ``transformers`` model of a local folder (its class from ``config.json``'s ``architectures``), or the
    model itself."""
    import transformers

    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a transformers model folder (it has no config.json)")
        config = transformers.AutoConfig.from_pretrained(path)
        for name in config.architectures or []:
            cls = getattr(transformers, name, None)
            if cls is not None:
                return cls.from_pretrained(path)
        return transformers.AutoModel.from_pretrained(path)
    if not isinstance(model_or_path, transformers.PreTrainedModel):
        raise TypeError(f"model_or_path must be a transformers model or a folder, got {type(model_or_path).__name__}")
    return model_or_path


def _convert(
    model_or_path: Any, families: tuple[str, ...], attention: str, max_length: int | None, options: dict[str, Any]
) -> HopformerPreTrainedModel:
    source = load_source(model_or_path)
    config = source.config
    name = "convert_roberta" if families is ROBERTA_TYPES else "convert_bert"
    if config.model_type not in families:
        raise ValueError(f"{name} converts {' / '.join(families)} models, got model_type={config.model_type!r}")
    _check_source(config)
    offset = config.pad_token_id + 1 if families is ROBERTA_TYPES else 0  # RoBERTa's first real position
    usable = config.max_position_embeddings - offset
    max_length = usable if max_length is None else max_length
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    dropout = options.pop("dropout", config.hidden_dropout_prob)
    attention_dropout = options.pop("attention_dropout", 0.0)

    task = _task(source)
    settings = dict(
        vocab_size=config.vocab_size,
        dim=config.hidden_size,
        depth=config.num_hidden_layers,
        heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size,
        max_len=max_length,
        attention=attention,
        attention_options=options,
        norm="post",
        positions="learned",
        dropout=float(dropout),
        attention_dropout=float(attention_dropout),
        pad_id=config.pad_token_id,
        layer_norm_eps=config.layer_norm_eps,
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
    )
    if task == "classify":
        settings.update(pooling="first", head_dim=config.hidden_size, head_activation="tanh")
        settings.update(id2label=dict(config.id2label), label2id=dict(config.label2id))
        settings.update(problem_type=config.problem_type)
        target_class: type[HopformerPreTrainedModel] = HopformerForSequenceClassification
    elif task == "masked":
        settings.update(mlm_transform=True)
        target_class = HopformerForMaskedLM
    else:
        target_class = HopformerModel
    target = target_class(HopformerConfig(**settings))
    base = getattr(source, source.base_model_prefix, source)
    dtype = next(source.parameters()).dtype
    target.to(dtype)
    with torch.no_grad():
        _copy_encoder(base, target.encoder, offset, usable, max_length)
        if task == "classify":
            _copy_classifier(source, target, families)
        elif task == "masked":
            _copy_masked_head(source, target, families)
    return target.to(next(source.parameters()).device)


def _check_source(config: Any) -> None:
    if getattr(config, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act={config.hidden_act!r}: hopformer's MLP is the exact GELU ('gelu') only")
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise ValueError(f"position_embedding_type={kind!r}: only absolute position embeddings convert")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("a decoder (is_decoder / add_cross_attention) does not convert: encoders only")


def _task(source: Any) -> str:
    name = type(source).__name__
    if name.endswith("ForSequenceClassification"):
        return "classify"
    if name.endswith("ForMaskedLM"):
        return "masked"
    return "encoder"


def _copy(target: nn.Module, source: nn.Module) -> None:
    target.weight.copy_(source.weight)
    if getattr(target, "bias", None) is not None:
        target.bias.copy_(source.bias)


def _copy_encoder(base: nn.Module, encoder: nn.Module, offset: int, usable: int, max_length: int) -> None:
    embeddings = base.embeddings
    encoder.embed.weight.copy_(embeddings.word_embeddings.weight)
    table = embeddings.position_embeddings.weight[offset : offset + usable]
    types = getattr(embeddings, "token_type_embeddings", None)
    if types is not None:  # token type 0, which every input of a single segment has
        table = table + types.weight[0]
    repeats = -(-max_length // usable)
    encoder.positions.copy_(table.repeat(repeats, 1)[:max_length])  # tiled, as Longformer extended RoBERTa
    _copy(encoder.embed_norm, embeddings.LayerNorm)
    for block, layer in zip(encoder.blocks, base.encoder.layer, strict=True):
        attention = layer.attention.self
        block.attention.qkv.weight.copy_(
            torch.cat([attention.query.weight, attention.key.weight, attention.value.weight])
        )
        block.attention.qkv.bias.copy_(torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]))
        _copy(block.attention.out, layer.attention.output.dense)
        _copy(block.norm1, layer.attention.output.LayerNorm)
        _copy(block.mlp[0], layer.intermediate.dense)
        _copy(block.mlp[2], layer.output.dense)
        _copy(block.norm2, layer.output.LayerNorm)


def _copy_classifier(source: Any, target: HopformerForSequenceClassification, families: tuple[str, ...]) -> None:
    if families is ROBERTA_TYPES:  # classifier.dense -> tanh -> classifier.out_proj on <s>
        _copy(target.head[0], source.classifier.dense)
        _copy(target.head[2], source.classifier.out_proj)
    else:  # the pooler (dense, tanh on [CLS]) -> classifier
        pooler = getattr(source.bert, "pooler", None)
        if pooler is None:
            raise ValueError("this BertForSequenceClassification has no pooler to convert")
        _copy(target.head[0], pooler.dense)
        _copy(target.head[2], source.classifier)


def _copy_masked_head(source: Any, target: HopformerForMaskedLM, families: tuple[str, ...]) -> None:
    if families is ROBERTA_TYPES:
        head = source.lm_head
        dense, norm, decoder, bias = head.dense, head.layer_norm, head.decoder, head.bias
    else:
        predictions = source.cls.predictions
        dense, norm, decoder = predictions.transform.dense, predictions.transform.LayerNorm, predictions.decoder
        bias = predictions.bias
        if getattr(source.config, "hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act={source.config.hidden_act!r}: the MLM head's activation must be 'gelu'")
    _copy(target.head[0], dense)
    _copy(target.head[2], norm)
    target.head[3].weight.copy_(decoder.weight)
    target.head[3].bias.copy_(bias)


def save_converted(
    model: HopformerPreTrainedModel, out: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None
) -> Path:
    """Save a converted model to ``out`` (``save_pretrained``) with the tokenizer files of ``tokenizer_from`` (the
    original's folder, if it has them), their ``model_max_length`` set to the model's new length."""
    import json

    out = Path(out)
    model.save_pretrained(out)
    if tokenizer_from is None:
        return out
    source = Path(tokenizer_from).expanduser()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            data = (source / name).read_bytes()
            if name == "tokenizer_config.json":
                settings = json.loads(data)
                settings["model_max_length"] = model.config.max_len
                data = (json.dumps(settings, indent=2) + "\n").encode()
            (out / name).write_bytes(data)
    return out
