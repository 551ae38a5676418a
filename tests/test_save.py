"""Checkpoints that neither stall training nor fill the disk (``train.async_save``,
``output.keep_last``; the save path in inrank_megatron/training/checkpoint.py).

- ``output.keep_last`` deletes only step directories a training save into this ``output.dir``
  wrote and left untouched (checked against their ``meta.json``), only older than the one
  ``latest`` names, and only while that one is complete; never ``latest``'s; a checkpoint copied
  in, one a user added a file to and a converted one stay and do not count.
- Slow, 2 processes: with ``train.async_save`` the losses are bit-identical to the synchronous
  run (the session's ``tp2_run``), ``latest`` moves to a checkpoint only steps after its save
  (the loop went on while it was written), the checkpoint holds the state of its own step
  (bitwise equal to the synchronous run's), and ``keep_last=2`` leaves the newest two. A crash
  while a write is in flight leaves the previous checkpoint as ``latest`` and as what
  ``output.resume=auto`` takes.
- The pre-flight refuses ``train.async_save`` with another backend and a ``keep_last`` below 1.
"""

import os

import pytest

from inrank_megatron.checkpoint import (
    Meta,
    read_latest,
    record_files,
    write_growth,
    write_latest,
    write_meta,
)
from inrank_megatron.checkpoint.manager import prune_checkpoints, written_here
from tests.distributed import REPO, SHORT, TINY_CONFIG, read_summary, run_distributed


# ------------------------------------------------------------------------------ keep_last units
def _step(root, step, output_dir, **meta):
    path = root / f"step_{step:06d}"
    os.makedirs(path / "model")
    (path / "model" / "shard.bin").write_bytes(os.urandom(64))
    write_growth(str(path), {})
    write_meta(
        str(path),
        Meta(
            step=step,
            consumed_samples=4 * step,
            world_size=1,
            tp=1,
            pp=1,
            dp=1,
            backend="torch",
            config={"output": {"dir": output_dir}},
            files=record_files(str(path)),
            **meta,
        ),
    )
    return str(path)


def _names(root):
    return sorted(n for n in os.listdir(root) if n.startswith("step_"))


