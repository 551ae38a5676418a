"""Train/valid/test GPT datasets over a preprocessed indexed dataset, built by Megatron-Core.

`build_gpt_datasets` is a thin layer over megatron.core 0.16.1's own machinery
(`BlendedMegatronDatasetBuilder` + `GPTDatasetConfig` + `GPTDataset`, which runs on CPU as is),
plus the checks Megatron does not make:

- the data exists and is not empty (`data.prefix`);
- it was tokenized by the tokenizer we are given (the `describe()` stored by `preprocess` next to
  the data must match), and no id in it is >= the vocabulary size;
- a split that the split string leaves without documents is not asked for samples (Megatron's
  `GPTDataset._get_num_epochs` loops forever on an empty split).

Megatron's behaviour that callers rely on:

- Splits are by document: with `split="969,30,1"` the first 96.9 % of the documents (in file
  order) feed train, the next 3 % valid, the rest test. Samples are `seq_length + 1` consecutive
  tokens of the shuffled documents of one split, crossing document boundaries (eod in between);
  `tokens`/`labels` are that window shifted by one.
- Shuffling and epoch repetition depend only on `seed`, `seq_length`, `split`, the per-split
  sample counts and the document lengths; the resulting index arrays are cached as `.npy` files
  and reused by later runs.
- With torch.distributed initialised, every rank must call this: rank 0 builds the index cache
  first, the other ranks wait at a barrier and then load it (the cache directory must be on a
  filesystem all ranks see). Without torch.distributed, the single process builds it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Sequence, Union

import numpy

from inrank_megatron.data.preprocess import DESCRIPTION_SUFFIX
from inrank_megatron.data.tokenizers import Tokenizer, description_mismatch

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDataset

SPLIT_NAMES = ("train", "valid", "test")


class GPTDatasets(NamedTuple):
    """The three splits (a `BlendedDataset` of `GPTDataset`s for a blend); a split is None when it
    has no documents and was asked for no samples, or when `is_built_on_rank()` is False on this
    rank."""

    train: Optional[GPTDataset]
    valid: Optional[GPTDataset]
    test: Optional[GPTDataset]


class MegatronTokenizerAdapter:
    """The attributes `GPTDatasetConfig` / `GPTDataset` read from a tokenizer, over our `Tokenizer`.

    Megatron reads `vocab_size` (token dtype), `eod` (masks and position ids), `pad` (absent
    here, so Megatron uses its own -1 sentinel for padding) and `unique_identifiers`, which it
    hashes into the names of its cached index files; putting the tokenizer description there
    keeps caches built for different tokenizers apart.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.unique_identifiers = collections.OrderedDict(
            [("class", type(self).__name__), ("tokenizer", tokenizer.describe())]
        )

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)


def description_path(data_prefix: str) -> str | None:
    """Finds the `<output_prefix>.tokenizer.json` that `preprocess` wrote for `data_prefix`.

    `preprocess` names the data `<output_prefix>_<json_key>_document` and lists that basename in
    the description; the json key may itself contain "_", so every "_"-cut of the prefix is tried,
    longest first.

    Returns:
        The path, or None if there is no description that lists this dataset.
    """
    directory, name = os.path.split(data_prefix)
    cuts = [index for index, character in enumerate(name) if character == "_" and index > 0]
    for stem in [name] + [name[:index] for index in reversed(cuts)]:
        path = os.path.join(directory, stem + DESCRIPTION_SUFFIX)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as stream:
                description = json.load(stream)
            if name in description.get("datasets", {}):
                return path
    return None


# megatron.core.datasets.indexed_dataset: the .idx header, and its dtype codes (DType).
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
                 6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}


