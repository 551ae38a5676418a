"""parallel.backend=megatron (megatron.core's DDP + ``get_megatron_optimizer``) pinned to the torch
backend: over a short run with growth every 2 steps and the stage cut after step 8, the per-step
``train_losses`` equal the torch backend's (same seed, data, clipping) to 1e-6 -- without and with
the distributed optimizer (``parallel.zero_stage=1``), and with the factor-training keys
(``inrank.init=spectral``, ``inrank.lr_multiplier``, ``inrank.frobenius_decay``) -- and a run
stopped after the cut and resumed from its checkpoint continues like the uninterrupted one. On one
GPU everything runs at world size 1 (two NCCL processes cannot share a GPU); with 2 GPUs also at
DP=2 and TP=2.
Without CUDA the backend is refused before any process group starts (megatron-core 0.16.1's
optimizers are GPU-only) and the GPU tests skip; ``tools/gpu_check.sh`` runs them on a GPU. On
CPU, megatron's param groups built from our overrides are checked against the other backends'."""

import pytest
import torch

from tests.distributed import SHORT, read_summary, run_distributed, run_train

TP1 = ["parallel.tensor_model_parallel_size=1"]
TP2 = ["parallel.tensor_model_parallel_size=2"]
MEGATRON = ["parallel.backend=megatron"]
DIST_OPT = ["parallel.zero_stage=1"]
# Past the cut (step 8) so that the resume crosses a reallocation.
STOP = ["train.exit_after_step=10", "train.save_interval=2"]
GPUS = torch.cuda.device_count()
WORLD = min(GPUS, 2)  # the resume test's world size: 2 processes where 2 GPUs are there
# layout: (processes, the torch reference's layout overrides, the megatron run's extra overrides)
# The factor-training keys (spectral init, the factors' lr multiplier, Frobenius decay).
FACTOR_KEYS = ["inrank.init=spectral", "inrank.lr_multiplier=2", "inrank.frobenius_decay=0.01"]
LAYOUTS = {"world1": (1, TP1, []), "world1_distributed_optimizer": (1, TP1, DIST_OPT),
           "world1_factor_keys": (1, [*TP1, *FACTOR_KEYS], DIST_OPT),
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


def _groups_body(rank, world_size):
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    from inrank_megatron import InRankConfig, InRankLinear
    from inrank_megatron.config import load_config
    from inrank_megatron.training.backends.megatron_backend import config_overrides
    from inrank_megatron.training.optim import param_groups

    model = torch.nn.Sequential(InRankLinear(48, 80, InRankConfig(rank=2, buffer=4)),
                                torch.nn.LayerNorm(80), torch.nn.Linear(80, 80))
    out = {}
    for keys in ([], ["inrank.lr_multiplier=3", "inrank.frobenius_decay=0.1"]):
        cfg = load_config(None, keys)
        config = OptimizerConfig(optimizer="adam", lr=cfg.train.lr, min_lr=cfg.train.min_lr,
                                 weight_decay=cfg.train.weight_decay)
        names = {id(p): n for n, p in model.named_parameters()}

        def view(groups):
            return sorted((sorted(names[id(p)] for p in g["params"]), g["wd_mult"],
                           g.get("max_lr", cfg.train.lr), g.get("min_lr", cfg.train.min_lr))
                          for g in groups)

        out[tuple(keys)] = (view(_get_param_groups([model], config,
                                                   config_overrides(cfg, model, config))),
                            view(param_groups(model, cfg)))
    return out


@pytest.mark.slow  # a spawned process importing megatron (a process group for megatron's groups)
def test_megatron_param_groups_are_the_other_backends():
    """megatron's optimizer groups (``get_megatron_optimizer``'s, from our overrides) hold the
    same parameters with the same wd_mult and lr range as ``optim.param_groups`` (the torch and
    DeepSpeed backends'): the InRank factors apart, with ``inrank.lr_multiplier`` and
    ``inrank.frobenius_decay``. Runs on CPU (the optimizer itself needs a GPU)."""
    for keys, (megatron, ours) in run_distributed(_groups_body, 1)[0].items():
        assert megatron == ours, keys
        factors = [g for g in ours if g[0] == ["0.A", "0.B"]]
        assert factors == [(["0.A", "0.B"], 0.0, 3 * 6e-4, 3 * 6e-5)] if keys else \
            [(["0.A", "0.B"], 1.0, 6e-4, 6e-5)], keys


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
