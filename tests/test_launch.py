"""Launching at scale: what the launchers and ``inrank_megatron.launch_env`` pin down.

- ``init_distributed_env`` resolves RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
  from each launcher's environment (torchrun, the deepspeed launcher and its ``--local_rank``,
  OpenMPI and MPICH through an MPI broadcast, srun steps through the Slurm node list, a plain
  process), exports them, and suggests gloo without CUDA; a Slurm batch step is one process.
- ``python -m inrank_megatron.launch_env check`` is the launchers' pre-flight: exit 2 and one line.
- Every script in ``launch/`` refuses bad input (no config, a missing config, more processes than
  the node or the allocation holds, a layout that does not divide the world size) with one line
  on stderr and exit status 2 before any training process starts (no output directory appears).
- Slow: ``mpirun.sh``, ``deepspeed.sh`` and ``torchrun.sh`` train the tiny config on 2 processes;
  on a real Slurm with two fake nodes on this host (``tests/slurm/start.sh``), ``sbatch -N2`` of
  both SLURM scripts (the DeepSpeed one with srun and with one deepspeed launcher per node)
  trains on 2 nodes x 1 process, evaluates, and writes metrics, a summary and a checkpoint; a
  bad config fails the job with the one-line error. The DeepSpeed scripts run the DeepSpeed
  backend (ZeRO-1, ``configs/deepspeed/zero1.json``). The Slurm fixture skips only
  where Slurm cannot be installed (apt fails, not root), and never under CI=true.

Runs use the real ``inrank_megatron.train`` (``INRANK_TRAIN_MODULE`` selects another).
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from inrank_megatron import launch_env
from inrank_megatron.launch_env import (
    LaunchEnvError,
    init_distributed_env,
    parse_nodelist,
    slurm_port,
)
from tests.distributed import read_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SLURM_HELPERS = os.path.join(REPO, "tests", "slurm")
CONFIG = "tests/tiny.yaml"  # relative, as users pass it: scripts run with cwd=REPO
# 4 optimizer steps: rank checks from step 1, the stage cut after step 3, evaluation at 2 and 4,
# one checkpoint at step 4.
SHORT = [
    "train.steps=4",
    "train.lr_warmup_steps=1",
    "train.log_interval=1",
    "train.eval_interval=2",
    "train.eval_iters=1",
    "train.save_interval=4",
    "inrank.warmup=1",
    "inrank.gap=1",
    "inrank.stage1_steps=3",
    "output.plot=false",
]
SINGLE_NODE = ["torchrun.sh", "deepspeed.sh", "mpirun.sh"]
SLURM_SCRIPTS = ["slurm_torchrun.sbatch", "slurm_deepspeed.sbatch"]
# More processes than any node has (GPUs, or 2 x cores on CPU).
TOO_MANY = "100000"


def _env(**extra) -> dict:
    """The test's environment without any launcher's variables, with this interpreter first."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SRUN_", "SBATCH_", "OMPI_", "PMI_", "PMIX_"))
        and k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "TORCHELASTIC_RUN_ID",
            "NPROC",
            "NNODES",
            "NPROC_PER_NODE",
        )
    }
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# ------------------------------------------------------------------------- (a) launch_env units
def test_torchrun_env_is_taken_as_is():
    environ = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "abc",
    }
    env = init_distributed_env(environ, argv=[], cuda_available=False)
    assert env == {
        "rank": 3,
        "world_size": 4,
        "local_rank": 1,
        "master_addr": "node7",
        "master_port": 29400,
        "launcher": "torchrun",
        "backend": "gloo",
    }
    assert environ["RANK"] == "3" and environ["MASTER_PORT"] == "29400"


@pytest.mark.parametrize(
    "argv", [["--local_rank=1", "--config", "x.yaml"], ["--config", "x.yaml", "--local_rank", "1"]]
)
def test_deepspeed_launcher_local_rank_argument(argv):
    # The deepspeed launcher exports RANK etc. and CROSS_RANK, and passes --local_rank.
    environ = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29501",
        "CROSS_RANK": "0",
    }
    env = init_distributed_env(environ, argv=argv, cuda_available=True)
    assert (env["launcher"], env["rank"], env["local_rank"], env["backend"]) == (
        "deepspeed",
        1,
        1,
        "nccl",
    )
    assert environ["LOCAL_RANK"] == "1"


