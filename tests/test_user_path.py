"""The user's path (issue 15): errors found before any process starts,
one line each, in the launch scripts' pre-flight (``python -m inrank_megatron.launch_env check``)
and the trainer's alike; one line on rank 0 for what fails after launch; data import details.

Pins down:
- pre-flight refuses, with exit status 2 and one line naming the key and the file: a truncated
  ``.bin`` (a raw numpy error in the ranks before), an ``.idx`` that is not an index, ``output.dir``
  that is a file, a missing SentencePiece model, ``data.tokenizer=gpt2`` with a model file, a
  resume whose checkpoint needs other values (the values are given), a truncated ``.distcp`` (a
  bare ``EOFError`` in every rank before), a split that leaves valid no documents; a split that
  leaves valid a document or two is a warning;
- the trainer prints a failure after launch as one line on rank 0 and exits 1; ``INRANK_DEBUG=1``
  raises it with its traceback;
- the console: a line per log interval (step, loss, lr, tokens/s, stage, ranks), each
  validation result, the cut, where the run's files are; TE/apex noise dropped, any other
  third-party warning once, nothing from ranks other than 0;
- data import strips a UTF-8 BOM and shuffles documents by a seed.

In process, no process group; the data is a 12-document SentencePiece dataset made once. The
import/export round trip is in tests/test_export.py (test_hf_round_trip_is_loss_exact,
test_import_writes_a_run_that_resume_auto_continues), the tokenizer switch in tests/test_config.py.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from inrank_megatron import launch_env
from inrank_megatron.config import load_config, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "tests", "tiny.yaml")
SP_MODEL = os.path.join(REPO, "data", "wiki_sp8k.model")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 12-document dataset (prefix), tokenized with the shipped 8k SentencePiece model."""
    from inrank_megatron.data.preprocess import preprocess
    from inrank_megatron.data.tokenizers import build_tokenizer

    root = tmp_path_factory.mktemp("data")
    text = root / "corpus.txt"
    text.write_text(
        "\n\n".join(f"Document {i} says something about topic {i % 3}." for i in range(12)) + "\n",
        encoding="utf-8",
    )
    result = preprocess(
        str(root / "mine"), tokenizer=build_tokenizer("sentencepiece", SP_MODEL), inputs=[str(text)]
    )
    return result.data_prefix


def _copy(prefix, tmp_path):
    """A copy of the dataset (and its tokenizer description) under tmp_path."""
    out = str(tmp_path / "mine_text_document")
    for suffix in (".bin", ".idx"):
        shutil.copyfile(prefix + suffix, out + suffix)
    shutil.copyfile(
        prefix.removesuffix("_text_document") + ".tokenizer.json",
        str(tmp_path / "mine.tokenizer.json"),
    )
    return out


def _check(capsys, *overrides, world=2):
    """``launch_env check`` of tiny-cpu.yaml with the overrides: (status, stdout, stderr)."""
    status = launch_env.main(["check", CONFIG, "--world-size", str(world), *overrides])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _refused(capsys, needle, *overrides):
    status, _, err = _check(capsys, *overrides)
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    return err


def _data(prefix, tmp_path):
    return [
        f"data.prefix={prefix}",
        "data.corpus=none",
        f"output.dir={tmp_path / 'run'}",
        "data.split=6,4,2",
    ]


# ------------------------------------------------------------------------------- data files
def test_good_data_passes(dataset, tmp_path, capsys):
    status, out, err = _check(capsys, *_data(dataset, tmp_path))
    assert status == 0 and out.startswith("world 2"), err


def test_truncated_bin_is_refused_before_launch(dataset, tmp_path, capsys):
    prefix = _copy(dataset, tmp_path)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 6)
    _refused(
        capsys,
        f"{prefix}.bin is truncated: {size - 6} bytes, its index describes "
        f"{size // 2} uint16 tokens = {size} bytes",
        *_data(prefix, tmp_path),
    )


def test_garbage_idx_is_refused_before_launch(dataset, tmp_path, capsys):
    prefix = _copy(dataset, tmp_path)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"not an index at all, just some bytes")
    _refused(capsys, f"{prefix}.idx is not a Megatron index", *_data(prefix, tmp_path))
    with open(prefix + ".idx", "wb") as f:  # the header of an index, cut short
        f.write(open(dataset + ".idx", "rb").read()[:40])
    _refused(capsys, f"{prefix}.idx is truncated", *_data(prefix, tmp_path))


