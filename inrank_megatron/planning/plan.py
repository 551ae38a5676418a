"""Whether a run fits, and the plan ``tools/plan.py`` prints: the layout checks (each rule of
:mod:`inrank_megatron.rules` as a row), parameters, model-state memory of every strategy,
activations and FLOPs, and :func:`fit`, which adds activations to the model state of the config's
strategy and says whether a GPU holds the run, and which one change would.

    plan(cfg, nodes=2, gpus_per_node=8).checks             # what tools/plan.py prints, as data
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from inrank_megatron import rules
from inrank_megatron.config import (
    ConfigError,
    TrainConfig,
    data_parallel_size,
    grad_accumulation_steps,
)
from inrank_megatron.planning.activations import ACTIVATION_VARIANTS, activation_memory
from inrank_megatron.planning.estimates import (
    SLOT_COUNTS,
    STRATEGIES,
    check_inrank,
    count_parameters,
    flops_per_token,
    memory_for,
    selected_strategy,
    tokenizer_vocab_size,
)

DEFAULT_GPU_MEMORY_GIB = 80.0


@dataclass(frozen=True)
class Phase:
    """One phase of a run on the fullest GPU: model state under the config's strategy plus the
    activations of its attention and recompute settings."""

    label: str
    state: int
    activations: int

    @property
    def total(self) -> int:
        return self.state + self.activations


@dataclass(frozen=True)
class Fit:
    """Whether a config's run fits GPUs of ``gpu_bytes``, and what would make it fit.

    Attributes:
        gpu_bytes: memory of one GPU.
        phases: dense: one; InRank: stage 1 (weights as allocated, active slots) and after the
            cut (rank-fraction slots), each the fullest GPU's weights, gradients and optimizer
            state plus activations (the two maxima may come from different pipeline stages: the
            sum is an upper bound).
        suggestions: ``(overrides, total bytes)`` that fit, cheapest change first (empty when the
            config fits or nothing tried fits).
    """

    gpu_bytes: int
    phases: tuple
    suggestions: tuple = ()

    @property
    def total(self) -> int:
        return max(p.total for p in self.phases)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes


def _phases(
    cfg: TrainConfig, world_size: int, rank_fraction: Optional[float], vocab_size: Optional[int]
) -> tuple:
    """The run's phases on the fullest GPU (see :class:`Fit`)."""
    dp = data_parallel_size(cfg, world_size)
    micro = grad_accumulation_steps(cfg, world_size)
    strategy = selected_strategy(cfg)
    kw = dict(rank_fraction=rank_fraction, vocab_size=vocab_size)
    if cfg.model.inrank:
        stages = [("InRank stage 1", "storage", "active")]
        if cfg.inrank.mode == "efficient" and cfg.inrank.stage1_steps is not None:
            stages.append(("InRank after cut", "fraction", "fraction"))
    else:
        stages = [("dense", "storage", "active")]
    phases = []
    for label, param_stage, act_stage in stages:
        pc = count_parameters(cfg, stage=param_stage, **kw)
        state = memory_for(pc, cfg.train.precision, dp, strategy).total
        act = activation_memory(cfg, stage=act_stage, num_microbatches=micro, **kw).total
        phases.append(Phase(label, state, act))
    return tuple(phases)


def _with(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """A copy of ``cfg`` with ``{"section.key": value}`` applied."""
    import copy

    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(out, section), name, value)
    return out


def _candidates(cfg: TrainConfig, world_size: int, gpus_per_node: int) -> list[dict]:
    """Changes to try, cheapest first: SDPA, selective recompute, full recompute of as few layers
    as needed, a smaller micro batch, then twice the TP size within a node (with SP)."""
    m, p = cfg.model, cfg.parallel
    out = []
    if m.attention == "local":
        out.append(
            {"model.attention": "sdpa"}
            | ({"model.recompute": "none"} if m.recompute == "selective" else {})
        )
        if m.recompute == "none":
            out.append({"model.recompute": "selective"})
    per_stage = m.num_layers // p.pipeline_model_parallel_size
    if m.recompute != "full" or m.recompute_num_layers is not None:
        first = m.recompute_num_layers + 1 if m.recompute == "full" else 1
        for n in range(first, per_stage + 1):
            out.append(
                {
                    "model.attention": "sdpa",
                    "model.recompute": "full",
                    "model.recompute_num_layers": n if n < per_stage else None,
                }
            )
    mb = cfg.train.micro_batch_size
    for smaller in range(mb - 1, 0, -1):
        if mb % smaller == 0:
            out.append({"train.micro_batch_size": smaller})
    tp = p.tensor_model_parallel_size
    if 2 * tp <= gpus_per_node:
        out.append(
            {"parallel.tensor_model_parallel_size": 2 * tp, "parallel.sequence_parallel": True}
        )
    return out


def fit(
    cfg: TrainConfig,
    world_size: int,
    *,
    gpus_per_node: int,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
    rank_fraction: Optional[float] = None,
    vocab_size: Optional[int] = None,
    max_suggestions: int = 3,
) -> Fit:
    """Whether ``cfg`` fits GPUs of ``gpu_memory_gib`` on ``world_size`` GPUs and, if not, the
    first ``max_suggestions`` changes of :func:`_candidates` that make it fit (each alone, a
    valid layout).

    Raises:
        ConfigError: a layout that does not fit the world size.
    """
    gpu = int(gpu_memory_gib * 2**30)
    phases = _phases(cfg, world_size, rank_fraction, vocab_size)
    result = Fit(gpu, phases)
    if result.fits:
        return result
    found = []
    for change in _candidates(cfg, world_size, gpus_per_node):
        if any(c.items() <= change.items() for c, _ in found):
            continue  # a part of this change already fits
        trial = _with(cfg, change)
        try:
            if rules.check(trial, world_size):
                continue
            total = Fit(gpu, _phases(trial, world_size, rank_fraction, vocab_size)).total
        except (ConfigError, ValueError):
            continue
        if total <= gpu:
            found.append((change, total))
            if len(found) == max_suggestions:
                break
    return Fit(gpu, phases, tuple(found))