def test_env_launcher_without_master_fails():
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR/MASTER_PORT"):
        init_distributed_env({"RANK": "0", "WORLD_SIZE": "2"}, argv=[], cuda_available=False)


class _FakeComm:
    """mpi4py's COMM_WORLD as seen by one rank; ``bcast`` returns what rank 0 sent."""

    def __init__(self, rank, sent=None):
        self.rank, self.sent, self.calls = rank, sent, []

    def Get_rank(self):
        return self.rank

    def bcast(self, obj, root=0):
        self.calls.append((obj, root))
        return obj if self.rank == root else self.sent


def _ompi(rank, size, local_rank, local_size, **extra):
    return {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(local_rank),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
        **extra,
    }


def test_mpirun_one_node_rank0_broadcasts_localhost_and_a_port():
    comm0 = _FakeComm(0)
    env0 = init_distributed_env(_ompi(0, 2, 0, 2), argv=[], mpi_comm=comm0, cuda_available=False)
    assert (env0["launcher"], env0["rank"], env0["world_size"]) == ("mpirun", 0, 2)
    assert env0["master_addr"] == "127.0.0.1" and 1024 <= env0["master_port"] < 65536
    comm1 = _FakeComm(1, sent=comm0.calls[0][0])
    environ1 = _ompi(1, 2, 1, 2)
    env1 = init_distributed_env(environ1, argv=[], mpi_comm=comm1, cuda_available=False)
    assert (env1["rank"], env1["local_rank"]) == (1, 1)
    assert (env1["master_addr"], env1["master_port"]) == (env0["master_addr"], env0["master_port"])
    assert comm1.calls == [(None, 0)]  # rank 1 only receives
    assert environ1["MASTER_PORT"] == str(env0["master_port"])


def test_mpirun_several_nodes_uses_rank0_hostname(monkeypatch):
    monkeypatch.setattr(launch_env.socket, "gethostname", lambda: "gpu-017")
    env = init_distributed_env(
        _ompi(0, 4, 0, 2), argv=[], mpi_comm=_FakeComm(0), cuda_available=False
    )
    assert env["master_addr"] == "gpu-017"


def test_mpirun_exported_master_needs_no_mpi():
    environ = _ompi(1, 2, 1, 2, MASTER_ADDR="10.0.0.1", MASTER_PORT="23456")
    env = init_distributed_env(environ, argv=[], mpi_comm=object(), cuda_available=False)
    assert (env["master_addr"], env["master_port"]) == ("10.0.0.1", 23456)


def test_mpirun_without_mpi4py_or_master_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py -> ImportError
    with pytest.raises(LaunchEnvError, match="mpi4py"):
        init_distributed_env(_ompi(0, 2, 0, 2), argv=[], cuda_available=False)


def test_mpich_pmi_variables():
    environ = {
        "PMI_RANK": "2",
        "PMI_SIZE": "4",
        "MPI_LOCALRANKID": "0",
        "MPI_LOCALNRANKS": "2",
        "MASTER_ADDR": "h0",
        "MASTER_PORT": "1234",
    }
    env = init_distributed_env(environ, argv=[], cuda_available=False)
    assert (env["launcher"], env["rank"], env["world_size"], env["local_rank"]) == (
        "mpirun",
        2,
        4,
        0,
    )


def test_mpirun_inside_slurm_allocation_is_mpirun():
    # mpirun in an sbatch script: its daemons' srun step leaves SLURM_* behind; MPI ranks win.
    environ = _ompi(
        1,
        2,
        1,
        2,
        SLURM_PROCID="0",
        SLURM_STEP_ID="0",
        SLURM_NTASKS="1",
        MASTER_ADDR="h",
        MASTER_PORT="1",
    )
    env = init_distributed_env(environ, argv=[], cuda_available=False)
    assert (env["launcher"], env["rank"], env["world_size"]) == ("mpirun", 1, 2)


def test_srun_step_uses_first_node_and_job_port():
    seen = []

    def hostnames(nodelist):
        seen.append(nodelist)
        return parse_nodelist(nodelist)

    environ = {
        "SLURM_PROCID": "3",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
        "SLURM_JOB_ID": "123456",
    }
    env = init_distributed_env(environ, argv=[], hostnames=hostnames, cuda_available=False)
    assert env == {
        "rank": 3,
        "world_size": 4,
        "local_rank": 1,
        "master_addr": "gpu07",
        "master_port": slurm_port("123456"),
        "launcher": "srun",
        "backend": "gloo",
    }
    assert seen == ["gpu[07-08]"]
    assert env["master_port"] == 10000 + 123456 % 20000
    assert {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
    }


