"""parallel.backend=megatron (megatron.core's DDP + ``get_megatron_optimizer``) pinned to the torch
backend: over a short run with growth every 2 steps and the stage cut after step 8, the per-step
``train_losses`` equal the torch backend's (same seed, data, clipping) to 1e-6 -- without and with
the distributed optimizer (``parallel.zero_stage=1``) -- and a run stopped after the cut and
resumed from its checkpoint continues like the uninterrupted one. On one GPU everything runs at
world size 1 (two NCCL processes cannot share a GPU); with 2 GPUs also at DP=2 and TP=2.
Without CUDA the backend is refused before any process group starts (megatron-core 0.16.1's
optimizers are GPU-only) and the GPU tests skip; ``tools/gpu_check.sh`` runs them on a GPU."""

import pytest
import torch

from tests.distributed import SHORT, read_summary, run_train

TP1 = ["parallel.tensor_model_parallel_size=1"]
TP2 = ["parallel.tensor_model_parallel_size=2"]
MEGATRON = ["parallel.backend=megatron"]
DIST_OPT = ["parallel.zero_stage=1"]
# Past the cut (step 8) so that the resume crosses a reallocation.
STOP = ["train.exit_after_step=10", "train.save_interval=2"]
GPUS = torch.cuda.device_count()
WORLD = min(GPUS, 2)  # the resume test's world size: 2 processes where 2 GPUs are there
# layout: (processes, the torch reference's layout overrides, the megatron run's extra overrides)
LAYOUTS = {"world1": (1, TP1, []), "world1_distributed_optimizer": (1, TP1, DIST_OPT),
           "dp2": (2, TP1, []), "dp2_distributed_optimizer": (2, TP1, DIST_OPT),
           "tp2": (2, TP2, [])}

needs_gpu = pytest.mark.skipif(GPUS < 1, reason="megatron backend runs on GPUs only "
                               "(tools/gpu_check.sh)")


def _losses(out_dir, overrides, nproc):
    run_train([*SHORT, f"output.dir={out_dir}", *overrides], nproc=nproc)
    return read_summary(str(out_dir))["train_losses"]


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    """The torch backend's losses per (processes, layout), run once for all tests."""
    cache = {}

    def get(nproc, layout):
        key = (nproc, tuple(layout))
        if key not in cache:
            out = tmp_path_factory.mktemp("torch")
            cache[key] = _losses(out, layout, nproc)
        return cache[key]

    return get


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal only")
def test_refused_without_cuda(tmp_path):
    out = tmp_path / "run"
    proc = run_train([*SHORT, f"output.dir={out}", *MEGATRON, *TP1], check=False)
    assert proc.returncode != 0  # train.main exits 2; torchrun reports a failed child as 1
    assert "parallel.backend='megatron'" in proc.stderr and "needs CUDA" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
@needs_gpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_losses_equal_torch_backend(tmp_path, torch_reference, layout):
    nproc, base, extra = LAYOUTS[layout]
    if nproc > GPUS:
        pytest.skip(f"{layout} needs {nproc} GPUs (one per NCCL process), found {GPUS}")
    reference = torch_reference(nproc, base)
    got = _losses(tmp_path / "megatron", [*MEGATRON, *base, *extra], nproc)
    assert len(got) == len(reference) == 16
    assert got == pytest.approx(reference, abs=1e-6, rel=0)


@pytest.mark.slow
@needs_gpu
def test_resume_across_the_cut(tmp_path):
    out = tmp_path / "resumed"
    full = _losses(tmp_path / "full", [*MEGATRON, *TP1], WORLD)
    run_train([*SHORT, f"output.dir={out}", *MEGATRON, *TP1, *STOP], nproc=WORLD)
    run_train([*SHORT, f"output.dir={out}", *MEGATRON, *TP1, "output.resume=auto"], nproc=WORLD)
    assert read_summary(str(out))["train_losses"] == pytest.approx(full[10:], abs=1e-6, rel=0)