def test_split_without_valid_documents_is_refused_and_few_warn(dataset, tmp_path, capsys):
    # 12 documents at 969,30,1: valid gets round(0.999 * 12) - round(0.969 * 12) = 0.
    _refused(
        capsys,
        "data.split='969,30,1' leaves the valid split no documents (12 documents: "
        "train 12, valid 0, test 0)",
        *_data(dataset, tmp_path),
        "data.split=969,30,1",
    )
    status, out, _ = _check(capsys, *_data(dataset, tmp_path), "data.split=10,1,1")
    assert status == 0
    assert out.splitlines()[0] == (
        "warning: data.split='10,1,1' gives the valid split only 1 of 12 documents (train 10, "
        "valid 1, test 1); its samples repeat them (raise its weight; shuffle ordered documents "
        "with tools/preprocess_data.py --shuffle-seed)"
    )


# ------------------------------------------------------------------- tokenizer and output dir
def test_missing_tokenizer_model_is_refused(dataset, tmp_path, capsys):
    _refused(
        capsys,
        f"data.tokenizer_model='{tmp_path}/gone.model': no such file",
        *_data(dataset, tmp_path),
        f"data.tokenizer_model={tmp_path}/gone.model",
    )


def test_gpt2_with_a_model_file_is_refused_naming_the_key(dataset, tmp_path, capsys):
    _refused(
        capsys,
        "data.tokenizer_model='data/wiki_sp8k.model' is only read by "
        "data.tokenizer=sentencepiece (tokenizer is gpt2); expected null",
        *_data(dataset, tmp_path),
        "data.tokenizer=gpt2",
        "data.tokenizer_model=data/wiki_sp8k.model",
    )


def test_output_dir_that_is_a_file_is_refused(dataset, tmp_path, capsys):
    (tmp_path / "run").write_text("my notes\n")
    _refused(
        capsys, f"output.dir='{tmp_path}/run': {tmp_path}/run is a file", *_data(dataset, tmp_path)
    )
    assert (tmp_path / "run").read_text() == "my notes\n"


# ------------------------------------------------------------------------------------ resume
def _checkpoint(run, cfg, step=5, files=None):
    """A step directory as the training loop writes it, as far as pre-flight reads it."""
    from inrank_megatron.checkpoint import (
        Meta,
        record_files,
        step_dir,
        write_growth,
        write_latest,
        write_meta,
    )

    path = step_dir(str(run / "checkpoints"), step)
    os.makedirs(os.path.join(path, "model"))
    for name, size in (files or {}).items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"\0" * size)
    write_growth(path, {})
    write_meta(
        path,
        Meta(
            step=step,
            consumed_samples=0,
            world_size=2,
            tp=2,
            pp=1,
            dp=1,
            backend="torch",
            config=to_dict(cfg),
            files=record_files(path),
        ),
    )
    write_latest(str(run / "checkpoints"), path)
    return path


def test_incompatible_resume_names_the_values_needed(dataset, tmp_path, capsys):
    overrides = _data(dataset, tmp_path)
    saved = load_config(CONFIG, [*overrides, "model.hidden_size=256", "inrank.buffer=8"])
    step_dir = _checkpoint(tmp_path / "run", saved)
    _refused(
        capsys,
        f"checkpoint {step_dir} was trained with model.hidden_size=256 "
        "inrank.buffer=8 (this run: model.hidden_size=128, inrank.buffer=16); resume with "
        "those values",
        *overrides,
        "output.resume=auto",
    )


def test_truncated_distcp_is_named_before_launch(dataset, tmp_path, capsys):
    """The launch pre-flight runs the resume checks (checkpoint.meta.is_complete names it)."""
    overrides = _data(dataset, tmp_path)
    step_dir = _checkpoint(
        tmp_path / "run", load_config(CONFIG, overrides), files={"model/__0_0.distcp": 4096}
    )
    overrides.append(f"output.resume={step_dir}")
    assert _check(capsys, *overrides)[0] == 0  # whole: fine
    with open(os.path.join(step_dir, "model", "__0_0.distcp"), "r+b") as f:
        f.truncate(100)
    _refused(
        capsys, f"{step_dir}/model/__0_0.distcp has 100 bytes, the save wrote 4096", *overrides
    )