def test_srun_exported_master_wins():
    environ = {
        "SLURM_PROCID": "0",
        "SLURM_STEP_ID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_ID": "7",
        "MASTER_ADDR": "n2",
        "MASTER_PORT": "20001",
    }
    env = init_distributed_env(
        environ, argv=[], hostnames=lambda _: pytest.fail("called"), cuda_available=False
    )
    assert (env["world_size"], env["master_addr"], env["master_port"]) == (2, "n2", 20001)


def test_slurm_batch_step_is_a_single_process():
    # The sbatch script itself: SLURM_PROCID=0 and the job's task count, but no step id.
    environ = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_ID": "7",
    }
    env = init_distributed_env(environ, argv=[], cuda_available=False)
    assert (env["launcher"], env["rank"], env["world_size"]) == ("single", 0, 1)


def test_single_process_gets_world_one_and_a_free_port():
    environ = {}
    env = init_distributed_env(environ, argv=[], cuda_available=False)
    assert (env["launcher"], env["rank"], env["world_size"], env["local_rank"]) == (
        "single",
        0,
        1,
        0,
    )
    assert env["master_addr"] == "127.0.0.1" and 1024 <= env["master_port"] < 65536
    assert environ == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(env["master_port"]),
    }


def test_backend_suggestion_follows_cuda():
    assert init_distributed_env({}, argv=[], cuda_available=True)["backend"] == "nccl"
    import torch

    expected = "nccl" if torch.cuda.is_available() else "gloo"
    assert init_distributed_env({}, argv=[])["backend"] == expected


@pytest.mark.parametrize(
    "environ, match",
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "inconsistent"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, "NODELIST"),
    ],
)
def test_bad_launcher_env_is_named(environ, match):
    with pytest.raises(LaunchEnvError, match=match):
        init_distributed_env(environ, argv=[], cuda_available=False)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[07-08,10],login", ["gpu07", "gpu08", "gpu10", "login"]),
        ("a[08-10]b", ["a08b", "a09b", "a10b"]),
        ("node3", ["node3"]),
    ],
)
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts
    if shutil.which("scontrol"):  # the same as Slurm's own expansion
        assert launch_env.expand_nodelist(nodelist) == hosts