def test_keep_last_deletes_only_its_own_older_checkpoints(tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    ours = [_step(root, s, str(out)) for s in range(1, 7)]
    foreign = _step(root, 7, str(tmp_path / "elsewhere"))  # copied in from another run
    touched = _step(root, 8, str(out))
    (root / "step_000008" / "notes.txt").write_text("mine")  # a user's file inside
    converted = _step(root, 9, str(out), resharded_from="/x/step_000009")
    write_latest(str(root), ours[4])  # step 5: a save killed before latest moved left step 6
    assert [written_here(p, str(out)) for p in (ours[0], foreign, touched, converted)] == [
        True,
        False,
        False,
        False,
    ]
    deleted = prune_checkpoints(str(root), keep_last=2)
    # Ours: 1..6; the newest two are 5 and 6, and only what is older than latest (5) goes.
    assert deleted == ours[:4]
    assert _names(root) == [
        "step_000005",
        "step_000006",
        "step_000007",
        "step_000008",
        "step_000009",
    ]
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    assert read_latest(str(root)) == ours[4]
    # keep_last=1 never deletes latest's own directory, nor the newer step 6 of ours.
    assert prune_checkpoints(str(root), keep_last=1) == []


def test_keep_last_deletes_nothing_while_latest_is_incomplete(tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    paths = [_step(root, s, str(out)) for s in range(1, 4)]
    write_latest(str(root), paths[-1])
    os.remove(os.path.join(paths[-1], "model", "shard.bin"))  # latest's write is not complete
    assert prune_checkpoints(str(root), keep_last=1) == []
    assert _names(root) == ["step_000001", "step_000002", "step_000003"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            [
                "train.async_save=true",
                "parallel.backend=deepspeed",
                "parallel.deepspeed_config=configs/deepspeed/zero1.json",
            ],
            "train.async_save=true needs parallel.backend=torch",
        ),
        (["output.keep_last=0"], "output.keep_last"),
    ],
)
def test_preflight_refuses_bad_save_settings(overrides, needle, monkeypatch, capsys):
    from inrank_megatron import launch_env

    monkeypatch.chdir(REPO)
    assert launch_env.main(["check", TINY_CONFIG, "--world-size", "2", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_bench_save_stall_is_the_window_over_the_median_step():
    """tools/bench_save.py's arithmetic: the save's step and the steps until ``latest`` moved,
    less as many median steps of the rest (not the first step, not another save's window, not
    the last step)."""
    from inrank_megatron.bench.save import analyse, project

    step_s = [9.0, 1.0, 1.2, 0.8, 5.0, 2.0, 1.0, 1.1, 0.9, 7.0, 3.0, 4.0]
    summary = {
        "step_s": step_s,
        "saves": [
            {"step": 5, "blocking_s": 0.5, "latest_at": 6},
            {"step": 10, "blocking_s": 0.6, "latest_at": 11},
            {"step": 12, "blocking_s": 3.0, "latest_at": 12},
        ],
    }
    result = analyse(summary, 5, 1000)
    # Quiet steps: 2, 3, 4, 7, 8, 9 -> median of 1.0, 1.2, 0.8, 1.0, 1.1, 0.9 = 1.0.
    assert result == {
        "step_s": 1.0,
        "save_s": 0.5,
        "written_at": 6,
        "stall_s": pytest.approx(5.0 + 2.0 - 2 * 1.0),
        "bytes": 1000,
    }
    assert project(result, 100, 300) == pytest.approx(3 * 5.0)


# ------------------------------------------------------------------------------ real jobs
def _body(rank, world_size, out, overrides, crash_at_step):
    """Train SHORT here (rank ``rank`` of 2); with ``crash_at_step``, die like ``kill -9`` in that
    step's forward pass. Returns (exit status, summary or None)."""
    from inrank_megatron import train
    from inrank_megatron.training import loop
    from inrank_megatron.training.backends.torch_ddp import TorchBackend

    if crash_at_step:
        done = {"step": 0}
        step, forward = loop.GrowthController.step, TorchBackend.forward_backward

        def track(self, s):
            done["step"] = s
            return step(self, s)

        def crash(self, *args, **kwargs):
            if done["step"] == crash_at_step - 1:
                os._exit(9)
            return forward(self, *args, **kwargs)

        loop.GrowthController.step, TorchBackend.forward_backward = track, crash
    rc = train.main(
        ["--config", os.path.join(REPO, TINY_CONFIG), *SHORT, f"output.dir={out}", *overrides]
    )
    return rc, (read_summary(out) if rank == 0 else None)


@pytest.mark.slow
def test_async_save_goes_on_training_and_writes_the_state_of_its_step(tp2_run, tmp_path):
    from inrank_megatron.checkpoint.reader import read_dist_tensors

    out = str(tmp_path / "run")
    results = run_distributed(
        _body, 2, out, ["train.async_save=true", "output.keep_last=2"], 0, timeout=900
    )
    assert [rc for rc, _ in results] == [0, 0]
    summary, ref = results[0][1], read_summary(tp2_run)
    assert summary["train_losses"] == ref["train_losses"]
    saves = {s["step"]: s["latest_at"] for s in summary["saves"]}
    assert sorted(saves) == [4, 8, 12, 16]
    assert all(saves[s] > s for s in (4, 8, 12)) and saves[16] == 16, saves
    root = os.path.join(out, "checkpoints")
    assert _names(root) == ["step_000012", "step_000016"]
    assert read_latest(root) == os.path.join(root, "step_000016")
    mine = read_dist_tensors(os.path.join(root, "step_000012", "model"))
    theirs = read_dist_tensors(os.path.join(tp2_run, "checkpoints", "step_000012", "model"))
    assert sorted(mine) == sorted(theirs)
    assert all(mine[k].equal(theirs[k]) for k in mine)


@pytest.mark.slow
def test_crash_during_an_async_save_leaves_the_previous_checkpoint_latest(tmp_path):
    from inrank_megatron.checkpoint.resume import auto_resume_path

    out = str(tmp_path / "run")
    with pytest.raises(AssertionError, match="exited with code 9"):
        run_distributed(
            _body, 2, out, ["train.async_save=true", "train.save_interval=2"], 5, timeout=900
        )
    root = os.path.join(out, "checkpoints")
    # Step 4's write was in flight (it completes at a later step's sync at the earliest).
    assert read_latest(root) == os.path.join(root, "step_000002")
    assert _names(root) == ["step_000002"]
    assert auto_resume_path(root) == os.path.join(root, "step_000002")
