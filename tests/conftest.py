"""Shared pytest configuration: the ``slow`` marker's check (tests/slow_check.py) and the
reference runs.

Reference runs: the trainer runs that several test files compare against are trained once per
session here (each is about a minute on 2 cores). Tests must treat their directories as read-only:
copy a checkpoint out before resuming from it into another directory.
"""

import os

import pytest

from tests.distributed import SHORT, run_train


def pytest_configure(config):
    config.pluginmanager.import_plugin("tests.slow_check")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test starts from the session's environment: an in-process ``train.main`` (its
    ``init_distributed_env``) writes RANK / WORLD_SIZE / MASTER_* into ``os.environ``, and a later
    subprocess inheriting them believes it was launched (``convert_checkpoint.py`` then runs one
    process instead of spawning its job)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


# ----------------------------------------------------------------------------- reference runs
@pytest.fixture(scope="session")
def tp2_run(tmp_path_factory):
    """``SHORT`` at TP=2 on 2 processes, with plots: checkpoints at steps 4, 8, 12 and 16 (growth
    every 2 steps from step 2, the cut after step 8). Read-only."""
    out = str(tmp_path_factory.mktemp("tp2_run"))
    run_train([*SHORT, f"output.dir={out}", "output.plot=true"])
    return out


@pytest.fixture(scope="session")
def dp2_run(tmp_path_factory):
    """``SHORT`` at TP=1 x DP=2 with the torch backend: checkpoints at steps 4, 8, 12 and 16.
    The reference of the DeepSpeed runs, of backend conversion and of TP=2 (DP averages what TP
    computes in one replica). Read-only."""
    out = str(tmp_path_factory.mktemp("dp2_run"))
    run_train([*SHORT, f"output.dir={out}", "parallel.tensor_model_parallel_size=1"])
    return out


@pytest.fixture(scope="session")
def cumulative_run(tmp_path_factory):
    """``SHORT`` in cumulative mode at TP=2 (no cut: capacity grows), 8 steps, one checkpoint at
    step 8. Read-only."""
    out = str(tmp_path_factory.mktemp("cumulative_run"))
    run_train(
        [
            *SHORT,
            f"output.dir={out}",
            "inrank.mode=cumulative",
            "inrank.stage1_steps=null",
            "train.steps=8",
            "train.save_interval=8",
        ]
    )
    return out


# Weights of the blend run: the suite's Wikipedia dataset once, the books dataset three times.
BLEND_WEIGHTS = (1, 3)


@pytest.fixture(scope="session")
def books_data(tmp_path_factory):
    """A second dataset in the suite's 8k SentencePiece tokenizer: 100 documents of the books of
    big.txt (prefix). The Wikipedia one (``data/wiki_sp8k_text_document``) is built first if
    missing, with the tokenizer."""
    import itertools
    import json

    from inrank_megatron.config import load_config
    from inrank_megatron.data.corpus import book_documents
    from inrank_megatron.data.preprocess import preprocess
    from inrank_megatron.data.tokenizers import build_tokenizer
    from inrank_megatron.training.data import prepare_data
    from tests.distributed import REPO, TINY_CONFIG

    cwd = os.getcwd()
    os.chdir(REPO)  # the suite's config names data/ relative to the repository
    try:
        cfg = load_config(TINY_CONFIG)
        prepare_data(cfg)
        tokenizer = build_tokenizer(cfg.data.tokenizer, os.path.abspath(cfg.data.tokenizer_model))
    finally:
        os.chdir(cwd)
    root = tmp_path_factory.mktemp("books")
    lines = root / "books.jsonl"
    lines.write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in itertools.islice(book_documents(300), 100)),
        encoding="utf-8",
    )
    return preprocess(str(root / "books"), tokenizer=tokenizer, inputs=[str(lines)]).data_prefix


def blend_overrides(books: str) -> list:
    """``SHORT`` over 12 steps on the blend ``[1, wiki, 3, books]`` (``BLEND_WEIGHTS``), measured
    against a 0.5 TFLOP/s peak: checkpoints at steps 4, 8 and 12, the cut after step 8."""
    w_wiki, w_books = BLEND_WEIGHTS
    return [
        *SHORT,
        "train.steps=12",
        "train.peak_tflops=0.5",
        f"data.prefix=[{w_wiki}, data/wiki_sp8k_text_document, {w_books}, {books}]",
    ]


@pytest.fixture(scope="session")
def blend_run(tmp_path_factory, books_data):
    """:func:`blend_overrides` at TP=2 on 2 processes, uninterrupted. Read-only."""
    out = str(tmp_path_factory.mktemp("blend_run"))
    proc = run_train([*blend_overrides(books_data), f"output.dir={out}"])
    with open(os.path.join(out, "console.txt"), "w") as f:
        f.write(proc.stdout)
    return out
