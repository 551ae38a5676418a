"""Stopping early without losing a step: SIGTERM, SIGUSR1 and ``train.exit_duration_mins``.

A preempted or time-limited job (Slurm sends SIGTERM at preemption and at the time limit, and
``--signal=B:USR1@<seconds>`` before it; launch/README.md) finishes the step in flight on every
rank, saves a checkpoint, prints one line and exits with :data:`EXIT_STOPPED`; ``output.resume=auto``
continues it bit for bit. Megatron-LM's ``--exit-signal-handler`` and ``--exit-duration-in-mins``
are the model.

The signal handler only records the signal: nothing stops inside a collective, a rank check, the
cut or a save. Ranks agree through the step's one host sync (:func:`step_sync`): the flags ride on
the all-reduce that averages the loss (:func:`reason` reads them), so a signal that reached any
rank stops every rank after the same step, at no extra collective (one small world all-reduce per
step when there is no data parallelism, none on one process). The time budget is rank 0's clock
alone, shared the same way.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Optional

import torch

# sysexits.h EX_TEMPFAIL: "a temporary failure ... the user is invited to retry the operation
# later": stopped early with a checkpoint; rerun with output.resume=auto to continue.
EXIT_STOPPED = 75  # inrank_megatron/launcher.py knows it too (it imports no training code)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Before this job has timed a save, the time budget reserves this share of itself for one.
FIRST_SAVE_RESERVE = 0.1


class StopRequest:
    """This rank's reasons to stop: a signal it received, and (rank 0) the time budget.

    Args:
        budget_s: ``train.exit_duration_mins`` in seconds; None: no budget.
        clock_rank: whether this rank's clock decides the budget (rank 0).
        start: ``time.monotonic()`` when the job started.
    """

    def __init__(self, *, budget_s: Optional[float], clock_rank: bool, start: float):
        self.budget_s = budget_s if clock_rank else None
        self.start = start
        self.received: Optional[int] = None  # the first stop signal, until the loop ends
        self.slowest_step = 0.0
        self.slowest_save: Optional[float] = None
        self._previous = {}

    @classmethod
    def for_config(cls, cfg, *, rank: int, start: Optional[float] = None) -> "StopRequest":
        """``cfg.train.exit_duration_mins`` counted from ``start`` (default now) on rank 0."""
        minutes = cfg.train.exit_duration_mins
        return cls(
            budget_s=minutes * 60 if minutes else None,
            clock_rank=rank == 0,
            start=time.monotonic() if start is None else start,
        )

    def install(self) -> None:
        """Record SIGTERM / SIGUSR1 instead of dying (main thread only, as ``signal`` requires)."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
            # Restart interrupted system calls (gloo's sockets, file writes): the handler only
            # sets a flag, nothing needs waking (Python's signal() makes them fail with EINTR).
            signal.siginterrupt(sig, False)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def timed_step(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def timed_save(self, seconds: float) -> None:
        self.slowest_save = max(self.slowest_save or 0.0, seconds)

    def out_of_time(self, now: Optional[float] = None) -> bool:
        """Whether another step and a save would overrun the budget: the slowest step and the
        slowest save of this job (before its first save, :data:`FIRST_SAVE_RESERVE` of the
        budget) are kept in hand."""
        if self.budget_s is None:
            return False
        save = (
            self.slowest_save
            if self.slowest_save is not None
            else FIRST_SAVE_RESERVE * self.budget_s
        )
        elapsed = (time.monotonic() if now is None else now) - self.start
        return elapsed + self.slowest_step + save >= self.budget_s

    def flags(self) -> list:
        """This rank's votes: one per stop signal, then the time budget."""
        return [float(self.received == s) for s in STOP_SIGNALS] + [float(self.out_of_time())]


@contextlib.contextmanager
def deferred():
    """Hold SIGTERM / SIGUSR1 back until the block ends (a save): they stay pending, and the
    processes started inside it inherit them blocked. A launcher signals a rank's whole process
    group (torchrun ``os.killpg``, Slurm every process of the step), which would otherwise kill
    the helpers a save runs on (megatron dist_checkpointing's spawned ``Manager`` queue, its
    forked writers) under the rank that is saving."""
    from multiprocessing import resource_tracker

    # Python starts its resource tracker (once per process) with SIGTERM blocked and then
    # *unblocks* it: start it before the block, or a first spawn inside it would lift the block.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def reason(votes) -> Optional[str]:
    """The stop all ranks agreed on from the summed :meth:`StopRequest.flags`: ``"SIGTERM"``,
    ``"SIGUSR1"``, ``"time limit"`` (a signal wins), or None to go on."""
    for sig, n in zip(STOP_SIGNALS, votes):
        if n > 0:
            return sig.name
    return "time limit" if votes[len(STOP_SIGNALS)] > 0 else None


def step_sync(losses: list, groups, votes: list) -> tuple:
    """The step's one host sync: the mean loss over data-parallel replicas and the sum of every
    rank's ``votes`` (:meth:`StopRequest.flags`, and whatever else the loop asks all ranks), in
    one all-reduce over every rank.

    Each replica's losses count once (from its first tensor- and pipeline-parallel rank; the
    others add zeros, which leaves the sum exact), so the mean equals the data-parallel average.

    Returns:
        (mean loss, summed votes), the same on every rank.
    """
    counted = groups.tp_rank == 0 and getattr(groups, "pp_rank", 0) == 0
    t = torch.tensor(
        [
            float(sum(losses)) if counted else 0.0,
            float(len(losses)) if counted else 0.0,
            *map(float, votes),
        ],
        dtype=torch.float64,
    )
    if groups.world_size > 1:
        torch.distributed.all_reduce(t)
    return (t[0] / t[1]).item(), t[2:].tolist()
