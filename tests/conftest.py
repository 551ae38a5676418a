"""Shared pytest configuration: the ``slow`` marker's check (tests/slow_check.py) and the
reference runs.

Reference runs: the trainer runs that several test files compare against are trained once per
session here (each is about a minute on 2 cores). Tests must treat their directories as read-only:
copy a checkpoint out before resuming from it into another directory.
"""

import os

import pytest

from tests.distributed import SHORT, run_train


def pytest_configure(config):
    config.pluginmanager.import_plugin("tests.slow_check")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test starts from the session's environment: an in-process ``train.main`` (its
    ``init_distributed_env``) writes RANK / WORLD_SIZE / MASTER_* into ``os.environ``, and a later
    subprocess inheriting them believes it was launched (``convert_checkpoint.py`` then runs one
    process instead of spawning its job)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


# ----------------------------------------------------------------------------- reference runs
@pytest.fixture(scope="session")
def tp2_run(tmp_path_factory):
    """``SHORT`` at TP=2 on 2 processes, with plots: checkpoints at steps 4, 8, 12 and 16 (growth
    every 2 steps from step 2, the cut after step 8). Read-only."""
    out = str(tmp_path_factory.mktemp("tp2_run"))
    run_train([*SHORT, f"output.dir={out}", "output.plot=true"])
    return out


@pytest.fixture(scope="session")
def dp2_run(tmp_path_factory):
    """``SHORT`` at TP=1 x DP=2 with the torch backend: checkpoints at steps 4, 8, 12 and 16.
    The reference of the DeepSpeed runs, of backend conversion and of TP=2 (DP averages what TP
    computes in one replica). Read-only."""
    out = str(tmp_path_factory.mktemp("dp2_run"))
    run_train([*SHORT, f"output.dir={out}", "parallel.tensor_model_parallel_size=1"])
    return out


@pytest.fixture(scope="session")
def cumulative_run(tmp_path_factory):
    """``SHORT`` in cumulative mode at TP=2 (no cut: capacity grows), 8 steps, one checkpoint at
    step 8. Read-only."""
    out = str(tmp_path_factory.mktemp("cumulative_run"))
    run_train([*SHORT, f"output.dir={out}", "inrank.mode=cumulative", "inrank.stage1_steps=null",
               "train.steps=8", "train.save_interval=8"])
    return out

