"""``tools/compare_runs.py`` and :mod:`inrank_megatron.training.compare` on run directories the
test writes with the training loop's own writers (MetricsWriter, save_config, summary.json).

Pins down: every number of the table equals the value in the run's files (final and matched-step
valid loss and ppl, parameters, rank mean/min/max, tokens, wall time, median throughput), for a run
with a summary and one without (ranks from ranks.csv); matched steps are those every run
evaluated; the config keys that differ are listed (output.dir aside) with each run's value; text
and Markdown output; the PNG; a missing or invalid run directory is one line naming it, exit 2.
"""

import importlib.util
import json
import math
import os
import re

import pytest

from inrank_megatron.config import load_config, save_config
from inrank_megatron.training.compare import RunDirError, compare_runs, format_table
from inrank_megatron.training.metrics import MetricsWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny.yaml")
LAYERS = ["decoder.layers.0.mlp.linear_fc1", "decoder.layers.0.mlp.linear_fc2"]


def _run(path, overrides, *, valid, throughput, ranks=None, summary=None):
    """A run directory: config.yaml, metrics.csv (train rows with throughput, valid rows),
    ranks.csv (initial and final ranks) and, if given, summary.json."""
    cfg = load_config(TINY, [f"output.dir={path}", *overrides])
    os.makedirs(path)
    save_config(cfg, os.path.join(path, "config.yaml"))
    with MetricsWriter(str(path), tensorboard=False) as writer:
        if ranks:
            writer.log_ranks(0, dict.fromkeys(ranks, 2))
        for step, tps in throughput.items():
            writer.log_train(
                step, loss=9.0, lr=1e-3, grad_norm=1.0, tokens_per_s=tps, stage="growing"
            )
            if step in valid:
                writer.log_eval(step, split="valid", loss=valid[step])
        if ranks:
            writer.log_ranks(max(throughput), ranks, None)
    if summary is not None:
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump(summary, f)
    return str(path)


@pytest.fixture
def runs(tmp_path):
    inrank = _run(
        tmp_path / "inrank",
        ["train.steps=30"],
        valid={10: 7.5, 20: 6.25, 30: 5.875},
        throughput={10: 1000.0, 20: 3000.0, 30: 2000.0},
        ranks={LAYERS[0]: 30, LAYERS[1]: 41},
        summary={
            "steps": 30,
            "valid_loss": 5.875,
            "wall_s": 123.5,
            "ranks": {LAYERS[0]: 30, LAYERS[1]: 41},
            "parameters": {"total": 1_234_567},
        },
    )
    # Dense, another learning rate, evaluated at 10 and 20 only, still running: no summary.
    dense = _run(
        tmp_path / "dense",
        ["model.inrank=false", "train.lr=3e-4"],
        valid={10: 7.0, 20: 6.0},
        throughput={10: 500.0, 20: 700.0},
    )
    # A run without summary.json: its ranks are the last rows of ranks.csv.
    fixed = _run(
        tmp_path / "fixed",
        ["inrank.fixed_ranks=0.25"],
        valid={20: 6.5, 25: 6.4},
        throughput={20: 900.0, 25: 900.0},
        ranks={LAYERS[0]: 32, LAYERS[1]: 32},
    )
    return inrank, dense, fixed


def test_numbers_are_the_files_values(runs):
    inrank, dense, fixed = runs
    table = compare_runs([inrank, dense, fixed])
    assert table.matched_steps == [20]
    header, rows = table.rows()
    assert header == [
        "run",
        "end step",
        "valid loss",
        "valid ppl",
        "loss @20",
        "ppl @20",
        "parameters",
        "rank mean",
        "rank min",
        "rank max",
        "tokens",
        "wall s",
        "tokens/s",
    ]
    # tiny-cpu: 8 sequences of 128 tokens per step.
    assert rows[0] == [
        inrank,
        30,
        5.875,
        math.exp(5.875),
        6.25,
        math.exp(6.25),
        1_234_567,
        35.5,
        30,
        41,
        30 * 8 * 128,
        123.5,
        2000.0,
    ]
    assert rows[1] == [
        dense,
        20,
        6.0,
        math.exp(6.0),
        6.0,
        math.exp(6.0),
        None,
        None,
        None,
        None,
        20 * 8 * 128,
        None,
        600.0,
    ]
    assert rows[2] == [
        fixed,
        25,
        6.4,
        math.exp(6.4),
        6.5,
        math.exp(6.5),
        None,
        32.0,
        32,
        32,
        25 * 8 * 128,
        None,
        900.0,
    ]


