"""Where this process sits in the job, whichever launcher started it; and the launchers' pre-flight.

The training entry calls :func:`init_distributed_env` first. It fills the standard torch.distributed
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) from what the
launcher left in the environment, and initializes nothing itself:

=========  ===============================================================================
launcher   what it leaves, and what is derived
=========  ===============================================================================
torchrun   all five variables (and ``TORCHELASTIC_RUN_ID``): taken as they are.
deepspeed  the five variables plus ``--local_rank=N`` on the command line (``deepspeed``
           launcher); ``--local_rank`` fills ``LOCAL_RANK`` when the variable is missing.
mpirun     ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK`` (OpenMPI; ``PMI_RANK/PMI_SIZE`` for
           MPICH and Intel MPI). ``MASTER_ADDR/PORT`` from the environment if set, else rank 0
           chooses (127.0.0.1 when every rank is on one node, else its hostname; a free port)
           and broadcasts them with mpi4py, as DeepSpeed's ``mpi_discovery`` does.
srun       ``SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID`` inside a job step (srun without
           torchrun). ``MASTER_ADDR`` = the first host of ``SLURM_STEP_NODELIST`` (or
           ``SLURM_JOB_NODELIST``) from ``scontrol show hostnames``; ``MASTER_PORT`` =
           :func:`slurm_port` of the job id unless set.
single     none of the above: world 1, 127.0.0.1, a free port.
=========  ===============================================================================

A Slurm *batch* step (the sbatch script itself, no ``SLURM_STEP_ID``) counts as ``single``: a
plain ``python -m inrank_megatron.train`` there is one process, whatever ``--ntasks`` says.

    env = init_distributed_env()                   # {"rank": 0, "world_size": 2, ...}
    torch.distributed.init_process_group(env["backend"])   # reads the variables just set

The launch scripts (``launch/``) run the pre-flight check before they start anything:

    python -m inrank_megatron.launch_env check configs/tiny-cpu.yaml --world-size 2 [key=value ...]
    python -m inrank_megatron.launch_env show      # this process's resolved env, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, Optional

LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "srun", "single")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LOCALHOST = "127.0.0.1"


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete or contradictory; the message says what to set."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a Slurm job: 10000 + job id mod 20000.

    Below Linux's ephemeral range (32768+), and different for jobs that share a node. The sbatch
    scripts in ``launch/`` export the same value as ``MASTER_PORT``.
    """
    return 10000 + int(job_id) % 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm hostlist (``n[1-3,7],gpu01``), by ``scontrol show hostnames``.

    Falls back to :func:`parse_nodelist` where ``scontrol`` is not installed.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        hosts = out.split()
        if hosts:
            return hosts
    except (OSError, subprocess.SubprocessError):
        pass
    return parse_nodelist(nodelist)


def parse_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm hostlist without Slurm: ``"n[1-2,05],gpu"`` -> n1 n2 n05 gpu.

    Handles one bracket group per name (what Slurm prints for flat node names), keeping the
    zero padding of each range.
    """
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hi = hi or lo
            hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def _int(environ, name: str, default: Optional[int] = None) -> int:
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise LaunchEnvError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"{name}={value!r} is not an integer") from None


def _local_rank_arg(argv: Sequence[str]) -> Optional[int]:
    """``N`` of ``--local_rank=N`` / ``--local_rank N`` (also ``--local-rank``), the DeepSpeed
    launcher's argument; None when absent."""
    for i, arg in enumerate(argv):
        for flag in ("--local_rank", "--local-rank"):
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
            if arg == flag and i + 1 < len(argv):
                return int(argv[i + 1])
    return None


def _mpi_rendezvous(
    environ, world_size: int, local_size: Optional[int], mpi_comm
) -> tuple[str, int]:
    """``MASTER_ADDR/PORT`` of an MPI job: from the environment, or chosen by rank 0 and
    broadcast (the variables must agree on every rank)."""
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if addr and port:
        return addr, _int(environ, "MASTER_PORT")
    if world_size == 1:
        return addr or LOCALHOST, int(port) if port else free_port()
    if mpi_comm is None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise LaunchEnvError(
                "started by mpirun on several processes, but MASTER_ADDR/MASTER_PORT are not set "
                "and mpi4py is not installed to agree on them; install mpi4py or pass "
                "mpirun -x MASTER_ADDR=<rank 0 host> -x MASTER_PORT=<port>"
            ) from None
        mpi_comm = MPI.COMM_WORLD
    chosen = None
    if mpi_comm.Get_rank() == 0:
        one_node = local_size == world_size
        chosen = (
            addr or (LOCALHOST if one_node else socket.gethostname()),
            int(port) if port else free_port("" if not one_node else LOCALHOST),
        )
    addr, port = mpi_comm.bcast(chosen, root=0)
    return addr, int(port)


