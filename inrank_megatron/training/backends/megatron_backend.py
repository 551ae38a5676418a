"""The megatron.core backend: megatron's ``DistributedDataParallel`` (contiguous grad buffers,
bucketed DP reduce) and ``get_megatron_optimizer`` (AdamW, megatron's TP-aware clipping, optionally
the distributed optimizer that shards fp32 state over DP), with megatron's LR scheduler.

GPU only. megatron-core 0.16.1's optimizers allocate with ``device='cuda'`` literals
(``FP32Optimizer.__init__``, ``MixedPrecisionOptimizer.__init__``, ``clip_grads.py``) and accept
parameters only by ``Tensor.type() == 'torch.cuda.FloatTensor'`` (``DistributedOptimizer.
_build_model_and_main_param_groups``); running them on CPU would need module-level ``torch``
proxies or a global ``Tensor.type()`` override, which we do not ship. The rule "megatron needs CUDA"
(:mod:`inrank_megatron.rules`) refuses this backend without CUDA; ``tools/gpu_check.sh`` runs its tests.

Selection: ``parallel.backend=megatron``; the distributed optimizer when
``parallel.zero_stage >= 1`` (ZeRO-1: fp32 master weights and Adam moments sharded over DP).

Resizes (the stage cut, cumulative growth) replace factor parameters, which megatron's DDP holds in
its flat buffers and the optimizer in its groups (sharded, for the distributed optimizer). So a
resize is ``Backend.resize`` as in every backend: :meth:`MegatronBackend.export_state` snapshots
every parameter's full Adam moments and step by name, :meth:`MegatronBackend._rebuild` rebuilds DDP
and the optimizer around the resized module, and :meth:`MegatronBackend.import_state` writes them
back, resized factors mapped by :func:`inrank_megatron.core.resize_state`. The model is fp32
(bf16/fp16 run under autocast), so the model parameters are the fp32 master values; the LR schedule
continues.
"""

from __future__ import annotations

import contextlib
import gc
import os

import torch

from inrank_megatron.core.resize import MOMENTS
from inrank_megatron.training.backends.base import Backend
from inrank_megatron.training.optim import (
    AMP_DTYPES,
    FACTOR_GROUP,
    build_scheduler,
    factor_group_settings,
    factor_params,
)

# Distributed-optimizer checkpoints: one ShardedTensor per buffer, reshardable over DP
# (DistributedOptimizer.sharded_state_dict).
_DIST_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def use_distributed_optimizer(cfg) -> bool:
    """The distributed optimizer is megatron's ZeRO-1: selected by ``parallel.zero_stage >= 1``."""
    return (cfg.parallel.zero_stage or 0) >= 1


def config_overrides(cfg, model, config) -> dict:
    """megatron's param-group overrides that give the groups of ``optim.param_groups``: its
    standard ones (1-D parameters and biases get ``wd_mult`` 0; everything else is decayed) and
    the InRank factors' (:func:`~inrank_megatron.training.optim.factor_group_settings`: their
    ``max_lr`` / ``min_lr`` and ``wd_mult``), matched by identity, so that the rebuild after a
    resize finds the new factors.

    Args:
        cfg: the run's TrainConfig.
        model: the module whose parameters the optimizer gets.
        config: megatron's ``OptimizerConfig``.
    """
    from megatron.core.optimizer import ParamKey, ParamPredicate, get_standard_config_overrides

    factors = {id(p) for p in factor_params(model)}
    overrides = get_standard_config_overrides(config)
    overrides[
        ParamKey(predicate=ParamPredicate(name=FACTOR_GROUP, fn=lambda p: id(p) in factors))
    ] = factor_group_settings(cfg)
    return overrides


