"""Activation memory of one micro-batch on the fullest GPU (what ``tools/plan.py`` and the rule
"activations fit" read).

:func:`activation_memory` follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models"), adapted tensor by tensor to what this code's layers keep for backward
(fp32, autocast or 16-bit; local attention or SDPA; InRank's ``[tokens, k]`` intermediates;
selective and full recompute; 1F1B's micro-batches in flight) and checked against allocator peaks
in tests/test_planning.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from inrank_megatron.config import TrainConfig
from inrank_megatron.planning.estimates import (
    ceil_div,
    check_inrank,
    layer_linears,
    padded_vocab,
    slot_rule,
)

ATTENTIONS = ("local", "sdpa")
RECOMPUTES = ("none", "selective", "full")
# (attention, recompute) pairs a config can run (selective recomputes local attention only).
ACTIVATION_VARIANTS = (
    ("local", "none"),
    ("local", "selective"),
    ("local", "full"),
    ("sdpa", "none"),
    ("sdpa", "full"),
)


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


def _layer_activations(
    cfg: TrainConfig, linears: list, tp: int, micro_batch: int, attention: str, dt: ActivationBytes
) -> tuple[int, int]:
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


def activation_memory(
    cfg: TrainConfig,
    *,
    inrank: Optional[bool] = None,
    stage: str = "active",
    attention: Optional[str] = None,
    recompute: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
    tp: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
    rank_fraction: Optional[float] = None,
    vocab_size: Optional[int] = None,
    num_microbatches: Optional[int] = None,
) -> ActivationEstimate:
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
        raise ValueError(
            f"attention must be one of {ATTENTIONS} and recompute one of "
            f"{RECOMPUTES}, got {attention!r}, {recompute!r}"
        )
    if recompute_num_layers is None and recompute == m.recompute:
        recompute_num_layers = m.recompute_num_layers
    tp = tp or cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    b = micro_batch_size or cfg.train.micro_batch_size
    stage = "active" if stage == "storage" else stage
    if inrank:
        check_inrank(cfg)
    linears = layer_linears(cfg, inrank, slot_rule(cfg, stage, rank_fraction))
    dt = activation_bytes(cfg)
    core, rest = _layer_activations(cfg, linears, tp, b, attention, dt)
    layer = core + rest
    s, h = m.seq_length, m.hidden_size
    sp_div = tp if cfg.parallel.sequence_parallel and tp > 1 else 1
    tokens = s * b
    layer_input = dt.residual * tokens * h // sp_div
    per_stage = ceil_div(m.num_layers, pp)

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
            buffers.get(dt.residual, 0), tokens * h
        )
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
        last_layer = max(
            last_layer if n < per_stage else 0,
            layer + attention_backward + 2 * layer_input - (per_stage - n) * layer,
        )
    vocab_shard = ceil_div(padded_vocab(cfg, vocab_size=vocab_size), tp)
    embed = 2 * 8 * tokens  # token and position ids
    # Final norm input and stats, output layer input, the cross entropy's fp32 logits, labels.
    head = (
        (dt.residual * tokens * h + 2 * 4 * tokens + dt.linear_input * tokens * h) // sp_div
        + 4 * tokens * vocab_shard
        + 9 * tokens
    )
    # Start of backward: the output weight's gradient (under autocast, its 16-bit product and
    # the fp32 cast), the gradient of the output layer's input and, in 16-bit, the 16-bit cast
    # of the logits' fp32 gradient.
    autocast = dt.residual > dt.linear_input
    head_backward = (
        dt.compute + (4 if autocast else 0)
    ) * vocab_shard * h + dt.residual * tokens * h
    if dt.compute < 4:
        head_backward += dt.compute * tokens * vocab_shard
    micro = num_microbatches if num_microbatches is not None else pp
    best = None
    for p in range(pp):
        first, last = p == 0, p == pp - 1
        flight = max(1, min(pp - p, micro))
        kept = persistent + flight * (layers_kept + (embed if first else 0) + (head if last else 0))
        # The head's backward comes first; the layers' after the head's buffers are freed.
        extra = max(head_backward, last_layer - head) if last else last_layer
        if best is None or kept + extra > best[0] + best[1]:
            best = (kept, extra, flight)
    label = (
        "dense"
        if not inrank
        else {"active": "InRank stage 1", "fraction": "InRank after cut"}[stage]
    )
    return ActivationEstimate(
        label=label,
        attention=attention,
        recompute=recompute,
        layer=layer,
        kept=best[0],
        transient=best[1],
        in_flight=best[2],
    )
