"""Throughput a user can act on (issue 22): tokens/s, TFLOP/s per device, MFU, elapsed and ETA.

Pins down:
- the peak of a known GPU by its CUDA name and the precision (none on CPU, an unknown GPU, or bf16
  on a V100);
- the ETA is the steps left at the last interval's wall time per step, the interval's rates are
  its tokens and model FLOPs over its wall time, and the console line shows them;
- in a trained run's metrics.csv, every train row's TFLOP/s per device and MFU equal the planner's
  FLOPs per token at the ranks that step computed with (ranks.csv: those logged before it; rank +
  buffer in stage 1, the rank after the cut) x its tokens/s / devices / the peak; summary.json has
  the rates of stage 1 and after the cut, the latter at the cut ranks' FLOPs;
- a metrics.csv of the older, narrower format is resumed: rewritten with today's header, its rows
  padded.
"""

from __future__ import annotations

import csv
import os

import pytest

from inrank_megatron.training.throughput import (
    Throughput,
    default_peak_tflops,
    eta_seconds,
    format_duration,
)
from tests.distributed import REPO, TINY_CONFIG, read_summary


def test_peaks_by_device_name():
    assert default_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert default_peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.5
    assert default_peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert default_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert default_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert default_peak_tflops("Tesla V100-SXM2-32GB", "fp16") == 125.0
    assert default_peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None
    assert default_peak_tflops("Some Future GPU", "bf16") is None
    assert default_peak_tflops(None, "bf16") is None


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _meter(clock, **kw):
    from inrank_megatron.config import load_config

    cfg = load_config(os.path.join(REPO, TINY_CONFIG), ["data.tokenizer=gpt2"])
    return cfg, Throughput(cfg, vocab_size=50257, world_size=2, clock=clock, **kw)


def test_interval_rates_and_eta_arithmetic():
    clock = _Clock()
    _, meter = _meter(clock, peak_tflops=2.0, first_step=10, last_step=110, window=4)
    for step, (seconds, flops) in enumerate(
        [(1.0, 10**9), (3.0, 3 * 10**9), (2.0, 10**9), (2.0, 10**9), (4.0, 2 * 10**9)], start=11
    ):
        clock.now += seconds
        meter.step(step, "growing" if step < 14 else "fixed", 1000, seconds, flops)
    r = meter.interval()  # the last 4 steps: 12..15 after the mark of step 11
    assert (r.steps, r.seconds) == (4, 11.0)
    assert r.tokens_per_s == 4000 / 11.0
    assert r.tflops_per_device == (3e9 + 1e9 + 1e9 + 2e9) * 1000 / 11.0 / 2 / 1e12
    assert r.mfu == r.tflops_per_device / 2.0
    assert r.eta_s == eta_seconds(15, 110, 4, 11.0) == 95 * 11.0 / 4
    assert r.elapsed_s == 12.0
    stages = meter.summary()
    assert stages["growing"]["steps"] == 3 and stages["fixed"]["steps"] == 2
    assert stages["fixed"]["tokens_per_s"] == 2000 / 6.0
    assert stages["fixed"]["tflops_per_device"] == (1e9 + 2e9) * 1000 / 6.0 / 2 / 1e12
    assert format_duration(3725.4) == "1:02:05" and format_duration(2 * 86400 + 61) == "2d 0:01:01"


def test_flops_per_token_at_slots_is_the_planners():
    from inrank_megatron.planning.estimates import flops_per_token

    cfg, meter = _meter(_Clock(), peak_tflops=None, first_step=0, last_step=10, window=1)
    slots = {f"decoder.layers.{i}.mlp.linear_fc{k}": 5 + i for i in range(4) for k in (1, 2)}
    per_layer = [{"fc1": 5 + i, "fc2": 5 + i} for i in range(4)]
    assert (
        meter.flops_per_token(slots)
        == flops_per_token(cfg, inrank=True, vocab_size=50257, layer_slots=per_layer).total
    )
    assert meter.flops_per_token({}) == flops_per_token(cfg, inrank=False, vocab_size=50257).total
    assert meter.rates(1000.0, 10**9) == (1e12 / 2 / 1e12, None)


