"""Single-process pieces of the training loop: the AdamW decay groups (factors decayed, biases and
norms not), and the torch backend's optimizer state across reallocations: for each resize policy
the moments after the cut equal what the policy defines, exactly; capacity growth carries
surviving moments exactly with new slots at zero; step counts continue and training goes on."""

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
        assert torch.equal(state["step"], before[role]["step"])
    group_params = {id(q) for g in backend.optimizer.param_groups for q in g["params"]}
    assert id(layer.A) in group_params and id(event.old_params["A"]) not in group_params
    a_before = layer.A.detach().clone()
    _train(model, backend, 2, seed=1)
    assert not torch.equal(layer.A, a_before)
    assert int(backend.optimizer.state[layer.A]["step"]) == 5


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
