"""What a run of a config costs before it is launched: parameters, model-state memory and FLOPs,
dense and InRank (torch-free).

    cfg = load_config("configs/gpt2-medium.yaml")
    count_parameters(cfg, inrank=False).total              # == sum(p.numel()) of the built GPT
    count_parameters(cfg, stage="fraction").per_gpu        # after the cut, at the rule's rank

Parameter counts follow megatron.core's ``GPTModel`` as
:func:`inrank_megatron.models.gpt.build_gpt` builds it (local layer spec), layer by layer;
``tests/test_planning.py`` pins them to the built model exactly. InRank linears hold
``A [slots, in]`` and ``B [out, slots]`` (spec section 2); which slots count is the *stage*:

- ``storage``: what the layer allocates: efficient mode pre-allocates ``max_rank`` slots,
  cumulative mode ``rank + buffer`` (plus a frozen ``w0`` buffer, counted apart as ``buffers``);
- ``active``: the ``rank + buffer`` slots the forward pass uses in stage 1;
- ``fraction``: after the cut (spec section 4), by default the rank the config's rule will reach
  (:func:`expected_rank`: the rule's fixed point on the initial factors, which is what the
  reference rule learns, docs/results.md; 287 for GPT-2 medium), or ``round(rank_fraction *
  d_model)`` slots when a fraction is given (clipped to what the rank rule can reach), and no
  buffer; cumulative mode never cuts and keeps its buffer. A full-rank or dense start
  (``inrank.start``) trains ``min(in, out)`` slots in stage 1.

Model-state memory counts weights, gradients and optimizer state with the bytes per parameter
of the ZeRO paper (Rajbhandari et al. 2020, section 3.1): fp32 training keeps 4 + 4 bytes of
weights and gradients and 8 of Adam moments; bf16/fp16 under ZeRO keeps 2 + 2 and 12 of fp32
master weights and moments (:func:`bytes_per_parameter` has the torch and
Megatron backends). FLOPs are 6N-style (Kaplan et al. 2020; Narayanan et al. 2021):
twice the multiply-adds of every matmul per token forward, three times that for forward plus
backward.

Activation memory is :mod:`inrank_megatron.planning.activations`; whether a run fits, and the
plan ``tools/plan.py`` prints, :mod:`inrank_megatron.planning.plan`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Sequence

from inrank_megatron.config import (
    ConfigError,
    TrainConfig,
    data_parallel_size,
    inrank_fit_failures,
)
from inrank_megatron.deepspeed_json import zero_stage
from inrank_megatron.models.shape import COLUMN_PARALLEL, linear_shapes

# Which InRank slots a count uses (the `stage` argument; not the growth stages of core.STAGES).
SLOT_COUNTS = ("storage", "active", "fraction")
STRATEGIES = ("zero0", "zero1", "zero2", "zero3", "megatron")
STRATEGY_NAMES = {
    "zero0": "ZeRO-0 (DDP)",
    "zero1": "ZeRO-1",
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
    "megatron": "Megatron dist-opt",
}


# ------------------------------------------------------------------------------------- model shape
def tokenizer_vocab_size(cfg: TrainConfig) -> int:
    """Ids of the config's tokenizer: 50257 for GPT-2 BPE; a SentencePiece model's piece count when
    its file exists, else the size ``tools/train_tokenizer.py`` trains by default.

    Raises:
        ConfigError: naming ``data.tokenizer_model`` when its file is not a usable SentencePiece
            model (truncated, another format, no end-of-sentence piece).
    """
    if cfg.data.tokenizer == "gpt2":
        from inrank_megatron.data.tokenizers import GPT2_VOCAB_SIZE

        return GPT2_VOCAB_SIZE
    path = cfg.data.tokenizer_model
    if path and os.path.isfile(path):
        from inrank_megatron.data.tokenizers import SentencePieceTokenizer

        try:
            return SentencePieceTokenizer(path).vocab_size
        except ValueError as error:
            raise ConfigError(
                f"data.tokenizer_model={path!r}: {error}; expected the "
                "SentencePiece .model the data was tokenized with "
                "(tools/train_tokenizer.py makes one)"
            ) from None
    from inrank_megatron.data.train_tokenizer import DEFAULT_VOCAB_SIZE

    return DEFAULT_VOCAB_SIZE


def padded_vocab(cfg: TrainConfig, *, vocab_size: Optional[int] = None) -> int:
    """The vocabulary the model is built with (``inrank_megatron.models.shape.padded_vocab_size``:
    a multiple of ``model.make_vocab_size_divisible_by``, independent of TP)."""
    return gpt_shape(cfg, vocab_size=vocab_size).vocab_size


def gpt_shape(cfg: TrainConfig, *, vocab_size: Optional[int] = None):
    """The GPTShape the training loop's ``build_model`` makes of a config."""
    from inrank_megatron.models.shape import shape_from_config

    return shape_from_config(cfg, vocab_size or tokenizer_vocab_size(cfg))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Linear:
    """One linear layer of a transformer layer: its full shape, how Megatron splits it over TP and,
    for an InRank layer, its rank slots at the counted stage.

    Attributes:
        kind: ``qkv``, ``proj``, ``fc1`` or ``fc2``.
        in_features, out_features: full (unsharded) shape.
        column: column-parallel (``out`` split over TP) or row-parallel (``in`` split).
        slots: rank slots of an InRank layer (None: dense).
        frozen_w0: an InRank layer in cumulative mode (a frozen ``w0 [out, in]`` buffer).
    """

    kind: str
    in_features: int
    out_features: int
    column: bool
    slots: Optional[int] = None
    frozen_w0: bool = False


