"""The plain-PyTorch backend: torch DDP over the data-parallel group, torch AdamW, megatron's LR
scheduler, autocast (bf16/fp16 with a GradScaler) over fp32 master weights.

Resizes (the stage cut, cumulative capacity growth) replace factor parameters: ``Backend.resize``
moves AdamW's state to the new parameters under the configured policy
(:func:`inrank_megatron.core.resize_state`), and DDP is re-wrapped around the same module.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from inrank_megatron.core.resize import MOMENTS
from inrank_megatron.layers.base import named_inrank_layers
from inrank_megatron.tensor_parallel.layers import allreduce_sequence_parallel_grads
from inrank_megatron.training.backends.base import Backend
from inrank_megatron.training.optim import (
    AMP_DTYPES,
    SlotAdamW,
    build_scheduler,
    clip_gradients,
    param_groups,
)


class TorchBackend(Backend):
    """Args: cfg (TrainConfig), model (megatron GPTModel on this rank), groups (ParallelGroups)."""

    name = "torch"

    def __init__(self, cfg, model, groups):
        super().__init__(cfg, model, groups)
        t = cfg.train
        # On a GPU the model trains there (use_cpu_initialization builds it on the CPU).
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        )
        if self.device is not None:
            model.cuda(self.device)
        # AdamW, skipping the moment arithmetic of stage 1's unused factor slots (bit-identical).
        self.optimizer = SlotAdamW(
            param_groups(model, cfg),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
            slot_layers=[layer for _, layer in named_inrank_layers(model)],
        )
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scheduler.step(0)  # set the step-0 learning rate in the groups
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.amp_dtype = AMP_DTYPES.get(t.precision)
        self.scaler = (
            torch.amp.GradScaler(self.device_type, init_scale=t.initial_loss_scale)
            if t.precision == "fp16"
            else None
        )
        self._wrap()

    def _wrap(self):
        # With pipeline stages, 1F1B interleaves micro-batches, which DDP's hooks cannot follow:
        # step() averages the gradients over data parallelism itself.
        if self.groups.dp_size > 1 and self.groups.pp_size == 1:
            self.ddp = DistributedDataParallel(
                self.model, process_group=self.groups.dp_group, broadcast_buffers=False
            )
        else:
            self.ddp = self.model

    # ---- one optimizer step -----------------------------------------------------------------

    def to_device(self, batch: dict) -> dict:
        """The micro-batch on the model's device (the data loader yields CPU tensors)."""
        if self.device is None:
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch: dict) -> torch.Tensor:
        """The micro-batch's loss under autocast (bf16/fp16), graph kept for :meth:`backward`."""
        with self._autocast():
            return self.loss(self.ddp, self.to_device(batch))

    def backward(self, loss: torch.Tensor, num_microbatches: int, penalty=None) -> None:
        """Accumulate the gradient of ``loss / num_microbatches + penalty`` (scaled under fp16)."""
        scaled = loss / num_microbatches
        if penalty is not None:
            scaled = scaled + penalty
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()

    def forward_backward(self, batch: dict, num_microbatches: int, *, last: bool) -> torch.Tensor:
        sync = contextlib.nullcontext() if last or self.ddp is self.model else self.ddp.no_sync()
        with sync:
            loss = self.forward(batch)
            self.backward(loss, num_microbatches, self.frobenius_penalty() if last else None)
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        return super().eval_loss(self.to_device(batch))

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def _reduce_pipeline_grads(self) -> None:
        """Pipeline parallelism: average gradients over data parallelism (one flat buffer), then
        sum the tied word embedding's gradient over its two copies (first and last stage), as
        megatron's ``finalize_model_grads``."""
        from megatron.core import parallel_state

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.groups.dp_size > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat, group=self.groups.dp_group)
            flat /= self.groups.dp_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        if (
            self.model.share_embeddings_and_output_weights
            and parallel_state.is_rank_in_embedding_group(ignore_virtual=True)
        ):
            weight = self.model.shared_embedding_or_output_weight()
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            torch.distributed.all_reduce(weight.grad, group=parallel_state.get_embedding_group())

    def step(self) -> dict:
        allreduce_sequence_parallel_grads(self.model, self.groups.tp_group)
        if self.groups.pp_size > 1:
            self._reduce_pipeline_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = clip_gradients(
            params,
            self.cfg.train.clip_grad,
            tp_group=self.groups.tp_group,
            tp_rank=self.groups.tp_rank,
            pp_group=self.groups.pp_group,
        )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step on inf/nan gradients
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step(1)
        return {
            "grad_norm": norm,
            "lr": self.lr(),
            "loss_scale": self.scaler.get_scale() if self.scaler is not None else None,
        }

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- resize ----------------------------------------------------------------------------

    def _rebuild(self, resizes) -> None:
        """Put each resized factor in its replacement's place in AdamW's groups (its state goes:
        :meth:`import_state` gives the new one), then re-wrap DDP."""
        index = {
            id(p): (gi, pi)
            for gi, g in enumerate(self.optimizer.param_groups)
            for pi, p in enumerate(g["params"])
        }
        for event in resizes:
            for _, old, new in event.pairs():
                gi, pi = index.pop(id(old))
                self.optimizer.param_groups[gi]["params"][pi] = new
                self.optimizer.state.pop(old, None)
        self._wrap()

    # ---- checkpoints --------------------------------------------------------------------------

    def _init_state(self) -> None:
        """Give every parameter (zero) AdamW state, so a sharded load has tensors to fill."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p not in self.optimizer.state or not self.optimizer.state[p]:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }

    def _steps_by_name(self) -> dict:
        """AdamW's step count of every trainable parameter, by name (after ``_init_state``)."""
        return {
            name: float(self.optimizer.state[p]["step"])
            for name, p in self.model.named_parameters()
            if p.requires_grad
        }

    @staticmethod
    def _common_step(steps: dict) -> float:
        """The step most parameters share (all of them, unless the state came from a DeepSpeed
        run whose ``reset`` cut restarted the factor group's step)."""
        values = list(steps.values())
        return max(set(values), key=values.count) if values else 0.0

    def _sharded_state(self, model_sd, common_step: float):
        """AdamW moments as ShardedTensors sharded like their parameters (megatron's recipe for
        torch optimizers), so the checkpoint loads at any TP/DP layout; the step is stored once
        (``common_step``; parameters that differ are listed by name in ``train.pt``)."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        state = self.optimizer.state_dict()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        optim_state_to_sharding_state(
            state, get_param_id_to_sharded_param_map(model_sd, params), exclude_keys=("step",)
        )
        state["state"]["common_step"] = common_step
        return state

    def save(self, path: str, *, async_save: bool = False):
        """Model and AdamW state as one megatron dist checkpoint (``model/``), reshardable to any
        TP/DP layout, written now or (``async_save``) by the returned request; scheduler and
        loss-scaler state (the same on every rank) in ``train.pt``."""
        from megatron.core import dist_checkpointing

        model_dir = os.path.join(path, "model")
        if self.groups.rank == 0:
            os.makedirs(model_dir, exist_ok=True)
        torch.distributed.barrier()
        self._init_state()
        steps = self._steps_by_name()
        common = self._common_step(steps)
        model_sd = self.model.sharded_state_dict()
        request = dist_checkpointing.save(
            {"model": model_sd, "optimizer": self._sharded_state(model_sd, common)},
            model_dir,
            async_sharded_save=async_save,
        )
        if self.groups.rank == 0:
            file = os.path.join(path, "train.pt")
            torch.save(
                {
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "adam_steps": {n: s for n, s in steps.items() if s != common},
                },
                file + ".part",
            )
            os.replace(file + ".part", file)
        return request

    def load(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        self._init_state()
        model_sd = self.model.sharded_state_dict()
        with torch.no_grad():
            state = dist_checkpointing.load(
                {"model": model_sd, "optimizer": self._sharded_state(model_sd, 0.0)},
                os.path.join(path, "model"),
            )
        self.model.load_state_dict(state["model"], strict=True)
        train = torch.load(os.path.join(path, "train.pt"), weights_only=True)
        optim = state["optimizer"]
        step = optim["state"].pop("common_step")
        for s in optim["state"].values():
            s["step"] = torch.tensor(float(step))
        optim["param_groups"] = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict(optim)
        params = dict(self.model.named_parameters())
        for name, own in train.get("adam_steps", {}).items():
            self.optimizer.state[params[name]]["step"] = torch.tensor(float(own))
        self.scheduler.load_state_dict(train["scheduler"])
        self.scheduler.step(0)  # the restored step's lr and weight decay into the param groups
        if self.scaler is not None and train.get("scaler"):
            self.scaler.load_state_dict(train["scaler"])

    # ---- backend-neutral state ---------------------------------------------------------------

    def export_state(self, named=None):
        self._init_state()
        items = []
        for name, p in named if named is not None else self._trainable():
            state = self.optimizer.state[p]  # references: nothing is copied
            # The parameters are the masters (fp32 in training; autocast computes in bf16/fp16).
            items.append((name, p.detach(), {k: state[k] for k in MOMENTS}, float(state["step"])))
        return iter(items)

    @torch.no_grad()
    def import_state(self, items) -> None:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        for name, master, moments, step in items:
            p = params.pop(name)
            p.copy_(master.reshape(p.shape))
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                **{k: v.detach().to(p.dtype).reshape(p.shape).clone() for k, v in moments.items()},
            }
        if params:
            raise RuntimeError(f"import_state: no state given for {sorted(params)[:3]}")
