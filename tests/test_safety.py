"""Safety: loading a checkpoint never runs code, and the checkpoint format has one owner.

- A malicious pickle (its ``__reduce__`` creates a marker file) in each file type a checkpoint
  holds (DCP ``model/.metadata``, ``train.pt``, ``rng_*.pt``, DeepSpeed's model and optimizer
  states) is refused on every path that reads it: resume (torch and DeepSpeed backends), reshard,
  to-dense, to-deepspeed, from-deepspeed, zero_to_fp32, export_hf, export_inrank; and at load time
  inside DeepSpeed's checkpoint engine, megatron's dist-checkpoint reader and DCP's byte items.
  The marker never appears; the CLIs exit 2 with one line naming the file and the global.
- ``meta.json`` is a typed :class:`Meta`: unknown or missing keys are refused naming the file;
  ``latest`` may only name a step directory of its own ``checkpoints/``; the format module imports
  without torch.
"""

import io
import os
import pickle
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Exploit:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _config(tmp_path, **extra):
    from inrank_megatron.config import load_config, to_dict

    overrides = [
        f"output.dir={tmp_path / 'run'}",
        "parallel.tensor_model_parallel_size=1",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return to_dict(load_config(os.path.join(REPO, "tests", "tiny.yaml"), overrides))


def _checkpoint(tmp_path, backend="torch", **extra):
    """A run dir whose latest step directory has the files of ``backend`` (contents plain)."""
    from inrank_megatron.checkpoint import (
        Meta,
        write_growth,
        write_latest,
        write_meta,
    )

    root = tmp_path / "run" / "checkpoints"
    step = root / "step_000004"
    os.makedirs(step)
    if backend == "deepspeed":
        os.makedirs(step / "deepspeed")
        torch.save({"module": {}}, step / "deepspeed" / "mp_rank_00_model_states.pt")
        torch.save({}, step / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        with open(step / "inrank_deepspeed.json", "w") as f:
            f.write('{"zero_stage": 2, "tp": 1, "dp": 1, "precision": "fp32", "params": {}}')
        extra = {
            "parallel.backend": "deepspeed",
            "parallel.deepspeed_config": os.path.join(REPO, "configs/deepspeed/zero2.json"),
            **extra,
        }
    else:
        os.makedirs(step / "model")
        with open(step / "model" / ".metadata", "wb") as f:
            pickle.dump({"plain": 1}, f)
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
            backend=backend,
            config=_config(tmp_path, **extra),
        ),
    )
    write_latest(str(root), str(step))
    return step


def _poison(file, marker, as_torch):
    with open(file, "wb") as f:
        if as_torch:
            torch.save(_Exploit(marker), f)
        else:
            pickle.dump(_Exploit(marker), f)


def _one_line_refusal(err, file):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "refusing to load posix.system" in lines[0] and str(file) in lines[0], err


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "backend,rel,as_torch",
    [
        ("torch", "model/.metadata", False),
        ("torch", "train.pt", True),
        ("torch", "rng_00000.pt", True),
        ("deepspeed", "deepspeed/mp_rank_00_model_states.pt", True),
        ("deepspeed", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", True),
    ],
)
def test_resume_refuses_pickled_code(tmp_path, capsys, clean_env, backend, rel, as_torch):
    from inrank_megatron import train

    step = _checkpoint(tmp_path, backend)
    marker = tmp_path / "pwned"
    _poison(step / rel, marker, as_torch)
    overrides = [
        f"output.dir={tmp_path / 'run'}",
        "output.resume=auto",
        "parallel.tensor_model_parallel_size=1",
    ]
    if backend == "deepspeed":
        overrides += [
            "parallel.backend=deepspeed",
            f"parallel.deepspeed_config={REPO}/configs/deepspeed/zero2.json",
        ]
    rc = train.main(["--config", os.path.join(REPO, "tests", "tiny.yaml"), *overrides])
    assert rc == 2 and not marker.exists()
    _one_line_refusal(capsys.readouterr().err, step / rel)


