"""Optimizer pieces shared by every backend: AdamW decay groups (the reference's), megatron's LR
scheduler, and the global gradient norm under tensor parallelism."""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from inrank_megatron.config import TrainConfig


def param_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW groups as the reference: matrices (InRank factors, dense weights, embeddings) decayed;
    biases and norm weights (1-D) not. ``wd_mult`` is read by megatron's scheduler."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "wd_mult": 1.0, "name": "decay"},
            {"params": no_decay, "wd_mult": 0.0, "name": "no_decay"}]


def build_scheduler(cfg: TrainConfig, optimizer) -> OptimizerParamScheduler:
    """megatron.core's OptimizerParamScheduler (linear warm-up, then linear/cosine/constant decay)."""
    t = cfg.train
    decay_steps = t.decay_steps()
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, t.lr_warmup_steps + 1), lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True)


def is_tp_duplicate(p: torch.nn.Parameter, tp_rank: int) -> bool:
    """A replicated (not TP-sharded) parameter on a TP rank other than 0: counted once in norms,
    as megatron's ``param_is_not_tensor_parallel_duplicate``."""
    return not getattr(p, "tensor_model_parallel", False) and tp_rank > 0


def global_grad_norm(params, *, tp_group=None, tp_rank: int = 0, pp_group=None) -> float:
    """L2 norm of the full model's gradient: each TP shard once, each replicated parameter once,
    summed over the TP group, then over the pipeline stages (the last stage's copy of the tied
    word embedding, megatron's ``shared`` parameter, is left out). DP replicas hold the same
    (averaged) gradient."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None and not is_tp_duplicate(p, tp_rank) and \
                not getattr(p, "shared", False):
            sq += p.grad.detach().double().pow(2).sum().cpu()
    for group in (tp_group, pp_group):
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(sq, group=group)
    return math.sqrt(sq.item())


def clip_gradients(params, max_norm: float, *, tp_group=None, tp_rank: int = 0,
                   pp_group=None) -> float:
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