def check_indexed_files(data_prefix: str, key: str = "data.prefix") -> dict:
    """Checks that `<data_prefix>.idx` is a Megatron index and `<data_prefix>.bin` holds exactly the
    tokens it describes, reading the index's header and its last entry only (what megatron's reader
    would fail on later with a raw numpy error, or not at all: a truncated `.bin` reads past its
    end).

    Returns:
        {"sequences", "documents", "tokens", "dtype"}; "documents" counts documents (Megatron's
        document index holds one more entry, a leading 0).

    Args:
        data_prefix: The dataset prefix.
        key: The configuration key that names it, for messages (`data.prefix[1]` in a blend).

    Raises:
        ValueError: naming `key`, the file, and what is wrong (header, version, dtype
            code, a truncated index, inconsistent offsets, a `.bin` of the wrong size).
    """
    import struct

    idx_path, bin_path = data_prefix + ".idx", data_prefix + ".bin"
    where = f"{key}={data_prefix!r}: {idx_path}"
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        head = stream.read(34)
        if len(head) < 34 or head[:9] != _INDEX_HEADER:
            raise ValueError(f"{where} is not a Megatron index (header {head[:9]!r}, expected "
                             f"{_INDEX_HEADER!r}); rebuild it with tools/preprocess_data.py")
        version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            raise ValueError(f"{where}: index version {version}, expected 1")
        if code not in _INDEX_DTYPES:
            raise ValueError(f"{where}: unknown token dtype code {code}, expected one of "
                             f"{sorted(_INDEX_DTYPES)} (megatron's DType)")
        needed = 34 + sequences * (4 + 8) + documents * 8
        if size < needed:
            raise ValueError(f"{where} is truncated: {size} bytes, its header ({sequences} "
                             f"sequences, {documents - 1} documents) needs {needed}")
        dtype = numpy.dtype(_INDEX_DTYPES[code])
        tokens = 0
        if sequences:  # the last sequence ends where the .bin must end (O(1): corpora are big)
            stream.seek(34 + 4 * (sequences - 1))
            (last_length,) = struct.unpack("<i", stream.read(4))
            stream.seek(34 + 4 * sequences + 8 * (sequences - 1))
            (last_pointer,) = struct.unpack("<q", stream.read(8))
            if last_pointer % dtype.itemsize or last_pointer < 0 or last_length < 0:
                raise ValueError(f"{where}: its last sequence (offset {last_pointer}, length "
                                 f"{last_length}) is not one of {dtype.name} tokens (a corrupt "
                                 "index); rebuild it with tools/preprocess_data.py")
            tokens = last_pointer // dtype.itemsize + last_length
    bin_size = os.path.getsize(bin_path)
    if bin_size != tokens * dtype.itemsize:
        state = "truncated" if bin_size < tokens * dtype.itemsize else "longer than its index says"
        raise ValueError(f"{key}={data_prefix!r}: {bin_path} is {state}: {bin_size} bytes, "
                         f"its index describes {tokens} {dtype.name} tokens = "
                         f"{tokens * dtype.itemsize} bytes; rebuild it with "
                         "tools/preprocess_data.py")
    return {"sequences": int(sequences), "documents": int(documents) - 1, "tokens": tokens,
            "dtype": dtype.name}