# ------------------------------------------------------------------------------------ tools
@pytest.mark.parametrize("command", ["reshard", "to-dense", "to-deepspeed"])
def test_convert_refuses_pickled_dcp_metadata(tmp_path, capsys, command):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint

    step = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    _poison(step / "model" / ".metadata", marker, False)
    args = [command, str(step), str(tmp_path / "out" / "step_000004")]
    args += {
        "reshard": ["--tp", "1"],
        "to-deepspeed": ["--deepspeed-config", f"{REPO}/configs/deepspeed/zero2.json"],
    }.get(command, [])
    assert convert_checkpoint.main(args) == 2 and not marker.exists()
    _one_line_refusal(capsys.readouterr().err, step / "model" / ".metadata")
    assert not (tmp_path / "out" / "step_000004").exists()


@pytest.mark.parametrize(
    "rel",
    ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"],
)
def test_from_deepspeed_and_zero_to_fp32_refuse_pickled_code(tmp_path, capsys, rel):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint
    import zero_to_fp32

    step = _checkpoint(tmp_path, "deepspeed")
    marker = tmp_path / "pwned"
    _poison(step / rel, marker, True)
    assert convert_checkpoint.main(["from-deepspeed", str(step), str(tmp_path / "t")]) == 2
    _one_line_refusal(capsys.readouterr().err, step / rel)
    assert zero_to_fp32.main([str(step), str(tmp_path / "full.pt")]) == 2
    assert "refusing to load posix.system" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "full.pt").exists()


@pytest.mark.parametrize("tool", ["export_hf", "export_inrank"])
def test_exports_refuse_pickled_code(tmp_path, capsys, tool):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    module = __import__(tool)

    step = _checkpoint(tmp_path, **{"model.inrank": "false"})
    marker = tmp_path / "pwned"
    _poison(step / "model" / ".metadata", marker, False)
    assert module.main([str(step), str(tmp_path / "out")]) == 2 and not marker.exists()
    assert "refusing to load posix.system" in capsys.readouterr().err


