"""Pipeline parallelism (torch backend, 1F1B over megatron's pipeline stages).

Megatron's initialisation depends on the pipeline layout (each stage draws its own layers), so the
reference is a checkpoint: a PP=2 run saves at step 4 (before the growth checks at 4, 6, 8 and the
cut after step 8 have all happened); the same checkpoint resumed at TP=2 (no pipeline) and at
PP=2 x DP=2 (resharded with ``convert_checkpoint.py reshard --pp 2``, 4 processes) must continue
with the PP=2 run's losses, ranks and validation loss. That pins down the schedule, the loss on the
last stage, the tied-embedding gradient over the embedding group, data-parallel averaging without
DDP, the gradient norm over stages, growth decisions per stage, growth state gathered over stages
into the checkpoint, and the dist checkpoint's layout independence in PP; the runs train with the
factor-training keys, so each stage's Frobenius decay (added to its backward of the step's last
micro-batch) and the factors' own lr equal the non-pipelined backend's. With full activation
recompute (``model.recompute=full``) the PP=2 run is the same run, loss for loss.
"""

import csv
import json
import os

import pytest

from tests.distributed import SHORT, read_summary, run_train

# With the factor-training keys: each stage's Frobenius decay enters its backward of the step's
# last micro-batch, which must equal the non-pipelined backend's (the TP=2 resume below).
FACTOR_KEYS = ["inrank.init=spectral", "inrank.lr_multiplier=2", "inrank.frobenius_decay=0.01"]
PP2 = [
    *SHORT,
    "parallel.tensor_model_parallel_size=1",
    "parallel.pipeline_model_parallel_size=2",
    *FACTOR_KEYS,
]


def _close(a, b, tol):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pp2"))
    run_train([*PP2, f"output.dir={out}"])
    return out


@pytest.mark.slow
def test_pp2_run_resumed_at_tp2_continues_it(pp_run, tmp_path):
    s = read_summary(pp_run)
    assert s["finished"] and s["stage"] == "fixed" and len(s["ranks"]) == 8  # both stages' layers
    step4 = os.path.join(pp_run, "checkpoints", "step_000004")
    with open(os.path.join(step4, "inrank_growth.json")) as f:
        assert sorted(json.load(f)) == sorted(s["ranks"])
    with open(os.path.join(pp_run, "ranks.csv")) as f:
        rows = list(csv.DictReader(f))
    for step in ("0", "2", "8"):  # start, a check, the cut: every stage's layers are logged
        assert {r["layer"] for r in rows if r["step"] == step} == set(s["ranks"]), step

    out = str(tmp_path / "tp2")
    run_train([*SHORT, f"output.dir={out}", f"output.resume={step4}", *FACTOR_KEYS])  # TP=2
    t = read_summary(out)
    assert t["ranks"] == s["ranks"] and t["parameters"] == s["parameters"]
    assert _close(t["train_losses"], s["train_losses"][4:], 1e-6), [
        a - b for a, b in zip(t["train_losses"], s["train_losses"][4:])
    ]
    assert abs(t["valid_loss"] - s["valid_loss"]) < 1e-6


@pytest.mark.slow
def test_pp2_dp2_from_a_resharded_checkpoint_continues_the_pp2_run(pp_run, tmp_path):
    import tools.convert_checkpoint as cli

    src = os.path.join(pp_run, "checkpoints", "step_000004")
    dst = str(tmp_path / "pp2dp2" / "checkpoints" / "step_000004")
    assert cli.main(["reshard", src, dst, "--tp", "1", "--pp", "2", "--world-size", "4"]) == 0
    out = str(tmp_path / "pp2dp2")
    run_train([*PP2, f"output.dir={out}", f"output.resume={dst}"], nproc=4, timeout=900)
    s, t = read_summary(pp_run), read_summary(out)
    assert t["ranks"] == s["ranks"] and t["parameters"] == s["parameters"]
    assert _close(t["train_losses"], s["train_losses"][4:], 1e-5), [
        a - b for a, b in zip(t["train_losses"], s["train_losses"][4:])
    ]


def test_pipeline_refuses_what_it_cannot_run():
    from inrank_megatron import rules
    from inrank_megatron.config import ConfigError, from_dict

    cfg = from_dict(
        {
            "parallel": {"pipeline_model_parallel_size": 2},
            "train": {"precision": "fp16"},
            "data": {"tokenizer_model": "unused"},
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"pipeline_model_parallel_size=2 with "
        r"train.precision='fp16'.*expected bf16 or fp32",
    ):
        rules.validate(cfg, scopes=("config", "machine"))


@pytest.mark.slow
def test_pp2_with_full_recompute_is_the_same_run(pp_run, tmp_path):
    """Megatron's CheckpointFunction on the received activations of stage 2 (1F1B keeps two
    micro-batches in flight on stage 1): same ranks and cut, and the same losses up to the order
    in which a factor's gradient sums the recomputed segment's part (its own backward) and the
    Frobenius decay's (float addition is not associative: a few fp32 ulps)."""
    out = str(tmp_path / "recompute")
    run_train([*PP2, f"output.dir={out}", "model.recompute=full", "train.save_interval=16"])
    s, r = read_summary(pp_run), read_summary(out)
    assert r["ranks"] == s["ranks"] and r["stage"] == "fixed"
    assert _close(r["train_losses"], s["train_losses"], 1e-5)
    assert abs(r["valid_loss"] - s["valid_loss"]) < 1e-5
