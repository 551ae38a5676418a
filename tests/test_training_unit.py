"""Single-process pieces of the training loop: the AdamW decay groups (factors decayed, biases and
norms not), and the torch backend's optimizer state across reallocations: for each resize policy
the moments after the cut equal what the policy defines, exactly; capacity growth carries
surviving moments exactly with new slots at zero; step counts continue (restart under ``reset``)
and training goes on."""

import pytest
import torch

from inrank_megatron import InRankConfig, InRankLinear
from inrank_megatron.config import load_config
from inrank_megatron.training.backends.torch_ddp import TorchBackend
from inrank_megatron.training.optim import param_groups
from inrank_megatron.training.parallel import ParallelGroups

GROUPS = ParallelGroups(rank=0, world_size=1, tp_size=1, tp_rank=0, pp_size=1, dp_size=1,
                        dp_rank=0, tp_group=None, dp_group=None)


class Tiny(torch.nn.Module):
    def __init__(self, mode="efficient"):
        super().__init__()
        cfg = InRankConfig(mode=mode, rank=3, buffer=5, max_rank=20,
                           stage1_steps=None if mode == "cumulative" else 130)
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


def _backend(model):
    cfg = load_config(None, ["train.lr=1e-2", "train.lr_warmup_steps=0", "train.clip_grad=0",
                             "train.lr_decay_style=constant"])
    return TorchBackend(cfg, model, GROUPS)


def test_decay_groups_follow_reference():
    model = Tiny()
    decay, no_decay = param_groups(model)
    assert {id(p) for p in decay["params"]} == {id(model.fc.A), id(model.fc.B)}
    assert {id(p) for p in no_decay["params"]} == {id(model.fc.bias), id(model.norm.weight),
                                                   id(model.norm.bias)}
    assert decay["wd_mult"] == 1.0 and no_decay["wd_mult"] == 0.0


@pytest.mark.parametrize("policy", ["slice", "reset", "project"])
def test_cut_moves_adamw_state_by_policy(policy):
    torch.manual_seed(0)
    model = Tiny()
    backend = _backend(model)
    _train(model, backend, 3)
    layer = model.fc
    before = {role: {k: v.clone() for k, v in backend.optimizer.state[p].items()}
              for role, p in (("A", layer.A), ("B", layer.B))}
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
            want_v = (P_A ** 2) @ v[:k] if role == "A" else v[:, :k] @ (P_B ** 2)
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
    plain = backends[0].optimizer = torch.optim.AdamW(param_groups(ref), **kw)
    slot = backends[1].optimizer = SlotAdamW(param_groups(new), slot_layers=[new.fc], **kw)
    seen, real_adam = {"plain": set(), "slot": set()}, adam_module.adam
    monkeypatch.setattr(adam_module, "adam", lambda params, *a, **k: (
        seen[current].update(tuple(p.shape) for p in params if p.dim() == 2),
        real_adam(params, *a, **k))[1])
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(16, 48, generator=gen, dtype=torch.float64)
        for current, model, opt in (("plain", ref, plain), ("slot", new, slot)):
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
