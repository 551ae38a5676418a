"""The fixed-rank baseline (``inrank.fixed_ranks``).

Pins down: the three forms (rank, fraction of min(in, out), another run's per-layer ranks from its
latest checkpoint or its summary) resolve to exact per-layer ranks; bad values (0, negative, over
the full rank, fraction > 1, cumulative mode, missing run directory, a run of another architecture)
are refused naming the key (and the layer); a layer fixed at rank r allocates exactly r slots drawn
as efficient mode draws them, has the parameters of an InRank layer cut at r, and is the same full
layer at TP=1 and TP=2 (kaiming and spectral init, whose factors are the truncated SVD of
megatron's dense draw); and, end to end at TP=2 (slow) with the factor-training keys (spectral
init, lr multiplier, Frobenius decay), a run at another run's learned ranks keeps them with no
growth and no cut, has exactly that InRank run's parameter count, resumes bit for bit, reshards
to TP=1 and trains on, and exports (native and Hugging Face) to a model whose validation loss is
the run's.
"""

import json
import math
import os

import pytest
import torch

from inrank_megatron.checkpoint import Meta, write_growth, write_latest, write_meta
from inrank_megatron.config import ConfigError, load_config, save_config, to_dict
from inrank_megatron import rules
from inrank_megatron.training.fixed_ranks import fraction_rank, resolve_fixed_ranks
from tests.distributed import SHORT, run_distributed, run_train
from tests.export_check import exports_give_the_runs_validation_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny.yaml")
NAMES = [f"decoder.layers.{i}.mlp.linear_fc{j}" for i in range(4) for j in (1, 2)]


def _cfg(*overrides):
    cfg = load_config(TINY, list(overrides))
    rules.validate(cfg, 2)
    return cfg


def _run_dir(path, ranks, overrides=(), *, checkpoint):
    """A run directory as training leaves it: a latest checkpoint, or summary.json + config.yaml."""
    cfg = load_config(TINY, list(overrides))
    os.makedirs(path)
    if checkpoint:
        step = os.path.join(path, "checkpoints", "step_000010")
        os.makedirs(step)
        write_latest(os.path.join(path, "checkpoints"), step)
        write_meta(
            step,
            Meta(
                step=10,
                consumed_samples=80,
                world_size=2,
                tp=2,
                pp=1,
                dp=1,
                backend="torch",
                config=to_dict(cfg),
            ),
        )
        write_growth(
            step,
            {
                n: {
                    "growth": {"rank": r, "buffer": 0, "max_rank": 64, "stage": "fixed"},
                    "allocated_slots": r,
                    "extend_seed": 1,
                }
                for n, r in ranks.items()
            },
        )
    else:
        save_config(cfg, os.path.join(path, "config.yaml"))
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump({"ranks": ranks}, f)
    return str(path)


# ----------------------------------------------------------------------------- the three forms
def test_rank_and_fraction_resolve_per_layer():
    assert resolve_fixed_ranks(_cfg("inrank.fixed_ranks=40")) == dict.fromkeys(NAMES, 40)
    # min(128, 512) = 128 for fc1 and fc2: 0.33 * 128 = 42.24 -> 42; 1.0 is full rank.
    assert resolve_fixed_ranks(_cfg("inrank.fixed_ranks=0.33")) == dict.fromkeys(NAMES, 42)
    assert resolve_fixed_ranks(_cfg("inrank.fixed_ranks=1.0")) == dict.fromkeys(NAMES, 128)
    assert resolve_fixed_ranks(_cfg("inrank.fixed_ranks=null")) == {}
    assert resolve_fixed_ranks(_cfg("inrank.fixed_ranks=40", "model.inrank=false")) == {}
    assert fraction_rank(0.001, 128) == 1 and fraction_rank(0.5, 7) == 4


