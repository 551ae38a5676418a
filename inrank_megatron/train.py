"""Train a megatron.core GPT with InRank layers from a YAML config.

Single node, CPU default (TP=2 on 2 processes)::

    torchrun --nproc_per_node 2 -m inrank_megatron.train --config configs/tiny-cpu.yaml
    torchrun --nproc_per_node 2 -m inrank_megatron.train --config configs/tiny-cpu.yaml \\
        model.inrank=false output.dir=runs/tiny-cpu-dense        # the dense baseline

Multi-node (see launch/README.md)::

    sbatch -N 2 launch/slurm_torchrun.sbatch configs/gpt2-medium.yaml

Every config key can be overridden as ``section.key=value``; unknown keys are rejected. Bad input
(config, layout, data, resume directory) fails here, before any process group starts.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Optional

from inrank_megatron import rules
from inrank_megatron.checkpoint_format import CheckpointError
from inrank_megatron.config import (
    ConfigError, TrainConfig, diff_incompatible, format_value, from_dict, get_value, load_config,
)
from inrank_megatron.run_dir import check_not_locked, lock_output_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m inrank_megatron.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: all defaults)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p.parse_args(argv)


def resolve_resume(cfg: TrainConfig, world_size: int):
    """The checkpoint to resume from (or None), checked against this run's config and layout, its
    pickled files checked for code (nothing is loaded yet)."""
    from inrank_megatron.checkpoint_format import (
        CHECKPOINTS_DIR, check_pickles, is_complete, read_meta,
    )

    resume = cfg.output.resume
    if resume == "none":
        return None
    try:
        if resume == "auto":
            path = auto_resume_path(os.path.join(cfg.output.dir, CHECKPOINTS_DIR))
            if path is None:
                return None
        else:
            path = resume
            if not os.path.isdir(path):
                raise ConfigError(f"output.resume={resume!r}: no such checkpoint directory")
            reason = is_complete(path)
            if reason:
                raise ConfigError(f"output.resume={resume!r} is not a complete checkpoint: {reason}")
        meta = read_meta(path)
        check_pickles(path)
    except CheckpointError as e:
        raise ConfigError(f"output.resume={resume!r}: {e}") from None
    saved = from_dict(meta.config)
    changed = diff_incompatible(saved, cfg)
    if changed:
        needed = " ".join(f"{key}={format_value(get_value(saved, key))}" for key in changed)
        now = ", ".join(f"{key}={format_value(get_value(cfg, key))}" for key in changed)
        raise ConfigError(f"output.resume: checkpoint {path} was trained with {needed} (this run: "
                          f"{now}); resume with those values (or start a new output.dir)")
    # A weights-only checkpoint (tools/import_hf.py, to-dense) is a megatron dist checkpoint of the
    # model and nothing else: every backend starts from it with a fresh optimizer.
    if meta.backend != cfg.parallel.backend and not meta.weights_only:
        raise ConfigError(f"output.resume: checkpoint {path} was written by backend "
                          f"{meta.backend!r}, this run uses parallel.backend="
                          f"{cfg.parallel.backend!r}; convert it with tools/convert_checkpoint.py "
                          f"{'from' if meta.backend == 'deepspeed' else 'to'}-deepspeed")
    root = os.path.join(cfg.output.dir, CHECKPOINTS_DIR)
    later = sorted(n for n in (os.listdir(root) if os.path.isdir(root) else ())
                   if re.fullmatch(r"step_\d{6,}", n) and int(n[5:]) > meta.step)
    if later:
        raise ConfigError(f"output.resume: {root} already holds {', '.join(later[:3])}, after the "
                          f"resumed step {meta.step}; this run would have to replace them: resume "
                          "the newest one, or choose another output.dir")
    if meta.step >= cfg.train.steps:
        raise ConfigError(f"output.resume: checkpoint {path} is at step {meta.step}, "
                          f"train.steps={cfg.train.steps}: nothing left to train; expected "
                          f"train.steps > {meta.step}")
    return path


def auto_resume_path(root: str):
    """``output.resume=auto``: the newest complete (verified) step directory of ``root``, which
    is the one ``latest`` names unless a save was killed between its rename and the move of
    ``latest``, or ``latest`` is missing; None when ``root`` holds no step directory at all.

    Raises:
        CheckpointError: step directories exist but none is complete (never start fresh over
            them), or ``latest`` names something other than a step directory of ``root``.
    """
    from inrank_megatron.checkpoint_format import complete_step_dirs, is_complete, read_latest

    read_latest(root)  # refuses a latest that points anywhere else
    complete = complete_step_dirs(root)
    if complete:
        return complete[-1]
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) \
        if os.path.isdir(root) else []
    if not steps:
        return None
    raise CheckpointError(f"{root} holds {', '.join(steps)} but no complete checkpoint "
                          f"({is_complete(os.path.join(root, steps[-1]))}); refusing to start "
                          "fresh over them: resume one with output.resume=<step dir>, or choose "
                          "another output.dir")


def check_supported(cfg: TrainConfig, world_size: Optional[int] = None) -> None:
    """The configuration rules and what this machine cannot run (megatron without CUDA):
    :func:`inrank_megatron.rules.validate` with the ``config`` and ``machine`` scopes."""
    from inrank_megatron import rules

    rules.validate(cfg, world_size, scopes=("config", "machine"))


# Seconds a failed rank other than 0 waits before it reports (see main).
FAILURE_REPORT_DELAY_S = 5.0


def one_line(error: BaseException) -> str:
    """An exception as one line: its message with whitespace collapsed (multi-line messages from
    torch.distributed.checkpoint keep their first line), prefixed by the type unless the message
    already names a key or a file."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, FileNotFoundError)) and not isinstance(error, UnicodeError):
        return text
    return f"{type(error).__name__}: {text}"