def layer_linears(cfg: TrainConfig, inrank: bool, slots: Callable[[int, int], int]) -> list[Linear]:
    """The four linears of one transformer layer (megatron's local spec: SelfAttention's
    ``linear_qkv``/``linear_proj``, MLP's ``linear_fc1``/``linear_fc2``)."""
    m = cfg.model
    cumulative = cfg.inrank.mode == "cumulative"
    out = []
    for kind, (n_in, n_out) in linear_shapes(m.hidden_size, m.ffn(), m.activation).items():
        column = COLUMN_PARALLEL[kind]
        if inrank and kind in cfg.inrank.layers:
            out.append(Linear(kind, n_in, n_out, column, slots(n_in, n_out), cumulative))
        else:
            out.append(Linear(kind, n_in, n_out, column))
    return out


def rank_checks(cfg: TrainConfig) -> int:
    """Rank checks a layer gets: at optimizer steps ``t >= warmup`` with ``(t - warmup) % gap == 0``
    (``GrowthState.is_due``), up to the cut after ``stage1_steps`` (or ``train.steps`` without a
    cut)."""
    ir = cfg.inrank
    if ir.start != "low_rank":  # a full-rank or dense stage 1 has no checks, one at the cut
        return 0
    last = ir.stage1_steps if ir.stage1_steps is not None else cfg.train.steps
    first = max(ir.warmup, 1)
    first += (ir.warmup - first) % ir.gap
    return 0 if last < first else (last - first) // ir.gap + 1


def reachable_rank(cfg: TrainConfig, in_features: int, out_features: int) -> int:
    """The largest rank the rule can give a layer: each check grows it by at most ``buffer - 1``
    and it stays below ``max_rank - buffer`` (spec section 3); a full-rank or dense start's cut
    picks at most ``max_rank``."""
    ir = cfg.inrank
    if ir.start != "low_rank":
        return ir.layer_max_rank(in_features, out_features)
    cap = max(ir.rank, ir.layer_max_rank(in_features, out_features) - ir.buffer - 1)
    return min(ir.rank + rank_checks(cfg) * max(ir.buffer - 1, 0), cap)


