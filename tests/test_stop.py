"""Stopping early without losing a step (inrank_megatron/training/stop.py, launch/).

- The decision: the stop reasons of every rank and the loss mean travel in one all-reduce, so a
  signal on one rank stops all of them after the same step, and the mean equals the
  data-parallel average; the time budget keeps the slowest step and save (10% of the budget
  before the first save) in hand.
- A signal inside a save waits for the save to end, and the processes a save starts (megatron's
  spawned queue manager) survive the process-group signal a launcher sends.
- Slow: a real SIGTERM to ``launch/torchrun.sh`` of a real 2-process job: every rank finishes
  its step, saves, exits 75 with one line naming the signal and the checkpoint, and
  ``output.resume=auto`` continues with losses bit-identical to the uninterrupted run (the
  session's ``tp2_run``). A SIGUSR1 to one rank during a save, during the cut and during a rank
  check stops both ranks after the next step with a complete checkpoint; the cut case resumes
  bit for bit. ``train.exit_duration_mins`` stops the same way.

The Slurm side (``--signal=B:USR1@...``, requeue, resume) is in tests/test_launch.py.
"""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from inrank_megatron.training.stop import (
    EXIT_STOPPED,
    FIRST_SAVE_RESERVE,
    StopRequest,
    deferred,
    reason,
)
from tests.distributed import (
    REPO,
    SHORT,
    TINY_CONFIG,
    read_summary,
    run_distributed,
    run_train,
    train_env,
)


# ------------------------------------------------------------------------------- decision units
def test_reason_names_a_signal_before_the_time_limit():
    assert reason([0, 0, 0]) is None
    assert reason([0, 0, 1]) == "time limit"
    assert reason([0, 2, 1]) == "SIGUSR1"
    assert reason([1, 1, 1]) == "SIGTERM"


def test_time_budget_keeps_a_step_and_a_save_in_hand():
    stop = StopRequest(budget_s=100.0, clock_rank=True, start=0.0)
    stop.timed_step(5.0)
    # Before any save: 10% of the budget for it.
    assert not stop.out_of_time(now=100 - 5 - FIRST_SAVE_RESERVE * 100 - 0.01)
    assert stop.out_of_time(now=100 - 5 - FIRST_SAVE_RESERVE * 100)
    stop.timed_save(2.0)
    stop.timed_save(1.0)  # the slowest save counts
    assert not stop.out_of_time(now=92.99) and stop.out_of_time(now=93.0)
    # Only the clock rank votes on time; no budget, no vote.
    assert StopRequest(budget_s=1.0, clock_rank=False, start=0.0).flags() == [0.0, 0.0, 0.0]
    assert not StopRequest(budget_s=None, clock_rank=True, start=0.0).out_of_time(now=1e9)


def test_signal_is_recorded_and_handlers_restored():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(budget_s=None, clock_rank=True, start=time.monotonic())
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        assert stop.received == signal.SIGUSR1 and stop.flags() == [0.0, 1.0, 0.0]
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_signal_inside_a_save_waits_and_its_helpers_survive():
    import multiprocessing

    stop = StopRequest(budget_s=None, clock_rank=True, start=time.monotonic())
    stop.install()
    try:
        with deferred():
            # What megatron's save starts: a spawned Manager (its results queue).
            manager = multiprocessing.get_context("spawn").Manager()
            queue = manager.Queue()
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received is None  # held back inside the save
            os.kill(manager._process.pid, signal.SIGTERM)  # torchrun's killpg reaches it too
            time.sleep(0.5)
            queue.put("written")  # it still serves the save
            assert queue.get() == "written"
        assert stop.received == signal.SIGTERM  # delivered when the save ends
        manager.shutdown()
    finally:
        stop.uninstall()


def _sync_body(rank, world_size, tp):
    from types import SimpleNamespace

    from inrank_megatron.training.stop import step_sync

    stop = StopRequest(budget_s=None, clock_rank=rank == 0, start=time.monotonic())
    stop.install()
    try:
        if rank == world_size - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        groups = SimpleNamespace(world_size=world_size, tp_rank=rank % tp, pp_rank=0)
        replica = rank // tp
        # Replica r's two micro-batch losses; TP ranks of a replica hold the same values.
        loss, votes = step_sync([1.0 + replica, 2.0 + 3 * replica], groups, stop.flags())
        return loss, reason(votes)
    finally:
        stop.uninstall()


@pytest.mark.parametrize("tp", [1, 2])
def test_one_rank_signal_stops_every_rank_and_the_loss_is_the_dp_mean(tp):
    results = run_distributed(_sync_body, 2, tp)
    replicas = 2 // tp
    losses = [v for r in range(replicas) for v in (1.0 + r, 2.0 + 3 * r)]
    assert results == [(sum(losses) / len(losses), "SIGUSR1")] * 2


# ------------------------------------------------------------------------------- real jobs
def _train_steps(out) -> list:
    with open(os.path.join(out, "metrics.csv")) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r["split"] == "train"]


