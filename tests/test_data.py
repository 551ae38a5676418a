"""Training data, offline: corpus -> tokenizer -> Megatron indexed dataset -> GPT samples.

Pins down:
- GPT-2 BPE built offline is exactly GPT-2 ("Hello world!" -> [15496, 995, 0], eod 50256,
  50257 ids); a literal "<|endoftext|>" in text is text, not eod.
- SentencePiece training is deterministic (byte-identical models) and its models round-trip text.
- preprocess round-trips for both tokenizers: every document comes back from the .bin/.idx exactly,
  followed by eod; the stored tokenizer description equals the tokenizer's.
- An interrupted preprocess leaves no dataset and no temporary files; outputs are never replaced
  without overwrite.
- build_gpt_datasets (megatron.core's GPTDataset): samples of seq_length with shifted labels, the
  same for the same seed (fresh cache or not), splits disjoint by document, the same on 2 gloo
  ranks as in one process; an empty split is None or an error, never a hang.
- Bad input fails early with a ValueError naming the argument: missing input, empty corpus,
  unknown tokenizer, missing SentencePiece model, missing/empty data.prefix, tokenizer mismatch,
  token ids beyond the vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import numpy
import pytest
import torch

from inrank_megatron.data.corpus import book_documents, corpus_documents, iter_documents
from inrank_megatron.data.corpus import text_file_documents, wiki_articles
from inrank_megatron.data.datasets import build_gpt_datasets, check_data
from inrank_megatron.data.preprocess import preprocess
from inrank_megatron.data.tokenizers import GPT2Tokenizer, Tokenizer, build_tokenizer
from inrank_megatron.data.train_tokenizer import train_sentencepiece
from tests.distributed import run_distributed

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


@pytest.fixture(scope="module")
def wiki5():
    return list(wiki_articles(limit=5))


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, wiki5):
    prefix = tmp_path_factory.mktemp("sp") / "sp500"
    return train_sentencepiece(str(prefix), documents=wiki5, vocab_size=500)


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, gpt2):
    """The 5 wiki articles as a GPT-2 indexed dataset."""
    prefix = tmp_path_factory.mktemp("gpt2data") / "wiki5"
    return preprocess(str(prefix), tokenizer=gpt2, limit=5)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- corpora ----------------------------------------------------------------------------------


def test_wiki_articles_are_plain_text(wiki5):
    assert len(wiki5) == 5
    assert wiki5[0].startswith("Anarchism\n\n")
    for article in wiki5:
        assert "'''" not in article and "[[" not in article and "{{" not in article
        assert "\n\n\n" not in article and article == article.strip()


def test_wiki_books_corpus():
    """data.corpus=wiki+books: the four books' text only (no licence, no word lists), every word of
    them once, mixed with every article in a fixed shuffled order."""
    books = list(book_documents())
    text = "\n".join(books)
    assert "Gutenberg" not in text and "SMALL PRINT" not in text
    for opening in (
        "To Sherlock Holmes she is always the woman",
        "Well, Prince, so Genoa and Lucca",
    ):
        assert opening in text
    assert 1_000_000 < len(text.split()) < 1_100_000  # the four books, ~1.07M words
    assert all(500 <= len(d.split()) for d in books[:-1])
    mixed = list(corpus_documents("wiki+books"))
    assert sorted(mixed) == sorted([*wiki_articles(), *books])
    assert mixed == list(corpus_documents("wiki+books"))  # fixed seed
    # The split takes contiguous document ranges: its last 10% must not be one source.
    tail = mixed[-len(mixed) // 10 :]
    assert 0 < sum(d in set(books) for d in tail) < len(tail)
    with pytest.raises(ValueError, match="unknown corpus"):
        next(corpus_documents("books"))


def test_text_and_jsonl_readers(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("first doc\nline two\n\n\n second doc \n")
    assert list(text_file_documents(str(text))) == ["first doc\nline two", "second doc"]
    assert list(text_file_documents(str(text), document_boundary="file")) == [
        "first doc\nline two\n\n\n second doc"
    ]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": ""}\n{"body": "x", "text": "two"}\n')
    assert list(iter_documents([str(jsonl), str(text)])) == [
        "one",
        "two",
        "first doc\nline two",
        "second doc",
    ]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="--json-key"):
        list(iter_documents([str(bad)]))


# --- tokenizers -------------------------------------------------------------------------------


def test_gpt2_is_exact(gpt2):
    assert (gpt2.vocab_size, gpt2.eod) == (50257, 50256)
    assert gpt2.encode("Hello world!") == [15496, 995, 0]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("\n\n") == [628]
    assert gpt2.encode("It's 2024.") == [1026, 338, 48609, 13]
    # Text cannot forge the end of a document.
    assert gpt2.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert gpt2.decode([15496, 995, 0]) == "Hello world!"
    assert GPT2Tokenizer().describe() == gpt2.describe()


def test_sentencepiece_training_is_deterministic(tmp_path, wiki5, sp_model):
    again = train_sentencepiece(str(tmp_path / "other"), documents=wiki5, vocab_size=500)
    with open(sp_model, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    tokenizer = build_tokenizer("sentencepiece", sp_model)
    assert tokenizer.vocab_size == 500 and tokenizer.eod == 2
    text = "Tabs\tand  spaces,\nnewlines\n\nand ünïcödé 日本 survive: 12345!"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eod not in tokenizer.encode("</s> <s>")
    with pytest.raises(ValueError, match="--overwrite"):
        train_sentencepiece(str(tmp_path / "other"), documents=wiki5, vocab_size=500)
    with pytest.raises(ValueError, match="--vocab-size"):
        train_sentencepiece(str(tmp_path / "huge"), documents=["tiny text"], vocab_size=5000)


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'.*--tokenizer"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="--tokenizer-model.*not found.*nope.model"):
        build_tokenizer("sentencepiece", str(tmp_path / "nope.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build_tokenizer("sentencepiece", str(junk))


# --- preprocessing ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "sentencepiece"])
def test_preprocess_round_trip(tmp_path, kind, wiki5, gpt2, sp_model, gpt2_data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if kind == "gpt2":
        tokenizer, result = gpt2, gpt2_data
    else:
        tokenizer = build_tokenizer("sentencepiece", sp_model)
        result = preprocess(str(tmp_path / "wiki5"), tokenizer=tokenizer, limit=5)
    assert result.data_prefix.endswith("wiki5_text_document")
    assert (result.documents, result.dtype) == (5, "uint16")
    dataset = IndexedDataset(result.data_prefix)
    assert len(dataset) == 5 and dataset.index.dtype == numpy.uint16
    assert int(dataset.sequence_lengths.sum()) == result.tokens
    for document, sequence in zip(wiki5, (dataset[i] for i in range(5))):
        assert sequence[-1] == tokenizer.eod and tokenizer.eod not in sequence[:-1]
        assert tokenizer.decode(sequence[:-1].tolist()) == document
    with open(result.description_path) as stream:
        description = json.load(stream)
    assert description["tokenizer"] == tokenizer.describe()
    assert check_data(result.data_prefix, tokenizer)["documents"] == 5


class _FailingTokenizer(Tokenizer):
    """GPT-2 that fails on the third document, standing in for a crash mid-run."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.vocab_size, self.eod = inner.name, inner.vocab_size, inner.eod

    def encode(self, text):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("interrupted")
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)

    def describe(self):
        return self.inner.describe()