@functools.lru_cache(maxsize=64)
def _init_rank(
    in_features: int,
    out_features: int,
    start: str,
    signal: str,
    rank: int,
    buffer: int,
    max_rank: int,
    threshold: float,
    rule: str,
    init_scale: float,
    init: str,
) -> Optional[int]:
    # torch only here: the planner imports without it.
    from inrank_megatron.core.init_ranks import init_cut_rank, init_rank_trajectory

    if start != "low_rank":
        return init_cut_rank(
            in_features,
            out_features,
            start=start,
            signal=signal,
            max_rank=max_rank,
            threshold=threshold,
            rule=rule,
            init_scale=init_scale,
            init=init,
        )
    if signal == "update":
        return None
    return init_rank_trajectory(
        in_features,
        out_features,
        rank=rank,
        buffer=buffer,
        max_rank=max_rank,
        threshold=threshold,
        rule=rule,
        init_scale=init_scale,
        init=init,
    )[-1]


def expected_rank(cfg: TrainConfig, in_features: int, out_features: int) -> int:
    """The rank after the cut that the config's rule will reach, as far as it is known before
    training (docs/results.md): with the spec's product signal, the rule's fixed point on the
    initial factors (:func:`~inrank_megatron.core.init_ranks.init_rank_trajectory`; 287 for GPT-2
    medium, the paper's rank), or what a full-rank / dense start's cut picks on the init; with the
    update signal, which the init does not decide, the most the rule can reach. Never above
    :func:`reachable_rank`."""
    ir = cfg.inrank
    rank = _init_rank(
        in_features,
        out_features,
        ir.start,
        ir.signal,
        ir.rank,
        ir.buffer,
        ir.layer_max_rank(in_features, out_features),
        ir.threshold,
        ir.rule,
        ir.init_scale,
        ir.init,
    )
    reachable = reachable_rank(cfg, in_features, out_features)
    return reachable if rank is None else min(rank, reachable)


def rank_after_cut(
    cfg: TrainConfig, in_features: int, out_features: int, rank_fraction: Optional[float] = None
) -> int:
    """The rank after the cut: :func:`expected_rank` (``rank_fraction=None``), or
    ``rank_fraction`` of d_model clipped to what the rank rule can reach: never below
    ``inrank.rank``, never above :func:`reachable_rank`."""
    if rank_fraction is None:
        return expected_rank(cfg, in_features, out_features)
    want = round(rank_fraction * cfg.model.hidden_size)
    return max(cfg.inrank.rank, min(want, reachable_rank(cfg, in_features, out_features)))


def slot_rule(
    cfg: TrainConfig, stage: str, rank_fraction: Optional[float]
) -> Callable[[int, int], int]:
    ir = cfg.inrank
    if stage in ("storage", "active") and ir.start != "low_rank":
        return lambda i, o: min(i, o)  # stage 1 trains every slot (or the dense weight)
    if stage == "storage":
        if ir.mode == "efficient":
            return ir.layer_max_rank
        return lambda i, o: ir.rank + ir.buffer
    if stage == "active":
        return lambda i, o: ir.rank + ir.buffer
    if stage == "fraction":
        if ir.mode == "efficient":
            return lambda i, o: rank_after_cut(cfg, i, o, rank_fraction)
        return lambda i, o: rank_after_cut(cfg, i, o, rank_fraction) + ir.buffer
    raise ValueError(f"stage must be one of {SLOT_COUNTS}, got {stage!r}")


def check_inrank(cfg: TrainConfig) -> None:
    """The InRank settings fit every InRank layer (the rule ``InRank rank fits``), whatever
    ``model.inrank`` says."""
    failures = inrank_fit_failures(cfg)
    if failures:
        raise ConfigError("; ".join(str(f) for f in failures))


