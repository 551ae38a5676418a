"""Checkpoints move between the DeepSpeed and torch backends with their optimizer state
(``tools/convert_checkpoint.py from-deepspeed`` / ``to-deepspeed``).

- A ZeRO-2 checkpoint taken after the cut (``reset`` policy: the factor group's Adam step was
  restarted, so the steps differ across parameters) -> torch dist checkpoint -> a torchrun resume:
  the next steps' losses equal the DeepSpeed run's own continuation, and the converted weights
  equal DeepSpeed's consolidated fp32 masters bit for bit.
- The reverse: a torch checkpoint -> ZeRO-2 -> a DeepSpeed resume continues the torch run.
- A round trip through ZeRO-3 at another TP size (TP=1 x DP=2 -> TP=2 x DP=1 -> back) returns every
  model tensor, Adam moment and the schedule bit for bit.
- Bad input is refused before any process starts, naming the argument, and writes nothing.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed import REPO, SHORT, read_summary, run_train, train_env

DP2 = [*SHORT, "parallel.tensor_model_parallel_size=1"]
ZERO2 = ["parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2.json"]
TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")


def _convert(*args, check=True):
    proc = subprocess.run(
        [sys.executable, TOOL, *args],
        cwd=REPO,
        env=train_env(),
        text=True,
        capture_output=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"convert_checkpoint.py {args} failed:\n{proc.stderr[-3000:]}")
    return proc


def _close(a, b, tol=1e-6):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


@pytest.mark.slow
def test_zero2_to_torch_resume_continues_the_deepspeed_run(tmp_path):
    from inrank_megatron.checkpoint.reader import read_dist_tensors, unmap_dist_key
    from inrank_megatron.checkpoint.deepspeed import consolidate_checkpoint

    ds = str(tmp_path / "ds")
    policy = "inrank.resize_policy=reset"
    run_train([*DP2, *ZERO2, policy, f"output.dir={ds}", "train.save_interval=12"])
    src = os.path.join(ds, "checkpoints", "step_000012")
    dst = str(tmp_path / "torch" / "checkpoints" / "step_000012")
    _convert("from-deepspeed", src, dst)

    with open(os.path.join(dst, "meta.json")) as f:
        meta = json.load(f)
    assert (
        meta["backend"] == "torch"
        and meta["step"] == 12
        and meta["config"]["parallel"]["backend"] == "torch"
    )
    steps = torch.load(os.path.join(dst, "train.pt"), weights_only=True)["adam_steps"]
    assert steps and set(steps.values()) == {4.0}  # the factors restarted at the cut (step 8)
    masters = consolidate_checkpoint(src)["state_dict"]
    converted = {}
    for key, t in read_dist_tensors(
        os.path.join(dst, "model"), skip_prefixes=("optimizer.",)
    ).items():
        converted.update(unmap_dist_key(key, t))
    for name, value in masters.items():
        assert torch.equal(converted[name], value), name

    out = str(tmp_path / "torch")
    run_train([*DP2, policy, f"output.dir={out}", f"output.resume={dst}"])
    ref = read_summary(ds)["train_losses"][12:]
    got = read_summary(out)["train_losses"]
    assert _close(got, ref), (got, ref)
    assert read_summary(out)["ranks"] == read_summary(ds)["ranks"]


@pytest.mark.slow
def test_torch_to_zero2_resume_continues_the_dp2_run(dp2_run, tmp_path):
    src = os.path.join(dp2_run, "checkpoints", "step_000012")
    dst = str(tmp_path / "ds" / "checkpoints" / "step_000012")
    _convert("to-deepspeed", src, dst, "--deepspeed-config", "configs/deepspeed/zero2.json")
    with open(os.path.join(dst, "meta.json")) as f:
        assert json.load(f)["backend"] == "deepspeed"
    out = str(tmp_path / "ds")
    run_train([*DP2, *ZERO2, f"output.dir={out}", f"output.resume={dst}"])
    ref = read_summary(dp2_run)["train_losses"][12:]
    got = read_summary(out)["train_losses"]
    assert _close(got, ref), (got, ref)


@pytest.mark.slow
def test_round_trip_through_zero3_at_tp2_is_bit_identical(dp2_run, tmp_path):
    from inrank_megatron.checkpoint.reader import read_dist_tensors

    src = os.path.join(dp2_run, "checkpoints", "step_000012")
    mid = str(tmp_path / "ds3" / "step_000012")
    back = str(tmp_path / "back" / "step_000012")
    _convert(
        "to-deepspeed",
        src,
        mid,
        "--deepspeed-config",
        "configs/deepspeed/zero3.json",
        "--tp",
        "2",
        "--world-size",
        "2",
    )
    with open(os.path.join(mid, "meta.json")) as f:
        meta = json.load(f)
    assert (meta["tp"], meta["dp"], meta["backend"]) == (2, 1, "deepspeed")
    with open(os.path.join(mid, "inrank_deepspeed.json")) as f:
        assert json.load(f)["zero_stage"] == 3
    _convert("from-deepspeed", mid, back)

    a = read_dist_tensors(os.path.join(src, "model"))
    b = read_dist_tensors(os.path.join(back, "model"))
    assert sorted(a) == sorted(b)
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ta = torch.load(os.path.join(src, "train.pt"), weights_only=True)
    tb = torch.load(os.path.join(back, "train.pt"), weights_only=True)
    assert ta["scheduler"] == tb["scheduler"] and tb["adam_steps"] == {}
    with (
        open(os.path.join(src, "inrank_growth.json")) as f,
        open(os.path.join(back, "inrank_growth.json")) as g,
    ):
        assert json.load(f) == json.load(g)


@pytest.mark.slow  # dp2_run trains
def test_bad_input_is_refused_before_any_process_starts(dp2_run, tmp_path, capsys, monkeypatch):
    import tools.convert_checkpoint as cli

    src = os.path.join(dp2_run, "checkpoints", "step_000012")
    dst = str(tmp_path / "out" / "step_000012")
    cases = [
        (("from-deepspeed", src, dst), "expects a 'deepspeed' checkpoint"),
        (("to-deepspeed", src, dst), "needs --deepspeed-config"),
        (("to-deepspeed", src, dst, "--deepspeed-config", "no/such.json"), "no/such.json"),
        (
            (
                "to-deepspeed",
                src,
                dst,
                "--deepspeed-config",
                "configs/deepspeed/zero2.json",
                "--tp",
                "3",
            ),
            "parallel.tensor_model_parallel_size",
        ),
        (
            (
                "to-deepspeed",
                src,
                dst,
                "--deepspeed-config",
                "configs/deepspeed/zero2.json",
                "--zero-stage",
                "5",
            ),
            "--zero-stage 5",
        ),
        (
            (
                "to-deepspeed",
                str(tmp_path),
                dst,
                "--deepspeed-config",
                "configs/deepspeed/zero2.json",
            ),
            "not a training checkpoint",
        ),
        (
            ("to-deepspeed", src, src, "--deepspeed-config", "configs/deepspeed/zero2.json"),
            "refusing to overwrite",
        ),
    ]
    before = sorted(os.listdir(src))
    monkeypatch.chdir(REPO)  # the JSON paths are relative to the repository, as in a shell
    for args, message in cases:
        code = cli.main(list(args))
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err[-1500:])
        assert not os.path.exists(dst)
    assert sorted(os.listdir(src)) == before


@pytest.mark.slow
def test_weights_only_checkpoint_starts_a_deepspeed_run(dp2_run, tmp_path):
    """A weights-only checkpoint (here ``to-dense``'s merge of the torch run's step 12) has no
    optimizer state to convert: any backend starts from it. The DeepSpeed run's first loss (before
    its first update) is the torch run's loss on the same batch."""
    src = os.path.join(dp2_run, "checkpoints", "step_000012")
    import tools.convert_checkpoint as cli

    dense = str(tmp_path / "dense" / "step_000012")
    assert cli.main(["to-dense", src, dense]) == 0
    out = str(tmp_path / "ds")
    run_train(
        [
            *DP2,
            *ZERO2,
            "model.inrank=false",
            f"output.dir={out}",
            f"output.resume={dense}",
            "train.steps=13",
        ]
    )
    first = read_summary(out)["train_losses"]
    assert len(first) == 1 and abs(first[0] - read_summary(dp2_run)["train_losses"][12]) < 1e-5
