"""Single-process pieces of the training loop: the AdamW param groups (factors decayed, biases and
norms not; the factors in a group of their own: ``inrank.lr_multiplier`` gives exactly the update of
AdamW at that lr, and ``inrank.frobenius_decay`` exactly the update of AdamW on the objective plus
lambda/2 ||B A||_F^2 with the factors' weight decay off), and the torch backend's optimizer state
across reallocations: for each resize policy
the moments after the cut equal what the policy defines, exactly; capacity growth carries
surviving moments exactly with new slots at zero; step counts continue (restart under ``reset``)
and training goes on. The bf16-against-fp32 check of tools/gpu_check.sh passes bf16 autocast on
CPU and fails it broken on purpose (no autocast; the loss reduced in bf16)."""

import pytest
import torch

from inrank_megatron import InRankConfig, InRankLinear
from inrank_megatron.config import load_config
from inrank_megatron.training.backends.torch_ddp import TorchBackend
from inrank_megatron.training.optim import param_groups
from inrank_megatron.training.parallel import ParallelGroups
from tests.distributed import run_distributed

GROUPS = ParallelGroups(
    rank=0,
    world_size=1,
    tp_size=1,
    tp_rank=0,
    pp_size=1,
    dp_size=1,
    dp_rank=0,
    tp_group=None,
    dp_group=None,
)


class Tiny(torch.nn.Module):
    def __init__(self, mode="efficient"):
        super().__init__()
        cfg = InRankConfig(
            mode=mode,
            rank=3,
            buffer=5,
            max_rank=20,
            stage1_steps=None if mode == "cumulative" else 130,
        )
        self.fc = InRankLinear(48, 80, cfg, dtype=torch.float64)
        self.norm = torch.nn.LayerNorm(80, dtype=torch.float64)

    def forward(self, x):
        return self.norm(self.fc(x))


def _train(model, backend, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 48, generator=gen, dtype=torch.float64)
        model(x).pow(2).mean().backward()
        backend.step()


CONSTANT_LR = [
    "train.lr=1e-2",
    "train.lr_warmup_steps=0",
    "train.clip_grad=0",
    "train.lr_decay_style=constant",
]


def _backend(model, *overrides):
    return TorchBackend(load_config(None, [*CONSTANT_LR, *overrides]), model, GROUPS)