# ------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ParamCount:
    """Parameters of one variant of a config's GPT.

    Attributes:
        label: what is counted (``dense``, or the InRank stage).
        inrank: InRank layers or dense.
        stage: ``dense``, ``storage``, ``active`` or ``fraction``.
        tp, pp: the parallel layout the shards are for.
        vocab_size: the padded vocabulary.
        total: unique trainable parameters: ``sum(p.numel())`` of the model at TP=1, PP=1.
        buffers: elements of frozen ``w0`` buffers (cumulative mode), not trainable.
        per_stage: trainable parameters on one GPU of each pipeline stage (its TP shard); with
            PP > 1 and tied embeddings the last stage holds its own copy of the word embeddings.
        buffers_per_stage: ``w0`` elements on one GPU of each pipeline stage.
        slots: rank slots of each InRank layer kind (empty when dense).
        breakdown: ``total`` by component (embeddings, positions, attention, mlp, norms, output).
    """

    label: str
    inrank: bool
    stage: str
    tp: int
    pp: int
    vocab_size: int
    total: int
    buffers: int
    per_stage: tuple
    buffers_per_stage: tuple
    slots: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)

    @property
    def per_gpu(self) -> int:
        """Trainable parameters on the fullest GPU (the largest pipeline stage's TP shard)."""
        return max(self.per_stage)

    @property
    def buffers_per_gpu(self) -> int:
        return self.buffers_per_stage[self.per_stage.index(self.per_gpu)]


def _linear_params(lin: Linear, bias: bool, tp: int) -> tuple[int, int, int, int]:
    """``(total, per TP rank, w0 total, w0 per TP rank)`` of one linear.

    Dense: ``W [out, in]`` split along ``out`` (column) or ``in`` (row). InRank: the sharded factor
    follows the split (column: ``B [out/tp, k]``, row: ``A [k, in/tp]``), the other is replicated
    (inrank_megatron.tensor_parallel.layers). The bias is split with a column layer's output and
    replicated on a row layer (megatron's RowParallelLinear)."""
    n_in, n_out = lin.in_features, lin.out_features
    b_total = n_out if bias else 0
    b_shard = (ceil_div(n_out, tp) if lin.column else n_out) if bias else 0
    if lin.slots is None:
        shard = ceil_div(n_out, tp) * n_in if lin.column else n_out * ceil_div(n_in, tp)
        return n_in * n_out + b_total, shard + b_shard, 0, 0
    k = lin.slots
    total = k * (n_in + n_out) + b_total
    shard = (
        (k * n_in + ceil_div(n_out, tp) * k) if lin.column else (k * ceil_div(n_in, tp) + n_out * k)
    )
    w0, w0_shard = 0, 0
    if lin.frozen_w0:
        w0 = n_in * n_out
        w0_shard = ceil_div(n_out, tp) * n_in if lin.column else n_out * ceil_div(n_in, tp)
    return total, shard + b_shard, w0, w0_shard


