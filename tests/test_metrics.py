"""Run metrics (MetricsWriter, read_metrics) and the run plot (plot_run, tools/plot_run.py).

Pins down:
- metrics.csv, ranks.csv and events.csv have exactly the documented headers and rows: empty cells
  where a column does not apply, floats that round-trip, ppl = exp(loss) on eval rows (capped at
  exp(20), nan stays nan); read_metrics parses them back to the same numbers.
- Every row is on disk as soon as it is logged (no close needed).
- Resume from step s drops the rows with step > s (a torn last row too), keeps the earlier ones
  byte for byte, and appends the rerun's rows; a fresh run replaces old files; a CSV that is not
  ours is never trimmed.
- TensorBoard holds train/*, valid/*, rank/<layer>, explained_ratio/<layer> with the logged values
  at the logged steps, and after a resume shows the rerun's values, not the discarded ones.
- plot_run writes a PNG of plausible size for an InRank run and for a dense one (no ranks.csv),
  directly and through tools/plot_run.py.
- Bad calls fail with ValueError naming the argument.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time

import pytest

from inrank_megatron.training.metrics import (
    METRICS_COLUMNS,
    PPL_MAX_LOSS,
    MetricsWriter,
    perplexity,
    read_metrics,
)
from inrank_megatron.training.plot import plot_run, short_layer_name

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
FC1, FC2 = "decoder.layers.0.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(path) -> str:
    with open(path, newline="") as f:
        return f.read()


def _write_small_run(run_dir, **kwargs) -> None:
    """Three train steps (the last with throughput), one eval, two rank checks around a cut."""
    with MetricsWriter(run_dir, **kwargs) as metrics:
        metrics.log_train(
            1, loss=10.5, lr=1e-4, grad_norm=2.25, tokens_per_s=1234.5, stage="growing"
        )
        metrics.log_ranks(1, {FC1: 4, FC2: 4}, {FC1: 0.5, FC2: 0.25})
        metrics.log_train(
            2,
            loss=9.75,
            lr=2e-4,
            grad_norm=None,
            tokens_per_s=1300.0,
            stage="growing",
            loss_scale=65536.0,
        )
        metrics.log_eval(2, split="valid", loss=9.5)
        metrics.log_train(
            3,
            loss=9.5,
            lr=2e-4,
            grad_norm=1.0,
            tokens_per_s=1400.0,
            stage="fixed",
            tflops_per_device=0.5,
            mfu=0.25,
            elapsed_s=3.0,
            eta_s=4.0,
        )
        metrics.log_event(2, "cut", "stage 2, ranks fixed")
        metrics.log_ranks(2, {FC1: 6, FC2: 5})


def _synthetic_run(run_dir, *, inrank: bool, steps: int = 300, cut: int = 180) -> None:
    """A plausible run for the plot: 4 transformer layers x (fc1, fc2) growing until the cut."""
    layers = [f"decoder.layers.{i}.mlp.linear_fc{k}" for i in range(4) for k in (1, 2)]
    ranks = {layer: 4 for layer in layers}
    with MetricsWriter(run_dir, tensorboard=False) as metrics:
        for step in range(1, steps + 1):
            loss = 3.2 + 7.6 * math.exp(-step / 45) + 0.08 * math.sin(step * 1.7)
            metrics.log_train(
                step,
                loss=loss,
                lr=3e-4 * min(1.0, step / 30),
                grad_norm=1.0,
                tokens_per_s=5e4,
                stage="dense" if not inrank else ("growing" if step <= cut else "fixed"),
            )
            if step % 50 == 0:
                metrics.log_eval(step, split="valid", loss=loss + 0.15)
            if inrank and step % 20 == 0 and step <= cut:
                for j, layer in enumerate(layers):
                    ranks[layer] = min(64, ranks[layer] + (j + 1) * (2 if step < 100 else 1))
                metrics.log_ranks(
                    step, ranks, {layer: 0.9 + 0.001 * j for j, layer in enumerate(layers)}
                )
            if inrank and step == cut:
                metrics.log_event(step, "cut", "stage 2")
        metrics.log_eval(steps, split="test", loss=loss + 0.2)


def test_csv_exact_contents(tmp_path):
    _write_small_run(tmp_path, tensorboard=False)
    assert _read(tmp_path / "metrics.csv") == (
        "step,split,loss,ppl,lr,grad_norm,tokens_per_s,stage,loss_scale,tflops_per_device,mfu,"
        "elapsed_s,eta_s\r\n"
        "1,train,10.5,,0.0001,2.25,1234.5,growing,,,,,\r\n"
        "2,train,9.75,,0.0002,,1300.0,growing,65536.0,,,,\r\n"
        f"2,valid,9.5,{math.exp(9.5)!r},,,,,,,,,\r\n"
        "3,train,9.5,,0.0002,1.0,1400.0,fixed,,0.5,0.25,3.0,4.0\r\n"
    )
    assert _read(tmp_path / "ranks.csv") == (
        "step,layer,rank,explained_ratio\r\n"
        f"1,{FC1},4,0.5\r\n1,{FC2},4,0.25\r\n2,{FC1},6,\r\n2,{FC2},5,\r\n"
    )
    assert _read(tmp_path / "events.csv") == 'step,kind,detail\r\n2,cut,"stage 2, ranks fixed"\r\n'
    assert not (tmp_path / "tb").exists()

    data = read_metrics(tmp_path)
    assert data["metrics"][1] == {
        "step": 2,
        "split": "train",
        "loss": 9.75,
        "ppl": None,
        "lr": 2e-4,
        "grad_norm": None,
        "tokens_per_s": 1300.0,
        "stage": "growing",
        "loss_scale": 65536.0,
        "tflops_per_device": None,
        "mfu": None,
        "elapsed_s": None,
        "eta_s": None,
    }
    assert data["metrics"][2]["ppl"] == math.exp(9.5)
    assert data["ranks"][0] == {"step": 1, "layer": FC1, "rank": 4, "explained_ratio": 0.5}
    assert data["events"] == [{"step": 2, "kind": "cut", "detail": "stage 2, ranks fixed"}]
    assert read_metrics(tmp_path / "nothing-here") == {"metrics": [], "ranks": [], "events": []}


def test_ppl_capped_and_rows_flushed(tmp_path):
    metrics = MetricsWriter(tmp_path, tensorboard=False)
    assert metrics.log_eval(0, split="test", loss=1e4) == math.exp(PPL_MAX_LOSS)
    assert math.isnan(metrics.log_eval(1, split="valid", loss=float("nan")))
    assert perplexity(2.0) == math.exp(2.0)
    metrics.log_train(3, loss=1.0, lr=0.1, grad_norm=1.0, tokens_per_s=1.0, stage=2)
    # Read while the writer is still open: every row must already be on disk.
    rows = read_metrics(tmp_path)["metrics"]
    assert [r["step"] for r in rows] == [0, 1, 3]
    assert rows[2]["stage"] == 2
    metrics.close()
    metrics.close()
    with pytest.raises(RuntimeError, match="closed"):
        metrics.log_event(4, "resume")


def _log_steps(metrics, steps, offset=0.0):
    for step in steps:
        metrics.log_train(
            step,
            loss=10.0 - step + offset,
            lr=1e-3,
            grad_norm=1.0,
            tokens_per_s=100.0,
            stage="growing",
        )
        metrics.log_ranks(step, {FC1: step}, {FC1: 0.5})
        if step % 2 == 0:
            metrics.log_eval(step, split="valid", loss=10.0 - step + offset)
        metrics.log_event(step, "check", f"step {step}")


def _wait_for_next_second():
    # TensorBoard reads event files in name order and names them by whole seconds, then a
    # per-process counter compared as text; a new second keeps the resumed file last.
    time.sleep(1.02 - time.time() % 1.0)


def test_resume_trims_and_appends(tmp_path):
    metrics = MetricsWriter(tmp_path, tensorboard=True)
    _log_steps(metrics, range(1, 9))
    metrics.close()
    before = {
        name: _read(tmp_path / name).splitlines(keepends=True)
        for name in ("metrics.csv", "ranks.csv", "events.csv")
    }
    with open(tmp_path / "metrics.csv", "a", newline="") as f:
        f.write("9,tra")  # a row torn by a crash

    _wait_for_next_second()
    with MetricsWriter(tmp_path, resume_step=5) as metrics:
        metrics.log_event(5, "resume", "from checkpoint 5")
        _log_steps(metrics, range(6, 8), offset=100.0)

    data = read_metrics(tmp_path)
    train = [r for r in data["metrics"] if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in train] == [9.0, 8.0, 7.0, 6.0, 5.0, 104.0, 103.0]
    valid = [(r["step"], r["loss"]) for r in data["metrics"] if r["split"] == "valid"]
    assert valid == [(2, 8.0), (4, 6.0), (6, 104.0)]
    assert [r["rank"] for r in data["ranks"]] == [1, 2, 3, 4, 5, 6, 7]
    assert [(e["step"], e["kind"]) for e in data["events"]][-4:] == [
        (5, "check"),
        (5, "resume"),
        (6, "check"),
        (7, "check"),
    ]
    # Rows up to the resume step are kept byte for byte: header plus steps 1..5 (+2 valid rows).
    assert _read(tmp_path / "metrics.csv").startswith("".join(before["metrics.csv"][:8]))
    assert _read(tmp_path / "ranks.csv").startswith("".join(before["ranks.csv"][:6]))
    assert sorted(os.listdir(tmp_path)) == ["events.csv", "metrics.csv", "ranks.csv", "tb"]

    # TensorBoard: the resumed file's purge hides the discarded steps 6..8.
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(s, 10.0 - s) for s in range(1, 6)] + [(6, 104.0), (7, 103.0)]
    assert scalars["valid/loss"] == [(2, 8.0), (4, 6.0), (6, 104.0)]
    assert scalars[f"rank/{FC1}"] == [(s, float(s)) for s in range(1, 8)]


def test_fresh_run_replaces_old_files(tmp_path):
    _write_small_run(tmp_path)
    with MetricsWriter(tmp_path) as metrics:
        metrics.log_train(7, loss=1.5, lr=1.0, grad_norm=1.0, tokens_per_s=1.0, stage="dense")
    assert [r["step"] for r in read_metrics(tmp_path)["metrics"]] == [7]
    assert read_metrics(tmp_path)["ranks"] == []
    assert len(os.listdir(tmp_path / "tb")) == 1
    assert _tensorboard_scalars(tmp_path / "tb")["train/loss"] == [(7, 1.5)]


def _tensorboard_scalars(tb_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_tensorboard_scalars(tmp_path):
    _write_small_run(tmp_path)
    scalars = _tensorboard_scalars(tmp_path / "tb")
    f32 = pytest.approx  # event files store float32
    assert scalars["train/loss"] == [(1, 10.5), (2, 9.75), (3, 9.5)]
    assert scalars["train/lr"] == [(1, f32(1e-4)), (2, f32(2e-4)), (3, f32(2e-4))]
    assert scalars["train/grad_norm"] == [(1, 2.25), (3, 1.0)]  # None is not logged
    assert scalars["train/tokens_per_s"] == [(1, 1234.5), (2, 1300.0), (3, 1400.0)]
    for tag, value in (
        ("tflops_per_device", 0.5),
        ("mfu", 0.25),
        ("elapsed_s", 3.0),
        ("eta_s", 4.0),
    ):
        assert scalars[f"train/{tag}"] == [(3, value)]
    assert scalars["train/loss_scale"] == [(2, 65536.0)]
    assert scalars["valid/loss"] == [(2, 9.5)]
    assert scalars["valid/ppl"] == [(2, f32(math.exp(9.5), rel=1e-6))]
    assert scalars[f"rank/{FC1}"] == [(1, 4.0), (2, 6.0)]
    assert scalars[f"rank/{FC2}"] == [(1, 4.0), (2, 5.0)]
    assert scalars[f"explained_ratio/{FC1}"] == [(1, 0.5)]
    assert scalars[f"explained_ratio/{FC2}"] == [(1, 0.25)]


def test_bad_calls_name_the_argument(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as metrics:
        with pytest.raises(ValueError, match="split"):
            metrics.log_eval(1, split="train", loss=1.0)
        with pytest.raises(ValueError, match="step"):
            metrics.log_eval(-1, split="valid", loss=1.0)
        with pytest.raises(ValueError, match="lr"):
            metrics.log_train(1, loss=1.0, lr="high", grad_norm=None, tokens_per_s=None, stage=1)
        with pytest.raises(ValueError, match="without a rank"):
            metrics.log_ranks(1, {FC1: 3}, {FC2: 0.5})
        with pytest.raises(ValueError, match=f"rank of layer {FC1}"):
            metrics.log_ranks(1, {FC1: 2.5})
        with pytest.raises(ValueError, match="kind"):
            metrics.log_event(1, "")
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "metrics.csv").write_text("step,value\n1,2\n")
    with pytest.raises(ValueError, match="not a file written by MetricsWriter"):
        MetricsWriter(foreign, tensorboard=False, resume_step=0)
    assert (foreign / "metrics.csv").read_text() == "step,value\n1,2\n"
    assert len(METRICS_COLUMNS) == 13


def test_short_layer_names():
    assert short_layer_name("decoder.layers.3.mlp.linear_fc1") == "L3.fc1"
    assert short_layer_name("decoder.layers.11.self_attention.linear_qkv") == "L11.qkv"
    assert short_layer_name("output_layer") == "output_layer"


def _check_png(path, min_size=(600, 300)):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    from matplotlib.image import imread

    height, width = imread(path).shape[:2]
    assert width >= min_size[0] and height >= min_size[1], (width, height)
    assert os.path.getsize(path) > 10_000


def test_plot_inrank_and_dense(tmp_path):
    inrank, dense = tmp_path / "inrank", tmp_path / "dense"
    _synthetic_run(inrank, inrank=True)
    _synthetic_run(dense, inrank=False)
    assert plot_run(inrank) == str(inrank / "ranks.png")
    _check_png(inrank / "ranks.png", min_size=(1000, 700))
    out = tmp_path / "plots" / "dense.png"
    assert plot_run(dense, out) == str(out)
    _check_png(out, min_size=(1000, 400))


def test_plot_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("plot_run", os.path.join(TOOLS, "plot_run.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _write_small_run(tmp_path, tensorboard=False)
    assert tool.main([str(tmp_path), "--out", str(tmp_path / "cli.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli.png")
    _check_png(tmp_path / "cli.png")
    assert tool.main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
