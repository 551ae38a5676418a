#!/usr/bin/env python
"""Tokenize text into a Megatron-Core indexed dataset, offline.

Writes `<output-prefix>_<json-key>_document.bin/.idx` (one sequence per document, eod appended)
and `<output-prefix>.tokenizer.json` (the tokenizer's description, checked again at training
time). Train on the prefix `<output-prefix>_text_document` (`data.prefix`).

    # the Wikipedia sample shipped with gensim, GPT-2 BPE
    python tools/preprocess_data.py --output-prefix data/wiki-gpt2 --tokenizer gpt2

    # the same with a SentencePiece model from tools/train_tokenizer.py
    python tools/preprocess_data.py --output-prefix data/wiki-sp8k \\
        --tokenizer sentencepiece --tokenizer-model data/sp8k.model

    # your own text: JSON Lines (Megatron's format) or plain text, documents split at blank lines
    python tools/preprocess_data.py --input corpus.jsonl --json-key text \\
        --output-prefix data/mine --tokenizer gpt2
    python tools/preprocess_data.py --input a.txt b.txt --document-boundary file \\
        --output-prefix data/books --tokenizer gpt2
"""

from __future__ import annotations

import time

IMPORTED = time.perf_counter()  # run as a script: the report covers imports, tokenizer and writing

import argparse  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from inrank_megatron.config import DataSection
from inrank_megatron.data.corpus import DOCUMENT_BOUNDARIES
from inrank_megatron.data.datasets import split_problems
from inrank_megatron.data.preprocess import check_preprocess_args, preprocess
from inrank_megatron.data.tokenizers import TOKENIZER_KINDS, build_tokenizer


DEFAULT_SPLIT = DataSection().split  # what training splits by unless data.split says otherwise


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="Text or JSON Lines (.jsonl/.json) files. Default: the Wikipedia sample that ships "
        "with gensim (106 articles).",
    )
    parser.add_argument("--output-prefix", required=True, help="Output path prefix.")
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="{" + ",".join(TOKENIZER_KINDS) + "}",
        help="Tokenizer kind.",
    )
    parser.add_argument(
        "--tokenizer-model", metavar="PATH.model", help="SentencePiece model (sentencepiece only)."
    )
    parser.add_argument(
        "--json-key",
        default="text",
        help="JSON Lines field holding the text; also names the output (default: text).",
    )
    parser.add_argument(
        "--document-boundary",
        choices=DOCUMENT_BOUNDARIES,
        default="blank-line",
        help="Plain-text files: a document per blank-line-separated block, or per file.",
    )
    parser.add_argument("--limit", type=int, help="Tokenize at most this many documents.")
    parser.add_argument(
        "--shuffle-seed",
        type=int,
        metavar="SEED",
        help="Write the documents in a random order from this seed (default: input order). "
        "data.split takes train/valid/test from consecutive documents: shuffle a corpus that "
        "is ordered (by topic, by source) so that each split gets a mix.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing dataset.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    start = IMPORTED if __name__ == "__main__" else time.perf_counter()
    args = parse_args(argv)
    # Importing megatron.core warns that TE/apex are absent; nothing here needs them.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    options = dict(
        inputs=args.input,
        json_key=args.json_key,
        document_boundary=args.document_boundary,
        limit=args.limit,
        overwrite=args.overwrite,
        shuffle_seed=args.shuffle_seed,
    )
    try:
        # Fail on a bad path or flag before the tokenizer loads (GPT-2 BPE takes ~2 s).
        check_preprocess_args(args.output_prefix, **options)
        tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_model)
        result = preprocess(args.output_prefix, tokenizer=tokenizer, **options)
    except ValueError as error:
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.data_prefix}.bin/.idx and {result.description_path}: "
        f"{result.documents} documents, {result.characters} characters, {result.tokens} tokens "
        f"(eod included, {tokenizer.name}, {result.dtype}) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    errors, warnings_ = split_problems(DEFAULT_SPLIT, result.documents)
    for problem in errors + warnings_:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
