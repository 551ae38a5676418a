"""Reallocation of factors, and what it means for per-parameter optimizer state.

A layer whose factors are reallocated (the stage-1 -> stage-2 cut, or cumulative-mode capacity
growth) reports a :class:`FactorResize`. An optimizer backend moves each piece of state (master
value, Adam moments) of the old parameters to the new ones with :func:`map_slot_state`, under one of
three policies (training issue): ``slice`` (the reference: keep the first ``r`` slots, although the
cut's SVD rotated the basis), ``reset`` (zero the changed factors' moments) and ``project`` (the first
moment mapped through the same slot-dimension maps as the factors, exactly; the second moment by
``v' = v`` mapped through the element-wise squared maps, which is exact when the gradient's
coordinates are independent: ``Var(sum_i p_i g_i) = sum_i p_i^2 Var(g_i)``). Where factors only gain
slots (``extend``) every policy carries surviving state exactly and new slots start at zero.

:func:`resize_state` is the whole rule for one factor (master value, moments and Adam's step),
the same in every backend: ``Backend.resize`` (``training/backends/base.py``) applies it between
``export_state`` and ``import_state``. The step: ``reset`` at a cut restarts it at 0, so that the
zeroed moments get a fresh Adam's bias correction (carrying step ``t`` would divide them by
``1 - beta^t ~ 1``: the first updates would be ~3x a fresh Adam's); ``slice`` and ``project`` carry
the step with the moments they map (the reference's ``slice`` does), and ``extend`` carries it
under every policy (old and new slots share one tensor, so one step).

Slot dimension: ``A`` is ``[slots, in]`` (dim 0), ``B`` is ``[out, slots]`` (dim 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from inrank_megatron.core.names import POLICIES
from inrank_megatron.core.truncation import TruncationMaps

MOMENTS = ("exp_avg", "exp_avg_sq")
SLOT_DIM = {"A": 0, "B": 1}


@dataclass
class FactorResize:
    """One layer's factors were replaced by new parameters with another slot count.

    Attributes:
        layer: the layer's name.
        kind: ``"truncate"`` (the cut) or ``"extend"`` (capacity growth; old slots kept in place).
        old_slots, new_slots: slot counts before and after.
        old_params, new_params: ``{"A": param, "B": param}``.
        maps: the cut's slot maps (``kind == "truncate"`` only).
    """

    layer: str
    kind: str
    old_slots: int
    new_slots: int
    old_params: dict = field(repr=False)
    new_params: dict = field(repr=False)
    maps: Optional[TruncationMaps] = field(default=None, repr=False)

    def pairs(self):
        """``(role, old_param, new_param)`` for A and B."""
        return [(role, self.old_params[role], self.new_params[role]) for role in ("A", "B")]


def _resize_slots(t: torch.Tensor, role: str, slots: int) -> torch.Tensor:
    """Keep the first ``slots`` slots of ``t``, zero-padding if it has fewer."""
    dim = SLOT_DIM[role]
    have = t.shape[dim]
    if have >= slots:
        return t.narrow(dim, 0, slots).clone()
    pad_shape = list(t.shape)
    pad_shape[dim] = slots - have
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def map_slot_state(
    t: torch.Tensor, role: str, resize: FactorResize, *, policy: str, kind: str
) -> torch.Tensor:
    """Map one tensor of per-parameter state from the old factor to the new one.

    Args:
        t: the old state, shaped like the old factor (or its TP shard: only the slot dim is used).
        role: ``"A"`` or ``"B"``.
        resize: the event.
        policy: ``"slice"``, ``"reset"`` or ``"project"``.
        kind: ``"param"`` (the master value: always the layer's new factor, mapped exactly),
            ``"exp_avg"`` or ``"exp_avg_sq"``.

    Returns:
        The new state, shaped like the new factor, dtype of ``t``.
    """
    if policy not in POLICIES:
        raise ValueError(f"resize policy must be one of {POLICIES}, got {policy!r}")
    if role not in SLOT_DIM:
        raise ValueError(f"role must be 'A' or 'B', got {role!r}")
    if kind not in ("param",) + MOMENTS:
        raise ValueError(f"state kind must be 'param', 'exp_avg' or 'exp_avg_sq', got {kind!r}")
    if resize.kind == "extend":
        return _resize_slots(t, role, resize.new_slots)
    if kind == "param" or policy == "project":
        P_A, P_B = resize.maps.P_A, resize.maps.P_B
        if kind == "exp_avg_sq":
            P_A, P_B = P_A * P_A, P_B * P_B
        active = P_A.shape[1]  # the cut maps the active slots; unused storage slots drop out
        t64 = t.narrow(SLOT_DIM[role], 0, active).to(torch.float64)
        out = P_A @ t64 if role == "A" else t64 @ P_B
        return out.to(t.dtype)
    if policy == "reset":
        return _resize_slots(t, role, resize.new_slots).zero_()
    return _resize_slots(t, role, resize.new_slots)  # slice


def map_slot_step(step: float, resize: FactorResize, *, policy: str) -> float:
    """Adam's step count of a resized factor (module docstring): 0 under ``reset`` at a cut,
    carried otherwise."""
    if policy not in POLICIES:
        raise ValueError(f"resize policy must be one of {POLICIES}, got {policy!r}")
    return 0.0 if (policy == "reset" and resize.kind == "truncate") else float(step)


def resize_state(
    master: torch.Tensor,
    moments: dict,
    step: float,
    role: str,
    resize: FactorResize,
    new_param: torch.Tensor,
    *,
    policy: str,
):
    """What a resize does to one factor's optimizer state, in every backend.

    Args:
        master: the old factor's master value (this TP rank's shard, whole over DP): fp32, or
            the parameter itself where the model holds its own masters.
        moments: its ``{"exp_avg", "exp_avg_sq"}``, shaped like ``master``.
        step: its Adam step count.
        role: ``"A"`` or ``"B"``.
        resize: the event.
        new_param: the layer's new factor (its own dtype), computed by the layer from the old one.
        policy: ``"slice"``, ``"reset"`` or ``"project"``.

    Returns:
        ``(master, moments, step)`` for the new factor. The master is the layer's new factor when
        the parameters are their own masters (same dtype; the layer computed the new factor in
        fp64 from the old one: equal to ``map_slot_state(kind="param")`` of the old master); with
        bf16/fp16 parameters over fp32 masters, the old master mapped (truncate) or kept in the
        old slots, the new slots as the layer drew them (extend).
    """
    if new_param.dtype == master.dtype:
        new_master = new_param.detach().clone()
    elif resize.kind == "truncate":
        new_master = map_slot_state(master, role, resize, policy=policy, kind="param")
    else:
        new_master = new_param.detach().to(torch.float32).clone()
        new_master.narrow(SLOT_DIM[role], 0, resize.old_slots).copy_(master)
    new_moments = {
        k: map_slot_state(moments[k], role, resize, policy=policy, kind=k) for k in MOMENTS
    }
    return new_master, new_moments, map_slot_step(step, resize, policy=policy)