def init_distributed_env(
    environ: Optional[MutableMapping[str, str]] = None,
    argv: Optional[Sequence[str]] = None,
    *,
    hostnames: Callable[[str], list[str]] = expand_nodelist,
    mpi_comm: Any = None,
    cuda_available: Optional[bool] = None,
) -> dict:
    """Resolve rank, world size and rendezvous address from the launcher, and export them.

    Writes ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` into
    ``environ`` (so ``init_process_group``'s ``env://`` and ``deepspeed.init_distributed`` read
    them); does not initialize ``torch.distributed``. See the module docstring for the order in
    which launchers are recognized.

    Args:
        environ: the environment to read and update; None means ``os.environ``.
        argv: command-line arguments searched for DeepSpeed's ``--local_rank``; None means
            ``sys.argv[1:]``.
        hostnames: expands a Slurm hostlist (tests pass a fake).
        mpi_comm: an ``mpi4py`` communicator for the mpirun rendezvous (tests pass a fake);
            None imports mpi4py when it is needed.
        cuda_available: overrides ``torch.cuda.is_available()`` for the backend suggestion.

    Returns:
        ``{"rank", "world_size", "local_rank", "master_addr", "master_port"}`` (ints and a host),
        ``"launcher"`` (one of :data:`LAUNCHERS`) and ``"backend"``: ``"nccl"`` when CUDA is
        available, else ``"gloo"``.

    Raises:
        LaunchEnvError: a variable is not an integer, a rank is outside the world, or a
            multi-process launch leaves no way to agree on the rendezvous address.
    """
    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else argv
    local_rank_arg = _local_rank_arg(argv)

    if environ.get("RANK") is not None and environ.get("WORLD_SIZE") is not None:
        # torchrun and the deepspeed launcher export everything themselves.
        launcher = (
            "torchrun"
            if "TORCHELASTIC_RUN_ID" in environ
            else "deepspeed"
            if local_rank_arg is not None or "CROSS_RANK" in environ
            else "torchrun"
        )
        rank, world_size = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        local_rank = _int(
            environ, "LOCAL_RANK", local_rank_arg if local_rank_arg is not None else rank
        )
        if world_size > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
            raise LaunchEnvError(
                f"RANK={rank} and WORLD_SIZE={world_size} are set but "
                "MASTER_ADDR/MASTER_PORT are not; expected all five (torchrun "
                "and the deepspeed launcher set them)"
            )
        addr = environ.get("MASTER_ADDR") or LOCALHOST
        port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else free_port()
    elif "OMPI_COMM_WORLD_RANK" in environ or "PMI_RANK" in environ:
        # Before Slurm: mpirun inside an allocation also leaves SLURM_* (of its daemons' step).
        launcher = "mpirun"
        if "OMPI_COMM_WORLD_RANK" in environ:
            rank = _int(environ, "OMPI_COMM_WORLD_RANK")
            world_size = _int(environ, "OMPI_COMM_WORLD_SIZE")
            local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
            local_size = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", 0) or None
        else:
            rank, world_size = _int(environ, "PMI_RANK"), _int(environ, "PMI_SIZE")
            local_rank = _int(environ, "MPI_LOCALRANKID", 0)
            local_size = _int(environ, "MPI_LOCALNRANKS", 0) or None
        addr, port = _mpi_rendezvous(environ, world_size, local_size, mpi_comm)
    elif "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        launcher = "srun"
        rank = _int(environ, "SLURM_PROCID")
        world_size = _int(environ, "SLURM_STEP_NUM_TASKS", _int(environ, "SLURM_NTASKS", 1))
        local_rank = _int(environ, "SLURM_LOCALID", 0)
        addr = environ.get("MASTER_ADDR")
        if not addr:
            nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
            if nodelist:
                addr = hostnames(nodelist)[0]
            elif world_size == 1:
                addr = LOCALHOST
            else:
                raise LaunchEnvError(
                    "srun step without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST; "
                    "expected Slurm to set them, or MASTER_ADDR"
                )
        if environ.get("MASTER_PORT"):
            port = _int(environ, "MASTER_PORT")
        elif environ.get("SLURM_JOB_ID"):
            port = slurm_port(environ["SLURM_JOB_ID"])
        else:
            port = free_port()
    else:
        launcher = "single"
        rank, world_size, local_rank = 0, 1, local_rank_arg or 0
        addr = environ.get("MASTER_ADDR") or LOCALHOST
        port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else free_port()

    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise LaunchEnvError(
            f"{launcher}: rank {rank}, local rank {local_rank} and world size "
            f"{world_size} are inconsistent; expected 0 <= rank < world size"
        )
    resolved = {
        "rank": rank,
        "world_size": world_size,
        "local_rank": local_rank,
        "master_addr": addr,
        "master_port": port,
    }
    for name, key in zip(DIST_VARS, resolved):
        environ[name] = str(resolved[key])
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return {**resolved, "launcher": launcher, "backend": "nccl" if cuda_available else "gloo"}


