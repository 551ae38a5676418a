"""InRank settings (spec section 5 defaults) shared by every InRank layer of a model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from inrank_megatron.core.names import MODES, RULES
from inrank_megatron.core.rank_rule import check_rank_settings
from inrank_megatron.core.validation import check_int



@dataclass
class InRankConfig:
    """Settings of InRank layers. Counters are optimizer steps, never forward calls.

    Attributes:
        mode: ``"efficient"`` (``W = B A``, the published results) or ``"cumulative"``
            (``W = W0 + B A``, W0 frozen at an orthogonal init).
        rank: initial rank ``r0``.
        buffer: buffer ``b`` of extra active slots during growth.
        max_rank: rank cap; ``None`` means ``min(in, out) // 2`` per layer (the reference).
        threshold: ``alpha`` of the rank rule, in (0, 1).
        warmup: optimizer steps before the first rank check.
        gap: optimizer steps between checks.
        stage1_steps: efficient mode: optimizer steps of stage 1 before the cut to fixed rank;
            ``None`` never cuts. Cumulative mode grows for the whole run and must leave it ``None``.
        rule: ``"variance"`` (the spec) or ``"energy"`` (opt-in).
        init_scale: multiplier on the kaiming-uniform init of the factors (and on W0's gain).
        spectrum_dtype: ``torch.float32`` (reference) or ``torch.float64``.
    """

    mode: str = "efficient"
    rank: int = 2
    buffer: int = 100
    max_rank: Optional[int] = None
    threshold: float = 0.9
    warmup: int = 25
    gap: int = 3
    stage1_steps: Optional[int] = 130
    rule: str = "variance"
    init_scale: float = 1.0
    spectrum_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"inrank mode must be one of {MODES}, got {self.mode!r}")
        if self.rule not in RULES:
            raise ValueError(f"inrank rule must be one of {RULES}, got {self.rule!r}")
        check_int(self.warmup, "warmup", low=0)
        check_int(self.gap, "gap", low=1)
        if self.stage1_steps is not None:
            check_int(self.stage1_steps, "stage1_steps", low=1)
            if self.mode == "cumulative":
                raise ValueError("stage1_steps must be None in cumulative mode (it grows for the "
                                 f"whole run; the cut is an efficient-mode stage), got {self.stage1_steps}")
        if self.spectrum_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"spectrum_dtype must be torch.float32 or torch.float64, "
                             f"got {self.spectrum_dtype}")
        if not float(self.init_scale) > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale!r}")

    def layer_max_rank(self, in_features: int, out_features: int) -> int:
        """The rank cap of a layer of this shape."""
        return self.max_rank if self.max_rank is not None else min(in_features, out_features) // 2

    def check_layer(self, in_features: int, out_features: int, *, layer: str | None = None) -> int:
        """Validate these settings for a layer of this (full, unsharded) shape; return its max_rank.

        The active slots ``rank + buffer`` must fit under ``max_rank <= min(in, out)``.
        """
        n = min(in_features, out_features)
        max_rank = self.layer_max_rank(in_features, out_features)
        where = f"layer {layer}: " if layer else ""
        if max_rank > n:
            raise ValueError(f"{where}max_rank={max_rank} exceeds min(in, out)={n} "
                             f"for a {in_features} -> {out_features} layer")
        check_rank_settings(self.rank, self.buffer, max_rank, self.threshold, layer=layer)
        if self.rank + self.buffer > max_rank:
            raise ValueError(f"{where}rank + buffer = {self.rank} + {self.buffer} exceeds max_rank="
                             f"{max_rank} (min(in, out) // 2 for a {in_features} -> {out_features} "
                             "layer unless set): lower inrank.buffer/inrank.rank or raise max_rank")
        return max_rank

    def replace(self, **changes) -> "InRankConfig":
        return dataclasses.replace(self, **changes)
