"""The DeepSpeed backend (ZeRO 0-3, CPU, gloo) pinned down against DeepSpeed's own getters and
against the torch backend.

- Resize (stage cut, every policy; capacity growth): after ``backend.resize``, every parameter's
  fp32 master and Adam moments, read back with ``deepspeed.utils.safe_get_full_fp32_param`` /
  ``safe_get_full_optimizer_state``, equal the policy's definition exactly (moved parameters bit
  for bit), including parameters whose numel is not divisible by the data-parallel size; an
  ``extend`` carries every moment with zero new slots; step counts carry (a ``reset`` cut restarts
  the factor group's); the param groups keep their lr and weight decay (the factors': the
  ``inrank.lr_multiplier`` and ``inrank.frobenius_decay`` settings). DP=2 at every stage and
  TP=2 x DP=2 at stage 3; the consolidated checkpoint
  (``tools/zero_to_fp32.py``) equals the masters. Under every policy the torch and DeepSpeed
  backends keep the same Adam step per parameter and train on to the same losses.
- End to end (``python -m inrank_megatron.train``, 2 processes, growth and the cut): the losses of
  ZeRO 0, 1, 2 and 3 equal the torch AdamW + DDP backend's to two fp32 ulps; TP=2 x DP=2 with sequence
  parallelism under ZeRO-2 too (4 processes).
- Resume: a DeepSpeed checkpoint taken before the cut resumes and cuts again identically; one taken
  after the cut loads into the cut shapes; both reproduce the uninterrupted losses.
- Bad input: a JSON that contradicts the YAML or asks for unsupported ZeRO features, and a
  checkpoint whose factor shapes contradict its growth state, fail with a message naming the key.
"""

import json
import os

import numpy
import pytest
import torch

from inrank_megatron.core.resize import MOMENTS
from tests.distributed import REPO, SHORT, read_summary, run_distributed, run_train

VOCAB = 128
POLICIES = ("slice", "reset", "project")


# ------------------------------------------------------------------------------ resize, by stage
# The factors' own training settings: their param group's lr and decay differ from the others'.
FACTOR_KEYS = {"lr_multiplier": 2.0, "frobenius_decay": 0.01}


def _config(tmpdir, stage, tp, mode, ffn, world_size, **inrank):
    from inrank_megatron.config import from_dict

    ds_json = os.path.join(tmpdir, f"zero{stage}.json")
    with open(ds_json, "w") as f:
        # Threshold 0: ZeRO-3 partitions every parameter (the factors are kept full by the backend);
        # small sub-groups: several ZeRO-3 sub-groups per param group.
        json.dump(
            {
                "zero_optimization": {
                    "stage": stage,
                    "stage3_param_persistence_threshold": 0,
                    "sub_group_size": 20000,
                }
            },
            f,
        )
    dp = world_size // tp
    return from_dict(
        {
            "model": {
                "num_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "ffn_hidden_size": ffn,
                "seq_length": 16,
            },
            "inrank": {
                "mode": mode,
                "rank": 2,
                "buffer": 6,
                "warmup": 1,
                "gap": 1,
                "stage1_steps": None,
                **inrank,
            },
            "parallel": {
                "tensor_model_parallel_size": tp,
                "backend": "deepspeed",
                "deepspeed_config": ds_json,
            },
            "train": {
                "micro_batch_size": 2,
                "global_batch_size": 4 * dp,
                "lr": 1e-2,
                "clip_grad": 0.5,
                "lr_warmup_steps": 1,
                "steps": 10,
            },
            "data": {"tokenizer_model": "unused"},
        }
    )


def _batches(n, dp_rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (2, 2, 17), generator=gen)[dp_rank]  # per-DP-rank data
        out.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": torch.ones(2, 16),
                "position_ids": torch.arange(16).expand(2, 16),
            }
        )
    return out


def _train(backend, batches):
    losses = []
    for b in batches:
        n = backend.engine.gradient_accumulation_steps()
        for i in range(n):
            losses.append(backend.forward_backward(b, n, last=i == n - 1).item())
        info = backend.step()
        assert torch.isfinite(torch.tensor(info["grad_norm"])) and info["lr"] > 0
    return losses


