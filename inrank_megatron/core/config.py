"""InRank settings (spec section 5 defaults) shared by every InRank layer of a model.

:class:`InRankConfig` is the one declaration of these settings: the YAML section ``inrank``
(:class:`inrank_megatron.config.InRankSection`) extends it with what only training reads, and
``configs/README.md`` shows each field's ``metadata`` (``help``; allowed values in ``choices``;
numeric bounds in ``ge``/``gt``/``lt``, as in :mod:`inrank_megatron.config`). No torch at import,
so configs can be checked without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from inrank_megatron.core.names import INITS, MODES, RATIO_RULES, SIGNALS, STARTS

SPECTRUM_DTYPES = ("float32", "float64")


def _setting(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


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
        signal: the spectrum the rule reads: ``"product"`` (the spec: the active ``B A``) or
            ``"update"`` (efficient mode: the cumulative update ``B A - B0 A0`` over the active
            slots, ``B0, A0`` their initial values; a rank that comes from learning, not from
            the init's spectrum).
        start: ``"low_rank"`` (the spec: stage 1 trains ``rank + buffer`` slots and grows),
            ``"full_rank"`` (stage 1 trains all ``min(in, out)`` slots of the kaiming factors) or
            ``"dense"`` (stage 1 trains the dense weight ``W``, initialised by the layer's
            ``init_method`` as a dense layer is: one factor holds ``W``, the other is the
            identity and does not train). Both need efficient mode and a cut, where the rule
            picks each layer's rank once from the trained spectrum, at most ``max_rank``.
        init_scale: multiplier on each factor's init (and on W0's gain).
        init: ``"kaiming"`` (the reference: kaiming-uniform factors) or ``"spectral"`` (efficient
            mode: the balanced truncated SVD of the dense layer's standard init, Khodak et al.;
            :func:`inrank_megatron.core.init.init_factors`).
        spectrum_dtype: ``"float32"`` (reference) or ``"float64"`` (a ``torch.dtype`` is accepted
            and stored by name); :attr:`spectrum_torch_dtype` is the dtype.
    """

    mode: str = _setting(
        "efficient",
        "efficient: W = B A (published results); cumulative: W = W0 + B A with W0 frozen.",
        choices=MODES,
    )
    rank: int = _setting(2, "Initial rank r0 of every InRank layer.", ge=0)
    buffer: int = _setting(100, "Buffer b: extra active slots while the rank grows.", ge=0)
    max_rank: Optional[int] = _setting(
        None, "Rank cap; null means min(in, out) // 2 per layer.", ge=1
    )
    threshold: float = _setting(
        0.9, "Explained-ratio threshold alpha of the rank rule.", gt=0.0, lt=1.0
    )
    warmup: int = _setting(25, "Optimizer steps before the first rank check.", ge=0)
    gap: int = _setting(3, "Optimizer steps between rank checks.", ge=1)
    stage1_steps: Optional[int] = _setting(
        130,
        "Efficient mode: steps of rank growth before the cut to fixed rank; null never cuts "
        "(cumulative mode requires null).",
        ge=1,
    )
    rule: str = _setting(
        "variance", "Explained ratio: variance (the spec) or energy (opt-in).", choices=RATIO_RULES
    )
    signal: str = _setting(
        "product",
        "Spectrum the rank rule reads: product (the spec: the active B A) or update "
        "(efficient mode: the cumulative update B A - B0 A0 of the active slots since init).",
        choices=SIGNALS,
    )
    start: str = _setting(
        "low_rank",
        "Stage 1: low_rank (the spec: rank + buffer slots, growing), full_rank (all "
        "min(in, out) slots of the factors train) or dense (the dense weight trains, initialised "
        "as a dense layer's). full_rank and dense need efficient mode and stage1_steps: the cut "
        "picks each layer's rank once from the trained spectrum, at most max_rank.",
        choices=STARTS,
    )
    init_scale: float = _setting(
        1.0, "Multiplier on each factor's init (and on W0's gain in cumulative mode).", gt=0.0
    )
    init: str = _setting(
        "kaiming",
        "Factor init. kaiming: A and B kaiming-uniform (the reference). spectral "
        "(efficient mode; Khodak et al., arXiv 2105.01029): B = U sqrt(S), A = sqrt(S) V^T from "
        "the SVD of the dense layer's own init (megatron's init_method, drawn full-size as "
        "use_cpu_initialization does, so TP-independent), truncated to the allocated slots: the "
        "active slots multiply to that init's best rank-(rank + buffer) approximation, and each "
        "growth step adds its next singular directions.",
        choices=INITS,
    )
    spectrum_dtype: str = _setting(
        "float32", "Precision of the rank checks' spectra.", choices=SPECTRUM_DTYPES
    )

    def __post_init__(self):
        from inrank_megatron.core.validation import check_int

        if self.mode not in MODES:
            raise ValueError(f"inrank mode must be one of {MODES}, got {self.mode!r}")
        if self.init not in INITS:
            raise ValueError(f"inrank init must be one of {INITS}, got {self.init!r}")
        if self.init == "spectral" and self.mode != "efficient":
            raise ValueError(
                "inrank init='spectral' needs mode='efficient' (in cumulative mode "
                "B A starts at zero and W at W0)"
            )
        if self.rule not in RATIO_RULES:
            raise ValueError(f"inrank rule must be one of {RATIO_RULES}, got {self.rule!r}")
        if self.signal not in SIGNALS:
            raise ValueError(f"inrank signal must be one of {SIGNALS}, got {self.signal!r}")
        if self.start not in STARTS:
            raise ValueError(f"inrank start must be one of {STARTS}, got {self.start!r}")
        if self.mode != "efficient" and (self.signal, self.start) != ("product", "low_rank"):
            raise ValueError(
                f"signal={self.signal!r} / start={self.start!r} need efficient mode "
                f"(in cumulative mode B A is already the update and grows from "
                f"zero), got mode={self.mode!r}"
            )
        if self.start != "low_rank" and self.stage1_steps is None:
            raise ValueError(
                f"start={self.start!r} needs stage1_steps (the cut is where the rank is "
                "chosen), got None"
            )
        check_int(self.warmup, "warmup", low=0)
        check_int(self.gap, "gap", low=1)
        if self.stage1_steps is not None:
            check_int(self.stage1_steps, "stage1_steps", low=1)
            if self.mode == "cumulative":
                raise ValueError(
                    "stage1_steps must be None in cumulative mode (it grows for the "
                    f"whole run; the cut is an efficient-mode stage), got {self.stage1_steps}"
                )
        name = str(self.spectrum_dtype).removeprefix("torch.")
        if name not in SPECTRUM_DTYPES:
            raise ValueError(
                f"spectrum_dtype must be float32 or float64, got {self.spectrum_dtype}"
            )
        self.spectrum_dtype = name
        if not float(self.init_scale) > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale!r}")

    @property
    def spectrum_torch_dtype(self):
        """``torch.float32`` or ``torch.float64``."""
        import torch

        return getattr(torch, self.spectrum_dtype)

    @property
    def keeps_init(self) -> bool:
        """Whether layers draw their factors from a recorded seed, so that the initial factors
        ``B0, A0`` can be drawn again (the ``update`` signal) instead of being stored."""
        return self.signal == "update"

    def layer_max_rank(self, in_features: int, out_features: int) -> int:
        """The rank cap of a layer of this full (unsharded) shape."""
        return self.max_rank if self.max_rank is not None else min(in_features, out_features) // 2

    def check_layer(self, in_features: int, out_features: int, *, layer: str | None = None) -> int:
        """Validate these settings for a layer of this (full, unsharded) shape; return its max_rank.

        The active slots ``rank + buffer`` must fit under ``max_rank <= min(in, out)``.
        """
        from inrank_megatron.core.rank_rule import check_rank_settings

        n = min(in_features, out_features)
        max_rank = self.layer_max_rank(in_features, out_features)
        where = f"layer {layer}: " if layer else ""
        if max_rank > n:
            raise ValueError(
                f"{where}max_rank={max_rank} exceeds min(in, out)={n} "
                f"for a {in_features} -> {out_features} layer"
            )
        check_rank_settings(self.rank, self.buffer, max_rank, self.threshold, layer=layer)
        if self.rank + self.buffer > max_rank:
            raise ValueError(
                f"{where}rank + buffer = {self.rank} + {self.buffer} exceeds max_rank="
                f"{max_rank} (min(in, out) // 2 for a {in_features} -> {out_features} "
                "layer unless set): lower inrank.buffer/inrank.rank or raise max_rank"
            )
        return max_rank

    def replace(self, **changes) -> "InRankConfig":
        return dataclasses.replace(self, **changes)