# ------------------------------------------------------------------- the loaders themselves
def test_dependencies_loaders_are_guarded(tmp_path):
    """What resume calls underneath: DeepSpeed's checkpoint engine (weights_only=False in
    DeepSpeed), megatron's DCP reader (plain pickle.load in torch), DCP's byte items."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from megatron.core.dist_checkpointing.strategies import torch as strategy
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from inrank_megatron.checkpoint import UnsafeCheckpointError, safe_loading

    marker = tmp_path / "pwned"
    _poison(tmp_path / "states.pt", marker, True)
    os.makedirs(tmp_path / "model")
    _poison(tmp_path / "model" / ".metadata", marker, False)
    payload = io.BytesIO()
    torch.save(_Exploit(marker), payload)
    with safe_loading(str(tmp_path)):
        with pytest.raises(UnsafeCheckpointError, match="states.pt: refusing to load posix"):
            TorchCheckpointEngine().load(str(tmp_path / "states.pt"), map_location="cpu")
        with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refusing to load posix"):
            strategy._get_filesystem_reader(str(tmp_path / "model")).read_metadata()
        planner = DefaultLoadPlanner(flatten_state_dict=False)
        planner.state_dict = {}
        item = type("Item", (), {"dest_index": type("I", (), {"fqn": "x"})()})()
        payload.seek(0)
        with pytest.raises(UnsafeCheckpointError, match="refusing to load posix.system"):
            planner.load_bytes(item, payload)
    assert not marker.exists()
    # Outside the block everything is as torch and megatron left it.
    assert strategy._get_filesystem_reader.__module__.startswith("megatron")
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


# ------------------------------------------------------------------------------ the format
def test_format_module_imports_without_torch():
    code = (
        "import sys, inrank_megatron.checkpoint as f; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(f.META_FILE)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert out.returncode == 0 and out.stdout.strip() == "meta.json", out.stderr


def test_meta_refuses_unknown_and_missing_keys(tmp_path):
    import json

    from inrank_megatron.checkpoint import CheckpointError, read_meta

    step = _checkpoint(tmp_path)
    file = step / "meta.json"
    meta = json.loads(file.read_text())
    assert read_meta(str(step)).to_json() == meta
    for change, expected in (
        ({"stpe": 4}, r"unknown keys \['stpe'\]"),
        ({"step": None}, "step=None; expected int"),
        ({"backend": "jax"}, "backend='jax'"),
        ({"dp": 2}, "world_size=1"),
    ):
        bad = {k: v for k, v in {**meta, **change}.items() if v is not None or k != "step"}
        if change.get("step", 0) is None:
            bad["step"] = None
        file.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=expected) as info:
            read_meta(str(step))
        assert str(file) in str(info.value)
    del meta["consumed_samples"]
    file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing keys \['consumed_samples'\]"):
        read_meta(str(step))


@pytest.mark.parametrize(
    "content", ["/etc", "../../elsewhere/checkpoints/step_000004", "step_000004/../../x", "..", ""]
)
def test_latest_names_only_its_own_step_directories(tmp_path, content):
    from inrank_megatron.checkpoint import CheckpointError, read_latest, resolve_checkpoint

    step = _checkpoint(tmp_path)
    root = step.parent
    assert read_latest(str(root)) == str(step)
    (root / "latest").write_text(content + "\n")
    with pytest.raises(CheckpointError, match="expected the name of a step directory"):
        read_latest(str(root))
    with pytest.raises(CheckpointError, match="not a path"):
        resolve_checkpoint(str(tmp_path / "run"))


def test_resume_refuses_a_latest_that_points_elsewhere_and_a_finished_run(
    tmp_path, capsys, clean_env
):
    step = _checkpoint(tmp_path)
    before = _hashes(tmp_path / "run")
    # The issue: resuming a step-20 checkpoint with train.steps=10 rewrote summary.json.
    assert _train(tmp_path, "output.resume=auto", "train.steps=4") == 2
    assert (
        "is at step 4, train.steps=4: nothing left to train; expected train.steps > 4"
        in capsys.readouterr().err
    )
    (step.parent / "latest").write_text(str(step) + "\n")  # an absolute path
    assert _train(tmp_path, "output.resume=auto") == 2
    assert "expected the name of a step directory" in capsys.readouterr().err
    assert {k: v for k, v in _hashes(tmp_path / "run").items() if "latest" not in k} == {
        k: v for k, v in before.items() if "latest" not in k
    }


# ------------------------------------------------------------- nothing the run did not write
def _hashes(root):
    import hashlib

    out = {}
    for parent, _, names in os.walk(root):
        for name in names:
            file = os.path.join(parent, name)
            with open(file, "rb") as f:
                out[os.path.relpath(file, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _train(tmp_path, *overrides):
    from inrank_megatron import train

    return train.main(
        [
            "--config",
            os.path.join(REPO, "tests", "tiny.yaml"),
            f"output.dir={tmp_path / 'run'}",
            "parallel.tensor_model_parallel_size=1",
            *overrides,
        ]
    )


def test_fresh_run_into_a_non_empty_directory_is_refused(tmp_path, capsys, clean_env):
    run = tmp_path / "run"
    os.makedirs(run / "tb")
    (run / "metrics.csv").write_text("step,loss\n1,9.0\n")
    (run / "tb" / "events.out").write_bytes(os.urandom(64))
    (run / "notes.txt").write_text("mine")
    before = _hashes(run)
    assert _train(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty (metrics.csv, notes.txt, tb)" in err
    assert "resume it with output.resume=auto, or choose another directory" in err
    assert _hashes(run) == before and sorted(os.listdir(run)) == ["metrics.csv", "notes.txt", "tb"]
    # resume=auto finds nothing to resume there either: refused, not started fresh.
    assert _train(tmp_path, "output.resume=auto") == 2
    assert "holds no checkpoint to resume" in capsys.readouterr().err
    assert _hashes(run) == before


def test_auto_resume_takes_the_newest_verified_checkpoint_or_refuses(tmp_path, capsys, clean_env):
    import shutil

    from inrank_megatron.checkpoint import (
        CheckpointError,
        Meta,
        is_complete,
        read_meta,
        record_files,
        write_meta,
    )
    from inrank_megatron.checkpoint.resume import auto_resume_path

    step4 = _checkpoint(tmp_path)
    root = step4.parent
    write_meta(str(step4), read_meta(str(step4)).replace(files=record_files(str(step4))))
    step8 = root / "step_000008"
    shutil.copytree(step4, step8)
    write_meta(str(step8), read_meta(str(step8)).replace(step=8))
    os.remove(root / "latest")
    assert auto_resume_path(str(root)) == str(step8)  # no latest: the newest complete one
    with open(step8 / "train.pt", "ab") as f:  # a file shorter or longer than saved: not complete
        f.write(b"x")
    assert "train.pt has" in is_complete(str(step8))
    assert auto_resume_path(str(root)) == str(step4)
    # ... but resuming step 4 would later replace step_000008: refused before anything runs.
    before = _hashes(tmp_path / "run")
    assert _train(tmp_path, "output.resume=auto") == 2
    assert "already holds step_000008, after the resumed step 4" in capsys.readouterr().err
    os.remove(step4 / "train.pt")
    with pytest.raises(CheckpointError, match="no complete checkpoint .* refusing to start fresh"):
        auto_resume_path(str(root))
    assert _train(tmp_path, "output.resume=auto") == 2
    assert "refusing to start fresh over them" in capsys.readouterr().err
    assert _hashes(tmp_path / "run") == {
        k: v for k, v in before.items() if k != "checkpoints/step_000004/train.pt"
    }
    del Meta


_HOLD = """
import sys, time
from inrank_megatron.run_dir import lock_output_dir
lock_output_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_into_a_locked_directory_is_refused_naming_the_holder(
    tmp_path, capsys, clean_env
):
    import signal

    from inrank_megatron.run_dir import lock_output_dir, unlock_output_dir

    step = _checkpoint(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path / "run")],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _hashes(tmp_path / "run")
        for resume in ("auto", "none"):
            assert _train(tmp_path, f"output.resume={resume}") == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert f"is in use by another run (host {os.uname().nodename}, pid {holder.pid}" in err
        assert _hashes(tmp_path / "run") == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_output_dir(str(tmp_path / "run"))  # kill -9 released it: a resume is not blocked
    unlock_output_dir()
    assert step.exists()


