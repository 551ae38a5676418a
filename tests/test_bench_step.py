"""tools/bench_step.py and its library (inrank_megatron.bench.step): learned ranks read from a run
(as inrank.fixed_ranks reads them) and checked against the model, the whole-run projection's arithmetic, bad
input refused before anything starts (exit 2), and one real launch whose reported bytes equal the
planner's parameter counts exactly (parameters, gradients, AdamW's two moments) at the slots the
planner predicts, with the FLOP-ideal taken from the planner."""

import json
import os

import pytest

from inrank_megatron.bench import step as bench
from inrank_megatron.config import ConfigError, load_config, save_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny.yaml")


def test_learned_ranks_read_like_fixed_ranks_and_checked(tmp_path):
    """--ranks-from reads a run as inrank.fixed_ranks=RUN does, checked against this model, and
    its errors name --ranks-from."""
    cfg = load_config(TINY, ["model.num_layers=1"])
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ConfigError, match="--ranks-from='.*': holds neither a checkpoint"):
        bench.learned_ranks(cfg, str(run))
    save_config(cfg, str(run / "config.yaml"))
    ranks = {"decoder.layers.0.mlp.linear_fc1": 11, "decoder.layers.0.mlp.linear_fc2": 5}
    (run / "summary.json").write_text(json.dumps({"ranks": ranks}))
    assert bench.learned_ranks(cfg, str(run)) == ranks
    with pytest.raises(ConfigError, match="--ranks-from=.*no InRank layer decoder.layers.1"):
        bench.learned_ranks(load_config(TINY, ["model.num_layers=2"]), str(run))
    with pytest.raises(ConfigError, match="--ranks-from=.*no such run directory"):
        bench.learned_ranks(cfg, str(tmp_path / "missing"))


def test_layer_slots_place_layers_by_number():
    from inrank_megatron.training.throughput import layer_slots

    slots = layer_slots(
        4, {"decoder.layers.3.mlp.linear_fc2": 9, "decoder.layers.0.mlp.linear_fc1": 5}
    )
    assert slots == [{"fc1": 5}, {}, {}, {"fc2": 9}]
    with pytest.raises(ValueError, match="decoder.layers.4.mlp.linear_fc1"):
        layer_slots(4, {"decoder.layers.4.mlp.linear_fc1": 5})