def _full_state(engine, p, stage):
    """fp32 master and moments through DeepSpeed's getters (stage 0: the client AdamW, whose
    getters return None)."""
    import deepspeed

    if stage == 0:
        state = engine.optimizer.state[p]
        return {None: p.detach().float().clone(), **{k: state[k].clone() for k in MOMENTS}}
    out = {None: deepspeed.utils.safe_get_full_fp32_param(p)}
    for k in MOMENTS:
        out[k] = deepspeed.utils.safe_get_full_optimizer_state(p, k)
    return {k: v.clone() for k, v in out.items()}


def _snapshot(backend, stage):
    return {n: _full_state(backend.engine, p, stage) for n, p in backend.model.named_parameters()}


def _check_resize(rank, world_size, tmpdir, stage, tp, mode, policy, ffn):
    """Build, train 2 steps, reallocate (cut or extend), resize; return what differs."""
    from megatron.core import parallel_state

    from inrank_megatron.core.resize import map_slot_state
    from inrank_megatron.layers.base import named_inrank_layers
    from inrank_megatron.models.gpt import build_model
    from inrank_megatron.training.backends.deepspeed_backend import DeepSpeedBackend
    from inrank_megatron.training.optim import FACTOR_GROUP, param_groups
    from inrank_megatron.training.parallel import init_parallel, set_seeds

    # Efficient mode with the factors' own lr and Frobenius decay, cumulative mode without.
    cfg = _config(
        tmpdir, stage, tp, mode, ffn, world_size, **(FACTOR_KEYS if mode == "efficient" else {})
    )
    groups = init_parallel(tp, 1, backend="gloo")
    set_seeds(1234)
    model = build_model(cfg, VOCAB, tp)
    layers = named_inrank_layers(model)
    if mode == "efficient":
        for _, layer in layers:
            layer.set_rank(5)  # 11 active slots, cut to 5: odd slot counts
    backend = DeepSpeedBackend(cfg, model, groups)
    batches = _batches(3, parallel_state.get_data_parallel_rank())
    _train(backend, batches[:2])
    before = _snapshot(backend, stage)
    groups_before = [
        sorted(n for n, p in model.named_parameters() if id(p) in {id(q) for q in g["params"]})
        for g in param_groups(model, cfg)
    ]
    steps_before = backend.layout.group_steps()
    events, new_values = [], {}
    for name, layer in layers:
        event = (
            layer.cut(2)
            if mode == "efficient"
            else layer.extend_capacity(layer.allocated_slots + 3)
        )
        events.append(event)
        for role, _, new in event.pairs():
            new_values[f"{name}.{role}"] = (role, event, new.detach().float().clone())
    backend.resize(events, policy)
    after = _snapshot(backend, stage)
    problems = []
    for name, state in after.items():
        if name in new_values:
            role, event, value = new_values[name]
            want = {None: value}
            if event.kind == "truncate":
                mapped = map_slot_state(
                    before[name][None], role, event, policy=policy, kind="param"
                )
                if not torch.equal(mapped, value):
                    problems.append(f"{name}: layer's new factor != map_slot_state(param)")
            for k in MOMENTS:
                want[k] = map_slot_state(before[name][k], role, event, policy=policy, kind=k)
                if event.kind == "extend":
                    dim = 0 if role == "A" else 1
                    old = want[k].narrow(dim, 0, event.old_slots)
                    if not (
                        torch.equal(old, before[name][k])
                        and not want[k].narrow(dim, event.old_slots, 3).any()
                    ):
                        problems.append(f"{name}: extend does not carry {k} with zero new slots")
        else:
            want = before[name]
        for k in (None,) + MOMENTS:
            if state[k].shape != want[k].shape or not torch.equal(state[k], want[k]):
                problems.append(f"{name} {k or 'master'}: not equal to the policy's definition")
    if not any(p.numel() % (world_size // tp) for _, layer in layers for p in (layer.A, layer.B)):
        problems.append("no factor with a numel not divisible by the DP size")
    steps_after = backend.layout.group_steps()
    names_of_groups = [g["name"] for g in backend.engine.optimizer.param_groups]
    if names_of_groups != ["decay", "no_decay", FACTOR_GROUP] or len(steps_after) != 3:
        problems.append(f"param groups after the rebuild: {names_of_groups}")
    factor_keys = cfg.inrank.frobenius_decay > 0
    for group in backend.engine.optimizer.param_groups:
        factors = group["name"] == FACTOR_GROUP
        no_wd = group["name"] == "no_decay" or (factors and factor_keys)
        want_wd = cfg.train.weight_decay * (0.0 if no_wd else 1.0)
        want_max = cfg.train.lr * (cfg.inrank.lr_multiplier if factors else 1.0)
        if (
            group["lr"] != backend.scheduler.get_lr(group)
            or group["weight_decay"] != want_wd
            or group.get("max_lr", cfg.train.lr) != want_max
        ):
            problems.append(f"group {group['name']}: lr {group['lr']}, wd {group['weight_decay']}")
    if [
        sorted(n for n, p in model.named_parameters() if id(p) in {id(q) for q in g["params"]})
        for g in param_groups(model, cfg)
    ] != groups_before:
        problems.append("parameters changed param group in the rebuild")
    for gi, (a, b) in enumerate(zip(steps_before, steps_after)):
        reset = policy == "reset" and mode == "efficient" and names_of_groups[gi] == FACTOR_GROUP
        if b.item() != (0.0 if reset else a.item()):
            problems.append(f"group {names_of_groups[gi]}: step {a.item()} -> {b.item()}")
    losses = _train(backend, batches[2:])  # trains on after the rebuild
    engine = backend.engine
    if engine.global_steps != 3 or engine.global_samples != 3 * cfg.train.global_batch_size:
        problems.append(f"engine counters {engine.global_steps}, {engine.global_samples}")
    engine.destroy()
    parallel_state.destroy_model_parallel()
    return problems, losses


def _resize_body(rank, world_size, tmpdir, stage, tp, ffn, save_dir=None):
    import torch.distributed

    out = {}
    for mode, policies in (("efficient", POLICIES), ("cumulative", ("slice",))):
        for policy in policies:
            problems, losses = _check_resize(rank, world_size, tmpdir, stage, tp, mode, policy, ffn)
            out[(mode, policy)] = problems
            assert all(map(torch.isfinite, torch.tensor(losses)))
    torch.distributed.barrier()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resize_carries_state_exactly_dp2(stage, tmp_path):
    # ffn 129: fc1's B [129, 5], bias [129] and fc2's A [5, 129] have odd numels.
    results = run_distributed(_resize_body, 2, str(tmp_path), stage, 1, 129, timeout=900)
    for rank_result in results:
        assert rank_result == {key: [] for key in rank_result}


@pytest.mark.slow
def test_resize_carries_state_exactly_tp2_dp2_zero3(tmp_path):
    # ffn 258 over TP 2: per-rank shards of 129 rows/columns, odd numels again.
    results = run_distributed(_resize_body, 4, str(tmp_path), 3, 2, 258, timeout=1200)
    for rank_result in results:
        assert rank_result == {key: [] for key in rank_result}


def _resize_against_torch(rank, world_size, tmpdir, stage):
    """Every policy, both backends on the same model and batches: train 2 steps, cut, resize,
    train 2 more; return ``{policy: {backend: (Adam step by parameter, losses after the cut,
    the resize's collectives on this rank)}}``."""
    from megatron.core import parallel_state

    from inrank_megatron.config import from_dict, to_dict
    from inrank_megatron.layers.base import named_inrank_layers
    from inrank_megatron.tensor_parallel.comm_count import count_collectives
    from inrank_megatron.training.backends.deepspeed_backend import DeepSpeedBackend
    from inrank_megatron.training.backends.torch_ddp import TorchBackend
    from inrank_megatron.models.gpt import build_model
    from inrank_megatron.training.parallel import init_parallel, set_seeds

    ds_cfg = _config(tmpdir, stage, 1, "efficient", 129, world_size, **FACTOR_KEYS)
    plain = to_dict(ds_cfg)
    plain["parallel"].update(backend="torch", deepspeed_config=None)
    torch_cfg = from_dict(plain)
    groups = init_parallel(1, 1, backend="gloo")
    batches = _batches(4, parallel_state.get_data_parallel_rank())
    out = {}
    for policy in POLICIES:
        out[policy] = {}
        for cls, cfg in ((TorchBackend, torch_cfg), (DeepSpeedBackend, ds_cfg)):
            set_seeds(1234)
            model = build_model(cfg, VOCAB, 1)
            backend = cls(cfg, model, groups)
            n = cfg.train.global_batch_size // (cfg.train.micro_batch_size * groups.dp_size)

            def train(bs):
                losses = []
                for b in bs:
                    for i in range(n):
                        losses.append(backend.forward_backward(b, n, last=i == n - 1).item())
                    backend.step()
                return losses

            train(batches[:2])
            with count_collectives() as records:
                backend.resize([layer.cut(2) for _, layer in named_inrank_layers(model)], policy)
            steps = {name: step for name, _, _, step in backend.export_state()}
            out[policy][cls.name] = (steps, train(batches[2:]), [(r.op, r.shape) for r in records])
            if cls is DeepSpeedBackend:
                backend.engine.destroy()
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_resize_policies_equal_torch_backend(tmp_path):
    """What a policy does to the moments and to Adam's step is the core's (``resize_state``): the
    torch and DeepSpeed backends keep the same step per parameter (``reset`` restarts the factors'
    at 0 in both) and train on to the same losses, with the factors' lr multiplier and Frobenius
    decay on (their own param group, rebuilt by the resize; the penalty through ZeRO's gradient
    reduction). Both ranks make the same collectives in the same order in each resize (a rank
    making fewer would leave the other waiting: a hang)."""
    results = run_distributed(_resize_against_torch, 2, str(tmp_path), 1, timeout=900)
    for policy, by_backend in results[0].items():
        for name in ("torch", "deepspeed"):
            collectives = [r[policy][name][2] for r in results]
            assert collectives[0] == collectives[1], (policy, name, collectives)
        assert by_backend["deepspeed"][2], "the DeepSpeed resize made no collective"
        (torch_steps, torch_losses, _), (ds_steps, ds_losses, _) = (
            by_backend["torch"],
            by_backend["deepspeed"],
        )
        assert torch_steps == ds_steps, policy
        factors = {n: s for n, s in ds_steps.items() if n.endswith((".A", ".B"))}
        assert set(factors.values()) == ({0.0} if policy == "reset" else {2.0}), policy
        assert _close(ds_losses, torch_losses, tol=1e-6), (policy, ds_losses, torch_losses)


# ----------------------------------------------------------------- checkpoints, zero_to_fp32
def _checkpoint_body(rank, world_size, tmpdir, stage, tp):
    """Train, cut, save; return this rank's full masters (all ranks agree on replicated ones)."""
    from megatron.core import parallel_state

    from inrank_megatron.checkpoint import Meta
    from inrank_megatron.config import to_dict
    from inrank_megatron.growth.controller import GrowthController
    from inrank_megatron.checkpoint import manager as ckpt
    from inrank_megatron.training.backends.deepspeed_backend import DeepSpeedBackend
    from inrank_megatron.models.gpt import build_model
    from inrank_megatron.training.parallel import init_parallel, rng_state, set_seeds

    cfg = _config(tmpdir, stage, tp, "efficient", 128, world_size)
    groups = init_parallel(tp, 1, backend="gloo")
    set_seeds(1234)
    model = build_model(cfg, VOCAB, tp)
    controller = GrowthController(model, stage1_steps=2)
    backend = DeepSpeedBackend(cfg, model, groups)
    for step, batch in enumerate(_batches(2, parallel_state.get_data_parallel_rank()), start=1):
        _train(backend, [batch])
        report = controller.step(step)
        if report.resizes:
            backend.resize(report.resizes, "project")
    path = ckpt.save_training_checkpoint(
        os.path.join(tmpdir, "ckpt"),
        2,
        controller=controller,
        backend=backend,
        groups=groups,
        rng=rng_state(),
        meta=Meta(
            step=2,
            consumed_samples=8,
            world_size=world_size,
            tp=tp,
            pp=1,
            dp=world_size // tp,
            backend="deepspeed",
            config=to_dict(cfg),
        ),
    )
    masters = {n: _full_state(backend.engine, p, stage)[None] for n, p in model.named_parameters()}
    shard = {
        n: (bool(getattr(p, "tensor_model_parallel", False)), getattr(p, "partition_dim", -1))
        for n, p in model.named_parameters()
    }
    backend.engine.destroy()
    return path, parallel_state.get_tensor_model_parallel_rank(), masters, shard


@pytest.mark.slow
@pytest.mark.parametrize("stage,tp,world", [(0, 1, 2), (2, 1, 2), (3, 2, 4)])
def test_zero_to_fp32_consolidates_masters(stage, tp, world, tmp_path):
    from inrank_megatron.checkpoint.deepspeed import save_consolidated

    results = run_distributed(_checkpoint_body, world, str(tmp_path), stage, tp, timeout=900)
    path = results[0][0]
    per_tp = {r[1]: r[2] for r in results}
    shard = results[0][3]
    out = str(tmp_path / "full.safetensors")
    got = save_consolidated(path, out)
    from safetensors.torch import load_file

    assert set(load_file(out)) == set(per_tp[0])
    for name, (sharded, dim) in shard.items():
        want = (
            torch.cat([per_tp[i][name] for i in range(tp)], dim=dim)
            if sharded and tp > 1
            else per_tp[0][name]
        )
        assert torch.equal(got["state_dict"][name], want), name
    assert all(s["growth"]["stage"] == "fixed" for s in got["inrank_growth"].values())
    torch.save(got, tmp_path / "x.pt")


# ------------------------------------------------------------------------------ end to end
DS = ["parallel.backend=deepspeed", "parallel.tensor_model_parallel_size=1"]
DP2 = [*SHORT, "parallel.tensor_model_parallel_size=1", "train.save_interval=16"]


@pytest.fixture(scope="module")
def zero2_dp2(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("zero2_dp2"))
    run_train(
        [
            *DP2,
            *DS,
            "parallel.deepspeed_config=configs/deepspeed/zero2.json",
            f"output.dir={out}",
            "train.save_interval=4",
        ]
    )
    return out


def _close(a, b, tol=None):
    """Equal to ``tol``; by default to two float32 ulps of the loss (9.5e-7 each at a loss of 8):
    DeepSpeed averages gradients over DP in another order than DDP, which moves the last bit."""
    if len(a) != len(b):
        return False
    if tol is None:
        return all(
            abs(x - y) <= 2 * float(numpy.spacing(numpy.float32(max(abs(x), abs(y)))))
            for x, y in zip(a, b)
        )
    return max(abs(x - y) for x, y in zip(a, b)) <= tol


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_losses_equal_torch_backend(stage, dp2_run, zero2_dp2, tmp_path):
    if stage == 2:
        s = read_summary(zero2_dp2)
    else:
        out = str(tmp_path / f"zero{stage}")
        run_train(
            [
                *DP2,
                *DS,
                f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json",
                f"output.dir={out}",
            ]
        )
        s = read_summary(out)
    ref = read_summary(dp2_run)  # the torch backend (tests/conftest.py)
    assert s["stage"] == "fixed" and s["ranks"] == ref["ranks"]
    deltas = [abs(a - b) for a, b in zip(s["train_losses"], ref["train_losses"])]
    assert _close(s["train_losses"], ref["train_losses"]), deltas


@pytest.mark.slow
def test_tp2_dp2_sequence_parallel_zero2_equals_torch(tmp_path):
    common = [
        *SHORT,
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "train.global_batch_size=8",
        "train.steps=10",
        "train.save_interval=10",
    ]
    ref_out, ds_out = str(tmp_path / "torch"), str(tmp_path / "ds")
    run_train([*common, f"output.dir={ref_out}"], nproc=4, timeout=1200)
    run_train(
        [
            *common,
            "parallel.backend=deepspeed",
            "parallel.deepspeed_config=configs/deepspeed/zero2.json",
            f"output.dir={ds_out}",
        ],
        nproc=4,
        timeout=1200,
    )
    ref, s = read_summary(ref_out), read_summary(ds_out)
    assert s["ranks"] == ref["ranks"]
    assert _close(s["train_losses"], ref["train_losses"]), [
        abs(a - b) for a, b in zip(s["train_losses"], ref["train_losses"])
    ]


@pytest.mark.slow
def test_resume_before_and_after_cut_reproduces_losses(zero2_dp2, tmp_path):
    ref = read_summary(zero2_dp2)["train_losses"]
    cfg = [*DP2, *DS, "parallel.deepspeed_config=configs/deepspeed/zero2.json"]
    before = str(tmp_path / "before")  # stop at 6, resume=auto: the cut at 8 happens after resume
    run_train([*cfg, f"output.dir={before}", "train.exit_after_step=6"])
    assert read_summary(before)["train_losses"] == ref[:6]
    run_train([*cfg, f"output.dir={before}", "output.resume=auto"])
    assert _close(read_summary(before)["train_losses"], ref[6:], tol=0)
    after = str(tmp_path / "after")  # the uninterrupted run's step-12 checkpoint: cut shapes
    step12 = os.path.join(zero2_dp2, "checkpoints", "step_000012")
    run_train([*cfg, f"output.dir={after}", f"output.resume={step12}"])
    assert _close(read_summary(after)["train_losses"], ref[12:], tol=0)


# ------------------------------------------------------------------------------ bad input
def _cfg(tmp_path, ds: dict, **train):
    from inrank_megatron.config import from_dict

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return from_dict(
        {
            "parallel": {"backend": "deepspeed", "deepspeed_config": str(path)},
            "train": {"micro_batch_size": 2, "global_batch_size": 8, **train},
        }
    )


@pytest.mark.parametrize(
    "ds,key",
    [
        ({"train_micro_batch_size_per_gpu": 4}, "train.micro_batch_size"),
        ({"train_batch_size": 16}, "train.global_batch_size"),
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps"),
        ({"gradient_clipping": 1.0}, "train.clip_grad"),
        ({"bf16": {"enabled": True}}, "train.precision"),
        ({"optimizer": {"type": "Adam"}}, "'optimizer'"),
        ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
        (
            {"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}},
            "zero_optimization.reduce_bucket_size",
        ),
        ({"zero_optimization": {"stage": 2, "bogus": 1}}, "zero_optimization.bogus"),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
            "zero_optimization.offload_param",
        ),
        (
            {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}},
            "zero_hpz_partition_size",
        ),
        ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "ZeRO stage 0"),
    ],
)
def test_bad_deepspeed_json_is_refused_naming_the_key(ds, key, tmp_path):
    from inrank_megatron.config import ConfigError
    from inrank_megatron.deepspeed_json import check_deepspeed_config

    cfg = _cfg(tmp_path, ds, clip_grad=0.5, precision="bf16" if "stage 0" in key else "fp32")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        check_deepspeed_config(cfg, world_size=2)