# ------------------------------------------------------------------------------------------- CLI
def die_with_launcher() -> None:
    """Have the kernel kill this rank when its parent (the launcher's agent: torchrun, deepspeed,
    mpirun's daemon, slurmstepd) dies, even by ``kill -9``: launchers start ranks in sessions of
    their own, so killing the launcher's process group would otherwise leave them training
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, Linux). Not for a process started by hand, whose
    parent is a shell. Exits at once if the parent is already gone."""
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            return
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return
    if os.getppid() != parent or parent == 1:  # the launcher died before the signal was armed
        os._exit(1)


def check(
    config: str, world_size: int, overrides: Sequence[str] = (), train_module: Optional[str] = None
) -> str:
    """Load ``config`` with ``overrides`` and check it for ``world_size`` processes: every rule of
    the ``config`` and ``files`` scopes (:mod:`inrank_megatron.rules`), as the trainer's own
    pre-flight does; with ``train_module``, also that the module the launcher will run exists.
    Notes (what an override implied) and warnings are printed before the summary.

    Returns:
        A one-line summary, e.g. ``"world 2 = TP 2 x PP 1 x DP 1, backend torch"``.

    Raises:
        ConfigError: from :func:`inrank_megatron.config.load_config` or
            :func:`inrank_megatron.rules.validate`, or
            ``train_module`` not found.
    """
    import importlib.util

    from inrank_megatron.config import ConfigError, data_parallel_size, load_config

    if train_module is not None:
        try:
            found = importlib.util.find_spec(train_module) is not None
        except ImportError:  # a parent package is missing
            found = False
        if not found:
            raise ConfigError(
                f"training module {train_module!r} not found (python "
                f"{sys.executable}); expected it importable, e.g. "
                "inrank_megatron.train with the package installed"
            )

    from inrank_megatron import rules

    notes: list = []
    cfg = load_config(config, list(overrides), notes)
    # What the trainer's pre-flight checks but this machine's devices: the configuration and the
    # files the run reads (data, tokenizer, DeepSpeed JSON, output dir, resume).
    found = rules.validate(cfg, world_size, scopes=("config", "files"))
    # What the overrides implied and what is legal but dubious, before the summary (last line).
    for note in notes:
        print(f"note: {note}")
    for warning in found["split_warnings"]:
        print(f"warning: {warning}")
    p = cfg.parallel
    return (
        f"world {world_size} = TP {p.tensor_model_parallel_size} x PP "
        f"{p.pipeline_model_parallel_size} x DP {data_parallel_size(cfg, world_size)}, "
        f"backend {p.backend}, output {cfg.output.dir}"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inrank_megatron.launch_env",
        description="Launcher helpers. 'check' validates a config for a world size before any "
        "training process starts (exit 2 and one line on stderr when it does not "
        "fit); 'show' prints this process's resolved distributed env as JSON.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="validate CONFIG [overrides] for --world-size N")
    p_check.add_argument("config", help="YAML config, e.g. configs/tiny-cpu.yaml")
    p_check.add_argument("--world-size", type=int, required=True, help="processes in the job")
    p_check.add_argument(
        "--train-module",
        default=None,
        help="also check that this module exists (the one the launcher runs)",
    )
    p_check.add_argument("overrides", nargs="*", help="section.key=value overrides")
    sub.add_parser("show", help="print init_distributed_env() of this process as JSON")
    # Overrides may follow --world-size, which plain parse_args would reject.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "check" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "check":
        args.overrides = list(args.overrides) + extra

    if args.command == "show":
        try:
            print(json.dumps(init_distributed_env(argv=[]), sort_keys=True), flush=True)
        except LaunchEnvError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0

    from inrank_megatron.config import ConfigError

    try:
        print(check(args.config, args.world_size, args.overrides, args.train_module))
    except ConfigError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
