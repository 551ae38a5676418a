"""Run a test body on N CPU processes under torch.distributed (gloo), or the trainer under torchrun.

Every in-process distributed test goes through `run_distributed`:

    def _body(rank, world_size, hidden):          # module level, so spawn can pickle it
        ...
        return loss.item()

    def test_something():
        losses = run_distributed(_body, 2, 64)    # [rank 0's return, rank 1's return]

Each call starts `world_size` fresh processes, forked from a forkserver that imported torch and
megatron.core once per session (a spawned rank spent about 5 CPU seconds importing them), so
process groups, Megatron's parallel_state and monkeypatches never leak between tests or into the
pytest process.
A rank that raises fails the test with that rank's traceback; the other ranks are killed rather
than left waiting in a collective, and a run over `timeout` seconds is killed as a whole.

Every end-to-end test runs the trainer as a user does, through `run_train` (``torchrun -m
inrank_megatron.train --config tests/tiny.yaml`` plus overrides, usually `SHORT`), and
reads its ``summary.json`` with `read_summary`. Runs several files compare against are trained
once per session by the fixtures in ``tests/conftest.py``.
"""

import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import resource
import socket
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite's small GPT (configs/tiny-cpu.yaml's spec-like InRank settings, pinned for the tests).
TINY_CONFIG = "tests/tiny.yaml"
# A run short enough for 2 cores: growth every 2 steps from step 2, cut after step 8.
SHORT = [
    "train.steps=16",
    "train.lr_warmup_steps=2",
    "train.log_interval=1",
    "train.eval_interval=8",
    "train.eval_iters=1",
    "train.save_interval=4",
    "inrank.warmup=2",
    "inrank.gap=2",
    "inrank.stage1_steps=8",
    "output.plot=false",
    "model.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cleanup() -> None:
    import torch.distributed

    # Only if the body used Megatron: importing it here would cost seconds for nothing.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# CPU seconds the ranks of every run_distributed call so far used (forked from the forkserver,
# they are not this process's children: tests/slow_check.py adds this to its CPU count).
_RANK_CPU_S = [0.0]


def rank_cpu_s() -> float:
    """CPU seconds used by every rank :func:`run_distributed` has started in this process."""
    return _RANK_CPU_S[0]


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _child(conn, fn, rank, world_size, port, timeout, args, kwargs) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        import torch
        import torch.distributed

        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            backend="gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            result = fn(rank, world_size, *args, **kwargs)
        finally:
            _cleanup()
        # Pickle here, so an unpicklable return value fails this rank with a traceback.
        message = ("ok", pickle.dumps(result))
    except BaseException:
        message = ("error", traceback.format_exc())
    conn.send((*message, _own_cpu_s()))
    conn.close()


# What every rank imports: preloaded once per session by the forkserver (below), so that a rank does
# not import them again (about 5 CPU seconds per process: megatron.core pulls in most of torch).
PRELOAD = ["torch", "torch.distributed", "megatron.core"]


def _context():
    """``forkserver`` with :data:`PRELOAD` imported in the server: each rank is forked from it, a
    fresh process with the imports done (no state of a previous test: the server never runs a test
    body). The server starts on first use with this process's environment (``OMP_NUM_THREADS=1``
    set by :func:`run_distributed`) and ``sys.path``."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def run_distributed(fn, world_size: int, *args, timeout: float = 300, **kwargs) -> list:
    """Runs ``fn(rank, world_size, *args, **kwargs)`` on `world_size` gloo processes.

    Args:
        fn: A module-level function (pickled by its qualified name).
        world_size: Number of processes; ranks 0..world_size-1, all on 127.0.0.1.
        *args: Passed to `fn` after `rank, world_size`; must be picklable.
        timeout: Seconds for the whole run (process start and imports included) before every
            rank is killed and the call fails.
        **kwargs: Passed to `fn`; must be picklable.

    Returns:
        The ranks' return values, in rank order.

    Raises:
        AssertionError: A rank raised (the message holds its traceback), died without reporting,
            or the run timed out.
    """
    context = _context()
    port = _free_port()
    processes, connections = [], []
    # The forkserver (started by the first start() of the session) imports torch: OMP_NUM_THREADS
    # has to be in the environment it inherits, so set it around start() only.
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for rank in range(world_size):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_child,
                args=(sender, fn, rank, world_size, port, timeout, args, kwargs),
                name=f"{getattr(fn, '__name__', 'fn')}-rank{rank}",
            )
            process.start()
            # Drop the parent's copy of the write end, so a dead child reads as EOF.
            sender.close()
            processes.append(process)
            connections.append(receiver)
    finally:
        if saved_omp is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved_omp

    deadline = time.monotonic() + timeout
    results = [None] * world_size
    pending = set(range(world_size))
    failure = None
    try:
        while pending and failure is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = (
                    f"run_distributed({fn.__name__}, world_size={world_size}) timed out after "
                    f"{timeout} s; ranks {sorted(pending)} had not finished"
                )
                break
            waitables = {connections[rank]: rank for rank in pending}
            waitables.update({processes[rank].sentinel: rank for rank in pending})
            for ready in multiprocessing.connection.wait(list(waitables), timeout=remaining):
                rank = waitables[ready]
                if rank not in pending:
                    continue
                connection = connections[rank]
                # A child that exited after sending leaves its message readable in the pipe.
                if ready is connection or connection.poll():
                    try:
                        status, payload, cpu = connection.recv()
                        _RANK_CPU_S[0] += cpu
                    except EOFError:
                        status, payload = "died", None
                else:
                    status, payload = "died", None
                pending.discard(rank)
                if status == "ok":
                    results[rank] = pickle.loads(payload)
                    continue
                if status == "error":
                    failure = f"rank {rank} of {world_size} raised:\n{payload}"
                else:
                    processes[rank].join(timeout=5)
                    failure = (
                        f"rank {rank} of {world_size} exited with code "
                        f"{processes[rank].exitcode} without reporting a result"
                    )
                break
    finally:
        for process in processes:
            if process.is_alive() and (failure is not None or pending):
                process.kill()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in connections:
            connection.close()

    if failure is not None:
        raise AssertionError(failure)
    return results


# ------------------------------------------------------------------------- the trainer, torchrun
def train_command(overrides, nproc: int = 2, config: str = TINY_CONFIG) -> list:
    """``torchrun --nproc_per_node N -m inrank_megatron.train --config CONFIG`` (a path relative
    to the repository) followed by ``overrides``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        "-m",
        "inrank_megatron.train",
        "--config",
        os.path.join(REPO, config),
        *overrides,
    ]


def train_env() -> dict:
    """The environment of a launched run: one thread per process on a 2-core machine."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_train(
    overrides, nproc: int = 2, timeout: float = 600, check: bool = True, config: str = TINY_CONFIG
):
    """Train ``CONFIG`` (default the test suite's ``tests/tiny.yaml``) with ``overrides`` on
    ``nproc`` processes.

    Returns:
        The finished ``subprocess.CompletedProcess`` (text stdout and stderr).

    Raises:
        AssertionError: with ``check``, a non-zero exit (the message ends with its stderr).
    """
    proc = subprocess.run(
        train_command(overrides, nproc, config),
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def read_summary(out: str) -> dict:
    """``summary.json`` of the run directory ``out``."""
    import json

    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)