def count_parameters(
    cfg: TrainConfig,
    *,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    stage: str = "storage",
    rank_fraction: Optional[float] = None,
    inrank: Optional[bool] = None,
    vocab_size: Optional[int] = None,
) -> ParamCount:
    """Parameters of the config's GPT, total and per GPU.

    Args:
        cfg: the configuration.
        tp, pp: tensor / pipeline parallel sizes of the shards (default: the config's).
        stage: which InRank slots count: ``storage``, ``active`` or ``fraction`` (module docstring).
        rank_fraction: rank after the cut as a fraction of d_model (stage ``fraction``); None:
            the rank the config's rule will reach (:func:`expected_rank`).
        inrank: count the InRank model (True) or its dense twin (False); default
            ``cfg.model.inrank``. The InRank settings are ``cfg.inrank`` either way.
        vocab_size: tokenizer ids before padding (default: :func:`tokenizer_vocab_size`).

    Returns:
        A :class:`ParamCount`.

    Raises:
        ConfigError: InRank settings that do not fit a layer (``rank + buffer > max_rank``).
    """
    m = cfg.model
    tp = tp or cfg.parallel.tensor_model_parallel_size
    pp = pp or cfg.parallel.pipeline_model_parallel_size
    inrank = m.inrank if inrank is None else inrank
    if inrank:
        check_inrank(cfg)
    elif stage not in SLOT_COUNTS:
        raise ValueError(f"stage must be one of {SLOT_COUNTS}, got {stage!r}")
    slots = slot_rule(cfg, stage, rank_fraction)
    h, vocab = m.hidden_size, padded_vocab(cfg, vocab_size=vocab_size)
    norm = 2 * h if m.normalization == "LayerNorm" else h  # torch LayerNorm: weight + bias

    layer_total = layer_shard = w0_total = w0_shard = 0
    attention = mlp = 0
    linears = layer_linears(cfg, inrank, slots)
    for lin in linears:
        t, s, w, ws = _linear_params(lin, m.add_bias_linear, tp)
        layer_total, layer_shard, w0_total, w0_shard = (
            layer_total + t,
            layer_shard + s,
            w0_total + w,
            w0_shard + ws,
        )
        if lin.kind in ("qkv", "proj"):
            attention += t
        else:
            mlp += t
    layer_total += 2 * norm  # input_layernorm, pre_mlp_layernorm
    layer_shard += 2 * norm  # norms are replicated over TP

    embed = vocab * h
    positions = m.max_positions() * h if m.position_embedding_type == "learned_absolute" else 0
    untied = m.untie_embeddings_and_output_weights
    breakdown = {
        "embeddings": embed,
        "positions": positions,
        "attention": attention * m.num_layers,
        "mlp": mlp * m.num_layers,
        "norms": (2 * m.num_layers + 1) * norm,
        "output": embed if untied else 0,
    }
    total = sum(breakdown.values())

    # Pipeline stages: equal layer counts (the rule "PP divides layers" checks it); the first
    # holds the embeddings, the last the final norm and the output layer. Megatron allocates the
    # output weight on the last stage unless it is tied to an embedding on the same rank
    # (GPTModel: skip_weight_param_allocation=pre_process and share_embeddings_...).
    per_layer_stage = ceil_div(m.num_layers, pp)
    per_stage, buffers_per_stage = [], []
    for p in range(pp):
        first, last = p == 0, p == pp - 1
        n = per_layer_stage * layer_shard
        if first:
            n += ceil_div(vocab, tp) * h + positions
        if last:
            n += norm
            if untied or not first:
                n += ceil_div(vocab, tp) * h
        per_stage.append(n)
        buffers_per_stage.append(per_layer_stage * w0_shard)

    slot_map = {lin.kind: lin.slots for lin in linears if lin.slots is not None}
    label = (
        "dense"
        if not inrank
        else {
            "storage": "InRank allocated",
            "active": "InRank stage 1",
            "fraction": "InRank after cut",
        }[stage]
    )
    return ParamCount(
        label=label,
        inrank=inrank,
        stage="dense" if not inrank else stage,
        tp=tp,
        pp=pp,
        vocab_size=vocab,
        total=total,
        buffers=w0_total * m.num_layers,
        per_stage=tuple(per_stage),
        buffers_per_stage=tuple(buffers_per_stage),
        slots=slot_map,
        breakdown=breakdown,
    )


