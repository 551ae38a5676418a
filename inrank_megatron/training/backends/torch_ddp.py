"""The plain-PyTorch backend: torch DDP over the data-parallel group, torch AdamW, megatron's LR
scheduler, autocast (bf16/fp16 with a GradScaler) over fp32 master weights.

Resizes (the stage cut, cumulative capacity growth) replace factor parameters: AdamW's state moves
to the new parameters under the configured policy (:func:`inrank_megatron.core.map_slot_state`),
the step counts carry on, and DDP is re-wrapped around the same module.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from inrank_megatron.core.resize import map_slot_state
from inrank_megatron.tensor_parallel.layers import allreduce_sequence_parallel_grads
from inrank_megatron.training.backends.base import Backend
from inrank_megatron.training.optim import build_scheduler, clip_gradients, param_groups

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchBackend(Backend):
    """Args: cfg (TrainConfig), model (megatron GPTModel on this rank), groups (ParallelGroups)."""

    name = "torch"

    def __init__(self, cfg, model, groups):
        super().__init__(cfg, model, groups)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(param_groups(model), lr=t.lr,
                                           betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scheduler.step(0)  # set the step-0 learning rate in the groups
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.amp_dtype = _AMP_DTYPES.get(t.precision)
        self.scaler = torch.amp.GradScaler(self.device_type, init_scale=t.initial_loss_scale) \
            if t.precision == "fp16" else None
        self._wrap()

    def _wrap(self):
        if self.groups.dp_size > 1:
            self.ddp = DistributedDataParallel(self.model, process_group=self.groups.dp_group,
                                               broadcast_buffers=False)
        else:
            self.ddp = self.model

    # ---- one optimizer step -----------------------------------------------------------------

    def forward_backward(self, batch: dict, num_microbatches: int, *, last: bool) -> torch.Tensor:
        sync = contextlib.nullcontext() if last or self.ddp is self.model else self.ddp.no_sync()
        with sync:
            with self._autocast():
                loss = self.loss(self.ddp, batch)
            scaled = loss / num_microbatches
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
        return loss.detach()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def step(self) -> dict:
        allreduce_sequence_parallel_grads(self.model, self.groups.tp_group)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = clip_gradients(params, self.cfg.train.clip_grad, tp_group=self.groups.tp_group,
                              tp_rank=self.groups.tp_rank)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step on inf/nan gradients
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step(1)
        return {"grad_norm": norm, "lr": self.lr(),
                "loss_scale": self.scaler.get_scale() if self.scaler is not None else None}

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- resize ----------------------------------------------------------------------------

    def resize(self, resizes, policy: str) -> None:
        """Move AdamW state from each resized factor to its replacement, then re-wrap DDP."""
        index = {id(p): (gi, pi) for gi, g in enumerate(self.optimizer.param_groups)
                 for pi, p in enumerate(g["params"])}
        for event in resizes:
            for role, old, new in event.pairs():
                gi, pi = index.pop(id(old))
                self.optimizer.param_groups[gi]["params"][pi] = new
                state = self.optimizer.state.pop(old, None)
                if state:
                    self.optimizer.state[new] = {
                        "step": state["step"],
                        "exp_avg": map_slot_state(state["exp_avg"], role, event, policy=policy,
                                                  kind="exp_avg"),
                        "exp_avg_sq": map_slot_state(state["exp_avg_sq"], role, event,
                                                     policy=policy, kind="exp_avg_sq"),
                    }
        self._wrap()

    # ---- checkpoints --------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Model as a megatron dist checkpoint (``model/``, reshardable); optimizer, scheduler and
        loss scaler per rank (``optim/rank_*.pt``)."""
        from megatron.core import dist_checkpointing

        model_dir, optim_dir = os.path.join(path, "model"), os.path.join(path, "optim")
        if self.groups.rank == 0:
            os.makedirs(model_dir, exist_ok=True)
            os.makedirs(optim_dir, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(self.model.sharded_state_dict(), model_dir)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        file = os.path.join(optim_dir, f"rank_{self.groups.rank:05d}.pt")
        torch.save(state, file + ".part")
        os.replace(file + ".part", file)

    def load(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        with torch.no_grad():
            state = dist_checkpointing.load(self.model.sharded_state_dict(),
                                            os.path.join(path, "model"))
        self.model.load_state_dict(state, strict=True)
        file = os.path.join(path, "optim", f"rank_{self.groups.rank:05d}.pt")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} missing: checkpoint {path} was written by another "
                                    "layout or backend")
        state = torch.load(file, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
