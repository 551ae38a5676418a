"""Rank signals that come from learning (issue 20): ``inrank.signal=update`` (the rule on the
cumulative update ``B A - B0 A0``) and ``inrank.start=dense`` (stage 1 trains every slot, the cut
picks the rank once), against brute-force references: ``svdvals`` of the dense update, a literal
transcription of the cut's rule, the SVD truncation; the initial factors drawn again equal the ones
the layer started from; TP=2 equals TP=1; checkpoints carry the seed; bad settings are refused.
End to end (slow, one shared TP=1 x DP=2 run): a pre-cut checkpoint resumed at TP=2 cuts at the same
ranks and follows; DeepSpeed ZeRO-1 and ZeRO-3 cut at the same ranks with the torch backend's losses;
the trained run's native and Hugging Face exports give its validation loss."""

import pytest
import torch

from inrank_megatron import InRankConfig, InRankLinear
from inrank_megatron.core.rank_rule import explained_ratios, select_cut_rank
from tests.distributed import SHORT, read_summary, run_distributed, run_train
from tests.export_check import exports_give_the_runs_validation_loss


def _perturb(layer, seed, scale=0.05):
    """A deterministic 'training' step: every trained slot moves."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.A.add_(scale * torch.randn(layer.A.shape, generator=gen, dtype=layer.A.dtype))
        layer.B.add_(scale * torch.randn(layer.B.shape, generator=gen, dtype=layer.B.dtype))


def _brute_cut_rank(s, max_rank, alpha, rule):
    g = explained_ratios(s, rule).tolist()  # explained_ratios is pinned by test_core
    for k in range(1, max_rank + 1):
        if g[k] > alpha:
            return k
    return max_rank


def test_select_cut_rank_matches_transcription():
    gen = torch.Generator().manual_seed(0)
    for i in range(300):
        n = int(torch.randint(4, 60, (1,), generator=gen))
        max_rank = int(torch.randint(1, n + 1, (1,), generator=gen))
        alpha = [0.5, 0.9, 0.99][i % 3]
        rule = ("variance", "energy")[i % 2]
        decay = float(torch.rand(1, generator=gen)) * 2
        s = torch.exp(-decay * torch.arange(n, dtype=torch.float64)) * (i % 5 != 0)
        assert select_cut_rank(s, max_rank, alpha, rule=rule) == _brute_cut_rank(
            s, max_rank, alpha, rule
        ), (i, n, max_rank, alpha, rule)
    with pytest.raises(ValueError, match="max_rank=9 must be <= len"):
        select_cut_rank(torch.ones(8), 9, 0.9)


def test_update_spectrum_is_the_update_since_init():
    torch.manual_seed(3)
    cfg = InRankConfig(rank=4, buffer=6, max_rank=24, signal="update", spectrum_dtype="float64")
    layer = InRankLinear(48, 80, cfg, dtype=torch.float64)
    A_init, B_init = layer.A.detach().clone(), layer.B.detach().clone()
    A0, B0 = layer.initial_factors()  # drawn again from the seed: the same numbers
    assert torch.equal(A0, A_init[:10]) and torch.equal(B0, B_init[:, :10])
    _perturb(layer, 1)
    layer.set_rank(7)  # 13 active slots: the new ones are at their init values
    A, B = layer.active_factors()
    update = B @ A - B_init[:, :13] @ A_init[:13]
    ref = torch.linalg.svdvals(update)
    s = layer.spectrum()
    assert s.shape == (48,) and torch.allclose(s, ref, atol=1e-12, rtol=0)
    # The product signal (the spec) reads B A itself: a different, init-dominated spectrum.
    product = InRankLinear(48, 80, cfg.replace(signal="product"), dtype=torch.float64)
    assert product._init_seed is None and "init_seed" not in product.inrank_state()


@pytest.mark.parametrize("start", ["full_rank", "dense"])
@pytest.mark.parametrize("signal", ["product", "update"])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_full_and_dense_starts_cut_at_the_rule_rank(start, signal, shape):
    n_in, n_out = shape
    torch.manual_seed(5)
    cfg = InRankConfig(
        start=start,
        signal=signal,
        buffer=0,
        max_rank=20,
        threshold=0.9,
        stage1_steps=10,
        spectrum_dtype="float64",
    )
    layer = InRankLinear(n_in, n_out, cfg, dtype=torch.float64)
    assert layer.allocated_slots == 48 and layer.active_slots == 48
    assert not layer.growth.is_due(10)  # no checks in stage 1
    W_init = layer.dense_weight().detach().clone()
    if start == "dense":  # one factor is the dense weight (nn.Linear's init), the other I
        dense_role = "B" if n_out >= n_in else "A"
        assert torch.equal(getattr(layer, dense_role), W_init)
        assert torch.equal(
            getattr(layer, "A" if dense_role == "B" else "B"), torch.eye(48, dtype=torch.float64)
        )
        bound = 1 / 48**0.5 if n_in == 48 else 1 / 80**0.5  # kaiming_uniform(a=sqrt(5))
        assert W_init.abs().max() <= bound and W_init.abs().max() > 0.9 * bound
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(n_out, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 48 if start == "full_rank" else n_in, generator=gen, dtype=torch.float64)
    with torch.no_grad():  # a learned rank-3 update on top of the init, in the trained factor
        (layer.B if start == "full_rank" else getattr(layer, dense_role)).add_(10 * u @ v)
    W = layer.dense_weight().detach()
    ref_s = torch.linalg.svdvals(W - W_init if signal == "update" else W)
    want = _brute_cut_rank(ref_s, 20, 0.9, "variance")
    assert want == 3  # the rank-3 update stands out of the init's spectrum
    event = layer.cut(10)
    assert layer.growth.rank == want and event.new_slots == want and event.old_slots == 48
    assert layer.growth.stage == "fixed" and layer.A.shape == (want, n_in)
    U, S, Vh = torch.linalg.svd(W)
    assert torch.allclose(layer.dense_weight(), U[:, :want] * S[:want] @ Vh[:want], atol=1e-9)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_dense_start_stage1_is_dense_adamw(shape):
    """Stage 1 of inrank.start=dense is a dense layer under AdamW (weight decay included: the
    identity factor decays, unread), to rounding; the update signal is svdvals(W - W_init)."""
    n_in, n_out = shape
    torch.manual_seed(0)
    cfg = InRankConfig(
        start="dense",
        signal="update",
        buffer=0,
        max_rank=20,
        stage1_steps=5,
        spectrum_dtype="float64",
    )
    layer = InRankLinear(n_in, n_out, cfg, dtype=torch.float64)
    W_init = layer.dense_weight().detach().clone()
    dense = torch.nn.Linear(n_in, n_out, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(W_init)
        dense.bias.zero_()
    x = torch.randn(7, n_in, dtype=torch.float64)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (layer, dense)]
    for _ in range(5):
        for m, opt in zip((layer, dense), opts):
            opt.zero_grad()
            (m(x) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(layer.dense_weight(), dense.weight, atol=1e-14, rtol=0)
    assert (layer.dense_weight() - W_init).norm() > 0.1  # it trained
    assert torch.allclose(
        layer.spectrum(), torch.linalg.svdvals(dense.weight - W_init).detach(), atol=1e-12, rtol=0
    )


def test_checkpoint_reader_takes_the_identity_factor_before_the_cut():
    """A stage-1 checkpoint of a dense start stores the identity factor as AdamW left it (weight
    decay only); exports read it as the identity, as the layer does."""
    from inrank_megatron.config import load_config
    from inrank_megatron.checkpoint.reader import InRankLayerState, LoadedCheckpoint

    cfg = load_config("configs/study-cpu.yaml", ["inrank.start=dense"])
    W = torch.randn(1024, 256)
    name = "decoder.layers.0.mlp.linear_fc1"
    state = InRankLayerState(name, "fc1", "efficient", 256, 0, 256, 256, "growing", 256, 1024)
    ckpt = LoadedCheckpoint(
        "x",
        10,
        cfg,
        None,
        {name: state},
        {name + ".A": 0.99 * torch.eye(256), name + ".B": W},
        8000,
        8064,
    )
    assert torch.equal(ckpt.dense_weight(name), W)
    state.stage = "fixed"  # after the cut both factors are what they are
    assert torch.allclose(ckpt.dense_weight(name), 0.99 * W)


def test_seed_round_trips_and_is_required():
    cfg = InRankConfig(rank=2, buffer=4, max_rank=16, signal="update")
    torch.manual_seed(1)
    layer = InRankLinear(40, 64, cfg)
    _perturb(layer, 2)
    state = layer.state_dict()
    torch.manual_seed(99)  # another draw: the seed comes from the checkpoint
    fresh = InRankLinear(40, 64, cfg)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.spectrum(), layer.spectrum())
    old = dict(state)
    old["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k != "init_seed"}
    with pytest.raises(ValueError, match="does not record"):
        InRankLinear(40, 64, cfg).load_state_dict(old)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="cumulative", signal="update", stage1_steps=None), "need efficient mode"),
        (dict(mode="cumulative", start="dense", stage1_steps=None), "need efficient mode"),
        (dict(start="dense", stage1_steps=None), "needs stage1_steps"),
        (dict(signal="gradient"), "signal must be one of"),
        (dict(start="warm"), "start must be one of"),
    ],
)
def test_bad_core_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InRankConfig(**kwargs)


def test_rules_refuse_bad_combinations_before_launch():
    from inrank_megatron.config import load_config
    from inrank_megatron.rules import check

    cfg = load_config(
        "configs/study-cpu.yaml",
        ["inrank.mode=cumulative", "inrank.stage1_steps=null", "inrank.signal=update"],
    )
    keys = [f.key for f in check(cfg, 1)]
    assert "inrank.signal" in keys
    cfg = load_config("configs/study-cpu.yaml", ["inrank.start=dense", "inrank.stage1_steps=null"])
    assert [f.key for f in check(cfg, 1)] == ["inrank.stage1_steps"]
    cfg = load_config("configs/study-cpu.yaml", ["inrank.start=dense", "inrank.signal=update"])
    assert check(cfg, 1) == []


# ---- tensor parallelism: the update's spectrum and the dense start's cut, TP=2 vs TP=1 ---------

IN, OUT = 48, 80


def _tp_body(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    from inrank_megatron import enable_cpu_fallback
    from inrank_megatron.tensor_parallel import InRankColumnParallelLinear, InRankRowParallelLinear

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    group = parallel_state.get_tensor_model_parallel_group()

    def gather(t, dim):
        parts = [torch.empty_like(t) for _ in range(world_size)]
        torch.distributed.all_gather(parts, t.detach().contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    out = {}
    config = ModelParallelConfig(
        tensor_model_parallel_size=world_size,
        use_cpu_initialization=True,
        params_dtype=torch.float64,
        gradient_accumulation_fusion=False,
    )
    for kind, cls in (("column", InRankColumnParallelLinear), ("row", InRankRowParallelLinear)):
        for start in ("low_rank", "full_rank", "dense"):
            icfg = InRankConfig(
                rank=3,
                buffer=4,
                max_rank=20,
                signal="update",
                start=start,
                stage1_steps=5,
                spectrum_dtype="float64",
                threshold=0.95,
            )
            torch.manual_seed(1234)
            extra = {"gather_output": False} if kind == "column" else {"input_is_parallel": True}
            layer = cls(IN, OUT, config=config, init_method=None, inrank_config=icfg, **extra)
            sharded, dim = ("B", 0) if kind == "column" else ("A", 1)
            gen = torch.Generator().manual_seed(8)  # the same full perturbation at every TP size
            with torch.no_grad():
                for role in ("A", "B"):
                    p = getattr(layer, role)
                    full_shape = list(p.shape)
                    if role == sharded:
                        full_shape[dim] *= world_size
                    step = 0.05 * torch.randn(full_shape, generator=gen, dtype=torch.float64)
                    p.add_(step.chunk(world_size, dim)[rank] if role == sharded else step)
            s = layer.spectrum()
            layer.cut(5)
            full = {
                role: gather(getattr(layer, role), dim)
                if role == sharded
                else getattr(layer, role).detach().clone()
                for role in ("A", "B")
            }
            out[(kind, start)] = dict(spectrum=s, rank=layer.growth.rank, **full)
    return out


@pytest.mark.slow
def test_update_signal_and_dense_cut_tp2_equal_tp1():
    ref = run_distributed(_tp_body, 1)[0]
    per_rank = run_distributed(_tp_body, 2)
    for case, r0 in ref.items():
        for res in per_rank:
            r = res[case]
            assert r["rank"] == r0["rank"], case
            assert torch.equal(r["spectrum"], per_rank[0][case]["spectrum"])  # TSQR: same on ranks
            assert torch.allclose(r["spectrum"], r0["spectrum"], atol=1e-10, rtol=0), case
            for role in ("A", "B"):
                assert torch.allclose(r[role], r0[role], atol=1e-9, rtol=0), (case, role)


# ---- the trainer: a dense start with the update signal across layouts and a resume ------------

LEARNED = ["inrank.start=dense", "inrank.signal=update", "inrank.threshold=0.8"]
DP2 = [*SHORT, *LEARNED, "parallel.tensor_model_parallel_size=1"]


@pytest.fixture(scope="module")
def dense_start_dp2(tmp_path_factory):
    """``SHORT`` with the dense start and the update signal at TP=1 x DP=2, torch backend: the
    cut after step 8 picks a rank per layer from the update's spectrum. Read-only."""
    out = str(tmp_path_factory.mktemp("dense_start_dp2"))
    run_train([*DP2, f"output.dir={out}"])
    s = read_summary(out)
    ranks = set(s["ranks"].values())
    assert s["stage"] == "fixed" and len(ranks) > 1 and min(ranks) < 64  # per layer, < the cap
    return out