# ---------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one optimizer sharding strategy (model state; activations apart).

    Attributes:
        strategy: a key of :data:`STRATEGIES`.
        weights: model weights (plus frozen ``w0`` buffers).
        gradients: gradients of the trainable parameters.
        optimizer: Adam moments, plus fp32 master weights when training in bf16/fp16.
    """

    strategy: str
    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def name(self) -> str:
        return STRATEGY_NAMES[self.strategy]


def bytes_per_parameter(precision: str, strategy: str = "zero0") -> tuple[int, int, int]:
    """``(weight, gradient, optimizer)`` bytes per trainable parameter before sharding.

    fp32: 4, 4, 8 (Adam's two moments). bf16/fp16 depend on who holds what:

    - ``zero0``, the torch backend (DDP): fp32 weights and gradients under autocast, no separate
      master copy (``training/backends/torch_ddp.py``): 4, 4, 8;
    - ZeRO 1-3 (DeepSpeed mixed precision): 2, 2 and 12 of fp32 master weights and moments (the
      ZeRO paper's K = 12);
    - Megatron's distributed optimizer: 2, 12, and fp32 gradients (a ``main_grad`` buffer) with
      bf16, as Megatron-LM sets ``accumulate_allreduce_grads_in_fp32`` for bf16; 2 with fp16.
    """
    if precision == "fp32":
        return 4, 4, 8
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if strategy == "zero0":
        return 4, 4, 8
    grad = 4 if (strategy == "megatron" and precision == "bf16") else 2
    return 2, grad, 12


def memory_for(params: ParamCount, precision: str, dp: int, strategy: str) -> MemoryEstimate:
    """Bytes per GPU for ``params`` (its fullest GPU) under one strategy with ``dp`` replicas.

    ZeRO stage s shards over DP: 1 the optimizer state, 2 also the gradients, 3 also the weights
    (Rajbhandari et al. 2020). Megatron's distributed optimizer shards the optimizer state (with
    the fp32 master weights), as ZeRO-1. Frozen ``w0`` buffers are weights, never sharded.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    wb, gb, ob = bytes_per_parameter(precision, strategy)
    stage = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "megatron": 1}[strategy]
    n = params.per_gpu
    weights = (ceil_div(n, dp) if stage >= 3 else n) * wb + params.buffers_per_gpu * wb
    grads = (ceil_div(n, dp) if stage >= 2 else n) * gb
    optim = (ceil_div(n, dp) if stage >= 1 else n) * ob
    return MemoryEstimate(strategy, weights, grads, optim)


def memory_per_gpu(
    cfg: TrainConfig,
    world_size: int,
    *,
    inrank: Optional[bool] = None,
    stage: str = "storage",
    rank_fraction: Optional[float] = None,
    vocab_size: Optional[int] = None,
) -> dict[str, MemoryEstimate]:
    """Bytes per GPU of weights, gradients and optimizer state under every strategy of
    :data:`STRATEGIES`, for the config's layout on ``world_size`` GPUs (activations apart).

    Raises:
        ConfigError: TP * PP does not divide ``world_size``.
    """
    dp = data_parallel_size(cfg, world_size)
    params = count_parameters(
        cfg, stage=stage, rank_fraction=rank_fraction, inrank=inrank, vocab_size=vocab_size
    )
    return {s: memory_for(params, cfg.train.precision, dp, s) for s in STRATEGIES}


def checkpoint_bytes(cfg: TrainConfig) -> int:
    """Bytes of one training checkpoint on disk, every rank's files together: each parameter's
    weight and optimizer state (:func:`bytes_per_parameter` of the backend's strategy; ZeRO splits
    the files, not their sum) and the frozen ``w0`` buffers, at the allocated InRank slots. The
    metadata, RNG and growth files come on top (2 % of tests/tiny.yaml's checkpoint).

    Raises:
        ConfigError: as :func:`count_parameters` (and the tokenizer file unreadable).
    """
    params = count_parameters(cfg, tp=1, pp=1)
    weight, _, optimizer = bytes_per_parameter(cfg.train.precision, selected_strategy(cfg))
    return params.total * (weight + optimizer) + params.buffers * weight


def selected_strategy(cfg: TrainConfig) -> str:
    """The strategy the config's backend runs: torch is DDP (ZeRO-0); deepspeed the ZeRO stage of
    ``parallel.zero_stage`` or, when null, of the JSON (``zero_optimization.stage``, default 0;
    0 when the JSON cannot be read); megatron its distributed optimizer with
    ``parallel.zero_stage=1``, else DDP with the optimizer state replicated, as ZeRO-0 (the model
    is fp32 under autocast, as in the torch backend)."""
    p = cfg.parallel
    if p.backend == "torch":
        return "zero0"
    if p.backend == "megatron":
        return "megatron" if (p.zero_stage or 0) >= 1 else "zero0"
    try:
        return f"zero{zero_stage(cfg)}"
    except (ConfigError, TypeError, ValueError, AttributeError):
        return "zero0"


