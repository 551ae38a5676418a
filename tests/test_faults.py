"""Every fault ends in one clear line (issue 23): the error paths themselves run here.

- Every exception class the project defines is raised for real by a test and printed
  (:data:`TRIGGERED_BY` lists the test that does it; a new class without one fails
  :func:`test_every_exception_class_is_triggered_by_a_test`).
- Resume from a real checkpoint (the session's ``tp2_run``) that a user's disk or an attacker
  changed: a hostile byte item inside a ``.distcp`` data file, a corrupt byte item, a truncated
  ``.distcp``, a missing shard, a corrupt ``inrank_growth.json`` whose size still matches. Each is
  one line naming the file, exit 2, nothing of it run and nothing of the run directory changed.
- Rules never crash: a corrupt file for every rule that reads one, and an exception inside a rule
  that did not foresee it, are that rule's failure (one line, exit 2, before any process group).
"""

import ast
import hashlib
import io
import os
import pickle
import shutil

import pytest
import torch

from tests.distributed import REPO, SHORT


class _Exploit:
    """Unpickling this runs ``touch <marker>`` (the shell ignores the padding comment)."""

    def __init__(self, marker, pad=0):
        self.command = f"touch {marker} #" + "x" * pad

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _train(run, *overrides):
    from inrank_megatron import train

    return train.main(
        [
            "--config",
            os.path.join(REPO, "tests", "tiny.yaml"),
            *SHORT,
            f"output.dir={run}",
            "parallel.tensor_model_parallel_size=1",
            *overrides,
        ]
    )


def _one_error_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _hashes(root):
    out = {}
    for parent, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(parent, name), "rb") as f:
                out[os.path.relpath(os.path.join(parent, name), root)] = hashlib.sha256(
                    f.read()
                ).hexdigest()
    return out


# ----------------------------------------------------------------- resume from a changed checkpoint
def _copy_run(tp2_run, tmp_path, steps=(4, 8)):
    """``tp2_run``'s checkpoints ``steps`` copied into a run directory of our own (latest: the
    last one)."""
    from inrank_megatron.checkpoint import step_dir, write_latest

    root = tmp_path / "run" / "checkpoints"
    os.makedirs(root)
    for step in steps:
        shutil.copytree(
            step_dir(os.path.join(tp2_run, "checkpoints"), step), step_dir(str(root), step)
        )
    write_latest(str(root), step_dir(str(root), steps[-1]))
    return root / f"step_{steps[-1]:06d}"


def _byte_items(step):
    """``[(file, offset, length, item)]`` of the byte items (megatron's ``_extra_state``) in
    ``step/model``'s ``.distcp`` files, from its DCP metadata."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from inrank_megatron.checkpoint import read_dcp_metadata

    with open(step / "model" / ".metadata", "rb") as f:
        metadata = read_dcp_metadata(f, "metadata")
    return [
        (step / "model" / info.relative_path, info.offset, info.length, index.fqn)
        for index, info in metadata.storage_data.items()
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)
    ]


def _plant(file, offset, length, payload):
    data = bytearray(file.read_bytes())
    assert len(payload) == length
    data[offset : offset + length] = payload
    file.write_bytes(bytes(data))


def _hostile_item(step, marker):
    """Replace a byte item with a pickle that runs code, of exactly its length, so that the
    sizes ``meta.json`` recorded still match and only loading it can find it."""
    for file, offset, length, item in _byte_items(step):
        for pad in range(length):
            buffer = io.BytesIO()
            torch.save(_Exploit(marker, pad), buffer)
            if len(buffer.getvalue()) == length:
                _plant(file, offset, length, buffer.getvalue())
                return file, item
            if len(buffer.getvalue()) > length:
                break
    raise AssertionError("no byte item long enough for the payload")


def test_hostile_byte_item_inside_a_distcp_is_refused_naming_file_and_item(
    tp2_run, tmp_path, capsys, clean_env
):
    """The issue: ``TypeError: UnsafeCheckpointError.__init__() missing 1 required positional
    argument: 'refused'`` (DCP gathers the failure with pickle), exit 1."""
    step = _copy_run(tp2_run, tmp_path)
    marker = tmp_path / "pwned"
    file, item = _hostile_item(step, marker)
    before = _hashes(step.parent)
    assert _train(tmp_path / "run", "output.resume=auto") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"error: {file} (item {item}): refusing to load posix.system" in line, line
    assert not marker.exists() and _hashes(step.parent) == before


def test_corrupt_byte_item_is_one_line_naming_file_and_item(tp2_run, tmp_path, capsys, clean_env):
    """Before: torch's CheckpointException (a BaseException) escaped with a traceback per rank."""
    step = _copy_run(tp2_run, tmp_path)
    file, offset, length, item = _byte_items(step)[0]
    original = file.read_bytes()[offset : offset + length]
    for corrupt, expected in (
        (bytes(length), "not a readable torch.save file (Unsupported operand 0)"),  # zeroed
        # the zip's middle zeroed: torch's zip reader fails inside DCP's read
        (
            original[:100] + bytes(length - 200) + original[-100:],
            "unreadable (RuntimeError: PytorchStreamReader failed",
        ),
    ):
        _plant(file, offset, length, corrupt)
        assert _train(tmp_path / "run", "output.resume=auto") == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {file} (item {item}): {expected}"), line