def test_tools_never_write_over_or_into_their_input(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint
    import zero_to_fp32

    step = _checkpoint(tmp_path)
    user_tmp = tmp_path / "out" / "step_000004.tmp"  # a directory of the user's
    os.makedirs(user_tmp)
    (user_tmp / "keep.txt").write_text("mine")
    taken = tmp_path / "taken"
    taken.write_text("mine too")
    before = {**_hashes(tmp_path / "run"), **_hashes(tmp_path / "out")}
    for dst in (step / "copy", step, taken):
        assert convert_checkpoint.main(["reshard", str(step), str(dst), "--tp", "1"]) == 2
        err = capsys.readouterr().err
        assert ("inside the source" in err) or ("exists; refusing to overwrite" in err), err
    assert (
        convert_checkpoint.main(
            ["reshard", str(step), str(tmp_path / "out" / "step_000004"), "--tp", "1"]
        )
        == 0
    )
    assert (user_tmp / "keep.txt").read_text() == "mine" and taken.read_text() == "mine too"
    after = {**_hashes(tmp_path / "run"), **_hashes(tmp_path / "out")}
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]  # no leftovers
    ds = _checkpoint(tmp_path / "ds", "deepspeed")
    own = ds / "deepspeed" / "mp_rank_00_model_states.pt"
    ds_before = _hashes(ds)
    for out in (own, ds / "full.pt", taken):
        assert zero_to_fp32.main([str(ds), str(out)]) == 2
        err = capsys.readouterr().err
        assert ("inside the source" in err) or ("exists; refusing to overwrite" in err), err
    assert _hashes(ds) == ds_before and taken.read_text() == "mine too"


