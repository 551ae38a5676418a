"""tests/slow_check.py, the ``slow`` marker's check: an unmarked test whose wall AND CPU time are
over the budget is listed and, over twice the budget, fails the run; a marked one is not listed; a
test that only waits (wall time, no CPU: what a loaded machine looks like) is not listed either.
Runs a small pytest session in a subprocess with a budget of 0.1 s (tests of 0.3 s)."""

import os
import subprocess
import sys
import textwrap

from tests.distributed import REPO

TESTS = textwrap.dedent("""
    import time

    import pytest


    def _burn(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass


    def test_quick():
        pass


    def test_busy_unmarked():
        _burn(0.3)


    def test_waiting_unmarked():
        time.sleep(0.3)


    @pytest.mark.slow
    def test_busy_marked():
        _burn(0.3)
""")


def _session(tmp_path, budget):
    (tmp_path / "test_cases.py").write_text(TESTS)
    env = dict(
        os.environ, INRANK_SLOW_S=str(budget), PYTHONPATH=REPO, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.slow_check",
            "-o",
            "markers=slow",
            "test_cases.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unmarked_slow_tests_are_listed_and_fail_the_run(tmp_path):
    proc = _session(tmp_path, 0.1)
    listed = proc.stdout.split("unmarked tests over the slow marker's budget")[-1]
    assert "test_busy_unmarked  FAIL" in listed, proc.stdout
    for name in ("test_quick", "test_waiting_unmarked", "test_busy_marked"):
        assert name not in listed, proc.stdout
    assert "4 passed" in proc.stdout and proc.returncode == 1
    # Over the budget but under twice it: listed, the run passes.
    proc = _session(tmp_path, 0.2)
    assert "test_busy_unmarked" in proc.stdout.split("budget")[-1] and proc.returncode == 0
