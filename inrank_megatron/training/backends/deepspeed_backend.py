"""The DeepSpeed backend: ZeRO stage 0-3 around megatron.core's GPTModel, torch AdamW inside
DeepSpeed's optimizer, megatron's LR scheduler, and InRank resizes that carry the optimizer state.

    torchrun --nproc_per_node 2 -m inrank_megatron.train --config configs/tiny-cpu.yaml \\
        parallel.backend=deepspeed parallel.tensor_model_parallel_size=1 \\
        parallel.deepspeed_config=configs/deepspeed/zero2.json

What comes from where:

- The DeepSpeed JSON holds ZeRO settings only; batch sizes, ``gradient_clipping`` and bf16/fp16
  are written into it from the YAML (:func:`inrank_megatron.deepspeed_json.deepspeed_config`); a
  JSON that sets them otherwise is refused (:func:`~inrank_megatron.deepspeed_json.
  check_deepspeed_config`).
- ``torch.optim.AdamW`` over the param groups of every backend (``training.optim.param_groups``):
  dense matrices (decayed), 1-D parameters (not decayed) and the InRank factors in a group of
  their own (``inrank.lr_multiplier``, ``inrank.frobenius_decay``), which ZeRO also needs because
  it keeps one Adam ``step`` per group (a ``reset`` cut restarts the factors' step: core
  ``resize_state``). megatron's ``OptimizerParamScheduler`` sets the groups' lr and weight decay
  once per optimizer step, as in the torch backend.
- ``mpu=`` is :class:`~inrank_megatron.training.backends.deepspeed_compat.MegatronMPU`, so that
  ZeRO partitions over megatron's data-parallel group and counts TP shards once in the norm.

A resize (the stage cut, cumulative capacity growth) is ``Backend.resize``: this rank's pieces of
the old optimizer state are kept (no copy), the engine is rebuilt around the module with the new
factors (:meth:`DeepSpeedBackend._rebuild`), and every parameter's fp32 master, Adam moments and
step move over by name, one parameter at a time, through the resize policy
(:func:`inrank_megatron.core.resize_state`). Every DeepSpeed workaround lives in
:mod:`~inrank_megatron.training.backends.deepspeed_compat`.
"""

from __future__ import annotations

import copy
import gc
import logging
import os

import torch

from inrank_megatron.checkpoint.deepspeed import TAG, check_deepspeed_checkpoint
from inrank_megatron.checkpoint.meta import write_deepspeed_meta
from inrank_megatron.core.resize import MOMENTS
from inrank_megatron.deepspeed_json import deepspeed_config
from inrank_megatron.training.backends import deepspeed_compat as compat
from inrank_megatron.training.backends.base import Backend
from inrank_megatron.training.optim import (
    build_scheduler,
    factor_params,
    global_grad_norm,
    param_groups,
)