@pytest.mark.parametrize("checkpoint", [True, False])
def test_ranks_from_another_run(tmp_path, checkpoint):
    ranks = {n: 30 + i for i, n in enumerate(NAMES)}
    run = _run_dir(tmp_path / "x", ranks, checkpoint=checkpoint)
    assert resolve_fixed_ranks(_cfg(f"inrank.fixed_ranks={run}")) == ranks


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "inrank.fixed_ranks (override 'inrank.fixed_ranks=0'): expected a value > 0, got 0"),
        ("-3", "expected a value > 0, got -3"),
        ("-0.5", "expected a value > 0, got -0.5"),
        ("129", "inrank.fixed_ranks=129 exceeds the full rank min(in, out)=128 of layer fc1"),
        (
            "1.5",
            "inrank.fixed_ranks=1.5: a float is a fraction of each layer's full rank and must be "
            "in (0, 1]",
        ),
        (
            "true",
            "inrank.fixed_ranks (override 'inrank.fixed_ranks=true'): expected int | float | "
            "str | null, got true (bool)",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError) as error:
        _cfg(f"inrank.fixed_ranks={value}")
    assert message in str(error.value)


def test_cumulative_mode_is_refused():
    with pytest.raises(ConfigError, match=r"inrank.fixed_ranks=8 with inrank.mode=cumulative"):
        _cfg("inrank.fixed_ranks=8", "inrank.mode=cumulative", "inrank.stage1_steps=null")


