"""Data blends (issue 22): ``data.prefix`` as Megatron's weighted list, ``data.valid_prefix``.

Pins down:
- the config reads Megatron's flat ``[w1, prefix1, w2, prefix2]`` and a list of ``{prefix,
  weight}`` as the same blend, and refuses bad weights and prefixes naming the entry
  (``data.prefix[1]``);
- ``build_gpt_datasets`` of a blend is megatron's own builder's ``BlendedDataset``, sample for
  sample, and draws exactly ``weight * n`` samples of each dataset (1 : 3 of 200 is 50 : 150); a
  blend of one is the plain dataset;
- ``data.valid_prefix``: train reads every document of ``data.prefix``, valid every document of
  it (megatron's ``blend_per_split``);
- ``dataset_usage`` counts tokens per epoch, and so epochs, as megatron's GPTDataset does;
- the pre-flight (``launch_env check``) refuses a blend whose dataset is missing, truncated or left
  without valid documents by ``data.split``, naming the entry's key and the file (exit 2, one line),
  and checks a blend without importing torch (the split ranges are megatron's, computed without it);
- a blended run resumed from its step-4 checkpoint gives losses bit-identical to the uninterrupted
  one (through the cut), and its console reports each dataset's samples and epochs.

In process, no process group, except the resume test (torchrun, the session's ``blend_run``).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
import warnings

import numpy
import pytest

from inrank_megatron import launch_env
from inrank_megatron.config import ConfigError, load_config
from inrank_megatron.data.datasets import build_gpt_datasets, dataset_usage
from tests.conftest import BLEND_WEIGHTS, blend_overrides
from tests.distributed import REPO, TINY_CONFIG, read_summary, run_train

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

CONFIG = os.path.join(REPO, TINY_CONFIG)


@pytest.fixture(scope="module")
def sp(books_data):
    """The suite's 8k SentencePiece tokenizer (``books_data`` makes sure it exists)."""
    from inrank_megatron.data.tokenizers import build_tokenizer

    return build_tokenizer("sentencepiece", os.path.join(REPO, "data", "wiki_sp8k.model"))


@pytest.fixture(scope="module")
def two(tmp_path_factory, sp):
    """Two small datasets in that tokenizer: 10 Wikipedia articles and 30 short documents."""
    from inrank_megatron.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("two")
    text = root / "notes.txt"
    text.write_text(
        "\n\n".join(
            f"Note {i}: the river {i % 7} runs past the mill {i % 5} and on "
            f"to the sea, carrying boats number {i}."
            for i in range(30)
        ),
        encoding="utf-8",
    )
    wiki = preprocess(str(root / "wiki"), tokenizer=sp, limit=10).data_prefix
    notes = preprocess(str(root / "notes"), tokenizer=sp, inputs=[str(text)]).data_prefix
    return wiki, notes


# ------------------------------------------------------------------------------------- config
def test_both_blend_forms_read_as_one(tmp_path):
    flat = load_config(CONFIG, ["data.prefix=[0.3, data/a_text_document, 0.7, data/b]"])
    listed = load_config(
        CONFIG,
        [
            "data.prefix=[{prefix: data/a_text_document, weight: 0.3}, "
            "{prefix: data/b, weight: 0.7}]"
        ],
    )
    assert (
        flat.data.prefix
        == listed.data.prefix
        == [{"prefix": "data/a_text_document", "weight": 0.3}, {"prefix": "data/b", "weight": 0.7}]
    )
    # config.yaml keeps the blend and reads back as the same blend
    from inrank_megatron.config import save_config

    save_config(flat, str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")).data.prefix == flat.data.prefix


@pytest.mark.parametrize(
    "value, needle",
    [
        (
            "[0.3, a, 0, b]",
            "data.prefix[1] (override 'data.prefix=[0.3, a, 0, b]'): weight 0 of 'b'; "
            "expected a finite number > 0",
        ),
        ("[0.3, a, -1, b]", "data.prefix[1] (override"),
        ("[.nan, a]", "data.prefix[0] (override"),
        ("[0.3, a, 0.7]", "is neither Megatron's flat [weight, prefix, ...]"),
        ("[a, b]", "lists prefixes without weights"),
        ("[1, a, 2, a]", "'a' appears twice"),
        (
            "[0.5, 3, 0.5, b]",
            "data.prefix[0] (override 'data.prefix=[0.5, 3, 0.5, b]'): prefix 3 "
            "after weight 0.5; expected the text of a dataset prefix",
        ),
        (
            "[{prefix: a}]",
            "data.prefix[0] (override 'data.prefix=[{prefix: a}]'): keys ['prefix']; "
            "expected exactly prefix and weight",
        ),
        ("[]", "expected a dataset prefix, or a blend"),
    ],
)
def test_bad_blends_name_the_entry(value, needle):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG, [f"data.prefix={value}"])
    assert needle in str(error.value)
    with pytest.raises(ConfigError, match=r"data\.valid_prefix"):
        load_config(CONFIG, [f"data.valid_prefix={value}"])


