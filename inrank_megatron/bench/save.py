"""What a checkpoint save costs the step loop, with and without ``train.async_save``, measured
side by side: the same config trained twice through ``launch/torchrun.sh``, once per arm, each
saving at one step in the middle of the run.

Per arm, from the run's ``summary.json`` (``step_s``: each step's wall time including any save
work done in it; ``saves``: each save's step, the seconds the loop spent in it, and the step at
which ``latest`` moved to it):

- ``step``: the median wall time of the steps away from any save (not the first, not a save
  and the steps until its write was complete, not the last, whose save is always waited for);
- ``stall``: the time the save added to the run: the save step and every step until ``latest``
  moved, minus as many median steps. Synchronous, it is the write itself; asynchronous, the
  snapshot and fork, the finalisation (metadata, rename, ``latest``) and whatever the background
  writer slowed the steps it overlapped (on CPU it shares the cores);
- ``bytes``: the checkpoint's size on disk.

The stall scales with the checkpoint's bytes (model and AdamW state: 12 bytes per fp32
parameter), which :func:`project` uses to carry a measurement over to another model.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARMS = ("sync", "async")


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(p, n)) for p, _, names in os.walk(path) for n in names)


def analyse(summary: dict, save_step: int, checkpoint_bytes: int) -> dict:
    """The stall of the save at ``save_step`` in one arm's ``summary``.

    Returns:
        ``{"step_s", "save_s", "written_at", "stall_s", "bytes"}``: the median step away from
        the save, the seconds the loop spent inside the save call, the step at which ``latest``
        moved to it, the time it added to the run, and the checkpoint's bytes.
    """
    step_s = summary["step_s"]
    save = next(s for s in summary["saves"] if s["step"] == save_step)
    written = save["latest_at"]
    window = range(save_step, written + 1)
    busy = {i for s in summary["saves"] for i in range(s["step"], s["latest_at"] + 1)}
    last = len(step_s)
    quiet = [step_s[i - 1] for i in range(2, last) if i not in busy]
    if not quiet:
        raise ValueError(
            f"no step away from the save at {save_step} (written at {written}) in "
            f"{last} steps; run more steps"
        )
    median = statistics.median(quiet)
    return {
        "step_s": median,
        "save_s": save["blocking_s"],
        "written_at": written,
        "stall_s": sum(step_s[i - 1] for i in window) - len(window) * median,
        "bytes": checkpoint_bytes,
    }


def project(result: dict, params_from: int, params_to: int) -> float:
    """The stall of ``result`` carried to a model of ``params_to`` parameters (from one of
    ``params_from``): the checkpoint's bytes, and so the write, scale with the parameters."""
    return result["stall_s"] * params_to / params_from


def run_arm(
    config: str,
    overrides: list,
    arm: str,
    out: str,
    *,
    steps: int,
    save_step: int,
    nproc: int,
    stream=None,
) -> dict:
    """Train ``config`` for ``steps`` steps into ``out`` with a save at ``save_step`` and the
    last step, ``train.async_save`` per ``arm``; returns :func:`analyse` of it."""
    cmd = [
        "bash",
        os.path.join(REPO, "launch", "torchrun.sh"),
        "--nproc",
        str(nproc),
        config,
        *overrides,
        f"train.steps={steps}",
        f"train.save_interval={save_step}",
        f"train.exit_after_step={steps}",
        "train.log_interval=1",
        f"train.eval_interval={10 * steps}",
        "output.plot=false",
        "output.tensorboard=false",
        "output.resume=none",
        "output.keep_last=null",
        f"train.async_save={'true' if arm == 'async' else 'false'}",
        f"output.dir={out}",
    ]
    stream = stream or sys.stderr
    env = dict(os.environ, PYTHON=sys.executable)
    with subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            stream.write(line)
        if proc.wait() != 0:
            raise RuntimeError(f"the {arm} run failed (exit {proc.returncode}): {' '.join(cmd)}")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    ckpt = os.path.join(out, "checkpoints", f"step_{save_step:06d}")
    result = analyse(summary, save_step, _dir_bytes(ckpt))
    result["parameters"] = summary["parameters"]["total"]
    return result


def run_bench(
    config: str, overrides: list, *, steps: int, save_step: int, nproc: int, stream=None
) -> dict:
    """Both arms, one after the other, into temporary run directories."""
    with tempfile.TemporaryDirectory(prefix="bench_save.") as tmp:
        return {
            arm: run_arm(
                config,
                overrides,
                arm,
                os.path.join(tmp, arm),
                steps=steps,
                save_step=save_step,
                nproc=nproc,
                stream=stream,
            )
            for arm in ARMS
        }


def format_results(results: dict, *, project_to: int = 0) -> str:
    """The arms side by side, and the stall projected to ``project_to`` parameters."""
    from inrank_megatron.text_table import aligned_table

    rows = [
        [
            arm,
            f"{r['step_s']:.2f}",
            f"{r['save_s']:.2f}",
            str(r["written_at"]),
            f"{r['stall_s']:.2f}",
            f"{r['bytes'] / 2**30:.2f}",
        ]
        for arm, r in results.items()
    ]
    head = [
        "arm",
        "median step s",
        "in save call s",
        "latest moved at step",
        "stall s",
        "checkpoint GiB",
    ]
    out = "\n".join(aligned_table(head, rows))
    sync, asyn = results["sync"]["stall_s"], results["async"]["stall_s"]
    out += f"\nstall async / sync: {asyn / sync:.2f}" if sync > 0 else ""
    if project_to:
        p = results["sync"]["parameters"]
        out += (
            f"\nprojected to {project_to / 1e6:.0f}M parameters (x{project_to / p:.2f} "
            f"bytes): sync stall {project(results['sync'], p, project_to):.1f} s, async "
            f"{project(results['async'], p, project_to):.1f} s"
        )
    return out + "\n"