def test_console_step_line(capsys):
    from inrank_megatron.training.console import Console

    clock = _Clock()
    _, meter = _meter(clock, peak_tflops=None, first_step=0, last_step=200, window=10)
    out = Console(last_step=200, start_step=0)
    assert out.bar is None  # stderr is not a terminal here: lines only
    out.start(["data: ..."], None, "on CPU")
    out.start([], 989.4, "NVIDIA H200, bf16")
    for step in range(1, 11):
        clock.now += 0.2
        meter.step(step, "growing", 4096, 0.2, 10**8)
    out.step(
        10,
        loss=8.12345,
        lr=5e-4,
        stage="growing",
        ranks={"a": 8, "b": 12},
        grad_norm=1.5,
        rates=meter.interval(),
    )
    out.throughput(
        {
            "growing": {
                "steps": 10,
                "tokens_per_s": 20480.0,
                "tflops_per_device": 0.001024,
                "mfu": 0.25,
            }
        }
    )
    assert capsys.readouterr().out.splitlines() == [
        "data: ...",
        "MFU n/a (on CPU; set train.peak_tflops to compare with a peak)",
        "MFU against a peak of 989.4 TFLOP/s per device (NVIDIA H200, bf16)",
        "step  10/200 | loss 8.1235 | lr 5.00e-04 | 20480 tokens/s | 1.02 TFLOP/s/device | "
        "MFU n/a | stage growing | ranks 8-12 (mean 10.0) | grad norm 1.500 | elapsed 0:00:02 | "
        "ETA 0:00:38",
        "throughput, stage growing (10 steps): 20480 tokens/s | 0.00102 TFLOP/s/device | MFU 25.0%",
    ]


def test_resume_upgrades_an_older_metrics_csv(tmp_path):
    from inrank_megatron.training.metrics import METRICS_COLUMNS, MetricsWriter, read_metrics

    old = "step,split,loss,ppl,lr,grad_norm,tokens_per_s,stage,loss_scale\n"
    (tmp_path / "metrics.csv").write_text(
        old + "1,train,9.5,,0.001,2.0,100.0,growing,\n2,train,9.0,,0.001,2.0,100.0,growing,\n"
    )
    with MetricsWriter(str(tmp_path), tensorboard=False, resume_step=1) as writer:
        writer.log_train(
            2,
            loss=8.0,
            lr=1e-3,
            grad_norm=1.0,
            tokens_per_s=200.0,
            stage="fixed",
            tflops_per_device=0.5,
            mfu=0.25,
            elapsed_s=3.0,
            eta_s=4.0,
        )
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == [
        ",".join(METRICS_COLUMNS),
        "1,train,9.5,,0.001,2.0,100.0,growing,,,,,",
        "2,train,8.0,,0.001,1.0,200.0,fixed,,0.5,0.25,3.0,4.0",
    ]
    assert read_metrics(str(tmp_path))["metrics"][0]["mfu"] is None


# ------------------------------------------------------------------------------ trained runs
def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_metrics_tflops_and_mfu_are_flops_at_the_logged_ranks(blend_run):
    from inrank_megatron.config import load_config
    from inrank_megatron.planning.estimates import flops_per_token, tokenizer_vocab_size
    from inrank_megatron.training.throughput import layer_slots

    cfg = load_config(os.path.join(blend_run, "config.yaml"))
    cwd = os.getcwd()
    os.chdir(REPO)  # the tokenizer model's path is relative to the repository
    try:
        vocab = tokenizer_vocab_size(cfg)
    finally:
        os.chdir(cwd)
    peak, world, cut = cfg.train.peak_tflops, 2, cfg.inrank.stage1_steps
    ranks_log = _rows(os.path.join(blend_run, "ranks.csv"))
    train = [r for r in _rows(os.path.join(blend_run, "metrics.csv")) if r["split"] == "train"]
    assert [int(r["step"]) for r in train] == list(range(1, 13))  # log_interval 1
    for row in train:
        step = int(row["step"])
        ranks = {}
        for entry in ranks_log:  # the ranks this step computed with: those logged before it
            if int(entry["step"]) < step:
                ranks[entry["layer"]] = int(entry["rank"])
        buffer = cfg.inrank.buffer if step <= cut else 0  # the cut runs after step `cut`
        slots = layer_slots(cfg.model.num_layers, {k: r + buffer for k, r in ranks.items()})
        flops = flops_per_token(cfg, inrank=True, vocab_size=vocab, layer_slots=slots).total
        tflops = flops * float(row["tokens_per_s"]) / world / 1e12
        assert float(row["tflops_per_device"]) == pytest.approx(tflops, rel=1e-12), step
        assert float(row["mfu"]) == pytest.approx(tflops / peak, rel=1e-12), step
        assert float(row["eta_s"]) >= 0 and float(row["elapsed_s"]) > 0
    assert float(train[-1]["eta_s"]) == 0.0
    stages = read_summary(blend_run)["throughput"]
    assert list(stages) == ["growing", "fixed"]
    assert stages["growing"]["steps"] == cut and stages["fixed"]["steps"] == 12 - cut
    after = flops_per_token(cfg, inrank=True, vocab_size=vocab, layer_slots=slots).total
    fixed = stages["fixed"]
    assert fixed["tflops_per_device"] == pytest.approx(
        after * fixed["tokens_per_s"] / world / 1e12, rel=1e-12
    )
    assert fixed["mfu"] == pytest.approx(fixed["tflops_per_device"] / peak, rel=1e-12)
