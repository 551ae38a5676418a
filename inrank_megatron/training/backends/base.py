"""The narrow interface every training backend implements (build, step, resize, save, load).

The training loop (``inrank_megatron.training.loop``) only talks to this interface; plain torch
DDP, megatron's optimizer and DeepSpeed ZeRO differ behind it.
"""

from __future__ import annotations

import torch

from inrank_megatron.core.resize import resize_state
from inrank_megatron.layers.base import frobenius_penalty


class Backend:
    """Base class. Subclasses build their optimizer in ``__init__``.

    Args:
        cfg: the run's TrainConfig.
        model: the megatron GPTModel on this rank (unwrapped).
        groups: :class:`inrank_megatron.training.parallel.ParallelGroups`.
    """

    name = "base"
    scheduler = None  # megatron's OptimizerParamScheduler over this backend's optimizer

    def __init__(self, cfg, model, groups):
        self.cfg = cfg
        self.model = model
        self.groups = groups

    @staticmethod
    def loss(module, batch: dict) -> torch.Tensor:
        """Mean token loss of one micro-batch (``loss_mask`` applied)."""
        losses = module(
            batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
        )  # (b, s)
        mask = batch["loss_mask"].to(losses.dtype)
        return (losses.float() * mask).sum() / mask.sum().clamp_min(1)

    def forward_backward(self, batch: dict, num_microbatches: int, *, last: bool) -> torch.Tensor:
        """Forward and backward one micro-batch; returns its (unscaled) loss. The step's last
        micro-batch also back-propagates :meth:`frobenius_penalty` (once per step)."""
        raise NotImplementedError

    def frobenius_penalty(self):
        """``inrank.frobenius_decay``'s term of the step's objective: ``lambda/2`` times the sum of
        ``||B A||_F^2`` over this rank's InRank layers (:func:`inrank_megatron.layers.base.
        frobenius_penalty`), or None (decay off, or no InRank layer). Added once per optimizer
        step, next to the last micro-batch's ``loss / num_microbatches``, so that its gradient
        goes through the same DP reduction, loss scaling and clipping as the data gradient; the
        logged loss leaves it out."""
        decay = self.cfg.inrank.frobenius_decay if self.cfg.model.inrank else 0.0
        return frobenius_penalty(self.model, decay)

    def step(self) -> dict:
        """Reduce, clip and apply the accumulated gradients; advance the LR schedule.
        Returns ``{"grad_norm", "lr", "loss_scale"}``."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        self.model.eval()
        try:
            return self.loss(self.model, batch)
        finally:
            self.model.train()

    def lr(self) -> float:
        raise NotImplementedError

    def resize(self, resizes, policy: str) -> None:
        """Carry optimizer state across factor reallocations (``FactorResize`` events): the
        module already holds the new factors; the old ones are the events'.

        Written once for every backend: :meth:`export_state` of the parameters as they were (the
        old factors in place of the new), :meth:`_rebuild` around the new ones, then
        :meth:`import_state` with each resized factor's state through
        :func:`inrank_megatron.core.resize_state` (what the policy does to the master, the
        moments and the Adam step) and every other parameter's carried as it is.
        """
        replaced = {}  # id(new param) -> (role, event, old param)
        for event in resizes:
            for role, old, new in event.pairs():
                replaced[id(new)] = (role, event, old)
        named = self._trainable()
        # The layer's new factor values, before a rebuild may partition them (ZeRO-3).
        new_values = {name: p.detach().clone() for name, p in named if id(p) in replaced}
        role_event = {name: replaced[id(p)][:2] for name, p in named if id(p) in replaced}
        exported = self.export_state(
            [(n, replaced[id(p)][2] if id(p) in replaced else p) for n, p in named]
        )
        self._rebuild(resizes)

        def items():
            for name, master, moments, step in exported:
                if name in role_event:
                    role, event = role_event[name]
                    master, moments, step = resize_state(
                        master, moments, step, role, event, new_values.pop(name), policy=policy
                    )
                yield name, master, moments, step

        self.import_state(items())

    def _trainable(self) -> list:
        """``(name, parameter)`` of every trainable parameter, in module order."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _rebuild(self, resizes) -> None:
        """Rebuild what holds the parameters (optimizer, DDP wrapper, engine) around the module's
        new factors, with empty optimizer state for :meth:`import_state` to fill."""
        raise NotImplementedError

    def save(self, path: str, *, async_save: bool = False):
        """Collective: write model and optimizer state under checkpoint directory ``path``.

        Args:
            async_save: return megatron's ``AsyncRequest`` for the model and optimizer files
                instead of writing them (``train.async_save``; only the torch backend takes it).

        Returns:
            None, or the request.
        """
        raise NotImplementedError

    def load(self, path: str) -> None:
        """Collective: read what :meth:`save` wrote (the model already has the checkpoint's factor
        shapes: growth state is restored before the backend is built)."""
        raise NotImplementedError

    # ---- backend-neutral state (tools/convert_checkpoint.py from-deepspeed / to-deepspeed) ----

    def export_state(self, named=None):
        """Collective (every rank, same order): ``(name, master, moments, step)`` for every
        trainable parameter in module order: its fp32 master value (this TP rank's shard, whole
        over data parallelism), AdamW's ``{"exp_avg", "exp_avg_sq"}`` shaped like it (zeros
        before the first step) and its Adam step count (a float).

        Args:
            named: ``(name, parameter)`` to read, default :meth:`_trainable`; a resize passes the
                old factors, which the optimizer still holds.

        Returns:
            An iterator over the items. What it reads is captured when this is called, so that
            the items can be consumed after :meth:`_rebuild` (which drops the old optimizer).
        """
        raise NotImplementedError

    def import_state(self, items) -> None:
        """Collective: take :meth:`export_state`'s items (another backend's, same model and
        layout) as this backend's masters, moments and steps; the module's parameters follow."""
        raise NotImplementedError