@pytest.mark.parametrize("fault", ["truncated", "missing"])
def test_truncated_or_missing_shard_is_named_before_launch(
    tp2_run, tmp_path, capsys, clean_env, fault
):
    step = _copy_run(tp2_run, tmp_path)
    shard = sorted((step / "model").glob("*.distcp"))[0]
    size = shard.stat().st_size
    if fault == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(size // 2)
        why = f"{shard} has {size // 2} bytes, the save wrote {size}"
    else:
        shard.unlink()
        why = f"{shard} missing"
    before = _hashes(step.parent)
    # auto takes step 4, the newest complete one, and says why step 8 is not taken.
    assert _train(tmp_path / "run", "output.resume=auto") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"(step_000008 is not complete: {why})" in line, line
    assert _train(tmp_path / "run", f"output.resume={step}") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"is not a complete checkpoint: {why}" in line, line
    assert _hashes(step.parent) == before and not torch.distributed.is_initialized()


@pytest.mark.parametrize("fault", ["bytes", "value"])
def test_corrupt_growth_file_of_the_same_size(tp2_run, tmp_path, capsys, clean_env, fault):
    """``inrank_growth.json`` changed without changing its size (meta.json's record still
    matches): garbage bytes are refused before launch, a value no save writes when the layers
    load it; before, the latter was ``error: layer ...: stage must be ...`` with exit 1 and no
    file named."""
    step = _copy_run(tp2_run, tmp_path, steps=(8,))
    file = step / "inrank_growth.json"
    text = file.read_bytes()
    if fault == "bytes":
        file.write_bytes(text[:40] + b"\x00" * 20 + text[60:])
        expected = f"{file}: unreadable InRank growth state"
    else:
        assert b'"growing"' in text or b'"fixed"' in text
        file.write_bytes(text.replace(b'"growing"', b'"growinz"').replace(b'"fixed"', b'"fixez"'))
        expected = f"{file}: layer decoder.layers.0.mlp.linear_fc1: stage must be one of"
    assert file.stat().st_size == len(text)
    before = _hashes(step.parent)
    assert _train(tmp_path / "run", "output.resume=auto") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected in line, line
    assert _hashes(step.parent) == before


# ---------------------------------------------------------------------------- rules never crash
def _truncated_tokenizer(tmp_path):
    """The issue's tokenizer: the first 500 bytes of a real SentencePiece model."""
    bad = tmp_path / "sp.model"
    with open(os.path.join(REPO, "data", "wiki_sp8k.model"), "rb") as f:
        bad.write_bytes(f.read(500))
    return [
        f"data.tokenizer_model={bad}"
    ], f"data.tokenizer_model='{bad}': tokenizer model '{bad}' is not a SentencePiece model"


def _corrupt_index(tmp_path):
    prefix = tmp_path / "mine_text_document"
    shutil.copy(os.path.join(REPO, "data", "wiki_sp8k_text_document.bin"), f"{prefix}.bin")
    with open(os.path.join(REPO, "data", "wiki_sp8k_text_document.idx"), "rb") as f:
        size = len(f.read())
    (tmp_path / "mine_text_document.idx").write_bytes(b"\x07" * size)
    return [f"data.prefix={prefix}"], f"{prefix}.idx is not a Megatron index"


def _corrupt_deepspeed_json(tmp_path):
    bad = tmp_path / "zero2.json"
    with open(os.path.join(REPO, "configs", "deepspeed", "zero2.json"), "rb") as f:
        bad.write_bytes(f.read()[:-7])
    return (
        ["parallel.backend=deepspeed", f"parallel.deepspeed_config={bad}"],
        f"parallel.deepspeed_config='{bad}' is not readable JSON",
    )


def _corrupt_meta(tmp_path):
    from inrank_megatron.checkpoint import write_latest

    step = tmp_path / "run" / "checkpoints" / "step_000004"
    os.makedirs(step)
    (step / "meta.json").write_bytes(b'{"step": 4, \x00\xff')
    write_latest(str(step.parent), str(step))
    return ["output.resume=auto"], f"{step}/meta.json: unreadable checkpoint metadata"


def _corrupt_lock(tmp_path):
    """A lock file of garbage that another process holds: the holder is unknown, not a crash."""
    import fcntl

    from inrank_megatron.run_dir import LOCK_FILE

    os.makedirs(tmp_path / "run")
    lock = tmp_path / "run" / LOCK_FILE
    lock.write_bytes(b"\xff\xfe not json")
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # released when the test's process closes it (below)
    _corrupt_lock.fd = fd
    return [], "is in use by another run (host ?, pid ?"


def _output_dir_a_file(tmp_path):
    (tmp_path / "run").write_bytes(b"\x00" * 16)
    return [], f"output.dir='{tmp_path / 'run'}': {tmp_path / 'run'} is a file, not a directory"


# rule name -> (what makes its file corrupt, the rule that reports it). Every rule that reads a
# file is here: its own scope is "files", or it reads one to estimate (backend: the DeepSpeed
# JSON; activations fit: the tokenizer's vocabulary). The split rule reads the index but leaves
# a corrupt one to the data files rule.
CORRUPT_FILE = {
    "backend": (_corrupt_deepspeed_json, "backend"),
    "DeepSpeed JSON accepted": (_corrupt_deepspeed_json, "DeepSpeed JSON accepted"),
    "data files": (_corrupt_index, "data files"),
    "data split": (_corrupt_index, "data files"),
    "tokenizer file": (_truncated_tokenizer, "tokenizer file"),
    "activations fit": (_truncated_tokenizer, "activations fit"),
    "output dir kind": (_output_dir_a_file, "output dir kind"),
    "output directory": (_corrupt_lock, "output directory"),
    "resume": (_corrupt_meta, "resume"),
    # its newest checkpoint's size comes from meta.json: a corrupt one is the resume rule's
    "disk space": (_corrupt_meta, "resume"),
}


def test_every_file_reading_rule_has_a_corrupt_file_case():
    from inrank_megatron.rules import RULES

    assert {r.name for r in RULES if r.scope == "files"} <= set(CORRUPT_FILE)
    assert set(CORRUPT_FILE) <= {r.name for r in RULES}


@pytest.mark.parametrize("rule_name", sorted(CORRUPT_FILE))
def test_corrupt_file_is_its_rules_one_line_failure(
    tp2_run, tmp_path, capsys, clean_env, rule_name
):
    """tp2_run: the data and tokenizer exist. The tokenizer case is the issue's: before, an
    80-line traceback from the activation-memory rule and exit 1."""
    from inrank_megatron import rules
    from inrank_megatron.config import load_config

    corrupt, reporter = CORRUPT_FILE[rule_name]
    overrides, expected = corrupt(tmp_path)
    try:
        assert _train(tmp_path / "run", *overrides) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert expected in line, line
        assert not torch.distributed.is_initialized()
        # The rule that owns the file reports it (two rules reporting one fault: said once).
        cfg = load_config(
            os.path.join(REPO, "tests", "tiny.yaml"),
            [
                *SHORT,
                f"output.dir={tmp_path / 'run'}",
                "parallel.tensor_model_parallel_size=1",
                *overrides,
            ],
        )
        rule = next(r for r in rules.RULES if r.name == reporter)
        assert [f for f in rule.failures(cfg, 1) if expected in str(f)], reporter
    finally:
        if getattr(_corrupt_lock, "fd", None) is not None:
            os.close(_corrupt_lock.fd)
            _corrupt_lock.fd = None


def test_an_exception_inside_a_rule_is_that_rules_failure(
    tp2_run, tmp_path, capsys, clean_env, monkeypatch
):
    """What no rule foresaw (here the index reader meeting a ``struct.error``) is one line naming
    the rule's key, its value and what the rule expects; exit 2 before any process group."""
    import struct

    from inrank_megatron.data import datasets

    def broken(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 8 bytes")

    monkeypatch.setattr(datasets, "check_indexed_files", broken)
    assert _train(tmp_path / "run") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(
        "error: data.prefix='data/wiki_sp8k_text_document': the 'data files' "
        "check failed (error: unpack requires a buffer of 8 bytes); expected "
        "data.prefix is set"
    ), line
    assert not torch.distributed.is_initialized()


# ------------------------------------------------------------------ every exception class runs
# class -> "test file::test" that raises it for real and checks the line it prints.
TRIGGERED_BY = {
    "CheckpointError": "test_faults.py::test_corrupt_byte_item_is_one_line_naming_file_and_item",
    "UnsafeCheckpointError": (
        "test_faults.py::test_hostile_byte_item_inside_a_distcp_is_refused_naming_file_and_item"
    ),
    "ConfigError": "test_faults.py::test_corrupt_file_is_its_rules_one_line_failure",
    "NonFiniteError": "test_safety.py::test_nan_run_stops_with_latest_on_the_last_finite_checkpoint",
    "NonFiniteValueError": "test_faults.py::test_nonfinite_spectrum_names_the_layer",
    "RunDirError": "test_compare_runs.py::test_bad_run_directories_are_one_line_exit_2",
    "UnsupportedModelError": "test_export.py::test_import_refuses_what_it_cannot_express",
    "LaunchEnvError": "test_launch.py::test_bad_launcher_env_is_named",
    "DiskSpaceError": "test_faults.py::test_enospc_while_writing_is_named_and_the_partial_save_removed",
}


def _exception_classes():
    """Every exception class defined in inrank_megatron and tools (by their source)."""
    found = {}
    for top in ("inrank_megatron", "tools"):
        for parent, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(parent, name)
                with open(path) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.ClassDef) and any(
                        ast.unparse(b).split(".")[-1].endswith(("Error", "Exception"))
                        for b in node.bases
                    ):
                        found[node.name] = os.path.relpath(path, REPO)
    return found


def test_every_exception_class_is_triggered_by_a_test():
    found = _exception_classes()
    assert set(found) == set(TRIGGERED_BY), (
        f"exception classes without a test that raises them: {set(found) - set(TRIGGERED_BY)}; "
        f"gone: {set(TRIGGERED_BY) - set(found)}"
    )
    for where in TRIGGERED_BY.values():
        file, test = where.split("::")
        with open(os.path.join(REPO, "tests", file)) as f:
            assert f"def {test}(" in f.read(), where


def test_exceptions_survive_pickling_as_torch_dcp_gathers_them():
    """torch DCP sends a failed rank's exception through all_gather_object (pickle)."""
    from inrank_megatron.checkpoint import UnsafeCheckpointError

    error = UnsafeCheckpointError("x/__0_1.distcp", "posix.system")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is UnsafeCheckpointError and str(again) == str(error)
    assert (again.file, again.refused) == ("x/__0_1.distcp", "posix.system")


def test_nonfinite_spectrum_names_the_layer():
    from inrank_megatron.core.validation import NonFiniteValueError, check_factors

    A, B = torch.ones(3, 4), torch.ones(5, 3)
    B[2, 1] = float("inf")
    with pytest.raises(NonFiniteValueError) as info:
        check_factors(A, B, layer="decoder.layers.1.mlp.linear_fc2")
    assert str(info.value) == (
        "layer decoder.layers.1.mlp.linear_fc2: B contains inf; factors and spectra must be finite"
    )


# ------------------------------------------------------------------ one line after launch
@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "mpirun.sh"])
def test_a_failure_after_launch_is_rank_0s_line_and_the_exit_status(tmp_path, script):
    """Before: torchrun's ChildFailedError traceback and 30-line report (mpirun: its help blocks;
    deepspeed: its launcher's log) after rank 0's line."""
    import subprocess
    import sys

    from tests.failing_rank import LINE

    env = dict(
        os.environ,
        PYTHON=sys.executable,
        INRANK_TRAIN_MODULE="tests.failing_rank",
        OMP_NUM_THREADS="1",
        TMPDIR=str(tmp_path),
    )
    env.pop("INRANK_DEBUG", None)
    args = [
        "bash",
        os.path.join(REPO, "launch", script),
        "--nproc",
        "2",
        os.path.join(REPO, "tests", "tiny.yaml"),
        f"output.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, lines)
    assert lines[0].startswith(f"{script}: world 2 = ") and lines[1] == LINE, lines
    assert len(lines) == 3 and lines[2].startswith(f"{script}: training failed"), lines
    assert lines[2].split(" (launcher report: ")[0].endswith("with exit status 1"), lines
    if script == "torchrun.sh":
        report = lines[2].split(" (launcher report: ")[1].rstrip(")")
        with open(report) as f:
            assert "Root Cause (first observed failure)" in f.read()
        # INRANK_DEBUG=1: torchrun's own report on the console, as before.
        proc = subprocess.run(
            args,
            cwd=REPO,
            env=dict(env, INRANK_DEBUG="1"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1 and "ChildFailedError" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """``mount(size_mib)``: a tmpfs of that size (the real ENOSPC of a full filesystem), unmounted
    after the test. Skipped, saying why, where this process may not mount (not root, a container
    without CAP_SYS_ADMIN)."""
    import subprocess

    mounted = []

    def mount(size_mib):
        where = tmp_path / f"disk{len(mounted)}"
        os.makedirs(where)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            pytest.skip(
                f"cannot mount a tmpfs here ({proc.stderr.strip()}): the full-disk tests need root"
            )
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# One InRank layer, short sequences: a checkpoint is 14.4 MB (tools/plan.py: 14.0 MB).
SMALL = [
    "train.steps=4",
    "train.lr_warmup_steps=1",
    "train.save_interval=1",
    "train.eval_interval=100",
    "train.eval_iters=1",
    "output.plot=false",
    "output.tensorboard=false",
    "model.num_layers=1",
    "model.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
]


def test_too_little_space_is_refused_before_launch(small_disk, capsys, clean_env):
    from inrank_megatron.config import load_config
    from inrank_megatron.planning.estimates import checkpoint_bytes

    disk = small_disk(10)
    assert _train(disk / "run", *SMALL) == 2
    line = _one_error_line(capsys.readouterr().err)
    need = checkpoint_bytes(load_config(os.path.join(REPO, "tests", "tiny.yaml"), SMALL))
    assert line == (
        f"error: output.dir='{disk / 'run'}': no room for a checkpoint in "
        f"{disk / 'run'}: it needs {need:,} bytes (tools/plan.py's estimate), "
        f"{10 * 2**20:,} are free there; free space or choose another output.dir"
    )
    assert os.listdir(disk) == [] and not torch.distributed.is_initialized()


def test_too_little_space_for_the_next_save_stops_with_latest_intact(small_disk, capsys, clean_env):
    """30 MiB hold two checkpoints: the third save is not started, the run stops in one line
    (before: torch's 'unexpected pos' and 70 lines), and resume continues from the second."""
    from inrank_megatron.checkpoint import is_complete, read_latest, saved_bytes

    disk = small_disk(30)
    root = disk / "run" / "checkpoints"
    assert _train(disk / "run", *SMALL) == 1
    lines = [_one_error_line(capsys.readouterr().err)]
    need = saved_bytes(str(root / "step_000002"))
    assert lines[0].startswith(
        f"error: stopped at step 3: no room for a checkpoint in {root}: it needs {need:,} bytes "
        "(the size of step_000002), "
    ), lines
    assert lines[0].endswith(
        " are free there; latest is still step_000002 (free space, then "
        "continue with output.resume=auto)"
    ), lines
    assert read_latest(str(root)) == str(root / "step_000002")
    assert sorted(os.listdir(root)) == ["latest", "step_000001", "step_000002"]
    assert is_complete(str(root / "step_000002")) is None


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_enospc_while_writing_is_named_and_the_partial_save_removed(
    small_disk, capsys, clean_env, monkeypatch, async_save
):
    """The free-space check passes but the disk fills before the write (another writer): the
    real ENOSPC of the tmpfs, inside torch DCP's write (train.async_save: in megatron's
    background writer, found when the write is completed), is reported as such."""
    from inrank_megatron.checkpoint import is_complete, read_latest
    from inrank_megatron.checkpoint import manager as checkpoint

    disk = small_disk(30)
    root = disk / "run" / "checkpoints"
    monkeypatch.setattr(checkpoint, "check_free_space", lambda *args: None)
    assert _train(disk / "run", *SMALL, f"train.async_save={async_save}") == 1
    lines = [_one_error_line(capsys.readouterr().err)]  # megatron's own log of it dropped
    assert lines[0].startswith(
        "error: stopped at step 3: [Errno 28] no space left on device writing "
        f".step_000003.{os.getpid()}.tmp in {root} ("
    ), lines
    assert lines[0].endswith(
        " bytes free then; the partial save was removed); latest is still "
        "step_000002 (free space, then continue with output.resume=auto)"
    )
    assert read_latest(str(root)) == str(root / "step_000002")
    assert sorted(os.listdir(root)) == ["latest", "step_000001", "step_000002"]
    assert is_complete(str(root / "step_000002")) is None
