"""Optimizer pieces shared by every backend: AdamW param groups (the reference's decay split, the
InRank factors' own lr and decay), megatron's LR scheduler, and the global gradient norm under
tensor parallelism."""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from inrank_megatron.config import TrainConfig
from inrank_megatron.layers.base import named_inrank_layers

# Autocast dtype of each reduced training precision (fp32 runs without autocast).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


FACTOR_GROUP = "inrank_factors"


def factor_params(model: torch.nn.Module) -> list:
    """The InRank factors (``A``, ``B`` of every InRank layer), in module order."""
    return [p for _, layer in named_inrank_layers(model) for p in (layer.A, layer.B)]


def factor_group_settings(cfg: TrainConfig) -> dict:
    """What the InRank factors' param group sets apart from the others: ``max_lr`` / ``min_lr``
    (``inrank.lr_multiplier`` times ``train.lr`` / ``train.min_lr``; megatron's scheduler reads
    them per group) and ``wd_mult`` (0 when ``inrank.frobenius_decay`` replaces weight decay on
    the factors)."""
    m = cfg.inrank.lr_multiplier
    return {
        "max_lr": cfg.train.lr * m,
        "min_lr": cfg.train.min_lr * m,
        "wd_mult": 0.0 if cfg.inrank.frobenius_decay > 0 else 1.0,
    }


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: the reference's decay split (matrices decayed, biases and norm weights, 1-D,
    not), with the InRank factors in a group of their own (:func:`factor_group_settings`; ZeRO
    also keeps one Adam step per group). ``wd_mult`` is read by megatron's scheduler; empty groups
    are left out."""
    factors = {id(p) for p in factor_params(model)}
    decay, no_decay, grown = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in factors:
            grown.append(p)
        else:
            # ZeRO-3 leaves a partitioned parameter's data empty: its shape is ds_shape.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "wd_mult": 1.0, "name": "decay"},
        {"params": no_decay, "wd_mult": 0.0, "name": "no_decay"},
        {"params": grown, "name": FACTOR_GROUP, **factor_group_settings(cfg)},
    ]
    return [g for g in groups if g["params"]]


class SlotAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that runs Adam's moment arithmetic on the active slots of InRank
    factors only, with results bit-identical to ``AdamW`` on the whole tensors.

    In stage 1 an efficient-mode layer allocates ``max_rank`` slots but its forward pass reads the
    first ``rank + buffer`` (``A[:k]``, ``B[:, :k]``). The other slots' gradients are exactly zero
    (the backward of a slice), so their Adam moments stay exactly zero and AdamW's update on them
    is ``-lr * 0 / (0 + eps) = 0``: all AdamW changes there is the decoupled weight decay
    ``p *= 1 - lr * wd``. This optimizer hands Adam views of the active slots (parameter,
    gradient, moments) and applies that same multiplication, with the same scalar, to the
    inactive slots; a slot that becomes active later holds the value plain AdamW would have given
    it. The state keeps the full shapes (checkpoints do not change).

    Args:
        params: parameter groups, as ``torch.optim.AdamW``.
        slot_layers: the InRank layers whose factors are among ``params`` (their ``A``/``B`` are
            looked up at every step, so reallocated factors are followed).
        **kwargs: ``torch.optim.AdamW``'s (``amsgrad`` is not supported).
    """

    def __init__(self, params, *, slot_layers=(), **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("SlotAdamW does not support amsgrad")
        super().__init__(params, **kwargs)
        self.slot_layers = list(slot_layers)
        self._active = {}
        self._inactive = []

    def _active_slots(self) -> dict:
        """``{factor parameter: (slot dim, active slots)}`` of factors with inactive slots."""
        out = {}
        for layer in self.slot_layers:
            k = layer.active_slots
            if k < layer.allocated_slots:
                out[layer.A] = (0, k)
                out[layer.B] = (1, k)
        return out

    def _init_group(
        self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
    ):
        has_complex = super()._init_group(
            group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        )
        for i, p in enumerate(params_with_grad):
            if p not in self._active:
                continue
            dim, k = self._active[p]
            params_with_grad[i] = p.detach().narrow(dim, 0, k)
            grads[i] = grads[i].narrow(dim, 0, k)
            exp_avgs[i] = exp_avgs[i].narrow(dim, 0, k)
            exp_avg_sqs[i] = exp_avg_sqs[i].narrow(dim, 0, k)
            self._inactive.append((p.detach().narrow(dim, k, p.shape[dim] - k), group))
        return has_complex

    @torch.no_grad()
    def step(self, closure=None):
        self._active, self._inactive = self._active_slots(), []
        try:
            loss = super().step(closure)
            for tail, group in self._inactive:  # AdamW's decoupled weight decay, nothing else
                if group["weight_decay"] != 0:
                    tail.mul_(1 - group["lr"] * group["weight_decay"])
        finally:
            self._active, self._inactive = {}, []
        return loss


def build_scheduler(cfg: TrainConfig, optimizer) -> OptimizerParamScheduler:
    """megatron.core's OptimizerParamScheduler (linear warm-up, then linear/cosine/constant decay)."""
    t = cfg.train
    decay_steps = t.decay_steps()
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, t.lr_warmup_steps + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
    )


def is_tp_duplicate(p: torch.nn.Parameter, tp_rank: int) -> bool:
    """A replicated (not TP-sharded) parameter on a TP rank other than 0: counted once in norms,
    as megatron's ``param_is_not_tensor_parallel_duplicate``."""
    return not getattr(p, "tensor_model_parallel", False) and tp_rank > 0


def global_grad_norm(params, *, tp_group=None, tp_rank: int = 0, pp_group=None) -> float:
    """L2 norm of the full model's gradient: each TP shard once, each replicated parameter once,
    summed over the TP group, then over the pipeline stages (the last stage's copy of the tied
    word embedding, megatron's ``shared`` parameter, is left out). DP replicas hold the same
    (averaged) gradient."""
    # Summed on the gradients' device, moved to the host once: one sync per step, not one per
    # parameter (the same fp64 additions in the same order as summing on the host).
    on_device = {}
    for p in params:
        if (
            p.grad is not None
            and not is_tp_duplicate(p, tp_rank)
            and not getattr(p, "shared", False)
        ):
            g = p.grad.detach()
            on_device[g.device] = on_device.get(g.device, 0) + g.double().pow(2).sum()
    sq = torch.zeros((), dtype=torch.float64)
    for value in on_device.values():
        sq += value.cpu()
    for group in (tp_group, pp_group):
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(sq, group=group)
    return math.sqrt(sq.item())


def clip_gradients(
    params, max_norm: float, *, tp_group=None, tp_rank: int = 0, pp_group=None
) -> float:
    """Scale gradients so their global norm is at most ``max_norm`` (``<= 0``: no clipping, as
    megatron's ``clip_grad``). Returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, tp_group=tp_group, tp_rank=tp_rank, pp_group=pp_group)
    if max_norm > 0 and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.detach().mul_(coef)
    return norm
