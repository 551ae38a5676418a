"""Run a launcher so that a failed run ends in one line (the launch scripts' last step).

A failed rank prints its own one line (``error: ...``, rank 0). What the launcher adds after it is
kept out of the console: torchrun's ``ChildFailedError`` agent report (a traceback and a
30-line table), mpirun's help blocks (the scripts pass ``-q``), srun's ``srun: error: ...`` task
lines. They go to a log file, and the launch script's last line names it with the exit status::

    error: data.prefix=...: ...                                     (rank 0)
    torchrun.sh: training failed with exit status 1 (launcher report: /tmp/inrank-torchrun.sh-4242.log)

``INRANK_DEBUG=1`` runs the launcher untouched (its full report on the console).

    python -m inrank_megatron.launcher torchrun --name torchrun.sh -- [torchrun args]
    python -m inrank_megatron.launcher run --name mpirun.sh [--filter srun] -- mpirun ...

``torchrun`` runs torch's launcher in this process (the script ``exec``\\ s it, so it is the agent
the ranks' parent-death signal follows, and torchrun's own signal handling applies); ``run``
starts the command as a child that dies with this process, forwards the usual signals to it, and
with ``--filter srun`` moves srun's and slurmstepd's own lines to the log (under sbatch the
console is the job's output file, so the ranks' output may pass through a pipe).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from typing import Optional, Sequence

# The loggers torchrun's agent reports through (torch.distributed.elastic.* and run.py's own).
TORCHRUN_LOGGERS = (
    "torch.distributed.elastic",
    "torch.distributed.run",
    "torch.distributed.launcher",
)
# Signals a batch system or a user sends to stop or warn a job: handed on to the launcher.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# The ranks' status after a signal or train.exit_duration_mins stopped them with a checkpoint
# (inrank_megatron/training/stop.py): not a failure.
EXIT_STOPPED = 75
# Lines srun and slurmstepd write about tasks (not the ranks' own output).
SLURM_PREFIXES = ("srun: ", "slurmstepd: ", "slurmstepd-")


def debug() -> bool:
    """``INRANK_DEBUG`` set (and not 0): launchers and ranks show their full reports."""
    return os.environ.get("INRANK_DEBUG", "0") not in ("", "0")


def log_path(name: str) -> str:
    """Where this launch's report goes: ``$TMPDIR/inrank-<script>-<pid>.log``."""
    return os.path.join(tempfile.gettempdir(), f"inrank-{name}-{os.getpid()}.log")


def status(exitcode: int) -> int:
    """A shell's exit status for a child's ``exitcode`` (negative: killed by that signal)."""
    return 128 - exitcode if exitcode < 0 else exitcode


def failed(name: str, code: int, log: Optional[str], what: str = "") -> None:
    """The launch script's last line for a failed run."""
    where = f" (launcher report: {log})" if log and os.path.exists(log) else ""
    print(
        f"{name}: training failed{what} with exit status {code}{where}", file=sys.stderr, flush=True
    )


def run_torchrun(name: str, args: Sequence[str]) -> int:
    """torchrun (``torch.distributed.run``) in this process; returns the exit status.

    Its agent's log records and, on failure, its ``ChildFailedError`` report go to
    :func:`log_path`; the console gets one line naming the first failed rank, the exit status
    and that file.
    """
    # The agent's own c10 warnings with their C++ stacks (on a multi-node job, the rendezvous
    # store closing as another node's agent exits: "recvValueWithTimeout failed ... frame #0")
    # would follow rank 0's line. c10 reads its level once, when torch loads; the ranks started
    # below get the user's environment back.
    quiet_cpp = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet_cpp:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    import torch  # noqa: F401 - loads c10 at that level

    if quiet_cpp:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    log = log_path(name)
    handler = logging.FileHandler(log, delay=True)  # no file unless something is logged
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for logger_name in TORCHRUN_LOGGERS:
        logger = logging.getLogger(logger_name)
        logger.addHandler(handler)
        logger.propagate = False
    try:
        # run(), not main(): main's @record prints the report to stderr before re-raising.
        torchrun.run(torchrun.parse_args(list(args)))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        with open(log, "a") as f:
            f.write(error.format_msg() + "\n")
        code = status(failure.exitcode)
        if code == EXIT_STOPPED:  # stopped early with a checkpoint; rank 0 said so
            return code
        failed(name, code, log, f" (rank {rank} first)")
        return code or 1
    except SignalException as error:  # torchrun was signalled; it stopped its ranks first
        print(
            f"{name}: torchrun stopped by {signal.Signals(error.sigval).name} (exit status 1)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except Exception as error:  # noqa: BLE001 - rendezvous, bad flags: one line, the rest logged
        with open(log, "a") as f:
            traceback.print_exc(file=f)
        text = " ".join(str(error).split()) or type(error).__name__
        print(
            f"{name}: error: torchrun: {type(error).__name__}: {text} (launcher report: {log})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    finally:
        handler.close()
    return 0


def _die_with_parent() -> None:
    """In the child (``preexec_fn``): killed when this process dies, even by ``kill -9``."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def run_command(name: str, command: Sequence[str], slurm_filter: bool = False) -> int:
    """``command`` as a child; returns its exit status, after one line naming it when non-zero.

    Args:
        name: the launch script, for the last line.
        command: the launcher and its arguments (mpirun ..., srun ..., deepspeed's runner ...).
        slurm_filter: pipe the child's stderr and move srun's / slurmstepd's own lines to the
            log (the rest passes through unchanged).
    """
    log = log_path(name) if slurm_filter else None
    child = subprocess.Popen(
        list(command), preexec_fn=_die_with_parent, stderr=subprocess.PIPE if slurm_filter else None
    )
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda s, _frame: child.send_signal(s))
    if slurm_filter:
        with open(log, "w") as kept:
            for raw in iter(child.stderr.readline, b""):
                kept.write(raw.decode(errors="replace"))
                kept.flush()
                if not raw.decode(errors="replace").startswith(SLURM_PREFIXES):
                    sys.stderr.buffer.write(raw)
                    sys.stderr.buffer.flush()
    code = status(child.wait())
    if log and code in (0, EXIT_STOPPED):
        os.remove(log)
    if code not in (0, EXIT_STOPPED):  # stopped early with a checkpoint: rank 0 said so
        failed(name, code, log)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inrank_megatron.launcher", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_torchrun = sub.add_parser("torchrun", help="torch.distributed.run in this process")
    p_run = sub.add_parser("run", help="a launcher command as a child")
    for p in (p_torchrun, p_run):
        p.add_argument("--name", required=True, help="the launch script, for its last line")
        p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the launcher's arguments")
    p_run.add_argument(
        "--filter", choices=("srun",), default=None, help="move srun's own lines to the log"
    )
    args = parser.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if args.command == "torchrun":
        if debug():
            from torch.distributed import run as torchrun

            torchrun.main(rest)
            return 0
        return run_torchrun(args.name, rest)
    if debug():
        os.execvp(rest[0], rest)
    return run_command(args.name, rest, slurm_filter=args.filter == "srun")


if __name__ == "__main__":
    sys.exit(main())
