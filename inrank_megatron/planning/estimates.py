"""What a run of a config costs before it is launched: parameters, memory and FLOPs, dense and
InRank, and whether its parallel layout fits ``nodes x gpus_per_node`` GPUs.

    cfg = load_config("configs/gpt2-medium.yaml")
    count_parameters(cfg, inrank=False).total              # == sum(p.numel()) of the built GPT
    count_parameters(cfg, stage="fraction").per_gpu        # after the cut at 33% of d_model
    plan(cfg, nodes=2, gpus_per_node=8).checks             # what tools/plan.py prints, as data

Parameter counts follow megatron.core's ``GPTModel`` as
:func:`inrank_megatron.models.gpt.build_gpt` builds it (local layer spec), layer by layer;
``tests/test_planning.py`` pins them to the built model exactly. InRank linears hold
``A [slots, in]`` and ``B [out, slots]`` (spec section 2); which slots count is the *stage*:

- ``storage``: what the layer allocates: efficient mode pre-allocates ``max_rank`` slots,
  cumulative mode ``rank + buffer`` (plus a frozen ``w0`` buffer, counted apart as ``buffers``);
- ``active``: the ``rank + buffer`` slots the forward pass uses in stage 1;
- ``fraction``: after the cut (spec section 4), ``round(rank_fraction * d_model)`` slots (clipped
  to what the rank rule can reach) and no buffer; cumulative mode never cuts and keeps its buffer.
  The paper reports at most 33% of the ranks (``r / d_model``), hence the default 0.33.

Model-state memory counts weights, gradients and optimizer state with the bytes per parameter
of the ZeRO paper (Rajbhandari et al. 2020, section 3.1): fp32 training keeps 4 + 4 bytes of
weights and gradients and 8 of Adam moments; bf16/fp16 under ZeRO keeps 2 + 2 and 12 of fp32
master weights and moments (:func:`bytes_per_parameter` has the torch and
Megatron backends). FLOPs are 6N-style (Kaplan et al. 2020; Narayanan et al. 2021):
twice the multiply-adds of every matmul per token forward, three times that for forward plus
backward.

Activation memory (:func:`activation_memory`) follows Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models"), adapted tensor by tensor to what this
code's layers keep for backward (fp32, autocast or 16-bit; local attention or SDPA; InRank's
``[tokens, k]`` intermediates; selective and full recompute; 1F1B's micro-batches in flight) and
checked against allocator peaks in tests/test_planning.py. :func:`fit` adds it to the model state
of the config's strategy and says whether a GPU holds the run, and which one change would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Sequence

from inrank_megatron import rules
from inrank_megatron.config import (
    ConfigError, TrainConfig, data_parallel_size, grad_accumulation_steps,
)
from inrank_megatron.models.shape import COLUMN_PARALLEL, linear_shapes

# Which InRank slots a count uses (the `stage` argument; not the growth stages of core.STAGES).
SLOT_COUNTS = ("storage", "active", "fraction")
DEFAULT_RANK_FRACTION = 0.33
STRATEGIES = ("zero0", "zero1", "zero2", "zero3", "megatron")
STRATEGY_NAMES = {"zero0": "ZeRO-0 (DDP)", "zero1": "ZeRO-1", "zero2": "ZeRO-2",
                  "zero3": "ZeRO-3", "megatron": "Megatron dist-opt"}


# ------------------------------------------------------------------------------------- model shape
def tokenizer_vocab_size(cfg: TrainConfig) -> int:
    """Ids of the config's tokenizer: 50257 for GPT-2 BPE; a SentencePiece model's piece count when
    its file exists, else the size ``tools/train_tokenizer.py`` trains by default."""
    if cfg.data.tokenizer == "gpt2":
        from inrank_megatron.data.tokenizers import GPT2_VOCAB_SIZE

        return GPT2_VOCAB_SIZE
    path = cfg.data.tokenizer_model
    if path and os.path.isfile(path):
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=path).get_piece_size()
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


def _ceil(a: int, b: int) -> int:
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


def _linears(cfg: TrainConfig, inrank: bool, slots: Callable[[int, int], int]) -> list[Linear]:
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
    last = ir.stage1_steps if ir.stage1_steps is not None else cfg.train.steps
    first = max(ir.warmup, 1)
    first += (ir.warmup - first) % ir.gap
    return 0 if last < first else (last - first) // ir.gap + 1


def reachable_rank(cfg: TrainConfig, in_features: int, out_features: int) -> int:
    """The largest rank the rule can give a layer: each check grows it by at most ``buffer - 1``
    and it stays below ``max_rank - buffer`` (spec section 3)."""
    ir = cfg.inrank
    cap = max(ir.rank, ir.layer_max_rank(in_features, out_features) - ir.buffer - 1)
    return min(ir.rank + rank_checks(cfg) * max(ir.buffer - 1, 0), cap)


def fraction_rank(cfg: TrainConfig, in_features: int, out_features: int,
                  rank_fraction: float = DEFAULT_RANK_FRACTION) -> int:
    """The rank after the cut at ``rank_fraction`` of d_model, clipped to what the rank rule can
    reach: never below ``inrank.rank``, never above :func:`reachable_rank`."""
    want = round(rank_fraction * cfg.model.hidden_size)
    return max(cfg.inrank.rank, min(want, reachable_rank(cfg, in_features, out_features)))


def _slot_rule(cfg: TrainConfig, stage: str, rank_fraction: float) -> Callable[[int, int], int]:
    ir = cfg.inrank
    if stage == "storage":
        if ir.mode == "efficient":
            return ir.layer_max_rank
        return lambda i, o: ir.rank + ir.buffer
    if stage == "active":
        return lambda i, o: ir.rank + ir.buffer
    if stage == "fraction":
        if ir.mode == "efficient":
            return lambda i, o: fraction_rank(cfg, i, o, rank_fraction)
        return lambda i, o: fraction_rank(cfg, i, o, rank_fraction) + ir.buffer
    raise ValueError(f"stage must be one of {SLOT_COUNTS}, got {stage!r}")


def _check_inrank(cfg: TrainConfig) -> None:
    """The InRank settings fit every InRank layer (the rule ``InRank rank fits``), whatever
    ``model.inrank`` says."""
    failures = rules.inrank_fit_failures(cfg)
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
    b_shard = (_ceil(n_out, tp) if lin.column else n_out) if bias else 0
    if lin.slots is None:
        shard = _ceil(n_out, tp) * n_in if lin.column else n_out * _ceil(n_in, tp)
        return n_in * n_out + b_total, shard + b_shard, 0, 0
    k = lin.slots
    total = k * (n_in + n_out) + b_total
    shard = (k * n_in + _ceil(n_out, tp) * k) if lin.column else (k * _ceil(n_in, tp) + n_out * k)
    w0, w0_shard = 0, 0
    if lin.frozen_w0:
        w0 = n_in * n_out
        w0_shard = _ceil(n_out, tp) * n_in if lin.column else n_out * _ceil(n_in, tp)
    return total, shard + b_shard, w0, w0_shard


def count_parameters(cfg: TrainConfig, *, tp: Optional[int] = None, pp: Optional[int] = None,
                     stage: str = "storage", rank_fraction: float = DEFAULT_RANK_FRACTION,
                     inrank: Optional[bool] = None,
                     vocab_size: Optional[int] = None) -> ParamCount:
    """Parameters of the config's GPT, total and per GPU.

    Args:
        cfg: the configuration.
        tp, pp: tensor / pipeline parallel sizes of the shards (default: the config's).
        stage: which InRank slots count: ``storage``, ``active`` or ``fraction`` (module docstring).
        rank_fraction: rank after the cut as a fraction of d_model (stage ``fraction``).
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
        _check_inrank(cfg)
    elif stage not in SLOT_COUNTS:
        raise ValueError(f"stage must be one of {SLOT_COUNTS}, got {stage!r}")
    slots = _slot_rule(cfg, stage, rank_fraction)
    h, vocab = m.hidden_size, padded_vocab(cfg, vocab_size=vocab_size)
    norm = 2 * h if m.normalization == "LayerNorm" else h  # torch LayerNorm: weight + bias

    layer_total = layer_shard = w0_total = w0_shard = 0
    attention = mlp = 0
    linears = _linears(cfg, inrank, slots)
    for lin in linears:
        t, s, w, ws = _linear_params(lin, m.add_bias_linear, tp)
        layer_total, layer_shard, w0_total, w0_shard = (layer_total + t, layer_shard + s,
                                                        w0_total + w, w0_shard + ws)
        if lin.kind in ("qkv", "proj"):
            attention += t
        else:
            mlp += t
    layer_total += 2 * norm  # input_layernorm, pre_mlp_layernorm
    layer_shard += 2 * norm  # norms are replicated over TP

    embed = vocab * h
    positions = m.max_positions() * h if m.position_embedding_type == "learned_absolute" else 0
    untied = m.untie_embeddings_and_output_weights
    breakdown = {"embeddings": embed, "positions": positions,
                 "attention": attention * m.num_layers, "mlp": mlp * m.num_layers,
                 "norms": (2 * m.num_layers + 1) * norm, "output": embed if untied else 0}
    total = sum(breakdown.values())

    # Pipeline stages: equal layer counts (validate_layout checks PP divides the layers); the first
    # holds the embeddings, the last the final norm and the output layer. Megatron allocates the
    # output weight on the last stage unless it is tied to an embedding on the same rank
    # (GPTModel: skip_weight_param_allocation=pre_process and share_embeddings_...).
    per_layer_stage = _ceil(m.num_layers, pp)
    per_stage, buffers_per_stage = [], []
    for p in range(pp):
        first, last = p == 0, p == pp - 1
        n = per_layer_stage * layer_shard
        if first:
            n += _ceil(vocab, tp) * h + positions
        if last:
            n += norm
            if untied or not first:
                n += _ceil(vocab, tp) * h
        per_stage.append(n)
        buffers_per_stage.append(per_layer_stage * w0_shard)

    slot_map = {lin.kind: lin.slots for lin in linears if lin.slots is not None}
    label = "dense" if not inrank else {"storage": "InRank allocated", "active": "InRank stage 1",
                                        "fraction": "InRank after cut"}[stage]
    return ParamCount(label=label, inrank=inrank, stage="dense" if not inrank else stage, tp=tp,
                      pp=pp, vocab_size=vocab, total=total, buffers=w0_total * m.num_layers,
                      per_stage=tuple(per_stage), buffers_per_stage=tuple(buffers_per_stage),
                      slots=slot_map, breakdown=breakdown)


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
    weights = (_ceil(n, dp) if stage >= 3 else n) * wb + params.buffers_per_gpu * wb
    grads = (_ceil(n, dp) if stage >= 2 else n) * gb
    optim = (_ceil(n, dp) if stage >= 1 else n) * ob
    return MemoryEstimate(strategy, weights, grads, optim)


def memory_per_gpu(cfg: TrainConfig, world_size: int, *, inrank: Optional[bool] = None,
                   stage: str = "storage", rank_fraction: float = DEFAULT_RANK_FRACTION,
                   vocab_size: Optional[int] = None) -> dict[str, MemoryEstimate]:
    """Bytes per GPU of weights, gradients and optimizer state under every strategy of
    :data:`STRATEGIES`, for the config's layout on ``world_size`` GPUs (activations apart).

    Raises:
        ConfigError: TP * PP does not divide ``world_size``.
    """
    dp = data_parallel_size(cfg, world_size)
    params = count_parameters(cfg, stage=stage, rank_fraction=rank_fraction, inrank=inrank,
                              vocab_size=vocab_size)
    return {s: memory_for(params, cfg.train.precision, dp, s) for s in STRATEGIES}


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
        return f"zero{rules.zero_stage(cfg)}"
    except (ConfigError, TypeError, ValueError, AttributeError):
        return "zero0"


# ----------------------------------------------------------------------------------- activations
ATTENTIONS = ("local", "sdpa")
RECOMPUTES = ("none", "selective", "full")
# (attention, recompute) pairs a config can run (selective recomputes local attention only).
ACTIVATION_VARIANTS = (("local", "none"), ("local", "selective"), ("local", "full"),
                       ("sdpa", "none"), ("sdpa", "full"))


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes per element of what backward keeps, by role, for a precision and backend.

    fp32: 4 everywhere. DeepSpeed bf16/fp16 casts the module, so everything is 16-bit. The torch
    and megatron backends autocast over fp32 weights (CUDA autocast policy): the residual stream
    and norm inputs stay fp32, linears keep the 16-bit cast of their input, ``fc1 + bias`` is
    promoted to fp32 by the fp32 bias, and local attention keeps the fp32 softmax output and its
    16-bit cast for the second matmul. The cross entropy keeps fp32 logits in every case
    (megatron's ``vocab_parallel_cross_entropy`` casts them), SDPA an fp32 log-sum-exp.

    Attributes:
        residual: layer inputs and norm inputs.
        linear_input: a linear's saved input (autocast: its 16-bit copy).
        compute: matmul outputs kept (q, k, v, attention context, InRank ``[tokens, k]``).
        act_input: the MLP activation's input (``fc1`` output plus bias).
        probs: one local-attention probability (softmax output, plus its cast under autocast).
    """

    residual: int
    linear_input: int
    compute: int
    act_input: int
    probs: int


def activation_bytes(cfg: TrainConfig) -> ActivationBytes:
    """:class:`ActivationBytes` of the config's ``train.precision`` and ``parallel.backend``."""
    precision = cfg.train.precision
    if precision == "fp32":
        return ActivationBytes(4, 4, 4, 4, 4)
    if cfg.parallel.backend == "deepspeed":
        return ActivationBytes(2, 2, 2, 2, 2)
    return ActivationBytes(4, 2, 2, 4 if cfg.model.add_bias_linear else 2, 4 + 2)


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation memory on the fullest GPU for one model variant, attention and recompute.

    Attributes:
        label: the model variant (``dense``, ``InRank stage 1``, ``InRank after cut``).
        attention, recompute: the settings counted.
        layer: bytes one transformer layer keeps for backward without recompute (one micro-batch).
        kept: bytes kept through the forward of the fullest pipeline stage: its layers (inputs
            only where recomputed), embeddings or head, times the micro-batches 1F1B keeps in
            flight there.
        transient: the largest buffer live on top of ``kept`` in backward: the output layer's
            gradients, or one layer recomputed with its gradients, or local attention's
            score gradients.
        in_flight: micro-batches in flight on that stage.
    """

    label: str
    attention: str
    recompute: str
    layer: int
    kept: int
    transient: int
    in_flight: int

    @property
    def total(self) -> int:
        return self.kept + self.transient


def _layer_activations(cfg: TrainConfig, linears: list, tp: int, micro_batch: int,
                       attention: str, dt: ActivationBytes) -> tuple[int, int]:
    """``(core, rest)``: bytes one transformer layer keeps for backward, split into what core
    attention keeps (what selective recompute drops) and the rest.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    section 4) count ``sbh (34 + 5 a s / h)`` bytes per layer in 16-bit with dropout; the terms
    here are the tensors this code's layers save (checked against saved tensors and allocator
    peaks in tests/test_planning.py):

    - norms: their input (the residual stream) and fp32 mean / rstd, ``[s, b, h]`` each;
    - column linears (qkv, fc1): their input (the sequence shard under SP, as megatron's linear
      re-gathers it in backward); row linears (proj, fc2): their ``1/tp`` input;
    - InRank linears keep their ``[s, b, k]`` intermediate too: full sequence for column layers
      (gathered), the SP shard for row layers (reduce-scattered), on every TP rank;
    - q, k, v (``3 sbh / tp``), kept by the attention or by its checkpoint;
    - local attention: the softmax output ``[b, a/tp, s, s]`` (plus dropout mask and output when
      attention dropout is on) and the ``[s, s]`` causal mask (megatron rebuilds it per layer);
      SDPA: its fp32 log-sum-exp ``[b, a/tp, s]`` (its output is ``linear_proj``'s input);
    - the activation's input ``[s, b, ffn / tp]`` (SwiGLU: ``2 ffn`` gated input plus
      ``silu(x1)``);
    - hidden dropout masks (1 byte) when ``model.hidden_dropout > 0``.
    """
    m = cfg.model
    s, b, h, a = m.seq_length, micro_batch, m.hidden_size, m.num_attention_heads
    sp = cfg.parallel.sequence_parallel and tp > 1
    sp_div = tp if sp else 1
    tokens = s * b
    rest = 2 * (dt.residual * tokens * h + 2 * 4 * tokens) // sp_div  # norm inputs, mean, rstd
    if m.hidden_dropout > 0:
        rest += 2 * tokens * h // sp_div
    for lin in linears:
        if lin.column:
            rest += dt.linear_input * tokens * lin.in_features // sp_div
            if lin.slots is not None:
                rest += dt.compute * tokens * lin.slots
                if lin.frozen_w0 and sp:  # the dense W0 path keeps the gathered input
                    rest += dt.linear_input * tokens * lin.in_features
        else:
            saved = dt.compute if lin.kind == "proj" else dt.linear_input
            rest += saved * tokens * lin.in_features // tp
            if lin.slots is not None:
                rest += dt.compute * tokens * lin.slots // sp_div
    rest += 3 * dt.compute * tokens * h // tp  # q, k, v
    f = m.ffn()
    rest += dt.act_input * tokens * (3 if m.activation == "swiglu" else 1) * f // tp
    heads = a // tp
    if attention == "local":
        core = dt.probs * b * heads * s * s + s * s
        if m.attention_dropout > 0:
            core += (1 + dt.compute) * b * heads * s * s
    else:
        core = 4 * b * heads * s
    return core, rest


def activation_memory(cfg: TrainConfig, *, inrank: Optional[bool] = None, stage: str = "active",
                      attention: Optional[str] = None, recompute: Optional[str] = None,
                      recompute_num_layers: Optional[int] = None, tp: Optional[int] = None,
                      micro_batch_size: Optional[int] = None,
                      rank_fraction: float = DEFAULT_RANK_FRACTION,
                      vocab_size: Optional[int] = None,
                      num_microbatches: Optional[int] = None) -> ActivationEstimate:
    """Activation bytes on the fullest GPU of one training micro-batch step.

    Args:
        cfg: the configuration (sequence, micro batch, TP/SP/PP, precision, backend).
        inrank: InRank (True) or the dense twin (False); default ``model.inrank``.
        stage: InRank slots in use: ``active`` (stage 1: rank + buffer) or ``fraction`` (after
            the cut); ``storage`` counts as ``active`` (the forward uses the active slots).
        attention, recompute, recompute_num_layers: default the config's ``model.*``.
        tp, micro_batch_size: default the config's.
        num_microbatches: micro-batches per optimizer step on a rank (bounds what 1F1B keeps in
            flight); default: as many as pipeline stages.

    Per layer see :func:`_layer_activations`. Recompute (Korthikanti et al. 2022, section 5):
    ``selective`` drops core attention's part and recomputes it in backward; ``full`` keeps only
    the input ``[s, b, h]`` (the SP shard) of each recomputed layer and rebuilds one layer at a
    time in backward. Pipeline: under 1F1B the first stage keeps ``min(PP, micro-batches)``
    micro-batches in flight, the last one; the head keeps the final norm's and output layer's
    inputs and the fp32 ``[s, b, vocab / tp]`` the cross entropy saves.
    """
    m = cfg.model
    inrank = m.inrank if inrank is None else inrank
    attention = attention or m.attention
    recompute = recompute or m.recompute
    if attention not in ATTENTIONS or recompute not in RECOMPUTES:
        raise ValueError(f"attention must be one of {ATTENTIONS} and recompute one of "
                         f"{RECOMPUTES}, got {attention!r}, {recompute!r}")
    if recompute_num_layers is None and recompute == m.recompute:
        recompute_num_layers = m.recompute_num_layers
    tp = tp or cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    b = micro_batch_size or cfg.train.micro_batch_size
    stage = "active" if stage == "storage" else stage
    if inrank:
        _check_inrank(cfg)
    linears = _linears(cfg, inrank, _slot_rule(cfg, stage, rank_fraction))
    dt = activation_bytes(cfg)
    core, rest = _layer_activations(cfg, linears, tp, b, attention, dt)
    layer = core + rest
    s, h = m.seq_length, m.hidden_size
    sp_div = tp if cfg.parallel.sequence_parallel and tp > 1 else 1
    tokens = s * b
    layer_input = dt.residual * tokens * h // sp_div
    per_stage = _ceil(m.num_layers, pp)

    heads = m.num_attention_heads // tp
    sp = sp_div > 1
    # megatron's global "mpu" buffers persist: local attention's baddbmm writes its scores into
    # one ([b * a / tp, s, s]), and under SP column-parallel linears all-gather their input into
    # one ([s, b, h]); one buffer per dtype, as large as the largest request.
    buffers = {}
    if attention == "local":
        buffers[dt.compute] = b * heads * s * s
    if sp:
        buffers[dt.linear_input if dt.residual == dt.linear_input else dt.residual] = max(
            buffers.get(dt.residual, 0), tokens * h)
    persistent = sum(nbytes * numel for nbytes, numel in buffers.items())
    if attention == "local":
        # Backward of one layer's attention holds the gradients of the probabilities and of the
        # scores, each as large as the probabilities (fp32 under autocast).
        attention_backward = 2 * min(dt.probs, 4) * b * heads * s * s
    else:
        # dq, dk, dv and d(out), plus fp32 accumulators of dq, dk, dv (torch's CPU flash
        # kernel; FlashAttention-2 keeps dq's).
        attention_backward = (4 * dt.compute + 3 * 4) * tokens * h // tp
    if sp:  # a column linear's input gradient is full-sequence before its reduce-scatter
        attention_backward += dt.compute * tokens * h
    n = 0
    if recompute == "full":
        n = min(recompute_num_layers or per_stage, per_stage)
        layers_kept = n * layer_input + (per_stage - n) * layer
    elif recompute == "selective":
        layers_kept = per_stage * rest
    else:
        layers_kept = per_stage * layer
    # Backward of the stage's last layer (the others still kept); with full recompute, of its
    # last recomputed layer, rebuilt with the gradients of its output and input, after the
    # layers behind it are freed (megatron's block method recomputes the first n).
    last_layer = attention_backward + (core if recompute == "selective" else 0)
    if n:
        last_layer = max(last_layer if n < per_stage else 0,
                         layer + attention_backward + 2 * layer_input
                         - (per_stage - n) * layer)
    vocab_shard = _ceil(padded_vocab(cfg, vocab_size=vocab_size), tp)
    embed = 2 * 8 * tokens  # token and position ids
    # Final norm input and stats, output layer input, the cross entropy's fp32 logits, labels.
    head = (dt.residual * tokens * h + 2 * 4 * tokens + dt.linear_input * tokens * h) // sp_div \
        + 4 * tokens * vocab_shard + 9 * tokens
    # Start of backward: the output weight's gradient (under autocast, its 16-bit product and
    # the fp32 cast), the gradient of the output layer's input and, in 16-bit, the 16-bit cast
    # of the logits' fp32 gradient.
    autocast = dt.residual > dt.linear_input
    head_backward = (dt.compute + (4 if autocast else 0)) * vocab_shard * h \
        + dt.residual * tokens * h
    if dt.compute < 4:
        head_backward += dt.compute * tokens * vocab_shard
    micro = num_microbatches if num_microbatches is not None else pp
    best = None
    for p in range(pp):
        first, last = p == 0, p == pp - 1
        flight = max(1, min(pp - p, micro))
        kept = persistent + flight * (layers_kept + (embed if first else 0) +
                                      (head if last else 0))
        # The head's backward comes first; the layers' after the head's buffers are freed.
        extra = max(head_backward, last_layer - head) if last else last_layer
        if best is None or kept + extra > best[0] + best[1]:
            best = (kept, extra, flight)
    label = "dense" if not inrank else {"active": "InRank stage 1",
                                        "fraction": "InRank after cut"}[stage]
    return ActivationEstimate(label=label, attention=attention, recompute=recompute, layer=layer,
                              kept=best[0], transient=best[1], in_flight=best[2])


# ------------------------------------------------------------------------------------------- fit
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


def _phases(cfg: TrainConfig, world_size: int, rank_fraction: float,
            vocab_size: Optional[int]) -> tuple:
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
        out.append({"model.attention": "sdpa"} |
                   ({"model.recompute": "none"} if m.recompute == "selective" else {}))
        if m.recompute == "none":
            out.append({"model.recompute": "selective"})
    per_stage = m.num_layers // p.pipeline_model_parallel_size
    if m.recompute != "full" or m.recompute_num_layers is not None:
        first = m.recompute_num_layers + 1 if m.recompute == "full" else 1
        for n in range(first, per_stage + 1):
            out.append({"model.attention": "sdpa", "model.recompute": "full",
                        "model.recompute_num_layers": n if n < per_stage else None})
    mb = cfg.train.micro_batch_size
    for smaller in range(mb - 1, 0, -1):
        if mb % smaller == 0:
            out.append({"train.micro_batch_size": smaller})
    tp = p.tensor_model_parallel_size
    if 2 * tp <= gpus_per_node:
        out.append({"parallel.tensor_model_parallel_size": 2 * tp,
                    "parallel.sequence_parallel": True})
    return out


def fit(cfg: TrainConfig, world_size: int, *, gpus_per_node: int,
        gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
        rank_fraction: float = DEFAULT_RANK_FRACTION, vocab_size: Optional[int] = None,
        max_suggestions: int = 3) -> Fit:
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


def flops_per_token(cfg: TrainConfig, *, inrank: Optional[bool] = None, stage: str = "active",
                    rank_fraction: float = DEFAULT_RANK_FRACTION,
                    vocab_size: Optional[int] = None,
                    layer_slots: Optional[Sequence[Mapping[str, int]]] = None) -> FlopCount:
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
        _check_inrank(cfg)
    stage = "active" if stage == "storage" else stage
    if layer_slots is None:
        per_layer = [_linears(cfg, inrank, _slot_rule(cfg, stage, rank_fraction))] * m.num_layers
    else:
        if len(layer_slots) != m.num_layers:
            raise ValueError(f"layer_slots has {len(layer_slots)} entries, expected one per "
                             f"transformer layer ({m.num_layers})")
        template = _linears(cfg, inrank, _slot_rule(cfg, stage, rank_fraction))
        per_layer = [[lin if lin.slots is None else replace(lin, slots=slots[lin.kind])
                      for lin in template] for slots in layer_slots]
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
    label = "dense" if not inrank else ("InRank at given slots" if layer_slots is not None else
                                        {"active": "InRank stage 1",
                                         "fraction": "InRank after cut"}[stage])
    return FlopCount(label, linear, attention, logits)


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
    own (so that every problem shows, not only the first): the rows ``validate_layout`` passes or
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
    rank_fraction: float
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


def plan(cfg: TrainConfig, nodes: int, gpus_per_node: int, *,
         rank_fraction: float = DEFAULT_RANK_FRACTION, vocab_size: Optional[int] = None,
         config_path: Optional[str] = None,
         gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB) -> Plan:
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
    if not 0 < rank_fraction <= 1:
        raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction!r}")
    world = nodes * gpus_per_node
    vocab = vocab_size or tokenizer_vocab_size(cfg)
    kw = dict(rank_fraction=rank_fraction, vocab_size=vocab)
    try:
        _check_inrank(cfg)
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
        memory = {key: {s: memory_for(pc, cfg.train.precision, dp, s) for s in STRATEGIES}
                  for key, pc in params.items()}
    activations, fit_result = {}, None
    if accumulation is not None:
        keys = [("dense", False, "active")]
        if inrank_error is None:
            keys += [("active", True, "active"), ("fraction", True, "fraction")]
        for key, inrank, stage in keys:
            activations[key] = {
                (a, r): activation_memory(cfg, inrank=inrank, stage=stage, attention=a,
                                          recompute=r, num_microbatches=accumulation, **kw)
                for a, r in ACTIVATION_VARIANTS}
        if all(c.ok for c in checks):
            fit_result = fit(cfg, world, gpus_per_node=gpus_per_node,
                             gpu_memory_gib=gpu_memory_gib, **kw)
    return Plan(cfg=cfg, nodes=nodes, gpus_per_node=gpus_per_node, world_size=world,
                rank_fraction=rank_fraction, vocab_size=vocab, params=params, memory=memory,
                flops=flops, checks=checks, strategy=selected_strategy(cfg), dp=dp,
                grad_accumulation=accumulation, config_path=config_path,
                inrank_error=inrank_error, activations=activations, fit=fit_result)
