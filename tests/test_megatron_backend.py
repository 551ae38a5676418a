"""parallel.backend=megatron (megatron.core's DDP + ``get_megatron_optimizer``) pinned to the torch
backend: on 2 processes, over a short run with growth every 2 steps and the stage cut after step 8,
the per-step ``train_losses`` equal the torch backend's (same seed, data, clipping) to 1e-6 -- at
DP=2 without and with the distributed optimizer (``parallel.zero_stage=1``) and at TP=2 -- and a
run stopped after the cut and resumed from its checkpoint continues like the uninterrupted one.
Without CUDA the backend is refused before any process group starts (megatron-core 0.16.1's
optimizers are GPU-only); the equality runs need 2 GPUs (``tools/gpu_check.sh``)."""

import pytest
import torch

from tests.test_train_runs import SHORT, _summary, run_train

DP2 = ["parallel.tensor_model_parallel_size=1"]
TP2 = ["parallel.tensor_model_parallel_size=2"]
MEGATRON = ["parallel.backend=megatron"]
DIST_OPT = ["parallel.zero_stage=1"]
# Past the cut (step 8) so that the resume crosses a reallocation.
STOP = ["train.exit_after_step=10", "train.save_interval=2"]

needs_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                reason="megatron backend runs on GPUs only; needs 2 (gpu_check.sh)")


def _losses(tmp_path, name, overrides):
    out = str(tmp_path / name)
    run_train([*SHORT, f"output.dir={out}", *overrides])
    return _summary(out)["train_losses"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal only")
def test_refused_without_cuda(tmp_path):
    out = tmp_path / "run"
    proc = run_train([*SHORT, f"output.dir={out}", *MEGATRON, *DP2], check=False)
    assert proc.returncode != 0  # train.main exits 2; torchrun reports a failed child as 1
    assert "parallel.backend='megatron'" in proc.stderr and "needs CUDA" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
@needs_gpus
@pytest.mark.parametrize("layout", ["dp2", "dp2_distributed_optimizer", "tp2"])
def test_losses_equal_torch_backend(tmp_path, layout):
    extra = {"dp2": DP2, "dp2_distributed_optimizer": DP2 + DIST_OPT, "tp2": TP2}[layout]
    reference = _losses(tmp_path, "torch", [*DP2] if layout != "tp2" else [*TP2])
    got = _losses(tmp_path, "megatron", [*MEGATRON, *extra])
    assert len(got) == len(reference) == 16
    assert got == pytest.approx(reference, abs=1e-6, rel=0)


@pytest.mark.slow
@needs_gpus
def test_resume_across_the_cut(tmp_path):
    out = str(tmp_path / "resumed")
    full = _losses(tmp_path, "full", [*MEGATRON, *DP2])
    run_train([*SHORT, f"output.dir={out}", *MEGATRON, *DP2, *STOP])
    run_train([*SHORT, f"output.dir={out}", *MEGATRON, *DP2, "output.resume=auto"])
    assert _summary(out)["train_losses"] == pytest.approx(full[10:], abs=1e-6, rel=0)