@pytest.mark.slow
def test_dense_start_resumes_at_another_layout(dense_start_dp2, tmp_path):
    """The TP=1 x DP=2 run's pre-cut checkpoint resumed at TP=2 (init seed from the checkpoint,
    factors resharded) cuts at the same ranks and follows it."""
    import shutil

    ref, out = read_summary(dense_start_dp2), str(tmp_path / "resumed")
    shutil.copytree(f"{dense_start_dp2}/checkpoints/step_000004", f"{out}/checkpoints/step_000004")
    with open(f"{out}/checkpoints/latest", "w") as f:
        f.write("step_000004\n")
    run_train([*SHORT, *LEARNED, f"output.dir={out}", "output.resume=auto"])  # TP=2
    s = read_summary(out)
    assert s["ranks"] == ref["ranks"]
    assert s["train_losses"] == pytest.approx(ref["train_losses"][4:], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_dense_start_under_zero_follows_torch(stage, dense_start_dp2, tmp_path):
    """DeepSpeed ZeRO-1 (flat partitions) and ZeRO-3 (partitioned parameters) through the dense
    start's cut: the same per-layer ranks and the torch backend's losses. Before the cut DeepSpeed
    averages gradients in another order (a last-bit difference, tests/test_deepspeed.py), which the
    cut's SVD of the trained W carries on: hence a relative tolerance, not the two ulps of the
    growth runs."""
    out = str(tmp_path / f"zero{stage}")
    run_train(
        [
            *DP2,
            "parallel.backend=deepspeed",
            f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json",
            f"output.dir={out}",
        ]
    )
    ref, s = read_summary(dense_start_dp2), read_summary(out)
    assert s["stage"] == "fixed" and s["ranks"] == ref["ranks"]
    assert s["parameters"] == ref["parameters"]
    assert s["train_losses"] == pytest.approx(ref["train_losses"], rel=1e-5, abs=0)


@pytest.mark.slow
def test_dense_start_exports_give_the_runs_validation_loss(dense_start_dp2, tmp_path):
    ckpt = exports_give_the_runs_validation_loss(dense_start_dp2, tmp_path)
    ranks = read_summary(dense_start_dp2)["ranks"]
    assert {n: (l.stage, l.buffer, l.allocated_slots) for n, l in ckpt.layers.items()} == {
        n: ("fixed", 0, r) for n, r in ranks.items()
    }


def test_init_cut_rank_is_the_cut_rule_on_the_init():
    from inrank_megatron.core.init import dense_start_factors
    from inrank_megatron.core.init_ranks import init_cut_rank

    kw = dict(max_rank=30, threshold=0.95, rule="variance", seed=3)
    assert init_cut_rank(40, 96, start="dense", signal="update", **kw) is None
    W = dense_start_factors(
        40, 96, dense_init=torch.nn.init.normal_, generator=torch.Generator().manual_seed(3)
    )
    s = torch.linalg.svdvals((W.B @ W.A).double())
    assert init_cut_rank(40, 96, start="dense", signal="product", **kw) == _brute_cut_rank(
        s, 30, 0.95, "variance"
    )
    with pytest.raises(ValueError, match="low_rank grows"):
        init_cut_rank(40, 96, start="low_rank", signal="product", **kw)


def test_planner_defaults_to_the_rank_the_rule_reaches():
    """tools/plan.py and tools/bench_step.py count the cut at planning.estimates.expected_rank: the reference
    rule's fixed point on the init for GPT-2 medium (287 / 286, not 0.33 x 1024 = 338); the cap
    for the update signal, which the init does not decide; every slot in a dense stage 1."""
    from inrank_megatron.config import load_config
    from inrank_megatron.planning.estimates import count_parameters, rank_checks

    cfg = load_config("configs/gpt2-medium.yaml")
    assert count_parameters(cfg, stage="fraction").slots == {"fc1": 287, "fc2": 286}
    assert count_parameters(cfg, stage="fraction", rank_fraction=0.33).slots["fc1"] == 338
    learned = load_config(
        "configs/gpt2-medium.yaml", ["inrank.start=dense", "inrank.signal=update"]
    )
    assert count_parameters(learned, stage="fraction").slots == {"fc1": 512, "fc2": 512}
    assert count_parameters(learned, stage="active").slots == {"fc1": 1024, "fc2": 1024}
    assert rank_checks(learned) == 0 and rank_checks(cfg) > 0


def test_cut_at_an_imposed_rank():
    """tools/bench_step.py cuts a dense start at a planned rank: the SVD truncation at it."""
    torch.manual_seed(2)
    cfg = InRankConfig(start="dense", buffer=0, max_rank=20, stage1_steps=10)
    layer = InRankLinear(48, 80, cfg, dtype=torch.float64)
    W = layer.dense_weight().detach()
    with pytest.raises(ValueError, match=r"cut rank must be an integer in 1\.\.48"):
        layer.cut(10, rank=49)
    layer.cut(10, rank=5)
    U, S, Vh = torch.linalg.svd(W)
    assert layer.growth.rank == 5 and torch.allclose(
        layer.dense_weight(), U[:, :5] * S[:5] @ Vh[:5]
    )