# ------------------------------------------------------------------------- after the launch
def test_failure_after_launch_is_one_line_on_rank_0(dataset, tmp_path, capsys, monkeypatch):
    from inrank_megatron import train
    from inrank_megatron.training import loop

    capsys.readouterr()  # what importing megatron printed

    def broken(cfg, **kwargs):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(loop, "train", broken)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "INRANK_DEBUG", "INRANK_PREFLIGHT"):
        monkeypatch.delenv(key, raising=False)
    argv = ["--config", CONFIG, *_data(dataset, tmp_path), "parallel.tensor_model_parallel_size=1"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err == "error: EOFError: Ran out of input (INRANK_DEBUG=1 shows the traceback)\n"
    monkeypatch.setenv("INRANK_DEBUG", "1")
    with pytest.raises(EOFError):
        train.main(argv)


def test_pre_flight_error_in_the_trainer_is_one_line_exit_2(dataset, tmp_path, capsys, monkeypatch):
    from inrank_megatron import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "run").write_text("")
    assert (
        train.main(
            ["--config", CONFIG, *_data(dataset, tmp_path), "parallel.tensor_model_parallel_size=1"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a directory" in err


# ------------------------------------------------------------------------------- data import
def test_bom_is_stripped_and_shuffle_is_seeded(tmp_path):
    from inrank_megatron.data.corpus import iter_documents
    from inrank_megatron.data.preprocess import preprocess
    from inrank_megatron.data.tokenizers import build_tokenizer

    text, jsonl = tmp_path / "bom.txt", tmp_path / "bom.jsonl"
    text.write_bytes("\ufeffFirst document.\n\nSecond one.\n".encode("utf-8"))
    jsonl.write_bytes("\ufeff".encode("utf-8") + b'{"text": "A record."}\n')
    assert list(iter_documents([str(text), str(jsonl)])) == [
        "First document.",
        "Second one.",
        "A record.",
    ]

    tokenizer = build_tokenizer("sentencepiece", SP_MODEL)
    corpus = tmp_path / "ordered.txt"
    corpus.write_text("\n\n".join(f"Document number {i}." for i in range(20)), encoding="utf-8")

    def order(name, seed):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        result = preprocess(
            str(tmp_path / name), tokenizer=tokenizer, inputs=[str(corpus)], shuffle_seed=seed
        )
        data = IndexedDataset(result.data_prefix)
        return [tokenizer.decode(list(data[i][:-1])) for i in range(len(data))]

    plain, a, b = order("plain", None), order("a", 7), order("b", 7)
    assert plain == [f"Document number {i}." for i in range(20)]
    assert a == b != plain and sorted(a) == sorted(plain)


# ----------------------------------------------------------------------------------- console
def test_console_lines(capsys):
    from inrank_megatron.training import console

    out = console.Console(last_step=200, start_step=0)
    assert out.bar is None  # stderr is not a terminal here: lines only
    ranks = {"a": 8, "b": 12, "c": 10, "d": 9}
    out.valid(50, 6.9)
    out.cut(60, ranks)
    out.close()
    # the step line: tests/test_throughput.py::test_console_step_line
    assert capsys.readouterr().out.splitlines() == [
        "step  50/200 | valid loss 6.9000 | ppl 992.27",
        "step  60/200 | cut to stage 2 (fixed): ranks 8-12 (mean 9.8) over 4 layers",
    ]
    assert console.where(
        {
            "run_dir": "r",
            "checkpoint": "r/checkpoints/step_000200",
            "metrics_csv": "r/metrics.csv",
            "plot": None,
        }
    ) == [
        "run directory: r",
        "last checkpoint: r/checkpoints/step_000200",
        "metrics: r/metrics.csv",
    ]


def test_third_party_warnings_once_and_known_noise_dropped(capsys):
    import warnings

    from inrank_megatron.training.console import quiet_third_party

    def emit():
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to X")
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("full scope is deprecated. Use empty cuda_graph_scope")
        for _ in range(2):  # two call sites, one message
            warnings.warn("something the user should read", UserWarning)
        warnings.warn("something the user should read", UserWarning)

    def show(message, category, filename, lineno, file=None, line=None):
        # What Python prints without pytest's warnings plugin, which records instead of printing.
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.showwarning = show
        quiet_third_party(0)
        emit()
    err = capsys.readouterr().err
    assert err.count("UserWarning: ") == 1 and "UserWarning: something the user" in err, err
    with warnings.catch_warnings():
        warnings.showwarning = show
        quiet_third_party(1)
        emit()
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # a subprocess that imports megatron: 10-40 s on a loaded machine
def test_preprocess_reports_the_time_of_the_whole_tool(tmp_path):
    """The reported time covered only tokenizing and writing (0.1 s of an 8 s run: imports and
    the tokenizer load were left out); now it is the tool's, from its first import."""
    import re
    import subprocess
    import sys
    import time

    text = tmp_path / "a.txt"
    text.write_text("One document.\n\nAnother one.\n", encoding="utf-8")
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            str(text),
            "--output-prefix",
            str(tmp_path / "a"),
            "--tokenizer",
            "sentencepiece",
            "--tokenizer-model",
            SP_MODEL,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    reported = float(re.search(r" in ([0-9.]+) s$", proc.stdout.strip()).group(1))
    assert 0.5 * wall <= reported <= wall + 0.1, (reported, wall)