# ---------------------------------------------------------------------------------- the backend
class DeepSpeedBackend(Backend):
    """Args: cfg (TrainConfig), model (megatron GPTModel on this rank), groups (ParallelGroups)."""

    name = "deepspeed"

    def __init__(self, cfg, model, groups):
        super().__init__(cfg, model, groups)
        compat.skip_shm_op_build()
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.ds_config = deepspeed_config(cfg, groups.world_size)
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.mpu = compat.MegatronMPU()
        self._megatron_attributes = compat.parameter_attributes(model)
        self.engine = self._build_engine()
        self.scheduler = build_scheduler(cfg, self.engine.optimizer)
        self.scheduler.step(0)  # set the step-0 learning rate in the groups

    # ---- engine -------------------------------------------------------------------------------

    def _build_engine(self):
        import deepspeed

        t = self.cfg.train
        optimizer = torch.optim.AdamW(
            param_groups(self.model, self.cfg),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        engine, _, _, _ = deepspeed.initialize(
            model=self.model,
            optimizer=optimizer,
            config=copy.deepcopy(self.ds_config),
            mpu=self.mpu,
        )
        self.layout = compat.optimizer_layout(engine)
        self.layout.keep_full(factor_params(self.model))
        self._state_linked = False
        return engine

    # ---- one optimizer step -----------------------------------------------------------------

    def forward_backward(self, batch: dict, num_microbatches: int, *, last: bool) -> torch.Tensor:
        """DeepSpeed's protocol per micro-batch: forward, ``engine.backward`` (which divides by
        ``gradient_accumulation_steps``, as the torch backend divides by ``num_microbatches``),
        ``engine.step`` (a no-op before the accumulation boundary). The boundary's step is
        :meth:`step`'s."""
        engine = self.engine
        gas = engine.gradient_accumulation_steps()
        if num_microbatches != gas:
            raise ValueError(
                f"{num_microbatches} micro-batches per step, but the DeepSpeed config "
                f"has gradient_accumulation_steps={gas}"
            )
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary != last:
            raise RuntimeError(
                "DeepSpeed's micro-step counter is out of step with the loop "
                f"(boundary={boundary}, last={last})"
            )
        loss = self.loss(engine, batch)
        penalty = self.frobenius_penalty() if last else None
        # engine.backward divides by gradient_accumulation_steps (= num_microbatches).
        engine.backward(loss if penalty is None else loss + num_microbatches * penalty)
        if not last:
            engine.step()
        return loss.detach()

    def step(self) -> dict:
        engine = self.engine
        if self.groups.tp_size > 1 and self.cfg.parallel.sequence_parallel:
            partial = [p for p in self.model.parameters() if getattr(p, "sequence_parallel", False)]
            self.layout.allreduce_partitioned_sequence_parallel_grads(partial, self.groups.tp_group)
        norm = None
        if isinstance(self.layout, compat.TorchLayout):
            # Stage 0 in fp32 clips inside engine.step (deepspeed.runtime.utils.clip_grad_norm_)
            # without keeping the norm; the gradients are already averaged over DP here.
            params = [p for g in engine.optimizer.param_groups for p in g["params"]]
            norm = global_grad_norm(
                params, tp_group=self.groups.tp_group, tp_rank=self.groups.tp_rank
            )
        engine.step()
        if not self._state_linked:
            self.layout.relink()
            self._state_linked = True
        self.scheduler.step(1)
        if norm is None:
            norm = engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        scale = engine._get_optimizer_loss_scale() if self.cfg.train.precision == "fp16" else None
        return {"grad_norm": norm, "lr": self.lr(), "loss_scale": scale}

    def lr(self) -> float:
        return self.engine.optimizer.param_groups[0]["lr"]

    # ---- resize ------------------------------------------------------------------------------

    def _rebuild(self, resizes) -> None:
        """Destroy the engine and build a new one around the resized factors (``Backend.resize``
        moves every parameter's fp32 master and Adam moments to it by name, through
        :func:`inrank_megatron.core.resize_state` for the resized factors, bit for bit for the
        rest). Engine counters (``global_steps``, ``global_samples``, micro-steps) and megatron's
        scheduler continue.

        Memory: :meth:`export_state`'s references keep this rank's old partitions alive until the
        move is done (no copy), the new engine allocates its own, and at most one parameter's full
        master and moments are materialised at a time (``tools/bench_resize.py`` measures the
        peak).
        """
        compat.strip_deepspeed_attributes(
            [new for e in resizes for _, _, new in e.pairs()], self._megatron_attributes
        )
        counters = compat.engine_counters(self.engine)
        self.engine.destroy()
        self.engine = self.layout = None
        gc.collect()
        self.engine = self._build_engine()
        compat.set_engine_counters(self.engine, counters)
        self.scheduler.optimizer = self.engine.optimizer
        self.scheduler.step(0)  # the current lr and weight decay into the new groups

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """DeepSpeed's checkpoint under ``path/deepspeed/`` (module, ZeRO partitions, our LR
        scheduler as client state) and ``path/inrank_deepspeed.json`` (shapes, TP layout)."""
        self.engine.save_checkpoint(
            path,
            tag=TAG,
            save_latest=False,
            client_state={
                "inrank_scheduler": self.scheduler.state_dict(),
                "inrank_adam_steps": [float(s) for s in self.layout.group_steps()],
            },
        )
        if self.groups.rank == 0:
            meta = {
                "zero_stage": self.stage,
                "tp": self.groups.tp_size,
                "dp": self.groups.dp_size,
                "precision": self.cfg.train.precision,
                "params": {},
            }
            for name, p in self.model.named_parameters():
                shape = getattr(p, "ds_shape", p.shape)
                meta["params"][name] = {
                    "shape": list(shape),
                    "tensor_model_parallel": bool(getattr(p, "tensor_model_parallel", False)),
                    "partition_dim": int(getattr(p, "partition_dim", -1)),
                }
            write_deepspeed_meta(path, meta)
        torch.distributed.barrier()

    def load(self, path: str) -> None:
        check_deepspeed_checkpoint(path)
        load_path, client = self.engine.load_checkpoint(
            path,
            tag=TAG,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise FileNotFoundError(
                f"{os.path.join(path, TAG)}: no DeepSpeed checkpoint (written by another backend?)"
            )
        # ZeRO-3 restores one Adam step for every group; the factor group's may differ.
        self.layout.set_group_steps(client["inrank_adam_steps"])
        self.layout.relink()
        self._state_linked = True
        self.layout.refresh_model_params()
        self.scheduler.load_state_dict(client["inrank_scheduler"])

    # ---- backend-neutral state ---------------------------------------------------------------

    def export_state(self, named=None):
        named = named if named is not None else self._trainable()
        state = compat.LocalState(self.layout, named)  # this rank's pieces, referenced now

        def items():
            for name, _ in named:
                step = float(state.group_steps[state.pieces[name].param_group])
                yield name, state.full(name), {k: state.full(name, k) for k in MOMENTS}, step

        return items()

    def import_state(self, items) -> None:
        """Zeroed state is created first, then each item's master and moments are written to this
        rank's partitions. ZeRO keeps one Adam step per param group: the items of one group
        must agree (a ValueError names the parameter otherwise)."""
        groups = param_groups(self.model, self.cfg)
        group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        steps = [None] * len(groups)
        self.layout.create_zeroed_state([torch.tensor(0.0)] * len(groups))
        params = dict(self._trainable())
        for name, master, moments, step in items:
            p = params.pop(name)
            gi = group_of[id(p)]
            if steps[gi] is None:
                steps[gi] = float(step)
            elif steps[gi] != float(step):
                raise ValueError(
                    f"parameter {name} has Adam step {step:g}, other parameters of "
                    f"its DeepSpeed param group {groups[gi]['name']!r} have "
                    f"{steps[gi]:g}; ZeRO keeps one step per group"
                )
            self.layout.write_local(p, master)
            for k in MOMENTS:
                self.layout.write_local(p, moments[k], k)
        if params:
            raise RuntimeError(f"import_state: no state given for {sorted(params)[:3]}")
        self.layout.set_group_steps([s or 0.0 for s in steps])
        self.layout.relink()
        self._state_linked = True
        self.layout.refresh_model_params()