def test_bad_run_directories_are_refused_naming_the_layer(tmp_path):
    with pytest.raises(ConfigError, match=r"inrank.fixed_ranks='.*nope': no such run directory"):
        resolve_fixed_ranks(_cfg(f"inrank.fixed_ranks={tmp_path / 'nope'}"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"holds neither a checkpoint .* nor summary.json"):
        resolve_fixed_ranks(_cfg(f"inrank.fixed_ranks={tmp_path / 'empty'}"))
    # Another width: same names, other shapes.
    wide = _run_dir(
        tmp_path / "wide", dict.fromkeys(NAMES, 8), ["model.hidden_size=64"], checkpoint=True
    )
    with pytest.raises(
        ConfigError,
        match=r"layer decoder.layers.0.mlp.linear_fc1 is 64 -> 512 "
        r"there, 128 -> 512 here",
    ):
        resolve_fixed_ranks(_cfg(f"inrank.fixed_ranks={wide}"))
    # Fewer layers: this model's layer 2 is not there.
    short = _run_dir(
        tmp_path / "short", {n: 8 for n in NAMES[:4]}, ["model.num_layers=2"], checkpoint=False
    )
    with pytest.raises(
        ConfigError,
        match=r"that run has no InRank layer "
        r"decoder.layers.2.mlp.linear_fc1",
    ):
        resolve_fixed_ranks(_cfg(f"inrank.fixed_ranks={short}"))
    # A dense run has no ranks to take.
    dense = _run_dir(tmp_path / "dense", {}, ["model.inrank=false"], checkpoint=False)
    with pytest.raises(
        ConfigError,
        match=r"that run has no InRank layer "
        r"decoder.layers.0.mlp.linear_fc1",
    ):
        resolve_fixed_ranks(_cfg(f"inrank.fixed_ranks={dense}"))


def test_train_refuses_before_any_process_group(tmp_path, capsys):
    from inrank_megatron.train import main

    out = tmp_path / "out"
    code = main(
        [
            "--config",
            TINY,
            f"output.dir={out}",
            "parallel.tensor_model_parallel_size=1",
            f"inrank.fixed_ranks={tmp_path / 'missing'}",
        ]
    )
    assert code == 2 and not out.exists()
    assert "error: inrank.fixed_ranks=" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


# ------------------------------------------------------------------------------------ the layer
def test_fixed_layer_allocates_the_rank_drawn_as_efficient_mode():
    from inrank_megatron import InRankConfig
    from inrank_megatron.core.init import init_factors
    from inrank_megatron.layers.linear import InRankLinear

    cfg = InRankConfig(rank=2, buffer=8, init_scale=0.5)
    torch.manual_seed(0)
    layer = InRankLinear(48, 80, cfg, name="fc")
    layer.fix_rank(6)
    g = layer.growth
    assert (g.rank, g.buffer, g.stage, g.layer) == (6, 0, "fixed", "fc")
    assert layer.A.shape == (6, 48) and layer.B.shape == (80, 6) and layer.active_slots == 6
    ref = init_factors(
        "efficient",
        48,
        80,
        6,
        init_scale=0.5,
        generator=torch.Generator().manual_seed(layer._extend_seed),
    )
    assert torch.equal(layer.A, ref.A) and torch.equal(layer.B, ref.B)
    assert layer.B.abs().max() <= 0.5 / math.sqrt(6) + 1e-7  # kaiming bound, fan-in = 6 slots
    # The same parameters as an InRank layer of that shape cut at rank 6.
    grown = InRankLinear(48, 80, cfg)
    grown.set_rank(6)
    grown.cut(step=1)
    assert [p.shape for p in layer.parameters()] == [p.shape for p in grown.parameters()]
    for bad in (0, 49, 2.5):
        with pytest.raises(ValueError, match=r"layer fc: fixed rank must be an integer in 1..48"):
            layer.fix_rank(bad)


def _tp_body(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.utils import init_method_normal

    from inrank_megatron import InRankConfig, enable_cpu_fallback
    from inrank_megatron.tensor_parallel import (
        InRankColumnParallelLinear,
        InRankRowParallelLinear,
    )

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    group = parallel_state.get_tensor_model_parallel_group()
    config = ModelParallelConfig(
        tensor_model_parallel_size=world_size,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
    )

    def gather(layer, dim):
        full = {}
        for role in ("A", "B"):
            t = getattr(layer, role).detach()
            if role == dim[0] and world_size > 1:
                parts = [torch.empty_like(t) for _ in range(world_size)]
                torch.distributed.all_gather(parts, t.contiguous(), group=group)
                t = torch.cat(parts, dim=dim[1])
            full[role] = t.clone()
        return full

    out = {}
    for init in ("kaiming", "spectral"):
        for cls, extra, dim in (
            (InRankColumnParallelLinear, {"gather_output": False}, ("B", 0)),
            (InRankRowParallelLinear, {"input_is_parallel": True}, ("A", 1)),
        ):
            torch.manual_seed(1234)
            # spectral factorises the dense layer's init: megatron's init_method, as GPT passes it
            layer = cls(
                48,
                80,
                config=config,
                init_method=init_method_normal(0.02),
                bias=True,
                skip_bias_add=False,
                inrank_config=InRankConfig(rank=2, buffer=4, init=init),
                **extra,
            )
            grown = gather(layer, dim)
            layer.fix_rank(5)
            sharded = getattr(layer, dim[0])
            out[init, cls.__name__] = (
                grown,
                gather(layer, dim),
                getattr(sharded, "tensor_model_parallel", False),
                layer.growth.stage,
                layer.allocated_slots,
            )
    return out


@pytest.mark.slow  # three spawned processes importing megatron
def test_fixed_layers_are_the_same_full_layer_at_tp1_and_tp2():
    """Kaiming and spectral factors alike, as allocated at init and fixed at a rank: the full
    factors at TP=2 equal TP=1's bit for bit; spectral ones are the truncated SVD of megatron's
    draw of the dense weight."""
    ref = run_distributed(_tp_body, 1)[0]
    for result in run_distributed(_tp_body, 2):
        for name, (grown, full, tp_attr, stage, slots) in result.items():
            assert stage == "fixed" and slots == 5 and tp_attr
            assert grown["A"].shape == (24, 48) and grown["B"].shape == (80, 24)
            assert full["A"].shape == (5, 48) and full["B"].shape == (80, 5)
            assert all(
                torch.equal(f[r], g[r])
                for f, g in ((grown, ref[name][0]), (full, ref[name][1]))
                for r in ("A", "B")
            )
    torch.manual_seed(1234)
    W = torch.nn.init.normal_(torch.empty(80, 48), mean=0.0, std=0.02).double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    for kind in ("InRankColumnParallelLinear", "InRankRowParallelLinear"):
        grown = ref["spectral", kind][0]
        torch.testing.assert_close(
            (grown["B"] @ grown["A"]).double(),
            U[:, :24] @ torch.diag(S[:24]) @ Vh[:24],
            rtol=0,
            atol=1e-7,
        )


# ------------------------------------------------------------------------ end to end, TP = 2
# The fixed-rank arm trained the way issue 20 trains factors at a given rank: spectral init, the
# factors' own lr, Frobenius decay instead of weight decay on them. Resume, reshard and exports
# below therefore hold with these keys too.
FACTOR_KEYS = ["inrank.init=spectral", "inrank.lr_multiplier=2", "inrank.frobenius_decay=0.01"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tp2_run):
    """An InRank run grown and cut at step 8 of 16 (the session's ``tp2_run``), then a run fixed
    at its learned ranks (with a checkpoint at step 8), and that run resumed from step 8 in
    another directory; both with the factor-training keys (:data:`FACTOR_KEYS`)."""
    quick = [*SHORT, "output.tensorboard=false", "train.save_interval=8", *FACTOR_KEYS]
    root = tmp_path_factory.mktemp("fixed")
    learned = tp2_run
    fixed, resumed = (str(root / n) for n in ("fixed", "resumed"))
    run_train([*quick, f"output.dir={fixed}", f"inrank.fixed_ranks={learned}"])
    run_train(
        [
            *quick,
            f"output.dir={resumed}",
            f"inrank.fixed_ranks={learned}",
            f"output.resume={os.path.join(fixed, 'checkpoints', 'step_000008')}",
        ]
    )
    return {"learned": learned, "fixed": fixed, "resumed": resumed}


def _read(run, name):
    import csv

    with open(os.path.join(run, name)) as f:
        return json.load(f) if name.endswith(".json") else list(csv.DictReader(f))


@pytest.mark.slow
def test_run_at_learned_ranks_has_inranks_parameters_and_no_growth(runs):
    learned, fixed = _read(runs["learned"], "summary.json"), _read(runs["fixed"], "summary.json")
    assert len(set(learned["ranks"].values())) > 1  # per-layer ranks, not one number
    assert fixed["ranks"] == learned["ranks"] and fixed["stage"] == "fixed" and fixed["finished"]
    assert fixed["parameters"] == learned["parameters"]  # InRank's after the cut
    ranks = _read(runs["fixed"], "ranks.csv")  # the ranks at step 0, and no check after
    assert {(r["step"], r["explained_ratio"]) for r in ranks} == {("0", "")}
    assert {r["layer"]: int(r["rank"]) for r in ranks} == learned["ranks"]
    assert _read(runs["fixed"], "events.csv") == []  # no cut at inrank.stage1_steps
    losses = fixed["train_losses"]
    assert sum(losses[-4:]) < sum(losses[:4])


@pytest.mark.slow
def test_resume_is_bit_identical(runs):
    fixed, resumed = _read(runs["fixed"], "summary.json"), _read(runs["resumed"], "summary.json")
    assert resumed["train_losses"] == fixed["train_losses"][8:]
    assert resumed["valid_loss"] == fixed["valid_loss"] and resumed["ranks"] == fixed["ranks"]


@pytest.mark.slow
def test_exports_give_the_runs_validation_loss(runs, tmp_path):
    ckpt = exports_give_the_runs_validation_loss(runs["fixed"], tmp_path)
    learned = _read(runs["learned"], "summary.json")["ranks"]
    assert {n: (l.stage, l.buffer, l.allocated_slots) for n, l in ckpt.layers.items()} == {
        n: ("fixed", 0, r) for n, r in learned.items()
    }


@pytest.mark.slow
def test_resharded_to_tp1_continues(runs, tmp_path):
    """``reshard`` to TP=1 x DP=2 (no run-directory read: the checkpoint holds the ranks), then
    training on follows the TP=2 run (the Frobenius decay's k x k all-reduce at TP=2 against
    none at TP=1)."""
    from inrank_megatron.convert.layout import reshard

    out = str(tmp_path / "tp1")
    step = os.path.join(out, "checkpoints", "step_000008")
    reshard(os.path.join(runs["fixed"], "checkpoints", "step_000008"), step, tp=1)
    run_train(
        [
            *SHORT,
            "output.tensorboard=false",
            "train.save_interval=8",
            f"output.dir={out}",
            f"inrank.fixed_ranks={runs['learned']}",
            f"output.resume={step}",
            "parallel.tensor_model_parallel_size=1",
            *FACTOR_KEYS,
        ]
    )
    ref = _read(runs["fixed"], "summary.json")
    s = _read(out, "summary.json")
    assert s["ranks"] == ref["ranks"] and s["parameters"] == ref["parameters"]
    assert s["train_losses"] == pytest.approx(ref["train_losses"][8:], rel=1e-4)
