"""Distributed rank growth: once per optimizer step, run the due rank checks on sharded factors,
apply the core rule once per layer, make every rank agree, and cut to stage 2 when it is time.

Each layer's spectrum comes from its shards by TSQR over its TP group (``k x k`` matrices move,
never a factor and never the ``in x out`` product); every rank then applies
:func:`inrank_megatron.core.select_rank` to a bit-identical spectrum. The decisions are checked
with a collective over the ranks that hold the same layers (TP x DP): a mismatch raises, naming the
layer. Reallocations (the cut; cumulative-mode capacity growth) come back as
:class:`inrank_megatron.core.FactorResize` events in the report: the optimizer backend moves its
state with them (training loop's job).

    controller = GrowthController(model, stage1_steps=cfg.stage1_steps)
    for step in range(1, steps + 1):
        ...; optimizer.step()
        report = controller.step(step)
        if report.resizes:
            backend.resize(report.resizes)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from inrank_megatron.core.rank_rule import explained_ratios
from inrank_megatron.core.resize import FactorResize
from inrank_megatron.layers.base import named_inrank_layers


@dataclass
class LayerCheck:
    """One layer's rank check."""

    layer: str
    old_rank: int
    new_rank: int
    explained_ratio: float  # g(s, new_rank)
    top_singular_values: list


@dataclass
class GrowthReport:
    """What one call of :meth:`GrowthController.step` did."""

    step: int
    checks: list = field(default_factory=list)
    resizes: list = field(default_factory=list)
    cut: bool = False

    @property
    def changed(self) -> list:
        return [c for c in self.checks if c.new_rank != c.old_rank]


class GrowthController:
    """Runs InRank's schedule over a model's InRank layers.

    Args:
        model: the model, or a list of model chunks (virtual pipeline), on this rank.
        stage1_steps: efficient mode: the optimizer step after which stage 1 ends and the factors
            are cut to their learned ranks; ``None`` never cuts.
        agree_group: process group whose ranks hold the same layers (TP x DP of this pipeline
            stage); decisions are verified over it. ``None``: megatron's tensor-and-data-parallel
            group when initialised, else no check.
        top_k: singular values reported per check.
    """

    def __init__(
        self, model, *, stage1_steps: Optional[int] = None, agree_group=None, top_k: int = 5
    ):
        self.layers = named_inrank_layers(model)
        for name, layer in self.layers:
            layer.growth.layer = name
        self.stage1_steps = stage1_steps
        self.top_k = top_k
        self._agree_group = agree_group
        self._resolved_group = agree_group is not None

    def _group(self):
        if not self._resolved_group:
            self._resolved_group = True
            from megatron.core import parallel_state

            if (
                torch.distributed.is_initialized()
                and parallel_state.model_parallel_is_initialized()
            ):
                self._agree_group = parallel_state.get_tensor_and_data_parallel_group()
        return self._agree_group

    def is_due(self, step: int) -> bool:
        """Whether :meth:`step` would do anything at this step."""
        return self.stage1_steps == step or any(l.growth.is_due(step) for _, l in self.layers)

    def step(self, step: int) -> GrowthReport:
        """Call once after optimizer step ``step`` (1-based count of completed optimizer steps).

        Returns:
            A :class:`GrowthReport`: the checks run, the reallocations made, whether the cut ran.
        """
        report = GrowthReport(step)
        for name, layer in self.layers:
            if not layer.growth.is_due(step):
                continue
            s = layer.spectrum()
            old = layer.growth.rank
            new = layer.growth.observe(step, s)
            resize = layer.set_rank(new)
            if resize is not None:
                report.resizes.append(resize)
            ratio = float(explained_ratios(s, layer.growth.rule)[new])
            report.checks.append(
                LayerCheck(name, old, new, ratio, s[: self.top_k].double().tolist())
            )
        if self.stage1_steps is not None and step == self.stage1_steps:
            # Layers fixed from the start (the fixed-rank baseline) have no stage 1 to end.
            for _, layer in self.layers:
                if layer.growth.stage == "growing":
                    report.resizes.append(layer.cut(step))
                    report.cut = True
        self._verify(report)
        return report

    def _verify(self, report: GrowthReport) -> None:
        """All ranks of the agree group must hold the same rank and allocation for every layer;
        a mismatch raises on every rank, naming the first such layer and each decision with the
        ranks that made it."""
        group = self._group()
        if group is None or torch.distributed.get_world_size(group) == 1 or not self.layers:
            return
        mine = torch.tensor(
            [[l.growth.rank, l.allocated_slots] for _, l in self.layers], dtype=torch.int64
        )  # (layers, 2)
        gathered = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(gathered, mine, group=group)
        every = torch.stack(gathered)  # (group ranks, layers, 2)
        bad = (every != every[:1]).any(dim=2).any(dim=0).nonzero().flatten().tolist()
        if bad:
            layer = bad[0]
            by_decision = {}
            for member, decision in zip(
                torch.distributed.get_process_group_ranks(group), every[:, layer].tolist()
            ):
                by_decision.setdefault(tuple(decision), []).append(member)
            decisions = "; ".join(
                f"rank {r} / {slots} slots on process ranks {members}"
                for (r, slots), members in by_decision.items()
            )
            raise RuntimeError(
                f"InRank growth decisions differ across ranks at step {report.step} for layer "
                f"{self.layers[layer][0]}: {decisions}; the factors have diverged between "
                f"replicas"
            )

    def ranks(self) -> dict:
        """``{layer name: current rank}`` of this rank's layers."""
        return {name: layer.growth.rank for name, layer in self.layers}

    def over_pipeline(self, local):
        """Collective over the pipeline group: the list of ``local`` of every stage (in stage
        order); ``[local]`` without pipeline parallelism."""
        from megatron.core import parallel_state

        if (
            not (
                torch.distributed.is_initialized()
                and parallel_state.model_parallel_is_initialized()
            )
            or parallel_state.get_pipeline_model_parallel_world_size() == 1
        ):
            return [local]
        out = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(
            out, local, group=parallel_state.get_pipeline_model_parallel_group()
        )
        return out

    def all_ranks(self) -> dict:
        """Collective: :meth:`ranks` of every pipeline stage's layers."""
        return {k: v for part in self.over_pipeline(self.ranks()) for k, v in part.items()}

    def all_slots(self) -> dict:
        """Collective: ``{layer name: slots its forward pass uses}`` (rank + buffer in stage 1,
        the rank after the cut) of every pipeline stage's layers."""
        mine = {name: layer.active_slots for name, layer in self.layers}
        return {k: v for part in self.over_pipeline(mine) for k, v in part.items()}

    def full_state_dict(self) -> dict:
        """Collective: :meth:`state_dict` of every pipeline stage's layers."""
        return {k: v for part in self.over_pipeline(self.state_dict()) for k, v in part.items()}

    def state_dict(self) -> dict:
        return {name: layer.inrank_state() for name, layer in self.layers}

    def load_state_dict(self, state: dict) -> None:
        missing = [name for name, _ in self.layers if name not in state]
        if missing:
            raise ValueError(
                f"growth state has no entry for InRank layers {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}"
            )
        for name, layer in self.layers:
            layer.load_inrank_state(state[name])


__all__ = ["FactorResize", "GrowthController", "GrowthReport", "LayerCheck"]
