"""``hopformer convert``: a pretrained RoBERTa or BERT folder as a long-sequence hopformer model on any attention.

    hopformer convert --from roberta-base/ --attention diffuser --max-length 4096 --out roberta-diffuser-4k/
    hopformer convert --from bert-base-uncased/ --attention bigbird --max-length 4096 --attention-option block_size=64

``--from`` is a local ``transformers`` folder (``config.json``, weights, tokenizer files); its family is read from
``config.json`` (``--family`` overrides). The output folder holds the hopformer model in ``transformers``' format
(``AutoModel.from_pretrained`` and ``hopformer.models.from_pretrained`` both load it) and the original's tokenizer
files with the new length. Needs the ``hf`` extra (``pip install "hopformer[hf]"``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hopformer convert``."""
    parser.add_argument("--from", dest="source", required=True, metavar="DIR", help="a RoBERTa or BERT model folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the converted model is written")
    parser.add_argument("--attention", default="full", help="attention name (hopformer.attention.available())")
    parser.add_argument("--max-length", type=int, help="tokens the converted model takes (default: the original's)")
    parser.add_argument(
        "--attention-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an attention keyword argument, value parsed as YAML (repeatable), e.g. hops=3",
    )
    parser.add_argument("--family", choices=("auto", "roberta", "bert"), default="auto", help="default: from config")


def run(args: argparse.Namespace) -> int:
    """Convert, save, print where and what."""
    try:
        import hopformer.hf as hf
    except ImportError as error:
        print(f"hopformer convert needs the hf extra (pip install 'hopformer[hf]'): {error}", file=sys.stderr)
        return 2
    from hopformer.hf.convert import BERT_TYPES, ROBERTA_TYPES, save_converted
    from hopformer.train.config import parse_assignment

    source = Path(args.source).expanduser()
    if not (source / "config.json").is_file():
        print(f"hopformer convert: --from {source} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    family = args.family
    if family == "auto":
        model_type = json.loads((source / "config.json").read_text()).get("model_type")
        family = "roberta" if model_type in ROBERTA_TYPES else "bert" if model_type in BERT_TYPES else None
        if family is None:
            print(f"hopformer convert: model_type={model_type!r} is neither RoBERTa nor BERT", file=sys.stderr)
            return 2
    options = dict(parse_assignment(text) for text in args.attention_option)
    convert = hf.convert_roberta if family == "roberta" else hf.convert_bert
    model = convert(source, attention=args.attention, max_length=args.max_length, **options)
    out = save_converted(model, args.out, tokenizer_from=source)
    config = model.config
    print(
        f"{type(model).__name__}: {family} from {source}, {config.attention} attention {config.attention_options}, "
        f"up to {config.max_len} tokens; saved to {out}"
    )
    return 0