# ---------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    """One layout check: pass/fail, the keys it is about, and what it found."""

    name: str
    keys: tuple
    ok: bool
    detail: str


def layout_checks(cfg: TrainConfig, world_size: int) -> list[Check]:
    """Each rule of :data:`inrank_megatron.rules.RULES` that reads only the configuration, on its
    own (so that every problem shows, not only the first): the rows ``rules.validate`` passes or
    fails on."""
    checks = []
    for r in rules.applicable(world_size):
        failures = r.failures(cfg, world_size)
        detail = "; ".join(str(f) for f in failures) if failures else r.describe(cfg, world_size)
        checks.append(Check(r.name, r.keys, not failures, detail))
    return checks


# ------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """Everything ``tools/plan.py`` (``format_plan``) prints for a config on ``nodes x gpus_per_node`` GPUs.

    Attributes:
        params: ``dense``, ``storage``, ``active``, ``fraction`` (the last three InRank).
        memory: the same keys, each ``{strategy: MemoryEstimate}`` (empty when TP x PP does not
            divide the world size).
        flops: ``dense``, ``active``, ``fraction``.
        checks: :func:`layout_checks`.
        strategy: the strategy the config's backend runs (:func:`selected_strategy`).
        dp, grad_accumulation: None where the layout does not fit.
        inrank_error: why the InRank rows are missing (settings that do not fit a layer).
    """

    cfg: TrainConfig
    nodes: int
    gpus_per_node: int
    world_size: int
    rank_fraction: Optional[float]
    vocab_size: int
    params: dict
    memory: dict
    flops: dict
    checks: list
    strategy: str
    dp: Optional[int]
    grad_accumulation: Optional[int]
    config_path: Optional[str] = None
    inrank_error: Optional[str] = None
    activations: dict = field(default_factory=dict)
    fit: Optional[Fit] = None

    @property
    def ok(self) -> bool:
        """Every layout check passes."""
        return all(c.ok for c in self.checks)


def plan(
    cfg: TrainConfig,
    nodes: int,
    gpus_per_node: int,
    *,
    rank_fraction: Optional[float] = None,
    vocab_size: Optional[int] = None,
    config_path: Optional[str] = None,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
) -> Plan:
    """Parameters, memory, FLOPs and layout checks of ``cfg`` on ``nodes x gpus_per_node`` GPUs,
    dense and InRank (``cfg.inrank``'s settings, whatever ``model.inrank`` says).

    InRank settings that do not fit a layer leave the InRank rows out (``inrank_error`` says why)
    and, when ``model.inrank`` is true, fail the ``InRank rank fits`` check.

    Activations are counted for every attention / recompute pair of
    :data:`ACTIVATION_VARIANTS`; ``fit`` checks the config's own settings against
    ``gpu_memory_gib`` (None when the layout does not fit the world size).

    Raises:
        ValueError: non-positive nodes / GPUs or GPU memory, a rank fraction outside (0, 1].
    """
    if not gpu_memory_gib > 0:
        raise ValueError(f"gpu_memory_gib must be positive, got {gpu_memory_gib!r}")
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if rank_fraction is not None and not 0 < rank_fraction <= 1:
        raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction!r}")
    world = nodes * gpus_per_node
    vocab = vocab_size or tokenizer_vocab_size(cfg)
    kw = dict(rank_fraction=rank_fraction, vocab_size=vocab)
    try:
        check_inrank(cfg)
        inrank_error = None
    except ConfigError as error:
        inrank_error = str(error)
    params = {"dense": count_parameters(cfg, inrank=False, **kw)}
    flops = {"dense": flops_per_token(cfg, inrank=False, **kw)}
    if inrank_error is None:
        for stage in SLOT_COUNTS:
            params[stage] = count_parameters(cfg, inrank=True, stage=stage, **kw)
        for stage in ("active", "fraction"):
            flops[stage] = flops_per_token(cfg, inrank=True, stage=stage, **kw)
    checks = layout_checks(cfg, world)
    try:
        dp = data_parallel_size(cfg, world)
    except ConfigError:
        dp = None
    try:
        accumulation = grad_accumulation_steps(cfg, world)
    except ConfigError:
        accumulation = None
    memory = {}
    if dp is not None:
        memory = {
            key: {s: memory_for(pc, cfg.train.precision, dp, s) for s in STRATEGIES}
            for key, pc in params.items()
        }
    activations, fit_result = {}, None
    if accumulation is not None:
        keys = [("dense", False, "active")]
        if inrank_error is None:
            keys += [("active", True, "active"), ("fraction", True, "fraction")]
        for key, inrank, stage in keys:
            activations[key] = {
                (a, r): activation_memory(
                    cfg,
                    inrank=inrank,
                    stage=stage,
                    attention=a,
                    recompute=r,
                    num_microbatches=accumulation,
                    **kw,
                )
                for a, r in ACTIVATION_VARIANTS
            }
        if all(c.ok for c in checks):
            fit_result = fit(
                cfg, world, gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gib, **kw
            )
    return Plan(
        cfg=cfg,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        world_size=world,
        rank_fraction=rank_fraction,
        vocab_size=vocab,
        params=params,
        memory=memory,
        flops=flops,
        checks=checks,
        strategy=selected_strategy(cfg),
        dp=dp,
        grad_accumulation=accumulation,
        config_path=config_path,
        inrank_error=inrank_error,
        activations=activations,
        fit=fit_result,
    )
