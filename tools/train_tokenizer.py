#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer offline; writes `<output-prefix>.model` and `.vocab`.

Deterministic: the same text and arguments give a byte-identical model. Byte fallback makes
decode(encode(text)) == text for any text.

    # 8000 pieces on the Wikipedia sample shipped with gensim (~5 s, mostly parsing the dump)
    python tools/train_tokenizer.py --output-prefix data/sp8k

    # on your own text: JSON Lines or plain text files
    python tools/train_tokenizer.py --input corpus.jsonl --json-key text \\
        --output-prefix data/sp32k --vocab-size 32000

Then: python tools/preprocess_data.py --tokenizer sentencepiece --tokenizer-model data/sp8k.model \\
        --output-prefix data/wiki-sp8k
"""

from __future__ import annotations

import argparse
import sys
import warnings
import time

from inrank_megatron.data.corpus import DOCUMENT_BOUNDARIES
from inrank_megatron.data.train_tokenizer import DEFAULT_VOCAB_SIZE, train_sentencepiece


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="Text or JSON Lines (.jsonl/.json) files. Default: the Wikipedia sample that ships "
        "with gensim.",
    )
    parser.add_argument("--output-prefix", required=True, help="Writes PREFIX.model, PREFIX.vocab.")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="Pieces, including <unk> <s> </s> and 256 byte pieces "
        f"(default {DEFAULT_VOCAB_SIZE}).",
    )
    parser.add_argument("--json-key", default="text", help="JSON Lines field holding the text.")
    parser.add_argument(
        "--document-boundary",
        choices=DOCUMENT_BOUNDARIES,
        default="blank-line",
        help="Plain-text files: a document per blank-line-separated block, or per file.",
    )
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="Fraction of characters given their own piece; the rest fall back to bytes.",
    )
    parser.add_argument("--seed", type=int, default=0, help="SentencePiece random seed.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing model.")
    parser.add_argument("--verbose", action="store_true", help="Show SentencePiece's log.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Importing megatron.core warns that TE/apex are absent; nothing here needs them.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    start = time.perf_counter()
    try:
        model_path = train_sentencepiece(
            args.output_prefix,
            inputs=args.input,
            vocab_size=args.vocab_size,
            json_key=args.json_key,
            document_boundary=args.document_boundary,
            character_coverage=args.character_coverage,
            seed=args.seed,
            overwrite=args.overwrite,
            verbose=args.verbose,
        )
    except ValueError as error:
        print(f"train_tokenizer.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {model_path} ({args.vocab_size} pieces) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