def main(argv=None) -> int:
    """Pre-flight, then train. Returns the exit status: 0 done, 2 a bad input found before any
    process group starts, 1 a failure after launch (one line on rank 0; ``INRANK_DEBUG=1`` raises
    it with the full traceback on every rank)."""
    args = parse_args(argv)
    from inrank_megatron.launch_env import die_with_launcher, init_distributed_env

    env = init_distributed_env()
    if env["launcher"] != "single":
        die_with_launcher()  # a rank never outlives its launcher
    rank0 = env["rank"] == 0
    from inrank_megatron.training.console import quiet_third_party

    quiet_third_party(env["rank"], cpu=env["backend"] == "gloo")
    # The launch scripts ran the same pre-flight and printed its notes already.
    quiet = bool(os.environ.get("INRANK_PREFLIGHT"))
    try:
        notes: list = []
        cfg = load_config(args.config, args.overrides, notes)
        check_not_locked(cfg.output.dir)  # a second run into a running one's output.dir
        # Every rule: the config's, this machine's (CUDA) and the files' (data, DeepSpeed JSON,
        # tokenizer, the output directory's kind and state, resume).
        rules.validate(cfg, env["world_size"], scopes=rules.ALL_SCOPES)
        resume_path = resolve_resume(cfg, env["world_size"])
        if resume_path is None:
            from inrank_megatron.training.fixed_ranks import resolve_fixed_ranks

            resolve_fixed_ranks(cfg)  # a fixed-rank run's ranks (a run directory read) are sound
        from inrank_megatron.training.data import split_report

        notes += [f"warning: {w}" for w in split_report(cfg)[1]]
        if env["rank"] == 0:
            lock_output_dir(cfg.output.dir)  # before anything is written; held until exit
    except ConfigError as e:
        if rank0:  # every rank found the same: say it once
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if rank0 and not quiet:
        for note in notes:
            print(note if note.startswith("warning: ") else f"note: {note}", file=sys.stderr)
    from inrank_megatron.training.finite import NonFiniteError
    from inrank_megatron.training.loop import train
    from inrank_megatron.training.parallel import shutdown

    try:
        summary = train(cfg, resume_path=resume_path, dist_backend=env["backend"])
    except CheckpointError as e:  # a refused checkpoint file: one line, nothing of it ran
        if env["rank"] == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # NaN/inf: stopped within the step, nothing of it saved
        if env["rank"] == 0:  # on a line of its own, after the progress bar's
            print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - the one place a failed run is reported
        if os.environ.get("INRANK_DEBUG", "0") not in ("", "0"):
            raise
        if not rank0:
            # Rank 0 reports a failure every rank shares, and the launcher (torchrun, mpirun)
            # stops this process first; only a failure of this rank alone gets here to print.
            time.sleep(FAILURE_REPORT_DELAY_S)
        who = "" if rank0 else f" (rank {env['rank']})"
        print(f"error{who}: {one_line(error)} (INRANK_DEBUG=1 shows the traceback)",
              file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown()
    if rank0:
        from inrank_megatron.training.console import rank_summary, where

        loss, ppl = summary["valid_loss"], summary["valid_ppl"]
        print(f"done: {summary['steps']} steps in {summary['wall_s']:.0f} s, valid loss "
              f"{'-' if loss is None else f'{loss:.4f}'}, ppl {'-' if ppl is None else f'{ppl:.2f}'}"
              f", stage {summary['stage']}, ranks {rank_summary(summary['ranks'])}")
        for line in where(summary):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