# ----------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per token (forward + backward) of the matmuls.

    Attributes:
        label: what is counted.
        linear: the transformer layers' linears (qkv, proj, fc1, fc2).
        attention: attention scores ``Q K^T`` and context ``P V``.
        logits: the LM head.
    """

    label: str
    linear: int
    attention: int
    logits: int

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.logits


def flops_per_token(
    cfg: TrainConfig,
    *,
    inrank: Optional[bool] = None,
    stage: str = "active",
    rank_fraction: Optional[float] = None,
    vocab_size: Optional[int] = None,
    layer_slots: Optional[Sequence[Mapping[str, int]]] = None,
) -> FlopCount:
    """Training FLOPs per token of the matmuls, counted exactly from the layer shapes.

    A dense linear costs ``in * out`` multiply-adds per token forward; an InRank linear using ``k``
    slots ``k * (in + out)`` (``(x A^T) B^T``; cumulative mode adds ``in * out`` for ``W0``).
    Attention costs ``2 * seq * hidden`` per token and layer (scores and context over the full
    sequence, no causal saving: Narayanan et al. 2021, eq. 3), the logits ``hidden * vocab``.
    Forward is 2 FLOPs per multiply-add; backward twice forward (input and weight gradients), except
    for the frozen ``W0``, which needs no weight gradient. Norms, softmax, GELU, embeddings lookups
    and the rank checks' QR/SVD are not counted.

    Args:
        stage: InRank slots used by the forward pass: ``active`` (stage 1: ``rank + buffer``;
            ``storage`` counts the same, as efficient mode computes on the active slots only) or
            ``fraction`` (after the cut).
        layer_slots: the slots each InRank layer actually uses, one ``{kind: slots}`` per
            transformer layer (e.g. a run's learned ranks; ``tools/bench_step.py`` passes the
            slots of the models it times); overrides ``stage`` and ``rank_fraction``.
    """
    m = cfg.model
    inrank = m.inrank if inrank is None else inrank
    if inrank:
        check_inrank(cfg)
    stage = "active" if stage == "storage" else stage
    if layer_slots is None:
        per_layer = [
            layer_linears(cfg, inrank, slot_rule(cfg, stage, rank_fraction))
        ] * m.num_layers
    else:
        if len(layer_slots) != m.num_layers:
            raise ValueError(
                f"layer_slots has {len(layer_slots)} entries, expected one per "
                f"transformer layer ({m.num_layers})"
            )
        template = layer_linears(cfg, inrank, slot_rule(cfg, stage, rank_fraction))
        per_layer = [
            [lin if lin.slots is None else replace(lin, slots=slots[lin.kind]) for lin in template]
            for slots in layer_slots
        ]
    macs = 0  # forward+backward multiply-adds per token, linears only
    for linears in per_layer:
        for lin in linears:
            if lin.slots is None:
                macs += 3 * lin.in_features * lin.out_features
            else:
                macs += 3 * lin.slots * (lin.in_features + lin.out_features)
                if lin.frozen_w0:
                    macs += 2 * lin.in_features * lin.out_features
    linear = 2 * macs
    attention = 2 * 3 * 2 * m.seq_length * m.hidden_size * m.num_layers
    logits = 2 * 3 * m.hidden_size * padded_vocab(cfg, vocab_size=vocab_size)
    label = (
        "dense"
        if not inrank
        else (
            "InRank at given slots"
            if layer_slots is not None
            else {"active": "InRank stage 1", "fraction": "InRank after cut"}[stage]
        )
    )
    return FlopCount(label, linear, attention, logits)
