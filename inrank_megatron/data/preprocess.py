"""Tokenize a corpus into a Megatron-Core indexed dataset (`tools/preprocess_data.py` wraps this).

Output, for `output_prefix=data/wiki` and the default `json_key="text"` (Megatron-LM's
`tools/preprocess_data.py` names its outputs the same way):

    data/wiki_text_document.bin    token ids, one sequence per document, eod appended
    data/wiki_text_document.idx    sequence lengths and offsets (megatron.core IndexedDataset)
    data/wiki.tokenizer.json       the tokenizer's describe() and the dataset's statistics

`data/wiki_text_document` is the prefix to train on (`data.prefix`); `build_gpt_datasets` checks it
against `data/wiki.tokenizer.json`.

Files are written under temporary names and renamed when complete, the `.idx` last: an
interrupted run leaves no `.idx`, so no dataset that looks complete (`IndexedDataset.exists`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import random
import time
from typing import Sequence

import numpy

from inrank_megatron.data.corpus import DOCUMENT_BOUNDARIES, check_inputs, corpus_documents
from inrank_megatron.data.corpus import iter_documents
from inrank_megatron.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

DESCRIPTION_SUFFIX = ".tokenizer.json"
DESCRIPTION_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class PreprocessResult:
    """What `preprocess` wrote.

    Attributes:
        data_prefix: The indexed dataset prefix (`<output_prefix>_<json_key>_document`).
        description_path: The `<output_prefix>.tokenizer.json` file.
        documents: Number of documents (= sequences).
        tokens: Number of tokens written, eod included.
        characters: Number of characters of text read.
        max_token_id: The largest id written.
        dtype: The numpy dtype of the ids in the `.bin` file.
        seconds: Wall time of the whole run.
    """

    data_prefix: str
    description_path: str
    documents: int
    tokens: int
    characters: int
    max_token_id: int
    dtype: str
    seconds: float


def data_prefix_for(output_prefix: str, json_key: str = "text") -> str:
    """The indexed-dataset prefix written for `output_prefix` (Megatron-LM's naming)."""
    return f"{output_prefix}_{json_key}_document"


def description_path_for(output_prefix: str) -> str:
    """The tokenizer description written next to the data for `output_prefix`."""
    return output_prefix + DESCRIPTION_SUFFIX


def check_preprocess_args(
    output_prefix: str,
    *,
    inputs: Sequence[str] | None = None,
    json_key: str = "text",
    document_boundary: str = "blank-line",
    limit: int | None = None,
    overwrite: bool = False,
    shuffle_seed: int | None = None,
) -> dict[str, str]:
    """Checks `preprocess`'s arguments (other than the tokenizer) without reading any text.

    Returns:
        The final output paths: {"bin": ..., "idx": ..., "json": ...}.

    Raises:
        ValueError: Naming the bad argument by its command-line flag.
    """
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    check_inputs(inputs)
    if document_boundary not in DOCUMENT_BOUNDARIES:
        raise ValueError(
            f"--document-boundary must be one of {', '.join(DOCUMENT_BOUNDARIES)}, "
            f"got {document_boundary!r}"
        )
    if not json_key or "/" in json_key:
        raise ValueError(f"--json-key must be a non-empty field name, got {json_key!r}")
    if shuffle_seed is not None and (isinstance(shuffle_seed, bool)
                                     or not isinstance(shuffle_seed, int) or shuffle_seed < 0):
        raise ValueError(f"--shuffle-seed must be a non-negative integer, got {shuffle_seed!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be a positive integer, got {limit!r}")
    directory = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(directory):
        raise ValueError(f"--output-prefix: directory {directory!r} does not exist")
    data_prefix = data_prefix_for(output_prefix, json_key)
    final_paths = {
        "bin": get_bin_path(data_prefix),
        "idx": get_idx_path(data_prefix),
        "json": description_path_for(output_prefix),
    }
    existing = [path for path in final_paths.values() if os.path.exists(path)]
    if existing and not overwrite:
        raise ValueError(
            f"--output-prefix {output_prefix!r}: {', '.join(existing)} exist; "
            "pass --overwrite to replace them"
        )
    return final_paths


def preprocess(
    output_prefix: str,
    *,
    tokenizer: Tokenizer,
    inputs: Sequence[str] | None = None,
    json_key: str = "text",
    document_boundary: str = "blank-line",
    limit: int | None = None,
    overwrite: bool = False,
    corpus: str | None = None,
    shuffle_seed: int | None = None,
) -> PreprocessResult:
    """Tokenizes documents into `<output_prefix>_<json_key>_document.bin/.idx`.

    Each document becomes one sequence: its ids followed by `tokenizer.eod`. The ids are stored
    as `DType.optimal_dtype(tokenizer.vocab_size)` (uint16 below 65500 ids, else int32), the
    choice Megatron-LM's `tools/preprocess_data.py` makes.

    Every argument is checked before anything is read or written.

    Args:
        output_prefix: Output path prefix; its directory must exist.
        tokenizer: The tokenizer (see `tokenizers.build_tokenizer`).
        inputs: Text / JSON Lines files (see `corpus.iter_documents`); None: the Wikipedia sample.
        json_key: The JSON Lines field holding the text; also names the output.
        document_boundary: How plain-text files split into documents ("blank-line" or "file").
        limit: Tokenize at most this many documents (None: all).
        overwrite: Replace an existing dataset at this prefix.
        corpus: A built-in corpus instead of ``inputs`` (``corpus.corpus_documents``: "wiki",
            "wiki+books").
        shuffle_seed: Write the documents in a random order drawn from this seed (None: input
            order). Megatron's `data.split` takes train, valid and test from consecutive
            documents, so a corpus in some order (by topic, by source) needs this to give each
            split a mix. The documents are held in memory to shuffle them.

    Returns:
        What was written and how long it took.

    Raises:
        ValueError: A bad argument (the message names it) or an empty corpus.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path
    from megatron.core.datasets.indexed_dataset import get_idx_path

    start = time.perf_counter()
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"tokenizer must be a Tokenizer (--tokenizer), got {tokenizer!r}")
    final_paths = check_preprocess_args(
        output_prefix,
        inputs=inputs,
        json_key=json_key,
        document_boundary=document_boundary,
        limit=limit,
        overwrite=overwrite,
        shuffle_seed=shuffle_seed,
    )
    data_prefix = data_prefix_for(output_prefix, json_key)

    if corpus is not None and inputs:
        raise ValueError("give inputs or a built-in corpus, not both")
    if corpus is not None:
        documents = itertools.islice(corpus_documents(corpus), limit)
    else:
        documents = iter_documents(
            inputs, json_key=json_key, document_boundary=document_boundary, limit=limit
        )
    if shuffle_seed is not None:
        documents = list(documents)
        random.Random(shuffle_seed).shuffle(documents)
        documents = iter(documents)
    first = next(documents, None)
    if first is None:
        raise ValueError(f"--input: no non-empty documents in {list(inputs or ['(wiki sample)'])}")

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    if tokenizer.vocab_size - 1 > numpy.iinfo(dtype).max:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit {dtype.__name__}")
    temporary_prefix = f"{data_prefix}.tmp-{os.getpid()}"
    temporary_paths = {
        "bin": get_bin_path(temporary_prefix),
        "idx": get_idx_path(temporary_prefix),
        "json": f"{final_paths['json']}.tmp-{os.getpid()}",
    }
    num_documents = num_tokens = num_characters = 0
    max_token_id = -1
    builder = None
    try:
        builder = IndexedDatasetBuilder(temporary_paths["bin"], dtype=dtype)
        for document in itertools.chain([first], documents):
            ids = tokenizer.encode(document)
            ids.append(tokenizer.eod)
            max_token_id = max(max_token_id, max(ids))
            # One "sentence" per document, as Megatron-LM's preprocess_data without
            # --split-sentences: add_document appends the ids and closes the document.
            builder.add_document(ids, [len(ids)])
            num_documents += 1
            num_tokens += len(ids)
            num_characters += len(document)
        builder.finalize(temporary_paths["idx"])
        if max_token_id >= tokenizer.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer.name} produced id {max_token_id} >= its vocab_size "
                f"{tokenizer.vocab_size}"
            )

        description = {
            "format": DESCRIPTION_FORMAT,
            "tokenizer": tokenizer.describe(),
            "datasets": {
                os.path.basename(data_prefix): {
                    "documents": num_documents,
                    "tokens": num_tokens,
                    "characters": num_characters,
                    "max_token_id": max_token_id,
                    "dtype": dtype.__name__,
                }
            },
            "source": {
                "inputs": list(inputs) if inputs else (corpus or "wiki-sample (gensim)"),
                "json_key": json_key,
                "document_boundary": document_boundary,
                "limit": limit,
                "shuffle_seed": shuffle_seed,
            },
        }
        with open(temporary_paths["json"], "w", encoding="utf-8") as stream:
            json.dump(description, stream, indent=2)
            stream.write("\n")

        # Publish: drop the old .idx first, so that the prefix never pairs an old .idx with a new
        # .bin; the new .idx goes last.
        if os.path.exists(final_paths["idx"]):
            os.remove(final_paths["idx"])
        for key in ("bin", "json", "idx"):
            os.replace(temporary_paths[key], final_paths[key])
    finally:
        if builder is not None:
            builder.data_file.close()  # finalize() closed it unless we got here by an error
        for path in temporary_paths.values():
            if os.path.exists(path):
                os.remove(path)

    result = PreprocessResult(
        data_prefix=data_prefix,
        description_path=final_paths["json"],
        documents=num_documents,
        tokens=num_tokens,
        characters=num_characters,
        max_token_id=max_token_id,
        dtype=dtype.__name__,
        seconds=time.perf_counter() - start,
    )
    logger.info("preprocess: %s", result)
    return result
