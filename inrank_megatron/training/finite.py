"""Non-finite values stop a run within the step they appear, before anything holding them is saved.

Checked where the loop already syncs: the step's mean loss (every rank has the same value, so every
rank stops together) before the optimizer applies the gradients; a rank check that meets non-finite
factors; and, before a checkpoint is written, every parameter (one reduction per save). fp16's
dynamic loss scaler skipping an overflowed step is not a fault: its loss is finite.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


class NonFiniteError(RuntimeError):
    """The run met NaN or inf; the message names the step and, in InRank factors, the layer."""


def first_nonfinite(named_params: Iterable, inrank_layers: Iterable[str]) -> Optional[str]:
    """``"InRank layer L (factor A)"`` or ``"parameter P"`` for the first parameter holding NaN or
    inf, None when all are finite. One reduction per parameter, on its device."""
    layers = set(inrank_layers)
    for name, p in named_params:
        if p.numel() and not bool(torch.isfinite(p.detach()).all()):
            layer, _, role = name.rpartition(".")
            if layer in layers:
                return f"InRank layer {layer} (factor {role})"
            return f"parameter {name}"
    return None


def _locate(model, controller, groups) -> str:
    """Where the non-finite values are, over all ranks (collective)."""
    mine = first_nonfinite(model.named_parameters(), [n for n, _ in controller.layers]) or ""
    found = [mine]
    if torch.distributed.is_initialized() and groups.world_size > 1:
        found = [None] * groups.world_size
        torch.distributed.all_gather_object(found, mine)
    hits = [f for f in found if f]
    return f" in {hits[0]}" if hits else ""


def fault(step: int, what: str, model, controller, groups, latest: Optional[str]) -> NonFiniteError:
    """The error to raise (collective: every rank calls it at the same step)."""
    return NonFiniteError(
        f"step {step}: non-finite {what}{_locate(model, controller, groups)}; "
        f"the run stops without saving it (latest checkpoint: "
        f"{latest or 'none'})"
    )


def check_loss(loss: float, step: int, model, controller, groups, latest) -> None:
    """Raise :class:`NonFiniteError` when the step's mean loss is NaN or inf."""
    if not math.isfinite(loss):
        raise fault(step, f"loss ({loss})", model, controller, groups, latest)


def check_parameters(step: int, model, controller, groups, latest) -> None:
    """Collective: raise :class:`NonFiniteError` when any rank's parameters hold NaN or inf
    (before a checkpoint of them is written)."""
    # Counted on each parameter's device, moved to the host once (not one sync per parameter).
    counts = [(~torch.isfinite(p.detach())).sum() for p in model.parameters() if p.numel()]
    bad = (
        torch.stack([c.to(counts[0].device) for c in counts]).sum().double().cpu()
        if counts
        else torch.zeros((), dtype=torch.float64)
    )
    if torch.distributed.is_initialized() and groups.world_size > 1:
        torch.distributed.all_reduce(bad)
    if bad.item():
        raise fault(step, "parameters", model, controller, groups, latest)