def _latest(out) -> str:
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        return f.read().strip()


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_and_resume_is_bit_identical(tp2_run, tmp_path):
    out = str(tmp_path / "run")
    log = tmp_path / "stdout.txt"
    errlog = tmp_path / "stderr.txt"
    env = dict(train_env(), PYTHON=sys.executable)
    with open(log, "w") as stdout, open(errlog, "w") as stderr:
        launcher = subprocess.Popen(
            [os.path.join(REPO, "launch", "torchrun.sh"), TINY_CONFIG, *SHORT, f"output.dir={out}"],
            cwd=REPO,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
        try:
            deadline = time.time() + 600
            while "step  5/16 | loss" not in log.read_text():
                assert launcher.poll() is None, errlog.read_text()[-3000:]
                assert time.time() < deadline, "step 5 not reached"
                time.sleep(0.1)
            launcher.send_signal(signal.SIGTERM)  # what Slurm, Kubernetes or `kill` send
            launcher.wait(timeout=600)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    text, err = log.read_text(), errlog.read_text()
    lines = [line for line in text.splitlines() if line.startswith("stopped")]
    assert len(lines) == 1, (text[-2000:], err[-3000:])
    stopped = int(lines[0].split("after step ")[1].split("/")[0])
    ckpt = os.path.join(out, "checkpoints", f"step_{stopped:06d}")
    assert lines[0] == (
        f"stopped by SIGTERM after step {stopped}/16: checkpoint {ckpt}; "
        "continue with output.resume=auto"
    )
    assert 5 <= stopped < 16 and _latest(out) == os.path.basename(ckpt)
    # Both ranks exited 75; torchrun, which forwarded the signal, re-raises it (exit 1).
    assert launcher.returncode in (1, EXIT_STOPPED), err[-3000:]
    summary = read_summary(out) if os.path.exists(os.path.join(out, "summary.json")) else None
    assert summary is None or summary["stopped"] == "SIGTERM"
    ref = read_summary(tp2_run)["train_losses"]
    assert _train_steps(out) == list(range(1, stopped + 1))  # no step lost
    run_train([*SHORT, f"output.dir={out}", "output.resume=auto"])
    assert read_summary(out)["train_losses"] == ref[stopped:]
    assert _train_steps(out) == list(range(1, 17))


def _signalled_body(rank, world_size, out, where, at_step, extra):
    """Train SHORT in this process (rank ``rank`` of 2); rank 1 sends itself SIGUSR1 in the
    middle of ``where`` at step ``at_step``. Returns (exit status, summary or None)."""
    from inrank_megatron import train
    from inrank_megatron.layers.base import InRankFactorsMixin
    from inrank_megatron.training import loop

    seen = {"step": 0}
    owner, name = {
        "save": (loop.ckpt, "save_training_checkpoint"),
        "check": (InRankFactorsMixin, "spectrum"),  # inside the check, before TSQR
        "cut": (InRankFactorsMixin, "cut"),
    }.get(where, (None, None))
    if owner is not None:
        original, original_step = getattr(owner, name), loop.GrowthController.step

        def track(self, step):
            seen["step"] = step
            return original_step(self, step)

        def during(*args, **kwargs):
            step = args[1] if where == "save" else seen["step"]
            if rank == 1 and step == at_step and not seen.get("sent"):
                seen["sent"] = True
                os.kill(os.getpid(), signal.SIGUSR1)  # mid-operation: collectives still to come
            return original(*args, **kwargs)

        loop.GrowthController.step = track
        setattr(owner, name, during)
    rc = train.main(
        ["--config", os.path.join(REPO, TINY_CONFIG), *SHORT, f"output.dir={out}", *extra]
    )
    summary = os.path.join(out, "summary.json")
    return rc, (read_summary(out) if rank == 0 and os.path.exists(summary) else None)


@pytest.mark.slow
@pytest.mark.parametrize("where, at_step", [("save", 4), ("check", 6), ("cut", 8)])
def test_signal_on_one_rank_during_a_save_a_check_or_the_cut(tp2_run, tmp_path, where, at_step):
    """The stop comes after the next step (the signal missed this step's sync), on both ranks."""
    from inrank_megatron.checkpoint import is_complete

    out = str(tmp_path / "run")
    results = run_distributed(_signalled_body, 2, out, where, at_step, [], timeout=600)
    assert [rc for rc, _ in results] == [EXIT_STOPPED] * 2
    summary = results[0][1]
    ref = read_summary(tp2_run)["train_losses"]
    assert summary["stopped"] == "SIGUSR1" and summary["steps"] == at_step + 1
    assert summary["train_losses"] == ref[: at_step + 1]
    ckpt = os.path.join(out, "checkpoints", f"step_{at_step + 1:06d}")
    assert summary["checkpoint"] == ckpt and is_complete(ckpt) is None
    assert _latest(out) == os.path.basename(ckpt)
    if where == "cut":  # resumed past the cut: bit for bit
        resume = [f"train.exit_after_step={at_step + 3}", "output.resume=auto"]
        results = run_distributed(_signalled_body, 2, out, "none", 0, resume, timeout=600)
        assert [rc for rc, _ in results] == [0, 0]
        assert results[0][1]["train_losses"] == ref[at_step + 1 : at_step + 3]


@pytest.mark.slow
def test_time_budget_stops_with_a_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    budget = [
        "train.steps=400",
        "train.exit_duration_mins=0.3",
        "train.save_interval=null",
        "train.eval_interval=1000",
    ]
    results = run_distributed(_signalled_body, 2, out, "none", 0, budget, timeout=600)
    assert [rc for rc, _ in results] == [EXIT_STOPPED] * 2
    summary = results[0][1]
    assert summary["stopped"] == "time limit" and 1 <= summary["steps"] < 400
    assert _latest(out) == f"step_{summary['steps']:06d}"
    assert _train_steps(out) == list(range(1, summary["steps"] + 1))