def check_data(data_prefix: str, tokenizer: Tokenizer, *, check_description: bool = True,
               key: str = "data.prefix") -> dict:
    """Checks that `data_prefix` is a non-empty indexed dataset made with `tokenizer`.

    Args:
        data_prefix: The dataset prefix (`<prefix>.bin` / `<prefix>.idx`).
        tokenizer: The tokenizer training will use.
        check_description: Require the `.tokenizer.json` written by `preprocess` and compare it
            with `tokenizer.describe()`. Turn off only for data made by other tools (Megatron-LM's
            preprocess_data); the max-id check still runs.

    Returns:
        Statistics: documents, tokens, max_token_id, dtype, description_path.

    Raises:
        ValueError: Missing/empty data (names `key`), no or mismatching tokenizer
            description, or a token id >= `tokenizer.vocab_size`.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

    if not data_prefix:
        raise ValueError(f"{key} is not set")
    bin_path, idx_path = get_bin_path(data_prefix), get_idx_path(data_prefix)
    missing = [path for path in (bin_path, idx_path) if not os.path.isfile(path)]
    if missing:
        hint = ""
        if data_prefix.endswith((".bin", ".idx")):
            hint = " (give the prefix without .bin/.idx)"
        raise ValueError(
            f"{key}={data_prefix!r}: no indexed dataset, missing {', '.join(missing)}{hint}; "
            "make one with tools/preprocess_data.py"
        )
    if os.path.getsize(bin_path) == 0:
        raise ValueError(f"{key}={data_prefix!r}: {bin_path} is empty (no tokens)")
    check_indexed_files(data_prefix, key)
    try:
        dataset = IndexedDataset(data_prefix, mmap=True)
    except (AssertionError, ValueError, OSError) as error:
        raise ValueError(f"{key}={data_prefix!r}: not a readable indexed dataset ({error})")
    num_documents = len(dataset)
    if num_documents == 0:
        raise ValueError(f"{key}={data_prefix!r}: the dataset is empty (0 documents)")
    dtype = dataset.index.dtype
    num_tokens = int(dataset.sequence_lengths.sum(dtype=numpy.int64))
    del dataset

    found = description_path(data_prefix)
    if check_description:
        if found is None:
            raise ValueError(
                f"{key}={data_prefix!r}: no tokenizer description (<output_prefix>"
                f"{DESCRIPTION_SUFFIX} listing {os.path.basename(data_prefix)!r}); rebuild the "
                "data with tools/preprocess_data.py, or pass check_description=False for data "
                "made by another tool"
            )
        with open(found, encoding="utf-8") as stream:
            stored = json.load(stream)["tokenizer"]
        differences = description_mismatch(stored, tokenizer.describe())
        if differences:
            raise ValueError(
                f"{key}={data_prefix!r} was tokenized with {stored.get('name')!r} but the "
                f"configured tokenizer is {tokenizer.name!r} (tokenizer mismatch, stored != "
                f"configured: {'; '.join(differences)}; description in {found})"
            )

    max_token_id = _max_token_id(bin_path, dtype)
    if max_token_id >= tokenizer.vocab_size:
        raise ValueError(
            f"{key}={data_prefix!r} holds token id {max_token_id} >= vocab_size "
            f"{tokenizer.vocab_size} of tokenizer {tokenizer.name!r} (tokenizer mismatch)"
        )
    return {
        "documents": num_documents,
        "tokens": num_tokens,
        "max_token_id": max_token_id,
        "dtype": numpy.dtype(dtype).name,
        "description_path": found,
    }


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int] | None]:
    """The `[begin, end)` document range of each split, computed as Megatron computes it, in the
    same float arithmetic (`parse_and_normalize_split`, `convert_split_vector_to_split_matrix`,
    then `BlendedMegatronDatasetBuilder._build_megatron_dataset_splits` rounds the bookends times
    the documents); None for a zero weight. Without megatron, which imports torch: the launch
    pre-flight runs this for every dataset.

    Raises:
        ValueError: more than three weights (megatron asserts three at most).
    """
    weights = [float(w) for w in re.findall(r"[.0-9]+", split)]
    if len(weights) > len(SPLIT_NAMES):
        raise ValueError(f"data.split={split!r}: more than {len(SPLIT_NAMES)} weights")
    vector = numpy.array(weights + [0.0] * (len(SPLIT_NAMES) - len(weights)), dtype=numpy.float64)
    shares = (vector / numpy.sum(vector)).tolist()  # megatron.core.datasets.utils.normalize
    ends = [0]
    for share in shares:
        ends.append(ends[-1] + share)
    return [None if end <= begin
            else (int(round(begin * num_documents)), int(round(end * num_documents)))
            for begin, end in zip(ends[:-1], ends[1:])]


# A split the training loop reads (train every step, valid at each evaluation) with fewer documents
# than this gets a warning: its samples repeat the same few documents.
FEW_DOCUMENTS = 3


def split_problems(split: str, documents: int, dataset: str = "") -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of ``split`` over ``documents`` documents (Megatron splits by
    document, in file order): the train or valid split empty is an error (every step reads train,
    every evaluation valid), either under :data:`FEW_DOCUMENTS` documents a warning. Both name
    `data.split`, the dataset (``dataset``, e.g. ``"data.prefix[1]='data/b_text_document'"``, for
    a blend's datasets) and give every split's count."""
    counts = {name: (r[1] - r[0]) if r else None
              for name, r in zip(SPLIT_NAMES, split_document_ranges(split, documents))}
    shown = ", ".join(f"{name} {'-' if n is None else n}" for name, n in counts.items())
    of = f" of {dataset}" if dataset else ""
    errors, warnings = [], []
    for name, reader in (("train", "every step"), ("valid", "every evaluation")):
        if not counts[name]:
            errors.append(f"data.split={split!r} leaves the {name} split{of} no documents "
                          f"({documents} documents: {shown}), and {reader} reads it; expected a "
                          f"split that gives {name} at least one document (raise its weight), or "
                          "more documents")
        elif counts[name] < FEW_DOCUMENTS:
            warnings.append(f"data.split={split!r} gives the {name} split{of} only {counts[name]} "
                            f"of {documents} documents ({shown}); its samples repeat them (raise "
                            "its weight; shuffle ordered documents with tools/preprocess_data.py "
                            "--shuffle-seed)")
    return errors, warnings