# ------------------------------------------------------------------------------------- datasets
def test_blend_is_megatrons_blended_dataset_with_exact_counts(tmp_path, sp, two):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from inrank_megatron.data.datasets import MegatronTokenizerAdapter

    wiki, notes = two
    ours = build_gpt_datasets(
        [(wiki, 1.0), (notes, 3.0)],
        32,
        tokenizer=sp,
        num_samples=(200, 20, 0),
        split="8,2,0",
        seed=7,
        cache_dir=str(tmp_path / "ours"),
    )
    config = GPTDatasetConfig(
        random_seed=7,
        sequence_length=32,
        blend=([wiki, notes], [1.0, 3.0]),
        split="8,2,0",
        path_to_cache=None,
        tokenizer=MegatronTokenizerAdapter(sp),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    theirs = BlendedMegatronDatasetBuilder(GPTDataset, [200, 20, 0], lambda: True, config).build()
    for mine, reference, n in ((ours.train, theirs[0], 200), (ours.valid, theirs[1], 20)):
        assert len(mine) == len(reference) == n
        assert numpy.array_equal(mine.dataset_index, reference.dataset_index)
        assert numpy.array_equal(mine.dataset_sample_index, reference.dataset_sample_index)
        for i in range(n):
            assert numpy.array_equal(mine[i]["tokens"], reference[i]["tokens"])
    # 1 : 3 of 200 samples is 50 : 150, of 20 is 5 : 15 (weights read in order, not reversed)
    assert numpy.bincount(ours.train.dataset_index).tolist() == [50, 150]
    assert numpy.bincount(ours.valid.dataset_index).tolist() == [5, 15]
    assert ours.test is None  # asked for no samples: not built

    # A blend of one is the plain dataset.
    alone = build_gpt_datasets(
        [(wiki, 2.0)],
        32,
        tokenizer=sp,
        num_samples=(20, 4, 0),
        split="8,2,0",
        cache_dir=str(tmp_path / "one"),
    )
    plain = build_gpt_datasets(
        wiki,
        32,
        tokenizer=sp,
        num_samples=(20, 4, 0),
        split="8,2,0",
        cache_dir=str(tmp_path / "one"),
    )
    assert type(alone.train) is GPTDataset
    assert all(
        numpy.array_equal(alone.train[i]["tokens"], plain.train[i]["tokens"]) for i in range(20)
    )


def test_usage_counts_tokens_and_epochs_as_megatron(tmp_path, sp, two):
    wiki, notes = two
    n_train, n_valid = 200, 20
    built = build_gpt_datasets(
        [(wiki, 1.0), (notes, 3.0)],
        32,
        tokenizer=sp,
        num_samples=(n_train, n_valid, 0),
        split="8,2,0",
        cache_dir=str(tmp_path),
    )
    rows = dataset_usage([(wiki, 1.0), (notes, 3.0)], 32, (n_train, n_valid), split="8,2,0")
    assert [(r.split, r.prefix, r.key) for r in rows] == [
        ("train", wiki, "data.prefix[0]"),
        ("train", notes, "data.prefix[1]"),
        ("valid", wiki, "data.prefix[0]"),
        ("valid", notes, "data.prefix[1]"),
    ]
    for row, dataset in zip(rows, built.train.datasets + built.valid.datasets):
        assert row.documents == len(dataset.indices)
        assert row.tokens == dataset._get_num_tokens_per_epoch()
        assert row.samples == math.ceil(row.weight * (n_train if row.split == "train" else n_valid))
        assert row.epochs == (row.samples * 32 + 1) / row.tokens
        target = copy.copy(dataset)
        target.num_samples = row.samples  # megatron's epochs for exactly the target samples
        assert target._get_num_epochs(row.tokens) == math.ceil(row.epochs)
    assert rows[1].epochs > 1  # the notes are short: the run repeats them


def test_valid_prefix_reads_both_datasets_whole(tmp_path, sp, two):
    wiki, notes = two
    train, valid, test = build_gpt_datasets(
        wiki, 32, tokenizer=sp, num_samples=(40, 8, 0), valid_prefix=notes, cache_dir=str(tmp_path)
    )
    assert set(numpy.asarray(train.document_index).tolist()) == set(range(10))
    assert set(numpy.asarray(valid.document_index).tolist()) == set(range(30))
    assert valid.dataset.path_prefix == notes and test is None
    rows = dataset_usage(wiki, 32, (40, 8), valid_prefix=notes)
    assert [(r.split, r.key, r.documents) for r in rows] == [
        ("train", "data.prefix", 10),
        ("valid", "data.valid_prefix", 30),
    ]
    with pytest.raises(ValueError, match="no test data"):
        build_gpt_datasets(
            wiki,
            32,
            tokenizer=sp,
            num_samples=(40, 8, 4),
            valid_prefix=notes,
            cache_dir=str(tmp_path),
        )


# ------------------------------------------------------------------------------------ pre-flight
def _check(capsys, *overrides):
    status = launch_env.main(["check", CONFIG, "--world-size", "2", *overrides])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _blend(a, b, tmp_path):
    return [
        f"data.prefix=[1, {a}, 3, {b}]",
        "data.corpus=none",
        f"output.dir={tmp_path / 'run'}",
        "data.split=8,2,0",
    ]


def test_preflight_passes_a_good_blend(tmp_path, capsys, two):
    status, out, err = _check(capsys, *_blend(*two, tmp_path), f"data.valid_prefix={two[1]}")
    assert status == 0 and out.startswith("world 2"), err


def test_split_ranges_are_megatrons_without_importing_it():
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from inrank_megatron.data.datasets import split_document_ranges

    for split in (
        "969,30,1",
        "949,50,1",
        "8,2,0",
        "1",
        "99,1",
        "3,1,1",
        "0.7,0.2,0.1",
        "1,99,0",
        "33.3,33.3,33.4",
        "0,1,0",
        "98/1/1",
        "0.33,7,0.5",
        "5,0.33,969",
    ):
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        for documents in (0, 1, 3, 10, 24, 103, 456, 12345, 10**6 + 7):
            assert split_document_ranges(split, documents) == [
                None if b is None else (int(round(b[0] * documents)), int(round(b[1] * documents)))
                for b in matrix
            ], (split, documents)


def test_preflight_of_a_blend_does_not_import_torch(tmp_path, two):
    overrides = [*_blend(*two, tmp_path), "data.tokenizer=gpt2", "data.tokenizer_model=null"]
    code = (
        "import sys\nfrom inrank_megatron import launch_env\n"
        f"status = launch_env.main(['check', {CONFIG!r}, '--world-size', '2', *{overrides!r}])\n"
        "print(status, [m for m in ('torch', 'megatron') if m in sys.modules])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "0 []", (
        proc.stdout + proc.stderr
    )


def test_preflight_refuses_a_bad_blend_naming_the_key_and_file(tmp_path, capsys, two):
    wiki, notes = two
    missing = str(tmp_path / "gone_text_document")
    status, _, err = _check(capsys, *_blend(wiki, missing, tmp_path))
    assert status == 2 and err.count("\n") == 1, err
    assert (
        f"data.prefix[1]={missing!r}: {missing}.bin/.idx not found; the datasets of a blend "
        "and of data.valid_prefix must exist"
    ) in err

    cut = str(tmp_path / "cut_text_document")
    for suffix in (".bin", ".idx"):
        shutil.copyfile(notes + suffix, cut + suffix)
    size = os.path.getsize(cut + ".bin")
    with open(cut + ".bin", "r+b") as f:
        f.truncate(size - 4)
    status, _, err = _check(capsys, *_blend(cut, wiki, tmp_path))
    assert status == 2 and f"data.prefix[0]={cut!r}: {cut}.bin is truncated" in err, err

    status, _, err = _check(capsys, *_blend(wiki, notes, tmp_path), f"data.valid_prefix={missing}")
    assert status == 2 and f"data.valid_prefix={missing!r}: {missing}.bin/.idx not found" in err

    # 10 articles at 969:30:1 give valid none: the blend's first dataset is named
    status, _, err = _check(capsys, *_blend(wiki, notes, tmp_path)[:-1], "data.split=969,30,1")
    assert status == 2, err
    assert (
        f"data.split='969,30,1' leaves the valid split of data.prefix[0]={wiki!r} no "
        "documents (10 documents: train 10, valid 0, test 0)"
    ) in err


# ------------------------------------------------------------------------------ trained runs
@pytest.mark.slow
def test_blend_resume_is_bit_identical_and_console_reports_epochs(blend_run, books_data, tmp_path):
    # The run stopped after step 4 (its checkpoint, copied out) and resumed: steps 5..12, the cut
    # after step 8 included, read the blend's samples in the uninterrupted run's order.
    out = str(tmp_path / "resumed")
    shutil.copytree(
        os.path.join(blend_run, "checkpoints", "step_000004"),
        os.path.join(out, "checkpoints", "step_000004"),
    )
    run_train([*blend_overrides(books_data), f"output.dir={out}", "output.resume=auto"])
    reference = read_summary(blend_run)["train_losses"]
    assert len(reference) == 12 and read_summary(out)["train_losses"] == reference[4:]

    console = open(os.path.join(blend_run, "console.txt")).read().splitlines()
    usage = dataset_usage(
        [("data/wiki_sp8k_text_document", BLEND_WEIGHTS[0]), (books_data, BLEND_WEIGHTS[1])],
        64,
        (12 * 4, 1 * 2 * 1),
    )
    header = next(i for i, line in enumerate(console) if line.startswith("data: "))
    assert console[header] == (
        "data: 48 train samples of 64 tokens (12 steps x 4), a blend of 2 "
        "datasets; data.split 969,30,1 of each"
    )
    for row, line in zip(usage, console[header + 3 : header + 7]):
        assert line.split() == [
            row.split,
            row.prefix,
            f"{row.weight:.3f}",
            f"{row.documents:,}",
            f"{row.tokens:,}",
            f"{row.samples:,}",
            f"{row.epochs:.3g}",
        ]
    assert [row.samples for row in usage[:2]] == [12, 36]


def test_plan_reports_each_datasets_epochs(tmp_path, capsys, two):
    from tools.plan import main

    wiki, notes = two
    status = main(
        [
            "--config",
            CONFIG,
            "--nodes",
            "1",
            "--gpus-per-node",
            "2",
            f"data.prefix=[1, {wiki}, 3, {notes}]",
            "data.split=8,2,0",
            "train.steps=50",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert status == 0
    start = out.index("Data: what the run reads of each dataset (epochs past 1 repeat it)")
    assert out[start + 1] == (
        "data: 400 train samples of 128 tokens (50 steps x 8), a blend of 2 "
        "datasets; data.split 8,2,0 of each"
    )
    rows = dataset_usage([(wiki, 1), (notes, 3)], 128, (400, 4 * 4 * 1), split="8,2,0")
    assert [line.split() for line in out[start + 4 : start + 8]] == [
        [
            r.split,
            r.prefix,
            f"{r.weight:.3f}",
            f"{r.documents:,}",
            f"{r.tokens:,}",
            f"{r.samples:,}",
            f"{r.epochs:.3g}",
        ]
        for r in rows
    ]
    assert [r.samples for r in rows] == [100, 300, 4, 12]