def test_differing_config_keys_are_listed(runs):
    inrank, dense, fixed = runs
    table = compare_runs([inrank, dense, fixed])
    assert table.differences == {
        "inrank.fixed_ranks": [None, None, 0.25],
        "model.inrank": [True, False, True],
        "train.lr": [1e-3, 3e-4, 1e-3],
        "train.steps": [30, 200, 200],
    }
    assert compare_runs([inrank, inrank]).differences == {}


def test_text_and_markdown(runs):
    inrank, dense, _ = runs
    text = format_table(compare_runs([inrank, dense]))
    lines = text.splitlines()
    assert lines[0].split() == [
        "run",
        "end",
        "step",
        "valid",
        "loss",
        "valid",
        "ppl",
        "loss",
        "@20",
        "ppl",
        "@20",
        "parameters",
        "rank",
        "mean",
        "rank",
        "min",
        "rank",
        "max",
        "tokens",
        "wall",
        "s",
        "tokens/s",
    ]
    assert lines[2].split() == [
        inrank,
        "30",
        "5.8750",
        f"{math.exp(5.875):,.2f}",
        "6.2500",
        f"{math.exp(6.25):,.2f}",
        "1,234,567",
        "35.5",
        "30",
        "41",
        "30,720",
        "123.5",
        "2,000",
    ]
    assert lines[3].split() == [
        dense,
        "20",
        "6.0000",
        f"{math.exp(6.0):,.2f}",
        "6.0000",
        f"{math.exp(6.0):,.2f}",
        "—",
        "—",
        "—",
        "—",
        "20,480",
        "—",
        "600",
    ]
    assert "Config keys that differ:" in text
    diff = text[text.index("Config keys that differ:") :].splitlines()
    assert [line.split() for line in diff[4:]] == [
        ["model.inrank", "true", "false"],
        ["train.lr", "0.001", "0.0003"],
        ["train.steps", "30", "200"],
    ]
    markdown = format_table(compare_runs([inrank, dense]), markdown=True).splitlines()
    assert markdown[0].startswith("| run | end step | valid loss |")
    assert markdown[1] == "|" + "|".join(["---"] * 13) + "|"
    assert markdown[2] == (
        f"| {inrank} | 30 | 5.8750 | {math.exp(5.875):,.2f} | 6.2500 | "
        f"{math.exp(6.25):,.2f} | 1,234,567 | 35.5 | 30 | 41 | 30,720 | "
        "123.5 | 2,000 |"
    )
    assert "| model.inrank | true | false |" in markdown


def _tool():
    spec = importlib.util.spec_from_file_location(
        "compare_runs", os.path.join(REPO, "tools", "compare_runs.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_cli_plot(runs, tmp_path, capsys):
    inrank, dense, fixed = runs
    out = tmp_path / "compare.png"
    assert _tool().main([inrank, dense, fixed, "--markdown", "--plot", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| run |") and printed.rstrip().endswith(f"plot: {out}")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < os.path.getsize(out) < 200_000
    assert [p for p in os.listdir(tmp_path) if p.startswith(".compare.")] == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "{path}: no such run directory"),
        ("empty", "{path}: not a run directory (config.yaml missing)"),
        ("no_metrics", "{path}: not a run directory (metrics.csv missing)"),
        ("bad_metrics", "{path}: {path}/metrics.csv: header 'a,b' is not"),
    ],
)
def test_bad_run_directories_are_one_line_exit_2(runs, tmp_path, capsys, case, message):
    path = str(tmp_path / case)
    if case != "missing":
        os.makedirs(path)
    if case in ("no_metrics", "bad_metrics"):
        save_config(load_config(TINY), os.path.join(path, "config.yaml"))
    if case == "bad_metrics":
        with open(os.path.join(path, "metrics.csv"), "w") as f:
            f.write("a,b\n1,2\n")
    with pytest.raises(RunDirError, match="^" + re.escape(message.format(path=path))):
        compare_runs([runs[0], path])
    assert _tool().main([runs[0], path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"compare_runs.py: error: {path}")