# A dataset value of `build_gpt_datasets`: one prefix, or a blend [(prefix, weight), ...].
Blend = Union[str, Sequence[tuple[str, float]]]


def blend_entries(value: Blend, key: str) -> list[tuple[str, str, float]]:
    """``[(key, prefix, weight), ...]`` of a dataset value: one prefix is ``[(key, prefix, 1.0)]``,
    a blend's entries are keyed ``key[i]`` (``data.prefix[1]``), the key its messages name.

    Raises:
        ValueError: an empty blend, a weight that is not a finite number > 0, a repeated prefix.
    """
    if isinstance(value, str):
        return [(key, value, 1.0)]
    entries = [(f"{key}[{i}]", prefix, weight) for i, (prefix, weight) in enumerate(value)]
    if not entries:
        raise ValueError(f"{key}: an empty blend; expected at least one (prefix, weight)")
    for where, prefix, weight in entries:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{where}: weight {weight!r} of {prefix!r}; expected a finite "
                             "number > 0")
    prefixes = [prefix for _, prefix, _ in entries]
    if len(set(prefixes)) < len(prefixes):
        raise ValueError(f"{key}: a prefix appears twice in {prefixes}; expected each once")
    return entries


def _megatron_blend(entries: list) -> tuple[list[str], Optional[list[float]]]:
    """megatron's ``(prefixes, weights)``; one dataset has no weights (megatron then builds its
    GPTDataset alone, not a BlendedDataset of one)."""
    prefixes = [prefix for _, prefix, _ in entries]
    return prefixes, (None if len(entries) == 1 else [float(w) for *_, w in entries])


