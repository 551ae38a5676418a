"""A run's ``output.dir``: one run at a time, and nothing in it that a run did not write is
overwritten (torch-free; read by the trainer's pre-flight and :mod:`inrank_megatron.rules`).

The lock is an exclusive ``flock`` on ``output.dir/.inrank.lock``, taken by rank 0 before the run
writes anything and held until its process ends: the kernel releases it when the process dies,
even by ``kill -9``, so a resume afterwards is never blocked. The file records who holds it
(host, pid, and the job's rendezvous address, so that the other ranks of the same job recognise
their own rank 0), which a refused second run names.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from typing import Optional

from inrank_megatron.config import ConfigError

LOCK_FILE = ".inrank.lock"
_held: Optional[int] = None  # the locked file descriptor of this process, kept open until exit


def entries(output_dir: str) -> list:
    """The names in ``output_dir`` (sorted), the lock file left out; [] when it does not exist."""
    if not os.path.isdir(output_dir):
        return [] if not os.path.lexists(output_dir) else [os.path.basename(output_dir)]
    return sorted(n for n in os.listdir(output_dir) if n != LOCK_FILE)


def _job() -> str:
    """This job's identity, the same on all of its ranks: the rendezvous address."""
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}


def _busy(output_dir: str, holder: dict) -> ConfigError:
    return ConfigError(
        f"output.dir={output_dir!r} is in use by another run (host "
        f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, holding "
        f"{os.path.join(output_dir, LOCK_FILE)}); wait for it to end or choose "
        "another output.dir"
    )


def check_not_locked(output_dir: str) -> None:
    """ConfigError naming the holder when another job holds ``output_dir``'s lock. Creates
    nothing (the pre-flight of every rank)."""
    try:
        fd = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if holder.get("job") != _job() or _job() == ":":
                raise _busy(output_dir, holder) from None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_output_dir(output_dir: str) -> None:
    """Take ``output_dir``'s lock for the rest of this process (rank 0, before any write).

    Raises:
        ConfigError: another run holds it, naming its host and pid.
    """
    global _held
    if _held is not None:
        return
    os.makedirs(output_dir, exist_ok=True)
    fd = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise _busy(output_dir, holder) from None
    os.ftruncate(fd, 0)
    os.write(
        fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": _job()}).encode()
    )
    _held = fd


def unlock_output_dir() -> None:
    """Release this process's lock (in-process callers such as tests; a process exit does it)."""
    global _held
    if _held is not None:
        os.close(_held)
        _held = None
