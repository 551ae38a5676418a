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
import sys
import time

from inrank_megatron import rules
from inrank_megatron.checkpoint import CheckpointError, DiskSpaceError
from inrank_megatron.config import ConfigError, load_config
from inrank_megatron.run_dir import lock_output_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m inrank_megatron.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML config (default: all defaults)")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p.parse_args(argv)


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
    it with the full traceback on every rank), 75 stopped early by SIGTERM, SIGUSR1 or
    ``train.exit_duration_mins`` with a checkpoint of the last step (``output.resume=auto``
    continues; training/stop.py)."""
    started = time.monotonic()
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
        # Every rule: the config's, this machine's (CUDA) and the files' (data, DeepSpeed JSON,
        # tokenizer, the output directory's kind, lock and state, resume), each run once.
        found = rules.validate(cfg, env["world_size"], scopes=rules.ALL_SCOPES)
        resume_path = found["resume_path"]
        fixed_ranks = None
        if resume_path is None:  # a resumed run takes its ranks from the checkpoint
            from inrank_megatron.training.fixed_ranks import resolve_fixed_ranks

            fixed_ranks = resolve_fixed_ranks(cfg)  # a run directory's ranks read and checked
        notes += [f"warning: {w}" for w in found["split_warnings"]]
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
    from inrank_megatron.training.stop import EXIT_STOPPED, StopRequest

    stop = StopRequest.for_config(cfg, rank=env["rank"], start=started)
    stop.install()  # from here a SIGTERM / SIGUSR1 ends the run with a checkpoint
    try:
        summary = train(
            cfg,
            resume_path=resume_path,
            fixed_ranks=fixed_ranks,
            dist_backend=env["backend"],
            stop=stop,
        )
        if summary["stopped"]:
            if rank0:  # on a line of its own, after the progress bar's
                print(
                    f"\nstopped by {summary['stopped']} after step {summary['steps']}/"
                    f"{cfg.train.steps}: checkpoint {summary['checkpoint']}; continue with "
                    "output.resume=auto",
                    flush=True,
                )
            # No rank exits (75) before rank 0 has said so: srun --kill-on-bad-exit ends the
            # job step at the first non-zero exit.
            import torch.distributed

            torch.distributed.barrier()
    except DiskSpaceError as e:  # stopped before or while saving: latest untouched
        if env["rank"] == 0:
            print(f"\nerror: {e}", file=sys.stderr)
        return 1
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
        print(
            f"error{who}: {one_line(error)} (INRANK_DEBUG=1 shows the traceback)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    finally:
        stop.uninstall()
        shutdown()
    if summary["stopped"]:
        return EXIT_STOPPED
    if rank0:
        from inrank_megatron.training.console import rank_summary, where

        loss, ppl = summary["valid_loss"], summary["valid_ppl"]
        print(
            f"done: {summary['steps']} steps in {summary['wall_s']:.0f} s, valid loss "
            f"{'-' if loss is None else f'{loss:.4f}'}, ppl {'-' if ppl is None else f'{ppl:.2f}'}"
            f", stage {summary['stage']}, ranks {rank_summary(summary['ranks'])}"
        )
        for line in where(summary):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