def build_gpt_datasets(
    data_prefix: Blend,
    seq_length: int,
    *,
    tokenizer: Tokenizer,
    num_samples: Sequence[Optional[int]],
    seed: int = 1234,
    split: str = "969,30,1",
    valid_prefix: Optional[Blend] = None,
    cache_dir: str | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    is_built_on_rank: Callable[[], bool] | None = None,
    check_description: bool = True,
) -> GPTDatasets:
    """Builds the train/valid/test datasets of one indexed dataset or of a weighted blend.

    One dataset gives `GPTDataset`s. A blend gives megatron's `BlendedDataset`s: each dataset is
    split by `split` on its own, asked for `ceil(weight * n)` samples of a split of `n` (plus
    megatron's 0.5 % surplus), and the blend's sample `i` comes from the dataset whose share is
    furthest behind its weight after `i` samples (`helpers.build_blending_indices`): the order
    depends only on the weights and the sample counts, so a resumed run reads the same samples.

    Each sample is a dict of `tokens`, `labels` (int64), `loss_mask` (float32) and `position_ids`
    (int64), all of length `seq_length`, plus `attention_mask` (1 x seq x seq, True = masked) if
    `create_attention_mask` (and `dataset_id`, the blend entry, from a blend).

    Args:
        data_prefix: The indexed dataset (`data.prefix`), e.g. `data/wiki_text_document`, or a
            blend `[(prefix, weight), ...]` (weights > 0, normalised by megatron).
        seq_length: Tokens per sample.
        tokenizer: The tokenizer training uses; must be the one the data was made with.
        num_samples: Samples to draw per split (train, valid, test); a split is repeated over
            more epochs when it has fewer. None: exactly one epoch (one dataset only).
        seed: Seed of the document and sample shuffles.
        split: Relative weights of train, valid and test, by document ("969,30,1").
        valid_prefix: Validation data of its own (`data.valid_prefix`), a prefix or a blend: then
            train is every document of `data_prefix`, valid every document of this, there is
            no test split and `split` is not read (megatron's `blend_per_split`, Megatron-LM's
            `--train-data-path` / `--valid-data-path`).
        cache_dir: Where Megatron caches its index arrays; default `<data dir>/cache`. A
            subdirectory named after the `.idx` files' sha256 keeps a rebuilt dataset from
            reusing indices of the old one. A blend outside a process group is not cached.
        reset_position_ids: Restart position ids after each eod (Megatron's flag).
        reset_attention_mask: Block attention across eod (needs create_attention_mask).
        eod_mask_loss: Give the eod tokens zero loss weight.
        create_attention_mask: Add a causal `attention_mask` to each sample.
        is_built_on_rank: With torch.distributed initialised, whether this rank gets datasets
            (others get None); must be True on rank 0. Default: every rank.
        check_description: See `check_data`.

    Returns:
        The three datasets (see `GPTDatasets` for when one is None).

    Raises:
        ValueError: Bad data (see `check_data`, naming the dataset's key), a bad argument, or
            samples asked of a split that has no documents.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
    num_samples = list(num_samples)
    if len(num_samples) != 3 or any(
        n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0)
        for n in num_samples
    ):
        raise ValueError(
            f"num_samples must be (train, valid, test) non-negative integers or None, "
            f"got {num_samples!r}"
        )
    if reset_attention_mask and not create_attention_mask:
        raise ValueError("reset_attention_mask needs create_attention_mask=True")
    train = blend_entries(data_prefix, "data.prefix")
    valid = None if valid_prefix is None else blend_entries(valid_prefix, "data.valid_prefix")
    if valid is None:
        _check_split(split)
    every = train + (valid or [])
    stats = {key: check_data(prefix, tokenizer, check_description=check_description, key=key)
             for key, prefix, _ in every}
    _ensure_megatron_helpers()

    import torch.distributed

    cache = _index_cache_dir([prefix for _, prefix, _ in every], cache_dir)
    if max(len(train), len(valid or ())) > 1 and not torch.distributed.is_initialized():
        # megatron's BlendedDataset asks torch.distributed for the rank that writes its cache
        # (blended_dataset.py, `_build_indices`) and fails without a process group: in a single
        # process without one the blend is built in memory.
        cache = None
    common = dict(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=cache,
        tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    if valid is None:
        config = GPTDatasetConfig(blend=_megatron_blend(train), split=split, **common)
        for index, name in enumerate(SPLIT_NAMES):
            empty = [("" if key == "data.prefix" else f" of {key}={prefix!r}")
                     + f" no documents ({stats[key]['documents']} documents in all)"
                     for key, prefix, _ in train
                     if _empty(split_document_ranges(split, stats[key]["documents"])[index])]
            if empty and num_samples[index]:
                raise ValueError(
                    f"data.split={split!r} leaves the {name} split{empty[0]} but "
                    f"{num_samples[index]} {name} samples were asked for; change the split or "
                    "ask for 0")
            if empty or (len(train) > 1 and num_samples[index] == 0):
                # Megatron would try to build an empty split and never stop (and a blend split
                # of no samples is not worth its indices); dropping it from the split matrix makes
                # the builder return None for it.
                config.split_matrix[index] = None
        sources = [train] * 3
    else:
        if num_samples[2]:
            raise ValueError(f"num_samples asks for {num_samples[2]} test samples, but with "
                             "data.valid_prefix there is no test data")
        blends = [_megatron_blend(train), _megatron_blend(valid), None]
        blends[1] = blends[1] if num_samples[1] != 0 else None
        config = GPTDatasetConfig(blend_per_split=blends, **common)
        sources = [train, valid, []]
    for index, name in enumerate(SPLIT_NAMES):
        if len(sources[index]) > 1 and num_samples[index] is None:
            raise ValueError(f"num_samples[{index}] is None (one epoch) for the {name} split of a "
                             "blend; a blend needs a sample count")

    builder = BlendedMegatronDatasetBuilder(
        GPTDataset,
        num_samples,
        is_built_on_rank or (lambda: True),
        config,
    )
    return GPTDatasets(*builder.build())


def _empty(document_range) -> bool:
    return document_range is not None and document_range[0] >= document_range[1]


@dataclass(frozen=True)
class DatasetUse:
    """What a run reads of one dataset in one split (:func:`dataset_usage`).

    Attributes:
        split: ``train`` or ``valid``.
        key: the configuration key naming the dataset (``data.prefix[1]``).
        prefix: the dataset.
        weight: its share of the split's samples (normalised; 1 alone).
        documents: its documents in this split.
        tokens: their tokens: one epoch.
        samples: samples drawn from it: ``n`` alone, megatron's target ``ceil(weight * n)`` in a
            blend (`_get_size_per_split_per_dataset`; the blend draws within a sample of it).
        epochs: ``(samples * seq_length + 1) / tokens`` (a sample reads ``seq_length + 1``
            tokens); past 1 megatron repeats the documents, shuffled anew each epoch.
    """

    split: str
    key: str
    prefix: str
    weight: float
    documents: int
    tokens: int
    samples: int
    epochs: float


def dataset_usage(data_prefix: Blend, seq_length: int, num_samples: Sequence[int], *,
                  split: str = "969,30,1", valid_prefix: Optional[Blend] = None
                  ) -> list[DatasetUse]:
    """How many samples, and epochs, a run reads of each dataset, from the `.idx` files alone
    (what :func:`build_gpt_datasets` builds, counted as megatron counts: tokens per epoch are the
    split's sequence lengths, `GPTDataset._get_num_tokens_per_epoch`).

    Args:
        data_prefix, split, valid_prefix: as for :func:`build_gpt_datasets`.
        seq_length: Tokens per sample.
        num_samples: Samples of the train and valid splits.

    Returns:
        One :class:`DatasetUse` per dataset and split, train first.

    Raises:
        ValueError: a dataset's files are missing or broken (naming its key).
    """
    splits = [("train", blend_entries(data_prefix, "data.prefix"), 0)]
    if valid_prefix is None:
        splits.append(("valid", splits[0][1], 1))
    else:
        splits.append(("valid", blend_entries(valid_prefix, "data.valid_prefix"), None))
    out = []
    for (name, entries, index), n in zip(splits, num_samples):
        total = sum(weight for *_, weight in entries)
        for key, prefix, weight in entries:
            lengths, documents = _sequence_lengths(prefix, key)
            begin, end = 0, documents
            if index is not None:
                bookends = split_document_ranges(split, documents)[index]
                begin, end = bookends if bookends is not None else (0, 0)
            tokens = int(lengths[begin:end].sum(dtype=numpy.int64))
            share = weight / total
            samples = n if len(entries) == 1 else math.ceil(share * n)
            out.append(DatasetUse(name, key, prefix, share, end - begin, tokens, samples,
                                  (samples * seq_length + 1) / tokens if tokens else math.inf))
    return out


def _sequence_lengths(data_prefix: str, key: str) -> tuple[numpy.ndarray, int]:
    """The `.idx` file's sequence lengths (int32, memory-mapped) and its document count, checked
    first (:func:`check_indexed_files`). Megatron's GPTDataset splits the documents and reads the
    length of sequence `i` as document `i`'s (one sequence per document, as `preprocess` writes)."""
    info = check_indexed_files(data_prefix, key)
    if not info["sequences"]:
        return numpy.zeros(0, dtype=numpy.int32), info["documents"]
    return numpy.memmap(data_prefix + ".idx", dtype=numpy.int32, mode="r", offset=34,
                        shape=(info["sequences"],)), info["documents"]


def usage_table(rows: Sequence[DatasetUse]) -> list[str]:
    """:func:`dataset_usage` as aligned text lines (the console at start, `tools/plan.py`)."""
    from inrank_megatron.text_table import aligned_table

    return aligned_table(
        ["split", "dataset", "weight", "documents", "tokens", "samples", "epochs"],
        [[r.split, r.prefix, f"{r.weight:.3f}", f"{r.documents:,}", f"{r.tokens:,}",
          f"{r.samples:,}", f"{r.epochs:.3g}"] for r in rows], left=2)


def _check_split(split: str) -> None:
    # Megatron's parse_and_normalize_split reads any run of digits and dots as a weight and
    # divides by their sum; reject what it would turn into NaNs or silently misread.
    fields = split.split(",") if isinstance(split, str) else []
    try:
        weights = [float(field) for field in fields]
    except ValueError:
        weights = []
    if (
        not 1 <= len(weights) <= 3
        or not all(math.isfinite(w) and w >= 0 for w in weights)
        or sum(weights) <= 0
    ):
        raise ValueError(
            f"data.split must be 1 to 3 comma-separated non-negative weights with a positive sum, "
            f"like '969,30,1'; got {split!r}"
        )


def _index_cache_dir(prefixes: list[str], cache_dir: str | None) -> str:
    """`<cache_dir>/<name>-<sha256 of the .idx files>`: one directory per dataset, or per blend
    (named after its first dataset), that a rebuilt dataset never shares."""
    from megatron.core.datasets.indexed_dataset import get_idx_path

    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")
    digest = hashlib.sha256()
    for prefix in prefixes:
        if len(prefixes) > 1:
            digest.update(os.path.abspath(prefix).encode() + b"\0")
        with open(get_idx_path(prefix), "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    name = os.path.basename(prefixes[0]) + ("" if len(prefixes) == 1 else "-blend")
    return os.path.join(cache_dir, f"{name}-{digest.hexdigest()[:16]}")


def _max_token_id(bin_path: str, dtype) -> int:
    tokens = numpy.memmap(bin_path, dtype=dtype, mode="r")
    chunk = 1 << 24
    return int(max(tokens[i : i + chunk].max() for i in range(0, tokens.shape[0], chunk)))


def _ensure_megatron_helpers() -> None:
    """Makes sure Megatron's C++ index helpers (`megatron.core.datasets.helpers_cpp`) import.

    The megatron-core wheel ships them prebuilt; a source install may not, in which case they are
    compiled once (`megatron.core.datasets.utils.compile_helpers`, which runs `make`) on rank 0
    while the other ranks wait, as Megatron-LM's `training/initialize.py` does.
    """
    import importlib

    import torch.distributed

    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return
    except ImportError:
        pass
    from megatron.core.datasets.utils import compile_helpers

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        compile_helpers()
    if distributed:
        torch.distributed.barrier()
    importlib.import_module("megatron.core.datasets.helpers_cpp")
