"""Per-layer growth state: the current rank, the schedule in optimizer steps, and the stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from inrank_megatron.core.names import RATIO_RULES, STAGES
from inrank_megatron.core.rank_rule import check_rank_settings, select_rank
from inrank_megatron.core.validation import check_int


@dataclass
class GrowthState:
    """Where one InRank layer stands. Counters are optimizer steps (spec section 5: the reference's
    counters advance on every forward call; ours do not).

    A check is due at optimizer step ``t`` (the number of completed optimizer steps) when the stage
    is ``growing``, ``t >= warmup``, ``(t - warmup) % gap == 0`` and ``rank < max_rank - buffer``.

    Attributes:
        rank: current rank ``r``.
        buffer: buffer ``b`` (0 once the stage is ``fixed``).
        max_rank: rank cap.
        threshold: ``alpha``.
        warmup: steps before the first check.
        gap: steps between checks.
        stage: ``"growing"`` or ``"fixed"``.
        step: the optimizer step of the last check (or cut); -1 before any.
        rule: ``"variance"`` or ``"energy"``.
        layer: name used in errors.
    """

    rank: int
    buffer: int
    max_rank: int
    threshold: float
    warmup: int
    gap: int
    stage: str = "growing"
    step: int = -1
    rule: str = "variance"
    layer: str = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        layer = self.layer or None
        check_rank_settings(self.rank, self.buffer, self.max_rank, self.threshold, layer=layer)
        check_int(self.warmup, "warmup", low=0, layer=layer)
        check_int(self.gap, "gap", low=1, layer=layer)
        check_int(self.step, "step", low=-1, layer=layer)
        if self.stage not in STAGES:
            raise ValueError(
                f"layer {self.layer}: stage must be one of {STAGES}, got {self.stage!r}"
            )
        if self.rule not in RATIO_RULES:
            raise ValueError(
                f"layer {self.layer}: rule must be one of {RATIO_RULES}, got {self.rule!r}"
            )

    @property
    def active_slots(self) -> int:
        """Slots the forward pass uses: ``rank + buffer``."""
        return self.rank + self.buffer

    @property
    def can_grow(self) -> bool:
        return self.stage == "growing" and self.rank < self.max_rank - self.buffer

    def is_due(self, step: int) -> bool:
        """Whether a rank check is due after optimizer step ``step``."""
        check_int(step, "step", low=0, layer=self.layer or None)
        return self.can_grow and step >= self.warmup and (step - self.warmup) % self.gap == 0

    def observe(self, step: int, s: torch.Tensor) -> int:
        """Apply the rank rule to spectrum ``s`` at optimizer step ``step``; return the new rank.

        The rank never shrinks (the rule's range starts at the current rank).
        """
        if not self.is_due(step):
            raise ValueError(
                f"layer {self.layer}: no rank check is due at step {step} "
                f"(warmup={self.warmup}, gap={self.gap}, stage={self.stage}, "
                f"rank={self.rank}, max_rank - buffer={self.max_rank - self.buffer})"
            )
        self.rank = select_rank(
            s,
            self.rank,
            self.buffer,
            self.max_rank,
            self.threshold,
            rule=self.rule,
            layer=self.layer or None,
        )
        self.step = step
        return self.rank

    def fix(self, step: int) -> None:
        """Enter stage 2: fixed rank, no buffer (spec section 4)."""
        self.stage = "fixed"
        self.buffer = 0
        self.step = step

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - set(asdict(self))
        if unknown:
            raise ValueError(f"layer {self.layer}: unknown growth-state keys {sorted(unknown)}")
        previous = asdict(self)
        for key, value in state.items():
            setattr(self, key, value)
        try:
            self.validate()
        except ValueError:
            for key, value in previous.items():
                setattr(self, key, value)
            raise
