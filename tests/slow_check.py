"""The ``slow`` marker, enforced: a pytest plugin (``tests/conftest.py`` loads it) that lists the
unmarked tests over the marker's budget at the end of the session and fails the session for those
far over it.

``pytest -m "not slow"`` is the quick subset (CI runs everything). A test without the marker that
costs more than ``SLOW_S`` seconds (default 20; ``$INRANK_SLOW_S`` overrides it) is listed; one over
twice that fails the run. A test's cost is the smaller of its wall time and its CPU time (this
process plus every finished child: torchrun and spawned ranks), setup of the fixtures it is the
first to use included. On a loaded machine the wall time grows but the CPU time does not; a
2-process run burns CPU twice as fast as the wall clock, but its wall time does not grow. So
neither load nor parallelism makes a quick test look slow, and the factor 2 before failing leaves
room for what remains (cache misses, clock frequency).
"""

import os
import resource
import sys
import time

import pytest

SLOW_S = float(os.environ.get("INRANK_SLOW_S", "20"))
FAIL_S = 2 * SLOW_S

_COSTS: dict = {}


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # run_distributed's ranks are forked by a forkserver, not by this process: counted apart.
    distributed = sys.modules.get("tests.distributed")
    ranks = distributed.rank_cpu_s() if distributed is not None else 0.0
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + ranks


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall, cpu = time.monotonic(), _cpu_s()
    yield
    if item.get_closest_marker("slow") is None:
        _COSTS[item.nodeid] = min(time.monotonic() - wall, _cpu_s() - cpu)


def unmarked_over(limit: float) -> list:
    """``[(cost_s, nodeid)]`` of the unmarked tests costing more than ``limit``, costliest first."""
    return sorted(((cost, nodeid) for nodeid, cost in _COSTS.items() if cost > limit), reverse=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    slow = unmarked_over(SLOW_S)
    if not slow:
        return
    terminalreporter.section("unmarked tests over the slow marker's budget")
    terminalreporter.write_line(
        f"cost = min(wall, CPU time) > {SLOW_S:g} s: mark them "
        f"@pytest.mark.slow (over {FAIL_S:g} s fails the run)"
    )
    for cost, nodeid in slow:
        terminalreporter.write_line(
            f"  {cost:6.1f} s  {nodeid}" + ("  FAIL" if cost > FAIL_S else "")
        )


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and unmarked_over(FAIL_S):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