class WithDense(Tiny):
    """Tiny plus a dense matrix (the decayed group's)."""

    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(80, 80, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.dense(super().forward(x))


def test_param_groups_follow_reference_with_factors_apart():
    model = WithDense()
    cfg = load_config(None, [])
    decay, no_decay, factors = param_groups(model, cfg)
    assert [g["name"] for g in (decay, no_decay, factors)] == [
        "decay",
        "no_decay",
        "inrank_factors",
    ]
    assert [id(p) for p in decay["params"]] == [id(model.dense.weight)]
    assert [id(p) for p in factors["params"]] == [id(model.fc.A), id(model.fc.B)]
    assert {id(p) for p in no_decay["params"]} == {
        id(model.fc.bias),
        id(model.norm.weight),
        id(model.norm.bias),
    }
    # The reference: factors decayed like every matrix, at the schedule's lr.
    assert decay["wd_mult"] == factors["wd_mult"] == 1.0 and no_decay["wd_mult"] == 0.0
    assert (factors["max_lr"], factors["min_lr"]) == (cfg.train.lr, cfg.train.min_lr)
    # Frobenius decay replaces weight decay on the factors; the multiplier scales their lr.
    cfg = load_config(None, ["inrank.frobenius_decay=0.1", "inrank.lr_multiplier=3"])
    factors = param_groups(model, cfg)[2]
    assert factors["wd_mult"] == 0.0
    assert (factors["max_lr"], factors["min_lr"]) == (3 * cfg.train.lr, 3 * cfg.train.min_lr)
    assert [g["name"] for g in param_groups(torch.nn.Linear(4, 4), cfg)] == ["decay", "no_decay"]


class _TinyLoss(TorchBackend):
    """The torch backend with a loss for Tiny's batches (``{"x": ...}``): squared distance of the
    normalised output to a fixed target (``pow(2).mean()`` of a LayerNorm output is constant up to
    its eps, and its gradient is rounding noise that Adam would amplify)."""

    @staticmethod
    def loss(module, batch):
        return (module(batch["x"]) - torch.linspace(-1, 1, 80, dtype=torch.float64)).pow(2).mean()


@pytest.mark.parametrize("mode", ["efficient", "cumulative"])
def test_lr_multiplier_and_frobenius_decay_give_the_reference_update(mode):
    """Through the backend's real path (micro-batches, the penalty on the last one, SlotAdamW,
    the scheduler's groups): every parameter after 3 steps equals torch AdamW's on a copy whose
    objective is the mean micro-batch loss plus lambda/2 ||B A||_F^2 of the dense active product
    (autograd), with lr * multiplier and no weight decay on the factors."""
    lam, mult = 0.05, 3.0
    torch.manual_seed(0)
    model, ref = Tiny(mode), Tiny(mode)
    with torch.no_grad():
        model.fc.B.normal_()  # cumulative mode starts at B = 0, where the penalty is flat
    ref.load_state_dict(model.state_dict())
    backend = _TinyLoss(
        load_config(
            None, [*CONSTANT_LR, f"inrank.frobenius_decay={lam}", f"inrank.lr_multiplier={mult}"]
        ),
        model,
        GROUPS,
    )
    k = model.fc.active_slots
    factors = [ref.fc.A, ref.fc.B]
    others = [p for p in ref.parameters() if all(p is not q for q in factors)]  # all 1-D
    opt = torch.optim.AdamW(
        [{"params": factors, "lr": 1e-2 * mult}, {"params": others, "lr": 1e-2}], weight_decay=0.0
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        micro = [{"x": torch.randn(8, 48, generator=gen, dtype=torch.float64)} for _ in range(2)]
        for i, batch in enumerate(micro):
            backend.forward_backward(batch, 2, last=i == 1)
        backend.step()
        opt.zero_grad()
        W = ref.fc.B[:, :k] @ ref.fc.A[:k]  # (out, in), formed only by the reference
        loss = sum(_TinyLoss.loss(ref, b) for b in micro) / 2 + lam / 2 * W.pow(2).sum()
        loss.backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)
    assert backend.optimizer.param_groups[-1]["lr"] == 1e-2 * mult


def test_factor_lr_follows_the_schedule_times_the_multiplier():
    """Warm-up and cosine decay: the factors' lr is the multiplier times the others' at every step
    (megatron's scheduler, from the group's max_lr / min_lr), before and after a resize."""
    torch.manual_seed(0)
    model = WithDense()
    backend = TorchBackend(
        load_config(
            None, ["train.lr_warmup_steps=3", "train.steps=10", "inrank.lr_multiplier=0.5"]
        ),
        model,
        GROUPS,
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        model(torch.randn(4, 48, generator=gen, dtype=torch.float64)).pow(2).mean().backward()
        backend.step()
        if step == 4:
            backend.resize([model.fc.cut(step=5)], "slice")
        dense, _, factors = backend.optimizer.param_groups
        assert factors["params"] == [model.fc.A, model.fc.B]
        assert factors["lr"] == pytest.approx(0.5 * dense["lr"], rel=1e-12) and dense["lr"] > 0


@pytest.mark.parametrize("policy", ["slice", "reset", "project"])
def test_cut_moves_adamw_state_by_policy(policy):
    torch.manual_seed(0)
    model = Tiny()
    backend = _backend(model)
    _train(model, backend, 3)
    layer = model.fc
    before = {
        role: {k: v.clone() for k, v in backend.optimizer.state[p].items()}
        for role, p in (("A", layer.A), ("B", layer.B))
    }
    event = layer.cut(step=3)
    backend.resize([event], policy)
    P_A, P_B = event.maps.P_A, event.maps.P_B  # (3, 8), (8, 3)
    k = P_A.shape[1]
    for role, p in (("A", layer.A), ("B", layer.B)):
        state = backend.optimizer.state[p]
        m, v = before[role]["exp_avg"], before[role]["exp_avg_sq"]
        if policy == "slice":  # the reference: exp_avg[:r] although the basis rotated
            want_m = m[:3] if role == "A" else m[:, :3]
            want_v = v[:3] if role == "A" else v[:, :3]
        elif policy == "reset":
            want_m = torch.zeros_like(p)
            want_v = torch.zeros_like(p)
        else:  # first moment through the cut's maps, second through their squares
            want_m = P_A @ m[:k] if role == "A" else m[:, :k] @ P_B
            want_v = (P_A**2) @ v[:k] if role == "A" else v[:, :k] @ (P_B**2)
        assert torch.equal(state["exp_avg"], want_m), role
        assert torch.equal(state["exp_avg_sq"], want_v), role
        # Adam's step: carried with mapped moments, restarted with reset ones (core.resize_state).
        assert float(state["step"]) == (0.0 if policy == "reset" else float(before[role]["step"]))
    group_params = {id(q) for g in backend.optimizer.param_groups for q in g["params"]}
    assert id(layer.A) in group_params and id(event.old_params["A"]) not in group_params
    a_before = layer.A.detach().clone()
    _train(model, backend, 2, seed=1)
    assert not torch.equal(layer.A, a_before)
    assert int(backend.optimizer.state[layer.A]["step"]) == (2 if policy == "reset" else 5)


def test_capacity_growth_carries_moments_exactly():
    torch.manual_seed(0)
    model = Tiny("cumulative")
    backend = _backend(model)
    with torch.no_grad():
        model.fc.B.normal_()
    _train(model, backend, 3)
    layer = model.fc
    m_before = backend.optimizer.state[layer.B]["exp_avg"].clone()
    v_before = backend.optimizer.state[layer.A]["exp_avg_sq"].clone()
    event = layer.set_rank(5)  # 5 + 5 > 8 allocated: doubles to 16
    assert event.kind == "extend" and event.new_slots == 16
    backend.resize([event], "slice")
    m = backend.optimizer.state[layer.B]["exp_avg"]
    v = backend.optimizer.state[layer.A]["exp_avg_sq"]
    assert torch.equal(m[:, :8], m_before) and torch.all(m[:, 8:] == 0)
    assert torch.equal(v[:8], v_before) and torch.all(v[8:] == 0)
    _train(model, backend, 1, seed=2)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("mode", ["efficient", "cumulative"])
def test_slot_adamw_equals_adamw_bit_for_bit(monkeypatch, foreach, mode):
    """The torch backend's optimizer hands Adam the active slots only, yet every parameter and
    moment equals plain AdamW's exactly, through a rank growth that activates decayed slots (and,
    in cumulative mode, a capacity growth)."""
    import torch.optim.adam as adam_module

    from inrank_megatron.training.optim import SlotAdamW

    torch.manual_seed(0)
    ref, new = Tiny(mode), Tiny(mode)
    new.load_state_dict(ref.state_dict())
    kw = dict(lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=foreach)
    backends = [_backend(ref), _backend(new)]  # for their resize(); stepped directly below
    cfg = load_config(None, [])
    plain = backends[0].optimizer = torch.optim.AdamW(param_groups(ref, cfg), **kw)
    slot = backends[1].optimizer = SlotAdamW(param_groups(new, cfg), slot_layers=[new.fc], **kw)
    seen, real_adam = {"plain": set(), "slot": set()}, adam_module.adam
    monkeypatch.setattr(
        adam_module,
        "adam",
        lambda params, *a, **k: (
            seen[current].update(tuple(p.shape) for p in params if p.dim() == 2),
            real_adam(params, *a, **k),
        )[1],
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(16, 48, generator=gen, dtype=torch.float64)
        for current, model, opt in (("plain", ref, plain), ("slot", new, slot)):  # noqa: B007
            # ``current`` is read by the adam stand-in above.
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            for group in opt.param_groups:
                group["lr"] *= 0.8  # a schedule: each step's decay factor differs
        if step == 2:
            for m, backend in zip((ref, new), backends):
                event = m.fc.set_rank(m.fc.growth.rank + 4)
                if event is not None:  # cumulative: 7 + 5 slots > 8 allocated, doubled to 16
                    backend.resize([event], "slice")
    for (name, p), q in zip(ref.named_parameters(), new.parameters()):
        assert torch.equal(p, q), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(plain.state[p][key], slot.state[q][key]), (name, key)
    k, allocated = new.fc.active_slots, new.fc.allocated_slots
    assert k < allocated  # inactive slots existed throughout
    # Adam's arithmetic saw the whole factors in AdamW, only the active slots in SlotAdamW.
    assert {(allocated, 48), (80, allocated)} <= seen["plain"]
    assert (allocated, 48) not in seen["slot"] and (80, allocated) not in seen["slot"]
    assert {(k, 48), (80, k)} <= seen["slot"]


def test_torch_backend_uses_slot_adamw():
    from inrank_megatron.training.optim import SlotAdamW

    model = Tiny()
    backend = _backend(model)
    assert isinstance(backend.optimizer, SlotAdamW)
    assert backend.optimizer.slot_layers == [model.fc]


# ----------------------------------------------------------------------------- bf16 vs fp32
PRECISION_VOCAB = 512


def _precision_losses(rank, world_size, steps):
    """A 2-layer GPT trained ``steps`` steps from one seed on the same batches by the torch
    backend: in fp32, in bf16 (autocast on CPU), in bf16 with autocast removed, and in bf16 with
    the loss reduced in bf16 (a wrong cast). Returns ``{variant: per-step losses}``."""
    import contextlib

    from inrank_megatron.config import from_dict
    from inrank_megatron.models.gpt import build_model
    from inrank_megatron.training.parallel import init_parallel, set_seeds

    def loss_in_bf16(module, batch):  # Backend.loss without its .float()
        losses = module(
            batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
        ).to(torch.bfloat16)
        return losses.mean()

    groups = init_parallel(1, 1, backend="gloo")
    out = {}
    for variant in ("fp32", "bf16", "bf16 without autocast", "bf16 with the loss in bf16"):
        cfg = from_dict(
            {
                "model": {
                    "num_layers": 2,
                    "hidden_size": 64,
                    "num_attention_heads": 4,
                    "ffn_hidden_size": 256,
                    "seq_length": 32,
                },
                "inrank": {"rank": 2, "buffer": 8, "warmup": 1, "gap": 1, "stage1_steps": None},
                "parallel": {"tensor_model_parallel_size": 1},
                "train": {
                    "micro_batch_size": 2,
                    "global_batch_size": 2,
                    "lr": 1e-3,
                    "lr_warmup_steps": 1,
                    "steps": steps,
                    "precision": "fp32" if variant == "fp32" else "bf16",
                },
                "data": {"tokenizer_model": "unused"},
            }
        )
        set_seeds(1234)
        backend = TorchBackend(cfg, build_model(cfg, PRECISION_VOCAB, 1), groups)
        if variant == "bf16 without autocast":
            backend._autocast = contextlib.nullcontext
        elif variant == "bf16 with the loss in bf16":
            backend.loss = loss_in_bf16
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(steps):
            tokens = torch.randint(0, PRECISION_VOCAB, (2, 33), generator=gen)
            batch = {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": torch.ones(2, 32),
                "position_ids": torch.arange(32).expand(2, 32),
            }
            losses.append(backend.forward_backward(batch, 1, last=True).float().item())
            backend.step()
        out[variant] = losses
    return out


def test_bf16_tolerance_catches_a_missing_autocast_and_a_wrong_cast():
    """tools/gpu_check.sh's bf16-against-fp32 check (``bf16_loss_problems``) passes bf16 autocast
    on CPU and fails it broken on purpose: without autocast (the losses equal fp32's) and with the
    loss reduced in bf16 (within 5 % of fp32's, the old tolerance, yet off at step 1 by bf16's
    rounding)."""
    from inrank_megatron.training.compare import bf16_loss_problems

    got = run_distributed(_precision_losses, 1, 4)[0]
    fp32 = got["fp32"]
    assert bf16_loss_problems(fp32, got["bf16"]) == []
    assert bf16_loss_problems(fp32, got["bf16 without autocast"]) == [
        "bf16: step 1's loss equals fp32's bit for bit: no bf16 autocast ran"
    ]
    wrong = got["bf16 with the loss in bf16"]
    assert all(abs(a - b) < 0.05 * b for a, b in zip(wrong, fp32))
    problems = bf16_loss_problems(fp32, wrong)
    assert len(problems) == 1 and problems[0].startswith("bf16: step 1's loss is "), problems
