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
CPU, megatron's param groups built from our overrides are checked against the other backends',
and the distributed optimizer's state export and import at DP=2 run through a double of its
sharding (megatron's own range maps): every rank makes the same collectives, the round trip is
exact."""

import pytest
import torch

from inrank_megatron.core.resize import MOMENTS
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
LAYOUTS = {
    "world1": (1, TP1, []),
    "world1_distributed_optimizer": (1, TP1, DIST_OPT),
    "world1_factor_keys": (1, [*TP1, *FACTOR_KEYS], DIST_OPT),
    "dp2": (2, TP1, []),
    "dp2_distributed_optimizer": (2, TP1, DIST_OPT),
    "tp2": (2, TP2, []),
}

needs_gpu = pytest.mark.skipif(
    GPUS < 1, reason="megatron backend runs on GPUs only (tools/gpu_check.sh)"
)


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

    model = torch.nn.Sequential(
        InRankLinear(48, 80, InRankConfig(rank=2, buffer=4)),
        torch.nn.LayerNorm(80),
        torch.nn.Linear(80, 80),
    )
    out = {}
    for keys in ([], ["inrank.lr_multiplier=3", "inrank.frobenius_decay=0.1"]):
        cfg = load_config(None, keys)
        config = OptimizerConfig(
            optimizer="adam",
            lr=cfg.train.lr,
            min_lr=cfg.train.min_lr,
            weight_decay=cfg.train.weight_decay,
        )
        names = {id(p): n for n, p in model.named_parameters()}

        def view(groups):
            return sorted(
                (
                    sorted(names[id(p)] for p in g["params"]),
                    g["wd_mult"],
                    g.get("max_lr", cfg.train.lr),
                    g.get("min_lr", cfg.train.min_lr),
                )
                for g in groups
            )

        out[tuple(keys)] = (
            view(_get_param_groups([model], config, config_overrides(cfg, model, config))),
            view(param_groups(model, cfg)),
        )
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
        assert (
            factors == [(["0.A", "0.B"], 0.0, 3 * 6e-4, 3 * 6e-5)]
            if keys
            else [(["0.A", "0.B"], 1.0, 6e-4, 6e-5)]
        ), keys


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


# -------------------------------------------- the distributed optimizer's state at DP=2, on CPU
# Parameters laid out in one grad buffer of 4 + 12 + 5 + 6 = 27 elements, padded to 28 and cut in
# two halves of 14 (megatron's _build_model_gbuf_range): "rank0" lies in [0, 4), "straddle" in
# [4, 16) across the cut, "rank1" in [16, 21) and "no_state" (no gradient yet, so no Adam state) in
# [21, 27).
SHARDED_PARAMS = (("rank0", (4,)), ("straddle", (3, 4)), ("rank1", (5,)), ("no_state", (2, 3)))


class _ShardedAdam:
    """An optimizer double that shards like megatron-core's ``DistributedOptimizer``: its shard
    ranges, ``model_param_group_index_map`` and state accessors are megatron's own classmethods and
    methods, applied to a flat layout of fp32 parameters; the inner optimizer is ``torch.optim.Adam``
    over this rank's shards, which are views of the parameters (megatron's
    ``shard_fp32_groups``). Only the parts of megatron that need CUDA (the grad buffers, DDP) are
    left out."""

    def __init__(self, params, dp_rank: int, dp_size: int):
        from types import MethodType, SimpleNamespace

        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, Range

        # megatron's own accessors, bound to this double.
        for method in ("_get_model_param_range_map", "_get_main_param_and_optimizer_states"):
            setattr(self, method, MethodType(getattr(DistributedOptimizer, method), self))
        index_map, offset = {}, 0
        for p in params:
            index_map[p] = (offset, offset + p.numel(), 0)  # (start, end, bucket)
            offset += p.numel()
        size = -(-offset // dp_size)  # the buffer is padded to a multiple of DP
        local = Range(dp_rank * size, (dp_rank + 1) * size)
        key = (torch.float32, torch.float32)
        self.gbuf_ranges = [
            {
                key: [
                    {
                        "param_map": DistributedOptimizer._build_model_gbuf_param_range_map(
                            index_map, local, 0
                        )
                    }
                ]
            }
        ]
        self.model_param_gbuf_map = DistributedOptimizer._build_model_param_gbuf_map(
            self.gbuf_ranges
        )
        self.model_param_group_index_map, group_ranges = (
            DistributedOptimizer._build_optimizer_group_ranges(
                [{"params": list(params)}], self.gbuf_ranges
            )
        )
        self.config = SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False)
        self.shards = {}
        for p in group_ranges[0]["params"]:
            r = self._get_model_param_range_map(p)["param"]
            self.shards[p] = p.detach().view(-1)[r.start : r.end]
        self.optimizer = torch.optim.Adam(
            [{"params": list(self.shards.values())}], lr=0.1, foreach=False
        )

    def step(self, params, grads: dict) -> None:
        """One Adam step on this rank's shards of the full gradients ``grads`` (by parameter),
        then every parameter made whole again over DP (megatron's param all-gather)."""
        for p, shard in self.shards.items():
            r = self._get_model_param_range_map(p)["param"]
            shard.grad = grads[p].view(-1)[r.start : r.end].clone() if p in grads else None
        self.optimizer.step()
        for p in params:
            whole = torch.zeros(p.numel())
            if p in self.shards:
                r = self._get_model_param_range_map(p)["param"]
                whole[r.start : r.end] = self.shards[p]
            torch.distributed.all_reduce(whole)
            p.data.copy_(whole.view(p.shape))

    def shard_states(self) -> dict:
        """``{parameter: this rank's Adam state of its shard}``, cloned."""
        return {
            p: {k: v.clone() for k, v in self.optimizer.state.get(s, {}).items()}
            for p, s in self.shards.items()
        }


def _megatron_backend(model, optimizer, step):
    """A MegatronBackend around ``optimizer`` without its CUDA-only constructor (megatron's DDP and
    optimizers): the state methods read only what is set here."""
    from types import SimpleNamespace

    from inrank_megatron.training.backends.base import Backend
    from inrank_megatron.training.backends.megatron_backend import MegatronBackend

    backend = MegatronBackend.__new__(MegatronBackend)
    Backend.__init__(backend, None, model, SimpleNamespace(dp_group=None))
    backend.distributed, backend.device, backend.optimizer, backend._step = (
        True,
        torch.device("cpu"),
        optimizer,
        step,
    )
    return backend


def _state_round_trip(rank, world_size):
    """Two Adam steps on the sharded double (and on a whole-tensor Adam, the reference), export,
    import into a fresh double, export again; collectives counted on each rank."""
    from inrank_megatron.tensor_parallel.comm_count import count_collectives

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    for name, shape in SHARDED_PARAMS:
        model.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen)))
    reference_model = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    reference = torch.optim.Adam(reference_model, lr=0.1, foreach=False)
    params = list(model.parameters())
    sharded = _ShardedAdam(params, rank, world_size)
    for _ in range(2):
        grads = {p: torch.randn(p.shape, generator=gen) for p in params[:-1]}  # no_state: none
        sharded.step(params, grads)
        for p, q in zip(params, reference_model):
            q.grad = grads.get(p)
        reference.step()
    problems = []
    holds = {name: p in sharded.model_param_group_index_map for name, p in model.named_parameters()}
    backend = _megatron_backend(model, sharded, 2)
    with count_collectives() as exported:
        items = [
            (n, m.clone(), {k: v.clone() for k, v in mom.items()}, s)
            for n, m, mom, s in backend.export_state()
        ]
    for (name, master, moments, step), q in zip(items, reference_model):
        state = reference.state.get(q, {})
        for k in MOMENTS:
            want = state[k] if state else torch.zeros_like(q)
            if not torch.equal(moments[k], want):
                problems.append(f"{name} {k}: exported != whole-tensor Adam's")
        if step != 2.0 or not torch.equal(master, q.detach()):
            problems.append(f"{name}: step {step} or master differs")

    fresh = _ShardedAdam(params, rank, world_size)
    before = sharded.shard_states()
    with count_collectives() as imported:
        _megatron_backend(model, fresh, 2).import_state(iter(items))
    stateful = params[:-1]  # no_state exported zeros (checked through the second export)
    for p, state in fresh.shard_states().items():
        if any(p is q for q in stateful) and (
            state.keys() != before[p].keys()
            or not all(torch.equal(state[k], before[p][k]) for k in state)
        ):
            problems.append(f"imported shard state of {tuple(p.shape)} != the exported one")
    with count_collectives() as again:
        second = list(_megatron_backend(model, fresh, 2).export_state())
    for (name, _, moments, step), (_, _, first, step1) in zip(second, items):
        if step != step1 or not all(torch.equal(moments[k], first[k]) for k in MOMENTS):
            problems.append(f"{name}: export after import != the first export")
    return {
        "holds": holds,
        "problems": problems,
        "collectives": [len(exported), len(imported), len(again)],
    }


def test_distributed_optimizer_state_round_trip_dp2():
    """megatron's DistributedOptimizer at DP=2 (CPU double, gloo): a parameter wholly on rank 0,
    one across both ranks, one on rank 1 and one with no Adam state yet. Every rank makes the same
    collectives (before, a rank skipped the parameters it held nothing of: a hang at the first
    resize), the exported moments equal a whole-tensor Adam's bit for bit, and import then export
    is the identity. A 300 s process-group timeout turns a hang into a failure."""
    results = run_distributed(_state_round_trip, 2, timeout=300)
    assert [r["holds"] for r in results] == [
        {"rank0": True, "straddle": True, "rank1": False, "no_state": False},
        {"rank0": False, "straddle": True, "rank1": True, "no_state": True},
    ]
    for r in results:
        assert r["problems"] == []
    counts = [r["collectives"] for r in results]
    assert counts[0] == counts[1] == [len(SHARDED_PARAMS), 0, len(SHARDED_PARAMS)], counts
