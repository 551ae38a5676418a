"""The main job end to end, as a user runs it (``torchrun -m inrank_megatron.train``, 2 processes):
TP=2 and DP=2 runs on the shipped corpus with the loss going down, rank checks on the expected
optimizer steps, the stage cut, evaluation, metrics and a rank plot; the two-stage schedule as two
runs (stage-1 checkpoint, then stage 2 from it) and a real SIGKILL + ``resume=auto`` both continue
bit for bit like the uninterrupted run (the session's ``tp2_run``, tests/conftest.py); cumulative
mode grows capacity; bad input fails before any process group starts and leaves existing
checkpoints untouched. configs/gpt2-medium.yaml (355M, SDPA attention) trains 3 steps at TP=2
through rank checks and the cut."""

import csv
import os
import signal
import subprocess
import time

import pytest

from tests.distributed import REPO, SHORT, read_summary, run_train, train_command, train_env


def _descendants(pid):
    """All processes below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(pid):
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tp2_run_grows_cuts_evaluates(tp2_run):
    out = tp2_run
    s = read_summary(out)
    assert s["finished"] and s["steps"] == 16 and s["stage"] == "fixed"
    losses = s["train_losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    ranks = _rows(os.path.join(out, "ranks.csv"))
    check_steps = sorted({int(r["step"]) for r in ranks if r["explained_ratio"] != ""})
    assert check_steps == [2, 4, 6, 8]  # warmup 2, gap 2, no checks after the cut at 8
    events = _rows(os.path.join(out, "events.csv"))
    assert [(int(e["step"]), e["kind"]) for e in events] == [(8, "cut")]
    evals = [r for r in _rows(os.path.join(out, "metrics.csv")) if r["split"] == "valid"]
    assert [int(r["step"]) for r in evals] == [8, 16]
    assert s["valid_loss"] == pytest.approx(float(evals[-1]["loss"]))
    assert all(2 < r < 64 for r in s["ranks"].values())
    assert os.path.getsize(os.path.join(out, "ranks.png")) > 10_000
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "latest",
        "step_000004",
        "step_000008",
        "step_000012",
        "step_000016",
    ]


@pytest.mark.slow
def test_dp2_matches_tp2(tp2_run, dp2_run):
    ref = read_summary(tp2_run)
    s = read_summary(dp2_run)
    # Same global batch and initialisation: DP averages what TP computes in one replica, through
    # the rank checks, the cut after step 8 and the fixed-rank steps after it.
    assert len(s["train_losses"]) == len(ref["train_losses"]) == 16
    assert s["train_losses"] == pytest.approx(ref["train_losses"], rel=1e-4)
    assert s["ranks"] == ref["ranks"] and s["stage"] == ref["stage"] == "fixed"


@pytest.mark.slow
def test_two_run_schedule_continues_bit_for_bit(tp2_run, tmp_path):
    out = str(tmp_path / "two_runs")
    run_train([*SHORT, f"output.dir={out}", "train.exit_after_step=8"])
    first = read_summary(out)
    assert first["steps"] == 8 and first["stage"] == "fixed" and not first["finished"]
    run_train([*SHORT, f"output.dir={out}", "output.resume=auto"])
    ref = read_summary(tp2_run)["train_losses"]
    assert first["train_losses"] == ref[:8]
    assert read_summary(out)["train_losses"] == ref[8:]


@pytest.mark.slow
def test_sigkill_then_resume_auto_is_bit_identical(tp2_run, tmp_path):
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(
        train_command([*SHORT, f"output.dir={out}"]),
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = os.path.join(out, "checkpoints", "latest")
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if os.path.isfile(latest) and open(latest).read().strip() >= "step_000008":
                break
            if proc.poll() is not None:
                raise AssertionError("the run ended before it could be killed")
            time.sleep(0.2)
        else:
            raise AssertionError("no checkpoint at step 8 in time")
    finally:
        _kill_tree(proc.pid)  # the launcher and both ranks, mid-training
        proc.wait()
    resumed_from = int(open(latest).read().strip().split("_")[1])
    assert resumed_from < 16
    run_train([*SHORT, f"output.dir={out}", "output.resume=auto"])
    ref = read_summary(tp2_run)["train_losses"]
    assert read_summary(out)["train_losses"] == ref[resumed_from:]
    steps = [
        int(r["step"]) for r in _rows(os.path.join(out, "metrics.csv")) if r["split"] == "train"
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # the resume trimmed re-run rows


@pytest.mark.slow
def test_resume_at_another_layout_continues(tp2_run, tmp_path):
    """Checkpoints hold model and AdamW state as megatron dist checkpoints sharded like the
    parameters: a TP=2 checkpoint resumes at TP=1 x DP=2 and follows the TP=2 run."""
    import shutil

    out = str(tmp_path / "relayout")
    shutil.copytree(
        os.path.join(tp2_run, "checkpoints", "step_000012"),
        os.path.join(out, "checkpoints", "step_000012"),
    )
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("step_000012\n")
    run_train(
        [*SHORT, f"output.dir={out}", "output.resume=auto", "parallel.tensor_model_parallel_size=1"]
    )
    ref = read_summary(tp2_run)["train_losses"][12:]
    assert read_summary(out)["train_losses"] == pytest.approx(ref, rel=1e-4)


@pytest.mark.slow
def test_cumulative_mode_grows_capacity(cumulative_run):
    s = read_summary(cumulative_run)
    assert s["stage"] == "growing" and all(r > 2 for r in s["ranks"].values())


@pytest.mark.slow
def test_bad_input_fails_before_any_process_group(tmp_path):
    out = str(tmp_path / "bad")
    proc = run_train(
        [f"output.dir={out}", "data.prefix=/nonexistent/x_text_document", "data.corpus=none"],
        check=False,
    )
    assert proc.returncode != 0
    assert "data.prefix='/nonexistent/x_text_document'" in proc.stderr
    assert not os.path.exists(out)
    proc = run_train([f"output.dir={out}", "model.num_attention_heads=3"], check=False)
    assert "model.num_attention_heads" in proc.stderr and not os.path.exists(out)


@pytest.mark.slow
def test_resume_with_incompatible_config_is_refused(tp2_run):
    before = sorted(os.listdir(os.path.join(tp2_run, "checkpoints")))
    proc = run_train(
        [*SHORT, f"output.dir={tp2_run}", "output.resume=auto", "model.hidden_size=64"], check=False
    )
    assert proc.returncode != 0 and "model.hidden_size" in proc.stderr
    assert sorted(os.listdir(os.path.join(tp2_run, "checkpoints"))) == before


@pytest.mark.slow
def test_gpt2_medium_trains_at_tp2_through_the_cut(tmp_path):
    """The shipped GPT-2 medium config, unchanged but for the sizes a 2-core machine can take
    (sequence 128, micro batch 1, 4 of its 24 layers: every layer has the same shapes, so depth
    adds time and nothing else), on the shipped Wikipedia corpus tokenized with the GPT-2 BPE by
    the run itself: rank checks at steps 1 and 2, the cut after step 2, a stage-2 step."""
    out = tmp_path / "run"
    run_train(
        [
            "parallel.tensor_model_parallel_size=2",
            "model.num_layers=4",
            "model.seq_length=128",
            "train.micro_batch_size=1",
            "train.global_batch_size=1",
            "train.steps=3",
            "inrank.warmup=1",
            "inrank.gap=1",
            "inrank.stage1_steps=2",
            "train.lr_warmup_steps=1",
            "train.lr_decay_steps=3",
            "train.log_interval=1",
            "train.eval_interval=3",
            "train.eval_iters=1",
            "train.save_interval=null",
            "output.plot=false",
            "output.tensorboard=false",
            "output.resume=none",
            f"data.prefix={tmp_path / 'data' / 'wiki_gpt2_text_document'}",
            "data.corpus=wiki",
            f"output.dir={out}",
        ],
        config="configs/gpt2-medium.yaml",
        timeout=1500,
    )
    s = read_summary(out)
    assert s["finished"] and s["steps"] == 3 and s["stage"] == "fixed" and s["world_size"] == 2
    # 4 layers x (fc1, fc2) InRank at GPT-2 medium's shapes, ln(50304) = 10.83 at the start.
    assert len(s["ranks"]) == 8 and all(100 < r < 512 - 100 for r in s["ranks"].values())
    assert 10 < s["train_losses"][0] < 11.5 and s["train_losses"][-1] < s["train_losses"][0]
    ranks = _rows(os.path.join(out, "ranks.csv"))
    assert sorted({int(r["step"]) for r in ranks if r["explained_ratio"] != ""}) == [1, 2]
    events = _rows(os.path.join(out, "events.csv"))
    assert [(int(e["step"]), e["kind"]) for e in events] == [(2, "cut")]
    with open(os.path.join(out, "config.yaml")) as f:
        saved = f.read()
    assert "attention: sdpa" in saved and "hidden_size: 1024" in saved