# ---------------------------------------------------------------------- non-finite values stop
def test_first_nonfinite_names_the_inrank_layer():
    from inrank_megatron.training.finite import first_nonfinite

    layer = "decoder.layers.1.mlp.linear_fc2"
    params = [
        ("embedding.word_embeddings.weight", torch.ones(4, 2)),
        (f"{layer}.A", torch.ones(3, 2)),
        (f"{layer}.B", torch.ones(2, 3)),
    ]
    assert first_nonfinite(params, [layer]) is None
    params[2][1][0, 1] = float("nan")
    assert first_nonfinite(params, [layer]) == f"InRank layer {layer} (factor B)"
    params[0][1][3, 0] = float("inf")
    assert first_nonfinite(params, [layer]) == "parameter embedding.word_embeddings.weight"


@pytest.mark.slow
def test_nan_run_stops_with_latest_on_the_last_finite_checkpoint(tmp_path, capsys, clean_env):
    """train.lr=1e6 (the issue's case): before, the run ended with rc 0 and latest on NaN."""
    from inrank_megatron.checkpoint import read_latest
    from inrank_megatron.checkpoint.reader import read_dist_tensors

    rc = _train(
        tmp_path,
        "train.lr=1e6",
        "train.steps=8",
        "train.lr_warmup_steps=1",
        "train.save_interval=1",
        "train.eval_interval=100",
        "output.plot=false",
        "model.num_layers=1",
        "model.seq_length=32",
        "inrank.warmup=1",
        "inrank.gap=1",
        "inrank.stage1_steps=3",
    )
    err = [
        line
        for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
        if line.startswith("error:")
    ]
    assert rc == 1 and len(err) == 1 and "non-finite" in err[0], err
    stopped = int(err[0].split("step ")[1].split(":")[0])
    root = tmp_path / "run" / "checkpoints"
    assert read_latest(str(root)) == str(root / f"step_{stopped - 1:06d}")
    assert (
        sorted(n for n in os.listdir(root) if n.startswith("step_"))[-1]
        == f"step_{stopped - 1:06d}"
    )
    for name in os.listdir(root):
        if name.startswith("step_"):
            for key, t in read_dist_tensors(str(root / name / "model")).items():
                assert torch.isfinite(t).all(), (name, key)


# Each guard on its own fault, injected right after an optimizer update (the step's loss was
# computed before it, so the loss check cannot be what stops the run). Rank checks every step.
FAULT_RUN = (
    "train.steps=4",
    "train.lr_warmup_steps=1",
    "train.save_interval=2",
    "train.eval_interval=100",
    "output.plot=false",
    "model.num_layers=1",
    "model.seq_length=32",
    "inrank.stage1_steps=null",
    "inrank.warmup=1",
    "inrank.gap=1",
)


def _inject_after_update(monkeypatch, at_step: int, name: str):
    """The torch backend's step sets one element of parameter ``name`` to inf after update
    ``at_step``."""
    from inrank_megatron.training.backends.torch_ddp import TorchBackend

    original, calls = TorchBackend.step, []

    def step(self):
        info = original(self)
        calls.append(None)
        if len(calls) == at_step:
            with torch.no_grad():
                dict(self.model.named_parameters())[name].view(-1)[0] = float("inf")
        return info

    monkeypatch.setattr(TorchBackend, "step", step)