def test_preprocess_is_atomic_and_refuses_to_overwrite(tmp_path, gpt2):
    prefix = str(tmp_path / "wiki")
    with pytest.raises(RuntimeError, match="interrupted"):
        preprocess(prefix, tokenizer=_FailingTokenizer(gpt2), limit=5)
    assert os.listdir(tmp_path) == []

    first = preprocess(prefix, tokenizer=gpt2, limit=2)
    with pytest.raises(ValueError, match="--overwrite"):
        preprocess(prefix, tokenizer=gpt2, limit=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        preprocess(prefix, tokenizer=_FailingTokenizer(gpt2), limit=5, overwrite=True)
    # A failed overwrite keeps the old dataset whole.
    assert check_data(first.data_prefix, gpt2)["documents"] == 2
    second = preprocess(prefix, tokenizer=gpt2, limit=3, overwrite=True)
    assert check_data(second.data_prefix, gpt2)["documents"] == 3
    assert sorted(os.listdir(tmp_path)) == [
        "wiki.tokenizer.json",
        "wiki_text_document.bin",
        "wiki_text_document.idx",
    ]


def test_preprocess_bad_input(tmp_path, gpt2):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="--input: no such file"):
        preprocess(out, tokenizer=gpt2, inputs=[str(tmp_path / "missing.txt")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="--input: no non-empty documents"):
        preprocess(out, tokenizer=gpt2, inputs=[str(empty)])
    with pytest.raises(ValueError, match="--output-prefix.*does not exist"):
        preprocess(str(tmp_path / "no" / "out"), tokenizer=gpt2, limit=1)
    with pytest.raises(ValueError, match="--tokenizer"):
        preprocess(out, tokenizer="gpt2", limit=1)
    assert os.listdir(tmp_path) == ["empty.jsonl"]


def test_cli_tools(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    records = (json.dumps({"text": f"Document {i}: some text."}) for i in range(4))
    corpus.write_text("\n".join(records) + "\n")
    train_tool, preprocess_tool = _load_tool("train_tokenizer"), _load_tool("preprocess_data")
    model = str(tmp_path / "sp")
    train_args = ["--input", str(corpus), "--output-prefix", model, "--vocab-size", "280"]
    assert train_tool.main(train_args) == 0
    args = ["--input", str(corpus), "--output-prefix", str(tmp_path / "d"), "--tokenizer"]
    assert preprocess_tool.main(args + ["sentencepiece"]) == 2
    assert "--tokenizer-model" in capsys.readouterr().err
    assert preprocess_tool.main(args + ["nonesuch"]) == 2
    assert "unknown tokenizer kind 'nonesuch'" in capsys.readouterr().err
    sentencepiece = ["sentencepiece", "--tokenizer-model", model + ".model"]
    assert preprocess_tool.main(args + sentencepiece) == 0
    assert "4 documents" in capsys.readouterr().out
    assert preprocess_tool.main(args + sentencepiece) == 2
    assert "--overwrite" in capsys.readouterr().err


# --- GPT datasets -----------------------------------------------------------------------------


def _samples(dataset, count=None):
    count = len(dataset) if count is None else count
    return [dataset[i] for i in range(count)]


def _split_documents(dataset):
    return set(numpy.asarray(dataset.document_index).tolist())


def test_gpt_datasets_samples_deterministic_and_disjoint(tmp_path, gpt2, gpt2_data):
    prefix = gpt2_data.data_prefix
    kwargs = dict(tokenizer=gpt2, num_samples=(40, 8, 8), split="3,1,1", seed=5)
    train, valid, test = build_gpt_datasets(prefix, 64, cache_dir=str(tmp_path / "a"), **kwargs)

    sample = train[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    for key, dtype in [
        ("tokens", torch.int64),
        ("labels", torch.int64),
        ("loss_mask", torch.float32),
        ("position_ids", torch.int64),
    ]:
        assert sample[key].shape == (64,) and sample[key].dtype == dtype
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["position_ids"], torch.arange(64))

    # Same seed: same samples, from a fresh cache and from the cached indices.
    for cache in ("b", "a"):
        again = build_gpt_datasets(prefix, 64, cache_dir=str(tmp_path / cache), **kwargs)
        for mine, theirs in zip((train, valid, test), again):
            assert len(mine) == len(theirs)
            for a, b in zip(_samples(mine), _samples(theirs)):
                assert all(torch.equal(a[k], b[k]) for k in a)
    kwargs["seed"] = 6
    other_seed = build_gpt_datasets(prefix, 64, cache_dir=str(tmp_path / "a"), **kwargs)
    assert any(
        not torch.equal(a["tokens"], b["tokens"])
        for a, b in zip(_samples(train), _samples(other_seed.train))
    )

    # Split by document: 5 documents at 3:1:1 -> {0, 1, 2}, {3}, {4}; every sample is cut from
    # documents of its own split only (megatron reports the documents a sample spans).
    for dataset, documents in ((train, {0, 1, 2}), (valid, {3}), (test, {4})):
        assert _split_documents(dataset) == documents
        for i in range(len(dataset)):
            _, sample_documents = dataset._query_document_sample_shuffle_indices(i)
            assert set(sample_documents.tolist()) <= documents


def test_rebuilt_data_gets_fresh_indices(tmp_path, gpt2):
    # Megatron's cache key ignores the data; ours adds the .idx digest, so a dataset rebuilt at the
    # same prefix never reuses the old one's sample indices.
    prefix = str(tmp_path / "wiki")
    cache = str(tmp_path / "cache")
    for documents in (2, 3):
        result = preprocess(prefix, tokenizer=gpt2, limit=documents, overwrite=True)
        train = build_gpt_datasets(
            result.data_prefix,
            32,
            tokenizer=gpt2,
            num_samples=(4, 0, 0),
            split="1",
            cache_dir=cache,
        ).train
        assert _split_documents(train) == set(range(documents))


def test_gpt_datasets_empty_split(tmp_path, gpt2, gpt2_data):
    # 5 documents at 969:30:1 leave valid and test without documents.
    train, valid, test = build_gpt_datasets(
        gpt2_data.data_prefix,
        32,
        tokenizer=gpt2,
        num_samples=(10, 0, None),
        cache_dir=str(tmp_path),
    )
    assert len(train) >= 10 and valid is None and test is None
    with pytest.raises(ValueError, match="data.split.*valid split no documents"):
        build_gpt_datasets(
            gpt2_data.data_prefix,
            32,
            tokenizer=gpt2,
            num_samples=(10, 1, 0),
            cache_dir=str(tmp_path),
        )
    with pytest.raises(ValueError, match="data.split"):
        build_gpt_datasets(
            gpt2_data.data_prefix, 32, tokenizer=gpt2, num_samples=(1, 0, 0), split="0,0,0"
        )


def test_gpt_datasets_bad_data(tmp_path, gpt2, gpt2_data, sp_model):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    build = lambda prefix, tokenizer, **kw: build_gpt_datasets(  # noqa: E731
        prefix, 16, tokenizer=tokenizer, num_samples=(1, 0, 0), cache_dir=str(tmp_path), **kw
    )
    with pytest.raises(ValueError, match="data.prefix=.*missing"):
        build(str(tmp_path / "nothing_text_document"), gpt2)
    empty = str(tmp_path / "empty_text_document")
    IndexedDatasetBuilder(empty + ".bin", dtype=numpy.uint16).finalize(empty + ".idx")
    with pytest.raises(ValueError, match="data.prefix=.*empty"):
        build(empty, gpt2)

    sentencepiece = build_tokenizer("sentencepiece", sp_model)
    with pytest.raises(ValueError, match="tokenizer mismatch.*kind: 'gpt2' != 'sentencepiece'"):
        build(gpt2_data.data_prefix, sentencepiece)
    with pytest.raises(ValueError, match="token id 50256 >= vocab_size 500"):
        build(gpt2_data.data_prefix, sentencepiece, check_description=False)
    # Data without a description (made by another tool) is refused unless asked otherwise.
    bare = str(tmp_path / "bare_text_document")
    for suffix in (".bin", ".idx"):
        with open(gpt2_data.data_prefix + suffix, "rb") as src, open(bare + suffix, "wb") as dst:
            dst.write(src.read())
    with pytest.raises(ValueError, match="no tokenizer description"):
        build(bare, gpt2)
    assert build(bare, gpt2, check_description=False).train is not None


def _build_on_rank(rank, world_size, prefix, cache_dir):
    from inrank_megatron.data.datasets import build_gpt_datasets
    from inrank_megatron.data.tokenizers import build_tokenizer

    datasets = build_gpt_datasets(
        prefix,
        64,
        tokenizer=build_tokenizer("gpt2"),
        num_samples=(20, 4, 4),
        split="3,1,1",
        seed=11,
        cache_dir=cache_dir,
    )
    return [[d[i]["tokens"].tolist() for i in range(len(d))] for d in datasets]


@pytest.mark.slow  # two spawned processes importing megatron.core: 15-35 s on 2 cores
def test_gpt_datasets_two_ranks_match_one_process(tmp_path, gpt2, gpt2_data):
    ranks = run_distributed(_build_on_rank, 2, gpt2_data.data_prefix, str(tmp_path / "dist"))
    assert ranks[0] == ranks[1]
    single = build_gpt_datasets(
        gpt2_data.data_prefix,
        64,
        tokenizer=gpt2,
        num_samples=(20, 4, 4),
        split="3,1,1",
        seed=11,
        cache_dir=str(tmp_path / "single"),
    )
    assert ranks[0] == [[d[i]["tokens"].tolist() for i in range(len(d))] for d in single]