def test_matching_json_and_yaml_pass(tmp_path):
    from inrank_megatron.deepspeed_json import check_deepspeed_config, deepspeed_config

    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 8,
        "gradient_clipping": 0.5,
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 1},
    }
    cfg = _cfg(tmp_path, ds, clip_grad=0.5)
    check_deepspeed_config(cfg, world_size=2)
    merged = deepspeed_config(cfg, world_size=2)
    assert merged["gradient_clipping"] == 0.5 and merged["zero_allow_untested_optimizer"]
    for stage in range(4):  # the shipped JSONs leave the YAML's keys to the YAML
        cfg.parallel.deepspeed_config = os.path.join(
            REPO, "configs", "deepspeed", f"zero{stage}.json"
        )
        assert deepspeed_config(cfg, world_size=2)["zero_optimization"]["stage"] == stage
    cfg.parallel.zero_stage = 3  # parallel.zero_stage overrides the JSON's stage
    assert deepspeed_config(cfg, world_size=2)["zero_optimization"]["stage"] == 3


def _fake_checkpoint(path, slots, shape_slots, rank, stage="fixed"):
    os.makedirs(path)
    layer = "decoder.layers.0.mlp.linear_fc1"
    growth = {
        layer: {
            "growth": {"rank": rank, "buffer": 0 if stage == "fixed" else 6, "stage": stage},
            "allocated_slots": slots,
            "extend_seed": 1,
        }
    }
    meta = {
        "params": {
            f"{layer}.A": {"shape": [shape_slots, 64]},
            f"{layer}.B": {"shape": [256, shape_slots]},
        }
    }
    (path / "inrank_growth.json").write_text(json.dumps(growth))
    (path / "inrank_deepspeed.json").write_text(json.dumps(meta))


def test_checkpoint_with_contradicting_factor_shapes_is_refused(tmp_path):
    from inrank_megatron.config import ConfigError
    from inrank_megatron.checkpoint.deepspeed import check_deepspeed_checkpoint

    _fake_checkpoint(tmp_path / "ok", 7, 7, 7)
    check_deepspeed_checkpoint(str(tmp_path / "ok"))
    _fake_checkpoint(tmp_path / "shape", 7, 32, 7)
    with pytest.raises(ConfigError, match=r"linear_fc1\.A has shape \[32, 64\]"):
        check_deepspeed_checkpoint(str(tmp_path / "shape"))
    _fake_checkpoint(tmp_path / "rank", 32, 32, 7)  # cut layer must hold exactly its rank
    with pytest.raises(ConfigError, match="allocated_slots=32"):
        check_deepspeed_checkpoint(str(tmp_path / "rank"))