@pytest.mark.parametrize(
    "name,at_step,fault",
    [
        (
            "decoder.layers.0.mlp.linear_fc1.A",
            3,
            "InRank factors in InRank layer decoder.layers.0.mlp.linear_fc1 (factor A)",
        ),
        (
            "decoder.final_layernorm.weight",
            4,
            "parameters in parameter decoder.final_layernorm.weight",
        ),
    ],
    ids=["factor_at_a_rank_check", "parameter_before_a_save"],
)
def test_nonfinite_guard_stops_its_step_without_a_checkpoint(
    tmp_path, capsys, clean_env, monkeypatch, name, at_step, fault
):
    """An inf in fc1's factor A after update 3 meets the rank check of step 3 (training/loop.py's
    NonFiniteValueError guard); an inf in the final norm after update 4, a save step whose rank
    check does not read it, meets the pre-save check (training/finite.py). Either way the run
    stops in that step naming the layer or parameter, and ``latest`` stays at step 2."""
    from inrank_megatron.checkpoint import read_latest

    _inject_after_update(monkeypatch, at_step, name)
    rc = _train(tmp_path, *FAULT_RUN)
    err = [
        line
        for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
        if line.startswith("error")
    ]
    root = tmp_path / "run" / "checkpoints"
    assert (
        rc == 1
        and len(err) == 1
        and err[0].startswith(
            f"error: step {at_step}: non-finite {fault}; the run stops without saving it (latest "
            f"checkpoint: {root / 'step_000002'})"
        )
    ), err
    assert read_latest(str(root)) == str(root / "step_000002")
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_000002"]


# ------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_megatron_linear_backward_under_cpu_autocast(dtype):
    """train.precision=bf16/fp16 with the torch backend on CPU crashed in the first backward
    (megatron's linear function restores CUDA autocast, not CPU's, in its backward)."""
    from megatron.core.tensor_parallel.layers import (
        LinearWithGradAccumulationAndAsyncCommunication as Linear,
    )

    from inrank_megatron.cpu_fallback import enable_cpu_fallback

    if not enable_cpu_fallback():
        pytest.skip("CUDA machine: megatron's own custom_bwd applies")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, generator=gen, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(6, 8, generator=gen))
    with torch.autocast("cpu", dtype=dtype):
        y = Linear.apply(x, w, None, False, False, False, None, 0, None)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    xr, wr = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    (xr @ wr.t()).float().square().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, wr.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, xr.grad.float(), rtol=0, atol=0)


# ------------------------------------------------------------------- ranks die with launcher
@pytest.mark.slow
def test_kill_9_of_the_launcher_leaves_no_rank_alive(tmp_path):
    import signal
    import time

    from tests.distributed import SHORT
    from tests.test_train_runs import _descendants

    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [
            "bash",
            os.path.join(REPO, "launch", "torchrun.sh"),
            "--nproc",
            "2",
            os.path.join(REPO, "tests", "tiny.yaml"),
            *SHORT,
            "train.steps=400",
            "train.save_interval=null",
            f"output.dir={run}",
        ],
        # PYTHON: the launcher's interpreter is `python` on PATH, which under CI is not the venv's.
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ranks = []
    try:
        deadline = time.time() + 300
        while not (run / "metrics.csv").exists():  # both ranks are training
            assert launcher.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.5)
        ranks = [
            p
            for p in _descendants(launcher.pid)
            if "inrank_megatron.train" in open(f"/proc/{p}/cmdline").read()
        ]
        assert len(ranks) == 2
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's group; ranks have their own
        launcher.wait()
        deadline = time.time() + 10
        while [p for p in ranks if os.path.exists(f"/proc/{p}")] and time.time() < deadline:
            time.sleep(0.1)

        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        assert not [p for p in ranks if alive(p)]
    finally:
        for p in ranks:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------- absurd values
@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["train.steps=100000000000000000000000"], "dataset index alone needs"),
        (["model.seq_length=1000000"], "one micro-batch's activations need"),
        (["train.lr=.inf"], "train.lr (override 'train.lr=.inf'): expected a finite number"),
        (["inrank.init_scale=1e400"], "expected a finite number, got inf"),
    ],
)
def test_absurd_values_are_refused_before_launch(tmp_path, capsys, clean_env, overrides, expected):
    assert _train(tmp_path, *overrides) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    if "needs" in expected:
        assert "expected train.steps <= " in err or "expected model.seq_length <= " in err
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()