class MegatronBackend(Backend):
    """Args: cfg (TrainConfig), model (megatron GPTModel on this rank), groups (ParallelGroups)."""

    name = "megatron"

    def __init__(self, cfg, model, groups):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "parallel.backend=megatron needs CUDA (megatron-core's optimizers "
                "allocate on 'cuda'); use parallel.backend=torch on CPU"
            )
        super().__init__(cfg, model, groups)
        self.device = torch.device("cuda", torch.cuda.current_device())
        model.cuda(self.device)  # use_cpu_initialization leaves the weights on the CPU
        t = cfg.train
        self.distributed = use_distributed_optimizer(cfg)
        self.amp_dtype = AMP_DTYPES.get(t.precision)
        self._build()
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scheduler.step(0)  # set the step-0 learning rate in the groups
        self._step = 0  # Adam steps taken (torch.optim.AdamW keeps it per parameter)

    def _build(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t = self.cfg.train
        # No overlap: gradients are reduced once, in finalize_model_grads after the last
        # micro-batch, like torch DDP's reduce at the last backward.
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            overlap_param_gather=False,
            use_distributed_optimizer=self.distributed,
        )
        self.ddp = DistributedDataParallel(self.model.config, ddp_config, self.model)
        config = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad if t.clip_grad > 0 else 0.0,
            bf16=t.precision == "bf16",
            fp16=t.precision == "fp16",
            initial_loss_scale=t.initial_loss_scale if t.precision == "fp16" else 2**32,
            use_distributed_optimizer=self.distributed,
        )
        self.optimizer = get_megatron_optimizer(
            config, [self.ddp], config_overrides=config_overrides(self.cfg, self.model, config)
        )
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _optimizers(self):
        """The per-buffer megatron optimizers (``get_megatron_optimizer`` may chain several)."""
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    # ---- one optimizer step -----------------------------------------------------------------

    def _batch(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def forward_backward(self, batch: dict, num_microbatches: int, *, last: bool) -> torch.Tensor:
        # Without overlap megatron's DDP only accumulates into main_grad here; the reduce waits
        # for finalize_model_grads in step(), so no no_sync() is needed.
        with self._autocast():
            loss = self.loss(self.ddp, self._batch(batch))
        scaled = loss / num_microbatches
        penalty = self.frobenius_penalty() if last else None
        if penalty is not None:
            scaled = scaled + penalty
        scale = self.optimizer.get_loss_scale()  # 1 unless fp16
        (scaled * scale).backward()
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        self.model.eval()
        try:
            with self._autocast():
                return self.loss(self.model, self._batch(batch))
        finally:
            self.model.train()

    def step(self) -> dict:
        from megatron.core.distributed import finalize_model_grads

        # DP reduce of the grad buffers (averaged: megatron scales by 1/DP), plus the TP
        # all-reduce of sequence-parallel parameters' grads.
        finalize_model_grads([self.ddp])
        ok, norm, _ = self.optimizer.step()  # unscale, TP-aware clip, AdamW; skipped on inf
        if ok:
            self._step += 1
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.scheduler.step(1)
        scale = self.optimizer.get_loss_scale()
        return {
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "lr": self.lr(),
            "loss_scale": scale.item() if self.cfg.train.precision == "fp16" else None,
        }

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- per-parameter Adam state, whatever the sharding --------------------------------------

    def _local_shard(self, param):
        """``(optimizer, range)`` of this DP rank's shard of ``param`` under the distributed
        optimizer, or None when this rank holds none of it: megatron-core lists a parameter in
        ``model_param_group_index_map`` only on the ranks whose slice of the grad buffer overlaps it
        (``DistributedOptimizer._build_model_gbuf_param_range_map``), so at DP >= 2 most parameters
        are known to one rank or two."""
        for opt in self._optimizers():
            if param in opt.model_param_group_index_map:
                return opt, opt._get_model_param_range_map(param)["param"]
        return None

    def _full_state(self, param) -> dict:
        """Full (DP-unsharded) ``exp_avg``/``exp_avg_sq`` of ``param`` and its Adam ``step``;
        empty when no rank holds Adam state for it yet (before its first step).

        Collective with the distributed optimizer: every DP rank makes the same one
        ``all_reduce`` for every parameter, whatever it holds (zeros where it holds nothing, no
        state yet included), so the ranks never disagree on how many collectives a resize makes.
        """
        if not self.distributed:
            return self._replicated_state(param)
        n = param.numel()
        # [exp_avg | exp_avg_sq | step | 1]: each element of a moment lives on exactly one rank, so
        # the sum over DP assembles it; the last two sum the steps of the ranks holding state and
        # count them. The step is a float32 here: exact up to 2**24 steps.
        packed = torch.zeros(2 * n + 2, dtype=torch.float32, device=self.device)
        shard = self._local_shard(param)
        if shard is not None:
            opt, prange = shard
            local = opt._get_main_param_and_optimizer_states(param)
            if "exp_avg" in local:
                for i, key in enumerate(MOMENTS):
                    packed[i * n + prange.start : i * n + prange.end] = (
                        local[key].detach().float().view(-1)
                    )
                packed[2 * n] = float(local.get("step", self._step))
                packed[2 * n + 1] = 1.0
        torch.distributed.all_reduce(packed, group=self.groups.dp_group)
        holders = float(packed[2 * n + 1])
        if not holders:
            return {}
        return {
            "exp_avg": packed[:n].view(param.shape),
            "exp_avg_sq": packed[n : 2 * n].view(param.shape),
            "step": float(packed[2 * n]) / holders,
        }

    def _replicated_state(self, param) -> dict:
        """:meth:`_full_state` without the distributed optimizer: every DP rank holds it all."""
        for opt in self._optimizers():
            inner = opt.optimizer
            for group in inner.param_groups:
                for main in group["params"]:
                    if main is param:  # fp32 model parameters are their own main parameters
                        state = inner.state.get(main, {})
                        out = {k: state[k].detach().clone() for k in MOMENTS if k in state}
                        if out and "step" in state:
                            out["step"] = float(state["step"])
                        return out
        return {}

    def _set_full_state(self, param, state: dict, step: float) -> None:
        """Write full moments (and the step count) for ``param`` into the fresh optimizer: this
        rank's slice of them with the distributed optimizer (no collective)."""
        if self.distributed:
            shard = self._local_shard(param)
            if shard is None:
                return
            opt, prange = shard
            gi, go = opt.model_param_group_index_map[param]
            main = opt.optimizer.param_groups[gi]["params"][go]
            opt.optimizer.state[main] = {
                "step": torch.tensor(float(step)),
                **{
                    k: v.reshape(-1)[prange.start : prange.end].to(main.dtype).clone()
                    for k, v in state.items()
                },
            }
            return
        for opt in self._optimizers():
            for group in opt.optimizer.param_groups:
                for main in group["params"]:
                    if main is param:
                        opt.optimizer.state[main] = {
                            "step": torch.tensor(float(step)),
                            **{k: v.to(main.dtype) for k, v in state.items()},
                        }
                        return

    # ---- backend-neutral state and resize (Backend.resize) --------------------------------------

    def export_state(self, named=None):
        """Read now (collective), one full copy of the moments: megatron's buffers do not outlive
        :meth:`_rebuild`."""
        items = []
        for name, p in named if named is not None else self._trainable():
            state = self._full_state(p)
            step = state.pop("step", float(self._step)) if state else float(self._step)
            moments = {
                k: state[k] if k in state else torch.zeros(p.shape, device=p.device)
                for k in MOMENTS
            }
            # The model is fp32 (bf16/fp16 run under autocast): the parameters are the masters.
            items.append((name, p.detach(), moments, step))
        return iter(items)

    @torch.no_grad()
    def import_state(self, items) -> None:
        params = dict(self._trainable())
        for name, master, moments, step in items:
            p = params.pop(name)
            p.copy_(master.reshape(p.shape))
            self._set_full_state(p, {k: v.reshape(p.shape) for k, v in moments.items()}, step)
        if params:
            raise RuntimeError(f"import_state: no state given for {sorted(params)[:3]}")

    def _rebuild(self, resizes) -> None:
        """Rebuild megatron's DDP (its flat buffers hold the parameters) and optimizer around the
        resized module; the LR schedule and the step count continue."""
        # Drop the old wrapper before the new one hooks the same parameters: its backward hooks
        # (registered on the parameters' grad accumulators) stay alive as long as it does.
        self.ddp.param_to_bucket_group = {}
        del self.ddp, self.optimizer
        gc.collect()
        self._build()
        self.scheduler.optimizer = self.optimizer
        self.scheduler.step(0)  # the current lr and weight decay into the new groups

    # ---- checkpoints --------------------------------------------------------------------------

    def _sharded_state(self, model_sd, *, is_loading: bool):
        return self.optimizer.sharded_state_dict(
            model_sd,
            is_loading=is_loading,
            **({"metadata": _DIST_OPT_METADATA} if self.distributed else {}),
        )

    def save(self, path: str) -> None:
        """Model and megatron optimizer state as one megatron dist checkpoint (``model/``), the
        torch backend's layout; scheduler and step count in ``train.pt``."""
        from megatron.core import dist_checkpointing

        model_dir = os.path.join(path, "model")
        if self.groups.rank == 0:
            os.makedirs(model_dir, exist_ok=True)
        torch.distributed.barrier()
        model_sd = self.model.sharded_state_dict()
        dist_checkpointing.save(
            {"model": model_sd, "optimizer": self._sharded_state(model_sd, is_loading=False)},
            model_dir,
        )
        if self.groups.rank == 0:
            file = os.path.join(path, "train.pt")
            torch.save(
                {"scheduler": self.scheduler.state_dict(), "adam_step": self._step}, file + ".part"
            )
            os.replace(file + ".part", file)

    def load(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        model_sd = self.model.sharded_state_dict()
        with torch.no_grad():
            state = dist_checkpointing.load(
                {"model": model_sd, "optimizer": self._sharded_state(model_sd, is_loading=True)},
                os.path.join(path, "model"),
            )
            self.model.load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        # The grad/param buffers hold the parameters' storage, so the load above went into them;
        # the distributed optimizer's fp32 shards are views of fp32 parameters as well.
        train = torch.load(os.path.join(path, "train.pt"), weights_only=True)
        self.scheduler.load_state_dict(train["scheduler"])
        self.scheduler.step(0)  # the restored step's lr and weight decay into the param groups
        self._step = int(train["adam_step"])
