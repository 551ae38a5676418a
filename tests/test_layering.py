"""The package's layering and lint, and what the pre-flight costs.

- ``lint-imports`` keeps the import contract of pyproject.toml (function-local imports included):
  no cycles, no module importing a layer above its own; and it would catch one (an upward import
  planted in a copy of the package breaks the contract).
- ``ruff check`` finds nothing and ``ruff format --check`` changes nothing (pyproject.toml's
  ``[tool.ruff]``).
- The launch pre-flight (``python -m inrank_megatron.launch_env check``, torch backend, no resume)
  never imports torch.
- The trainer's pre-flight runs each check once per process: the resume resolution and its pickle
  scan, the lock check and the split report (counted), and the fixed ranks it resolves reach the
  training loop instead of being resolved again.
"""

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TINY = os.path.join(REPO, "tests", "tiny.yaml")


def _run(tool: str, *args, cwd=REPO):
    return subprocess.run(
        [os.path.join(BIN, tool), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


# ---------------------------------------------------------------------------------- the contract
def test_import_contract_is_kept():
    proc = _run("lint-imports", "--no-cache")
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout + proc.stderr


def test_import_contract_catches_an_upward_import(tmp_path):
    shutil.copytree(
        os.path.join(REPO, "inrank_megatron"),
        tmp_path / "inrank_megatron",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(os.path.join(REPO, "pyproject.toml"), tmp_path)
    with open(tmp_path / "inrank_megatron" / "config.py", "a") as f:  # config reaching up
        f.write(
            "\n\ndef _upward():\n    from inrank_megatron.rules import validate\n\n"
            "    return validate\n"
        )
    proc = _run("lint-imports", "--no-cache", cwd=tmp_path)
    assert proc.returncode != 0 and "1 broken" in proc.stdout, proc.stdout + proc.stderr
    assert "inrank_megatron.config -> inrank_megatron.rules" in proc.stdout


def test_ruff_finds_nothing():
    proc = _run("ruff", "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_leaves_every_file_as_it_is():
    """The tree is as ``ruff format`` writes it (pyproject's ``[tool.ruff]``: line length 100)."""
    proc = _run("ruff", "format", "--check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------- the pre-flight
def test_launch_preflight_does_not_import_torch(tmp_path):
    """A first launch (the data and tokenizer not built yet: prepare builds them)."""
    overrides = [
        f"output.dir={tmp_path / 'run'}",
        "output.resume=none",
        f"data.prefix={tmp_path / 'wiki_text_document'}",
        f"data.tokenizer_model={tmp_path / 'wiki.model'}",
    ]
    code = (
        "import sys\nfrom inrank_megatron import launch_env\n"
        f"status = launch_env.main(['check', {TINY!r}, '--world-size', '2', *{overrides!r}])\n"
        "print(status, [m for m in ('torch', 'megatron') if m in sys.modules])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout


class _Stop(Exception):
    """Raised by the stand-in training loop: the pre-flight is what is measured."""


def _count(monkeypatch, calls: dict, module, name: str):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def _preflight(tmp_path, monkeypatch, *overrides):
    """``train.main`` up to the training loop (replaced by one that records its arguments);
    returns (calls per check, the loop's keyword arguments)."""
    from inrank_megatron import run_dir, train
    from inrank_megatron.checkpoint import resume
    from inrank_megatron.data import checks
    from inrank_megatron.training import fixed_ranks, loop

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    calls, seen = {}, {}
    for module, name in (
        (resume, "resolve_resume"),
        (resume, "check_pickles"),
        (checks, "split_report"),
        (run_dir, "check_not_locked"),
        (fixed_ranks, "resolve_fixed_ranks"),
    ):
        _count(monkeypatch, calls, module, name)

    def stand_in(cfg, **kwargs):
        seen.update(kwargs)
        raise _Stop("stopped after the pre-flight")

    monkeypatch.setattr(loop, "train", stand_in)
    status = train.main(["--config", TINY, "parallel.tensor_model_parallel_size=1", *overrides])
    assert status == 1 and seen, "the pre-flight refused the run"
    return calls, seen


def test_resume_preflight_runs_each_check_once(tmp_path, monkeypatch):
    import torch

    from inrank_megatron.checkpoint.meta import (
        Meta,
        record_files,
        write_growth,
        write_latest,
        write_meta,
    )
    from inrank_megatron.config import load_config, to_dict

    overrides = ["parallel.tensor_model_parallel_size=1", f"output.dir={tmp_path / 'old'}"]
    root = tmp_path / "old" / "checkpoints"
    step = root / "step_000004"
    os.makedirs(step / "model")
    torch.save({"scheduler": {}}, step / "train.pt")
    torch.save({"torch": torch.zeros(2)}, step / "rng_00000.pt")
    write_growth(str(step), {})
    write_meta(
        str(step),
        Meta(
            step=4,
            consumed_samples=32,
            world_size=1,
            tp=1,
            pp=1,
            dp=1,
            backend="torch",
            config=to_dict(load_config(TINY, overrides)),
            files=record_files(str(step)),
        ),
    )
    write_latest(str(root), str(step))
    calls, seen = _preflight(
        tmp_path, monkeypatch, f"output.dir={tmp_path / 'new'}", f"output.resume={step}"
    )
    assert seen["resume_path"] == str(step)
    assert calls == {
        "resolve_resume": 1,
        "check_pickles": 1,
        "split_report": 1,
        "check_not_locked": 1,
    }


def test_fixed_ranks_are_resolved_once_and_reach_the_loop(tmp_path, monkeypatch):
    calls, seen = _preflight(
        tmp_path, monkeypatch, f"output.dir={tmp_path / 'run'}", "inrank.fixed_ranks=0.25"
    )
    assert calls == {
        "resolve_resume": 1,
        "split_report": 1,
        "check_not_locked": 1,
        "resolve_fixed_ranks": 1,
    }
    # fc1 and fc2 of each of the 4 layers: round(0.25 * min(128, 512)) = 32.
    assert seen["resume_path"] is None and sorted(set(seen["fixed_ranks"].values())) == [32]
    assert len(seen["fixed_ranks"]) == 8


def test_every_folder_of_the_package_is_a_regular_package():
    """A folder without ``__init__.py`` is a namespace package, which lint-imports does not see."""
    missing = [
        os.path.relpath(root, REPO)
        for root, _, files in os.walk(os.path.join(REPO, "inrank_megatron"))
        if any(f.endswith(".py") for f in files) and "__init__.py" not in files
    ]
    assert missing == []