def test_check_cli(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert launch_env.main(["check", CONFIG, "--world-size", "2", "train.steps=50"]) == 0
    assert capsys.readouterr().out.startswith("world 2 = TP 2 x PP 1 x DP 1")
    for argv, needle in [
        (["check", CONFIG, "--world-size", "3"], "does not divide world_size=3"),
        (["check", "configs/missing.yaml", "--world-size", "2"], "config file not found"),
        (["check", CONFIG, "--world-size", "2", "train.nope=1"], "unknown key 'train.nope'"),
        (
            ["check", CONFIG, "--world-size", "2", "--train-module", "inrank_megatron.nope"],
            "training module 'inrank_megatron.nope' not found",
        ),
    ]:
        assert launch_env.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


@pytest.mark.slow
def test_show_under_mpirun_agrees_on_master():
    """The real mpirun + mpi4py path: 2 ranks, one rendezvous address and port."""
    # tools/install.sh installs openmpi-bin: a missing mpirun is a broken install, not a skip.
    assert shutil.which("mpirun"), "mpirun not installed (tools/install.sh: openmpi-bin)"
    cmd = ["mpirun", "-np", "2", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    proc = subprocess.run(
        cmd + [sys.executable, "-m", "inrank_megatron.launch_env", "show"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    envs = sorted(
        (json.loads(m) for m in re.findall(r"\{[^{}]*\}", proc.stdout)), key=lambda e: e["rank"]
    )
    assert [(e["launcher"], e["rank"], e["world_size"]) for e in envs] == [
        ("mpirun", 0, 2),
        ("mpirun", 1, 2),
    ]
    assert len({(e["master_addr"], e["master_port"]) for e in envs}) == 1


# ------------------------------------------------------------------------- (b) bad input
def _run_script(script, args, env=None, timeout=120, runner=()):
    return subprocess.run(
        [*runner, os.path.join(LAUNCH, script), *args],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_refused(proc, script, needle, out_dir):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert not os.path.exists(out_dir), "a training process started"


@pytest.mark.parametrize("script", SINGLE_NODE + SLURM_SCRIPTS)
def test_help(script):
    proc = _run_script(script, ["--help"], runner=("bash",))
    assert proc.returncode == 0, proc.stderr
    assert f"launch/{script}" in proc.stdout and "CONFIG" in proc.stdout


@pytest.mark.parametrize("script", SINGLE_NODE)
@pytest.mark.parametrize(
    "case", ["no config", "missing config", "too many processes", "layout does not divide"]
)
def test_single_node_script_refuses_bad_input(script, case, tmp_path):
    out = tmp_path / "out"
    args, needle = {
        "no config": ([], "missing CONFIG"),
        "missing config": (["configs/nope.yaml"], "config file not found: configs/nope.yaml"),
        "too many processes": (["--nproc", TOO_MANY, CONFIG], f"--nproc={TOO_MANY} exceeds"),
        # TP=2 on one process.
        "layout does not divide": (["--nproc", "1", CONFIG], "does not divide world_size=1"),
    }[case]
    proc = _run_script(script, [*args, *SHORT, f"output.dir={out}"] if args else [])
    _assert_refused(proc, script, needle, out)


def test_bad_override_is_refused_before_launch(tmp_path):
    out = tmp_path / "out"
    proc = _run_script("torchrun.sh", [CONFIG, "train.stepz=4", f"output.dir={out}"])
    _assert_refused(proc, "torchrun.sh", "unknown key 'train.stepz'", out)


# A fake allocation of 2 nodes x 1 task x 1 CPU: the sbatch scripts' checks run without Slurm.
FAKE_JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_CPUS_ON_NODE": "1",
    "CUDA_VISIBLE_DEVICES": "",
}


@pytest.mark.parametrize("script", SLURM_SCRIPTS)
@pytest.mark.parametrize(
    "case",
    [
        "outside a job",
        "no config",
        "missing config",
        "more nodes than the job",
        "more processes than the job",
        "layout does not divide",
    ],
)
def test_slurm_script_refuses_bad_input(script, case, tmp_path):
    out = tmp_path / "out"
    more_procs = {
        "slurm_torchrun.sbatch": ({"NPROC_PER_NODE": TOO_MANY}, "exceeds 2 x 1 CPU"),
        "slurm_deepspeed.sbatch": ({"NPROC_PER_NODE": "2"}, "exceeds the 2 task(s)"),
    }
    job_env, args, needle = {
        "outside a job": ({}, [CONFIG], "not inside a Slurm job"),
        "no config": (FAKE_JOB, [], "missing CONFIG"),
        "missing config": (FAKE_JOB, ["configs/nope.yaml"], "config file not found"),
        "more nodes than the job": (
            {**FAKE_JOB, "NNODES": "3"},
            [CONFIG],
            "NNODES=3 exceeds the 2 node(s) of job 4242",
        ),
        "more processes than the job": (
            {**FAKE_JOB, **more_procs[script][0]},
            [CONFIG],
            more_procs[script][1],
        ),
        "layout does not divide": (
            {**FAKE_JOB, "NNODES": "1"},
            [CONFIG],
            "does not divide world_size=1",
        ),
    }[case]
    proc = _run_script(
        script,
        [*args, *SHORT, f"output.dir={out}"] if args else [],
        env=_env(**job_env),
        runner=("bash",),
    )
    _assert_refused(proc, script, needle, out)


# ------------------------------------------------------------------------- (c) single-node runs
# The DeepSpeed scripts train with the DeepSpeed backend (ZeRO-1, the shipped JSON).
DEEPSPEED = ["parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero1.json"]


def _assert_trained(out_dir, world_size=2, steps=4):
    """Trained ``steps`` steps, evaluated, wrote metrics, a summary and a checkpoint."""
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["finished"] and summary["steps"] == steps, summary
    assert summary["world_size"] == world_size, summary
    assert isinstance(summary["valid_loss"], float) and summary["valid_loss"] > 0, summary
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    train_steps = sorted(int(r["step"]) for r in rows if r["split"] == "train")
    assert train_steps == list(range(1, steps + 1)), rows
    assert [int(r["step"]) for r in rows if r["split"] == "valid"] == [2, 4]
    ckpt = os.path.join(out_dir, "checkpoints")
    with open(os.path.join(ckpt, "latest")) as f:
        latest = f.read().strip()
    assert latest == f"step_{steps:06d}" and os.listdir(os.path.join(ckpt, latest))


@pytest.mark.slow
@pytest.mark.parametrize("script", SINGLE_NODE)
def test_single_node_script_trains(script, tmp_path):
    out = tmp_path / "out"
    extra = DEEPSPEED if script == "deepspeed.sh" else []
    start = time.monotonic()
    proc = _run_script(
        script, ["--nproc", "2", CONFIG, *SHORT, *extra, f"output.dir={out}"], timeout=900
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    print(f"{script}: {time.monotonic() - start:.0f} s")
    _assert_trained(out)
    if script == "torchrun.sh":  # the console a user follows: lines, results, where things are
        lines = proc.stdout.splitlines()
        assert "step 2/4 | valid loss " in proc.stdout and "step 4/4 | loss " in proc.stdout
        assert lines[-3:] == [
            f"run directory: {out}",  # output.plot=false: no plot line
            f"last checkpoint: {out}/checkpoints/step_000004",
            f"metrics: {out}/metrics.csv",
        ], lines[-4:]
        assert "Apex" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------- (d) Slurm
@pytest.fixture(scope="module")
def slurm():
    """A real Slurm with nodes n1 and n2 on this host, for the tests of this module."""
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if os.geteuid() != 0:
        reason = "Slurm test cluster needs root (tests/slurm/start.sh starts munged and slurmd)"
        if in_ci:
            pytest.fail(reason)
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    proc = subprocess.run(
        [os.path.join(SLURM_HELPERS, "start.sh"), "2"], capture_output=True, text=True, timeout=1500
    )
    if proc.returncode == 3 and not in_ci:  # apt-get could not install slurm-wlm/munge
        reason = f"Slurm could not be installed: {proc.stderr.strip().splitlines()[-1]}"
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    assert proc.returncode == 0, f"tests/slurm/start.sh failed:\n{proc.stdout}\n{proc.stderr}"
    yield
    subprocess.run([os.path.join(SLURM_HELPERS, "stop.sh")], capture_output=True, timeout=120)


TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def _job_info(job_id) -> dict:
    """``JobState``, ``ExitCode``, ``NodeList`` of a job: scontrol, or sacct where the controller
    has already forgotten it (clusters with accounting)."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    if proc.returncode == 0:
        return dict(re.findall(r"(JobState|ExitCode|NodeList|Restarts)=(\S+)", proc.stdout))
    proc = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode,NodeList"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    fields = proc.stdout.strip().split("|") if proc.returncode == 0 else []
    if len(fields) == 3:
        return {"JobState": fields[0].split()[0], "ExitCode": fields[1], "NodeList": fields[2]}
    return {}


def _sbatch_and_wait(script, args, tmp_path, env_extra=None, timeout=900, on_poll=None):
    """Submit ``sbatch -N2 launch/SCRIPT ARGS``; poll until it ends (scancel after ``timeout``),
    calling ``on_poll(job_id)`` at every poll while it runs.

    Returns:
        (job info, the job's output text).
    """
    log = tmp_path / "slurm-%j.out"
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-N",
            "2",
            f"--chdir={REPO}",
            f"--output={log}",
            os.path.join(LAUNCH, script),
            *args,
        ],
        env=_env(**(env_extra or {})),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job_id}.out"
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        info = _job_info(job_id)
        if info.get("JobState") in TERMINAL and not queued.replace("COMPLETING", ""):
            break
        if on_poll is not None:
            on_poll(job_id)
        time.sleep(2)
    else:
        subprocess.run(["scancel", job_id], timeout=30)
        text = log.read_text() if log.exists() else ""
        pytest.fail(
            f"job {job_id} did not finish in {timeout} s ({info}); cancelled:\n{text[-4000:]}"
        )
    return info, (log.read_text() if log.exists() else "")


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, env_extra",
    [
        ("slurm_torchrun.sbatch", {}),
        ("slurm_deepspeed.sbatch", {}),  # srun runs every process
        ("slurm_deepspeed.sbatch", {"DS_LAUNCHER": "deepspeed"}),  # one deepspeed runner per node
    ],
    ids=["torchrun", "deepspeed-srun", "deepspeed-runner"],
)
def test_slurm_script_trains_on_two_nodes(slurm, script, env_extra, tmp_path):
    out = tmp_path / "out"
    extra = DEEPSPEED if script == "slurm_deepspeed.sbatch" else []
    start = time.monotonic()
    info, text = _sbatch_and_wait(
        script, [CONFIG, *SHORT, *extra, f"output.dir={out}"], tmp_path, env_extra
    )
    print(f"{script} {env_extra}: {time.monotonic() - start:.0f} s, {info}")
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        info,
        text[-6000:],
    )
    assert info.get("NodeList") == "n[1-2]", info
    assert "2 node(s) x 1 process(es)" in text and "done: 4 steps" in text, text[-3000:]
    _assert_trained(out)


@pytest.mark.slow
@pytest.mark.parametrize("script", SLURM_SCRIPTS)
def test_slurm_job_with_bad_layout_fails_before_training(slurm, script, tmp_path):
    out = tmp_path / "out"
    info, text = _sbatch_and_wait(
        script, [CONFIG, *SHORT, f"output.dir={out}"], tmp_path, {"NNODES": "1"}, timeout=300
    )
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", (info, text)
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), text
    assert "does not divide world_size=1" in lines[0]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", SLURM_SCRIPTS)
def test_slurm_job_failing_after_launch_ends_in_rank_0s_line(slurm, script, tmp_path):
    """After rank 0's error line, the job's output holds our exit-status line, not torchrun's
    ChildFailedError report nor srun's task lines (those go to the log file it names)."""
    from tests.failing_rank import LINE

    info, text = _sbatch_and_wait(
        script,
        [CONFIG, f"output.dir={tmp_path / 'out'}"],
        tmp_path,
        {"INRANK_TRAIN_MODULE": "tests.failing_rank"},
        timeout=300,
    )
    # srun's status: the failed task's 1, or 128 + the signal it ended the other tasks with.
    code = int(info.get("ExitCode", "0:0").split(":")[0])
    assert info.get("JobState") == "FAILED" and code in (1, 137, 143), (info, text)
    lines = [line for line in text.splitlines() if line.strip()]
    assert LINE in lines, text
    after = lines[lines.index(LINE) + 1 :]
    assert after and all(line.startswith(f"{script}: training failed") for line in after), text
    assert after[-1].startswith(
        f"{script}: training failed with exit status {code} (launcher report: "
    ), text
    assert not [
        line
        for line in lines
        if line.startswith(("srun: ", "slurmstepd: ", "Traceback")) or "ChildFailedError" in line
    ], text
    with open(after[-1].split("(launcher report: ")[1].rstrip(")")) as f:
        assert "Exited with exit code 1" in f.read()


@pytest.mark.slow
def test_slurm_time_limit_signal_requeues_and_the_job_finishes(slurm, tp2_run, tmp_path):
    """``--signal=B:USR1@300`` ahead of the time limit: the batch script passes SIGUSR1 to the
    ranks (srun, torchrun), they save and stop, the job requeues itself and its second run
    continues from the checkpoint (output.resume=auto) with the uninterrupted run's losses."""
    from tests.distributed import SHORT as SHORT_16

    out = tmp_path / "out"
    metrics = out / "metrics.csv"
    signalled = []

    def signal_at_step_5(job_id):
        if (
            not signalled
            and metrics.exists()
            and len([r for r in metrics.read_text().splitlines() if ",train," in r]) >= 5
        ):
            # What Slurm does 300 s before the limit; a test cannot wait for a real limit
            # (Slurm checks limits about once a minute).
            subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
            signalled.append(job_id)

    info, text = _sbatch_and_wait(
        "slurm_torchrun.sbatch",
        [CONFIG, *SHORT_16, f"output.dir={out}"],
        tmp_path,
        on_poll=signal_at_step_5,
        timeout=1500,
    )
    assert signalled, "the job ended before step 5"
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        info,
        text[-6000:],
    )
    assert info.get("Restarts") == "1", info
    stops = re.findall(r"stopped by SIGUSR1 after step (\d+)/16: checkpoint (\S+);", text)
    assert len(stops) == 1, text[-6000:]
    stopped = int(stops[0][0])
    assert stops[0][1] == f"{out}/checkpoints/step_{stopped:06d}"
    assert "restart 1 of job" in text and "done: 16 steps" in text, text[-3000:]
    ref = read_summary(tp2_run)["train_losses"]
    assert read_summary(str(out))["train_losses"] == ref[stopped:]
    with open(metrics) as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["split"] == "train"]
    assert steps == list(range(1, 17))  # no step lost, none repeated