def test_projection_arithmetic():
    """InRank = stage-1 steps at stage-1 speed + the rest at the cut's + every check + the cut; a
    step at the config's batch is (global / micro) micro-batches and one optimizer step."""
    cfg = load_config(
        TINY,
        [
            "train.steps=100",
            "train.global_batch_size=8",
            "inrank.stage1_steps=30",
            "inrank.warmup=10",
            "inrank.gap=5",
        ],
    )
    job = load_config(TINY, ["train.micro_batch_size=2", "train.global_batch_size=2"])

    def arm(f, b, o, **kw):
        return dict(
            forward_s=f,
            backward_s=b,
            optimizer_s=o,
            step_s=f + b + o,
            rank_check_s=None,
            cut_s=None,
            **kw,
        )

    arms = {
        "dense": arm(1.0, 2.0, 0.5),
        "stage1": arm(
            0.5,
            1.0,
            0.5,
        ),
        "cut": arm(0.25, 0.5, 0.25),
    }
    arms["stage1"]["rank_check_s"] = 0.7
    arms["cut"]["cut_s"] = 3.0
    p = bench.project_run(cfg, job, arms)
    assert p["accumulation"] == 4  # 8 sequences per step in micro-batches of 2
    assert p["step_s"] == {"dense": 4 * 3.0 + 0.5, "stage1": 4 * 1.5 + 0.5, "cut": 4 * 0.75 + 0.25}
    assert p["rank_checks"] == 5  # steps 10, 15, 20, 25, 30
    assert p["dense_s"] == 100 * 12.5
    assert p["inrank_s"] == 30 * 6.5 + 70 * 3.25 + 5 * 0.7 + 3.0
    assert p["rank_checks_share"] == pytest.approx(3.5 / p["inrank_s"], rel=1e-15)
    assert p["check_share_of_gap_steps"] == pytest.approx(0.7 / (5 * 6.5), rel=1e-15)
    assert p["check_share_of_gap_bench_steps"] == pytest.approx(0.7 / (5 * 2.0), rel=1e-15)
    assert bench.project_run(cfg, job, {"dense": arms["dense"]}) is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rank-fraction", "1.5"], "--rank-fraction=1.5"),
        (["--tp", "3"], "parallel.tensor_model_parallel_size=3"),
        (["--steps", "0"], "--steps=0"),
        (["--ranks-from", "/nonexistent/run"], "--ranks-from='/nonexistent/run': no such run"),
        (["model.no_such_key=1"], "no_such_key"),
    ],
)
def test_bad_input_exits_2_before_launching(capsys, argv, message):
    from tools.bench_step import main

    assert main(["--config", TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert main(["--config", "/nonexistent.yaml"]) == 2


@pytest.mark.slow
def test_one_launch_reports_the_planners_bytes_and_slots(tmp_path, capsys):
    """A real (tiny) run through launch/torchrun.sh: all four arms, the bytes of parameters,
    gradients and AdamW moments equal the planner's counts x 4 bytes, the slots are the planner's
    rank at the fraction (plus the buffer in stage 1), the FLOP-ideal is the planner's."""
    from inrank_megatron.planning.estimates import count_parameters, flops_per_token
    from tools.bench_step import main

    out = tmp_path / "bench.json"
    overrides = [
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_attention_heads=2",
        "model.ffn_hidden_size=256",
    ]
    assert (
        main(
            [
                "--config",
                TINY,
                "--seq",
                "16",
                "--micro",
                "2",
                "--steps",
                "1",
                "--repeats",
                "1",
                "--json",
                str(out),
                *overrides,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "InRank after cut" in printed and "whole run projected" in printed
    res = json.loads(out.read_text())
    job = load_config(TINY, [*overrides, "model.seq_length=16"])
    counts = {
        "dense": count_parameters(job, inrank=False),
        "stage1": count_parameters(job, inrank=True, stage="storage"),
        "fixed": count_parameters(job, inrank=True, stage="storage"),
        "cut": count_parameters(job, inrank=True, stage="fraction"),
    }
    r = counts["cut"].slots["fc1"]  # round(0.33 * 64) = 21 (max_rank 32, buffer 16: clipped to 15)
    assert r == 15
    want_slots = {"dense": [], "stage1": [r + 16], "cut": [r], "fixed": [r]}
    counts["fixed"] = counts["cut"]  # inrank.fixed_ranks allocates exactly r slots
    for arm, a in res["arms"].items():
        n = counts[arm].total
        assert a["memory"] == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}, arm
        assert a["slots"] == want_slots[arm], arm
        assert a["steps_timed"] == 1 and a["step_s"] > 0 and a["cpu_s"] > 0
        assert a["cpu_speedup"] == pytest.approx(res["arms"]["dense"]["cpu_s"] / a["cpu_s"])
    dense = flops_per_token(job, inrank=False).total
    cut = flops_per_token(job, inrank=True, stage="fraction").total
    assert res["arms"]["cut"]["flop_ideal"] == pytest.approx(dense / cut, rel=1e-12)
    assert res["arms"]["stage1"]["rank_check_s"] > 0
    assert res["projection"]["rank_checks"] == 11


@pytest.mark.slow
def test_attentions_compared_in_one_launch(tmp_path, capsys):
    """--attention local sdpa: every arm with each core attention, same parameters and optimizer
    bytes (attention has none), both reported and compared side by side."""
    from tools.bench_step import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--config",
                TINY,
                "--seq",
                "16",
                "--micro",
                "2",
                "--steps",
                "1",
                "--repeats",
                "1",
                "--arms",
                "dense",
                "cut",
                "--attention",
                "local",
                "sdpa",
                "--json",
                str(out),
                "model.num_layers=2",
                "model.hidden_size=64",
                "model.num_attention_heads=2",
                "model.ffn_hidden_size=256",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "attention local" in printed and "attention sdpa" in printed
    assert "model.attention compared" in printed and "sdpa vs local" in printed
    res = json.loads(out.read_text())
    assert res["attention"] == "local" and list(res["by_attention"]) == ["local", "sdpa"]
    local, sdpa = (res["by_attention"][a]["arms"] for a in ("local", "sdpa"))
    for arm in ("dense", "cut"):
        assert (
            local[arm]["memory"] == sdpa[arm]["memory"]
            and local[arm]["slots"] == sdpa[arm]["slots"]
        )
        # Same weights and batch: the first step's loss agrees to fp32 reorderings.
        assert sdpa[arm]["loss"] == pytest.approx(local[arm]["loss"], rel=1e-4)


def test_bad_attention_exits_2(capsys):
    from tools.bench_step import main

    assert main(["--config", TINY, "--attention", "sdpa", "sdpa"]) == 2
    assert "--attention ['sdpa', 'sdpa']" in capsys.readouterr().err
    # Selective recompute needs local attention: refused before launching.
    assert main(["--config", TINY, "model.recompute=selective", "--attention", "sdpa"]) == 2
    assert "model.recompute=selective" in capsys.readouterr().err


def test_job_passes_the_launch_preflight_without_the_configs_dataset(tmp_path):
    """The job trains on synthetic batches: the launcher's pre-flight of the run's files must not
    need the config's dataset (WikiText-103 for the GPT-2 configs) or its output directory."""
    from inrank_megatron.launch_env import check

    path = os.path.join(REPO, "configs", "gpt2-medium.yaml")
    opts = bench.BenchOptions(config=path, seq=64, micro=1)
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="data.prefix"):
        check(path, 1, bench.bench_overrides(opts, cfg))
    assert check(path, 1, bench.bench_overrides(opts, cfg, str(tmp_path))).startswith("world 1")
