#!/usr/bin/env python
"""Plan a run before launching it: parameters, memory per GPU and training FLOPs of a config's GPT,
dense and InRank, and whether its TP/PP/DP layout fits the cluster.

    python tools/plan.py --config configs/gpt2-medium.yaml --nodes 2 --gpus-per-node 8
    python tools/plan.py --config configs/gpt-13b.yaml --nodes 1 --gpus-per-node 8 \\
        parallel.tensor_model_parallel_size=8 --rank-fraction 0.25

What it prints (inrank_megatron/planning/ has the formulas and their sources):

  - the rules of inrank_megatron/rules.py, one row each (pass/FAIL, naming the key), with
    world_size = nodes x GPUs per node, heads per TP rank, layers per pipeline stage, micro and
    global batch and gradient-accumulation steps;
  - parameters, total and per GPU (one TP shard of the fullest pipeline stage): dense; InRank as
    allocated (efficient mode: max_rank slots); InRank with the rank + buffer slots active in
    stage 1; InRank after the cut at --rank-fraction of d_model (the paper: at most 33%);
  - bytes per GPU of weights, gradients and optimizer state (Adam moments, plus fp32 master
    weights in bf16/fp16) under ZeRO 0/1/2/3 and Megatron's distributed optimizer, sharded over
    DP; the config's own backend is marked;
  - activations per GPU for the config's micro batch, sequence, TP/SP/PP and precision, with
    each attention (local, sdpa) and recompute (none, selective, full), dense and InRank
    (stage-1 active slots and after the cut);
  - whether the run fits --gpu-memory-gib GPUs (model state + activations, stage 1 and after
    the cut) and, when it does not, which one change fits (SDPA, recompute, a smaller micro
    batch, 2x TP);
  - training FLOPs per token of the matmuls (linears, attention, logits), dense and InRank;
  - the data, when its files exist: samples, tokens and epochs the run takes of each dataset of
    data.prefix (each of a blend, by its weight) and data.valid_prefix, train and valid.

Overrides are the training CLI's: section.key=value, read as YAML. Exit status: 0 if every
layout check passes, 1 if one fails, 2 for a bad argument or configuration (a run that does
not fit the GPU memory is reported, not an error).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from inrank_megatron.config import ConfigError, format_value, inrank_layer_shapes, load_config
from inrank_megatron.planning.activations import ACTIVATION_VARIANTS
from inrank_megatron.planning.estimates import (
    STRATEGIES,
    STRATEGY_NAMES,
    ParamCount,
    bytes_per_parameter,
    rank_checks,
    reachable_rank,
)
from inrank_megatron.planning.plan import DEFAULT_GPU_MEMORY_GIB, Plan, plan
from inrank_megatron.text_table import aligned_table


# ------------------------------------------------------------------------------------ formatting
def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def _slots_text(pc: ParamCount) -> str:
    values = sorted(set(pc.slots.values()))
    return "/".join(str(v) for v in values) if values else "-"


def _cut_rank_text(p: Plan) -> str:
    if p.rank_fraction is not None:
        return f"rank {p.rank_fraction:g} x d"
    return "rank the rule reaches"


def _variant_name(attention: str, recompute: str) -> str:
    return attention if recompute == "none" else f"{attention}+{recompute}"


def _overrides_text(change: dict) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in change.items())


def _format_activations(p: Plan) -> list[str]:
    """The activation table and the fit on ``--gpu-memory-gib`` GPUs."""
    if not p.activations:
        return ["Activations per GPU: not computed (the batch does not fit this layout)", ""]
    cfg = p.cfg
    m, par, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    any_estimate = next(iter(p.activations["dense"].values()))
    autocast = " autocast" if t.precision != "fp32" and par.backend != "deepspeed" else ""
    out = [
        f"Activations per GPU, GiB: micro batch {t.micro_batch_size} x seq {m.seq_length}, "
        f"TP {tp}, SP {'on' if par.sequence_parallel and tp > 1 else 'off'}, PP {pp}, "
        f"{t.precision}{autocast}",
        f"  (kept for backward, {any_estimate.in_flight} micro-batch(es) in flight on the "
        "fullest stage, + the largest backward buffer;",
        "  Korthikanti et al. 2022 adapted to this code: planning.activations.activation_memory)",
    ]
    labels = {
        "dense": "dense",
        "active": "InRank stage 1 (rank + buffer)",
        "fraction": f"InRank after cut ({_cut_rank_text(p)})",
    }
    mine = (m.attention, m.recompute)
    header = ["model"] + [
        _variant_name(a, r) + (" *" if (a, r) == mine else "") for a, r in ACTIVATION_VARIANTS
    ]
    rows = [
        [labels[key]] + [_gib(by[v].total) for v in ACTIVATION_VARIANTS]
        for key, by in p.activations.items()
    ]
    out += aligned_table(header, rows)
    out.append(
        "  * the config's model.attention / model.recompute"
        + (
            f" (recompute_num_layers {m.recompute_num_layers})"
            if m.recompute_num_layers is not None
            else ""
        )
    )
    out.append("")
    f = p.fit
    if f is None:
        return out + ["Fit: not computed (a layout check fails)", ""]
    gib = f.gpu_bytes / 2**30
    out.append(
        f"Fit on {gib:g} GiB GPUs ({STRATEGY_NAMES[p.strategy]}, "
        f"attention {m.attention}, recompute {m.recompute}): "
        f"{'fits' if f.fits else 'does NOT fit'}"
    )
    out += aligned_table(
        ["phase", "state", "activations", "total", "free"],
        [
            [
                ph.label,
                _gib(ph.state),
                _gib(ph.activations),
                _gib(ph.total),
                _gib(f.gpu_bytes - ph.total),
            ]
            for ph in f.phases
        ],
    )
    if not f.fits:
        if f.suggestions:
            out.append("  Fits with any one of (cheapest first):")
            for change, total in f.suggestions:
                out.append(f"    {_overrides_text(change)}  -> {_gib(total)} GiB")
        else:
            out.append(
                "  Nothing tried fits (SDPA, recompute, smaller micro batch, 2x TP): "
                "use more GPUs per replica (TP/PP) or ZeRO-3."
            )
    out.append("")
    return out


def format_plan(p: Plan) -> str:
    """The plan as plain aligned text tables."""
    cfg = p.cfg
    m, ir, par, t = cfg.model, cfg.inrank, cfg.parallel, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    out = []
    where = p.config_path or "config"
    out.append(
        f"Plan for {where} on {p.nodes} node(s) x {p.gpus_per_node} GPUs = {p.world_size} GPUs"
    )
    out.append("")
    dense = p.params["dense"]
    pos = "learned positions" if m.position_embedding_type == "learned_absolute" else "rope"
    tied = "untied" if m.untie_embeddings_and_output_weights else "tied"
    out.append(
        f"  model     {m.num_layers} layers x hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads, ffn {m.ffn()}, seq {m.seq_length}, "
        f"{m.normalization}, {m.activation}, {pos}, {tied} embeddings"
        f"{'' if m.inrank else ' (config is the dense twin: model.inrank=false)'}"
    )
    out.append(
        f"  vocab     {cfg.data.tokenizer} {p.vocab_size} ids, padded to {dense.vocab_size} "
        f"(multiple of {m.make_vocab_size_divisible_by}), {dense.vocab_size / tp:g} per TP "
        "rank"
    )
    shapes = inrank_layer_shapes(cfg)
    layer_text = ", ".join(
        f"{k} {i}->{o} max_rank {ir.layer_max_rank(i, o)}" for k, (i, o) in shapes.items()
    )
    out.append(f"  InRank    {ir.mode}: {layer_text}; rank {ir.rank} + buffer {ir.buffer}")
    until = (
        f"cut after step {ir.stage1_steps}"
        if ir.stage1_steps is not None
        else f"no cut (to step {t.steps})"
    )
    reach = "/".join(
        str(v) for v in sorted({reachable_rank(cfg, i, o) for i, o in shapes.values()})
    )
    out.append(
        f"            threshold {ir.threshold}, checks every {ir.gap} steps from step "
        f"{ir.warmup}, {until}: {rank_checks(cfg)} checks, rank <= {reach} reachable"
    )
    dp_text = str(p.dp) if p.dp is not None else "?"
    out.append(
        f"  layout    TP {tp} x PP {pp} x DP {dp_text}, sequence parallel "
        f"{'on' if par.sequence_parallel else 'off'}, backend {par.backend} "
        f"= {STRATEGY_NAMES[p.strategy]}, precision {t.precision}"
    )
    if p.grad_accumulation is not None:
        out.append(
            f"  batch     micro {t.micro_batch_size} x DP {p.dp} x {p.grad_accumulation} "
            f"accumulation steps = global {t.global_batch_size} sequences = "
            f"{t.global_batch_size * m.seq_length:,} tokens per step"
        )
    else:
        out.append(
            f"  batch     micro {t.micro_batch_size}, global {t.global_batch_size}: "
            "does not fit this layout (see checks)"
        )
    out.append(
        f"  heads     {m.num_attention_heads / tp:g} per TP rank; layers "
        f"{m.num_layers / pp:g} per pipeline stage"
    )
    out.append("")

    out.append(f"Layout checks (world_size = {p.world_size}): {'all pass' if p.ok else 'FAILED'}")
    out += aligned_table(
        ["check", "result", "detail"],
        [[c.name, "pass" if c.ok else "FAIL", c.detail] for c in p.checks],
        left=3,
    )
    out.append("")

    labels = {
        "dense": "dense",
        "storage": f"InRank allocated ({ir.mode} storage)",
        "active": "InRank stage 1 active (rank + buffer)",
        "fraction": (
            f"InRank after cut ({_cut_rank_text(p)})"
            if ir.mode == "efficient"
            else f"InRank at {_cut_rank_text(p)} + buffer"
        ),
    }
    out.append(f"Parameters (per GPU = one TP shard of the fullest of {pp} pipeline stage(s))")
    rows = []
    for key, pc in p.params.items():
        rows.append(
            [
                labels[key],
                _slots_text(pc),
                _count(pc.total),
                _count(pc.per_gpu),
                f"{dense.total / pc.total:.2f}x",
            ]
        )
    out += aligned_table(["model", "slots/layer", "total", "per GPU", "dense / this"], rows)
    storage = p.params.get("storage")
    if storage is not None and storage.buffers:
        out.append(
            f"  + frozen w0 buffers (cumulative mode, not trainable): "
            f"{_count(storage.buffers)} total, {_count(storage.buffers_per_gpu)} per GPU"
        )
    if p.inrank_error:
        out.append(f"  InRank not computed: {p.inrank_error}")
    out.append("")

    if p.memory:
        per_param = ", ".join(
            f"{STRATEGY_NAMES[k]} {'+'.join(str(b) for b in bytes_per_parameter(t.precision, k))}"
            for k in ("zero0", "zero1", "megatron")
        )
        out.append(
            f"Memory per GPU, GiB: weights + gradients + optimizer state, sharded over "
            f"DP {p.dp} (activations below)"
        )
        out.append(
            f"  ({t.precision}, bytes per parameter before sharding: {per_param}; "
            "ZeRO-2/3 as ZeRO-1)"
        )
        out.append("  (InRank as allocated is what stage 1 holds)")
        rows = []
        for key in [k for k in ("dense", "storage", "fraction") if k in p.memory]:
            for s in STRATEGIES:
                e = p.memory[key][s]
                mark = " *" if s == p.strategy else ""
                rows.append(
                    [
                        labels[key] if s == STRATEGIES[0] else "",
                        e.name + mark,
                        _gib(e.weights),
                        _gib(e.gradients),
                        _gib(e.optimizer),
                        _gib(e.total),
                    ]
                )
        out += aligned_table(
            ["model", "strategy", "weights", "grads", "optimizer", "total"], rows, left=2
        )
        out.append(
            f"  * the config's backend ({par.backend}). ZeRO-0 is the torch backend (DDP, "
            "autocast over fp32"
        )
        out.append(
            "    weights); Megatron dist-opt shards the optimizer state, fp32 master "
            "weights included, over DP."
        )
    else:
        out.append("Memory per GPU: not computed (TP x PP does not divide the world size)")
    out.append("")
    out += _format_activations(p)

    tokens = t.global_batch_size * m.seq_length
    out.append(
        "Training FLOPs per token: forward + backward = 3 x 2 x multiply-adds of the matmuls"
    )
    out.append("  (norms, softmax, GELU and the rank checks' QR/SVD not counted)")
    flops_labels = {
        "dense": "dense",
        "active": "InRank stage 1 (rank + buffer slots)",
        "fraction": labels["fraction"],
    }
    rows = []
    fd = p.flops["dense"]
    for key, fc in p.flops.items():
        rows.append(
            [
                flops_labels[key],
                _flops(fc.linear),
                _flops(fc.attention),
                _flops(fc.logits),
                _flops(fc.total),
                f"{fd.total / fc.total:.2f}x",
                _flops(fc.total * tokens),
            ]
        )
    out += aligned_table(
        [
            "model",
            "linears",
            "attention",
            "logits",
            "total",
            "dense / this",
            f"per step ({tokens:,} tokens)",
        ],
        rows,
    )
    return "\n".join(out) + "\n"


def _format_data(cfg, dp) -> list[str]:
    """The samples and epochs the run takes of each dataset (the console's report at start), or
    why they are not counted."""
    from inrank_megatron.data.checks import datasets_of
    from inrank_megatron.training.data import data_report

    missing = [
        f"{key}={prefix!r}"
        for key, prefix, _ in datasets_of(cfg)
        if not all(os.path.isfile(prefix + s) for s in (".bin", ".idx"))
    ]
    if cfg.data.prefix is None or missing or dp is None:
        why = (
            "the layout does not fit"
            if dp is None and not missing
            else f"no data: {', '.join(missing) or 'data.prefix=null'}"
        )
        return [f"Data: not counted ({why})"]
    try:
        with warnings.catch_warnings():  # megatron's import notices (no TE/apex): not the plan's
            warnings.simplefilter("ignore")
            return [
                "Data: what the run reads of each dataset (epochs past 1 repeat it)",
                *data_report(cfg, dp),
            ]
    except ValueError as error:
        return [f"Data: not counted ({error})"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        required=True,
        metavar="YAML",
        help="Training configuration, e.g. configs/gpt2-medium.yaml.",
    )
    parser.add_argument(
        "--nodes", type=int, default=1, metavar="N", help="Nodes of the run (default: 1)."
    )
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=8,
        metavar="G",
        help="GPUs per node (default: 8). The world size is N x G.",
    )
    parser.add_argument(
        "--rank-fraction",
        type=float,
        default=None,
        metavar="F",
        help="InRank rank after the cut as a fraction of d_model, in (0, 1], "
        "clipped to what the rank rule can reach (default: the rank the config's "
        "rule will reach, planning.estimates.expected_rank: its fixed point on the "
        "initial factors, e.g. 287 for GPT-2 medium)",
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=DEFAULT_GPU_MEMORY_GIB,
        metavar="GIB",
        help="Memory of one GPU for the fit check, GiB (default: "
        f"{DEFAULT_GPU_MEMORY_GIB:g}, an 80 GB A100/H100).",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        metavar="V",
        help="Tokenizer ids before padding (default: 50257 for gpt2; the "
        "SentencePiece model's size, or 8000 when its file is missing).",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="Overrides applied after the file, as for training.",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = plan(
            cfg,
            args.nodes,
            args.gpus_per_node,
            rank_fraction=args.rank_fraction,
            vocab_size=args.vocab_size,
            config_path=args.config,
            gpu_memory_gib=args.gpu_memory_gib,
        )
    except (ConfigError, ValueError, OSError) as error:
        print(f"plan.py: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(format_plan(result))
    sys.stdout.write("\n".join(_format_data(cfg, result.dp)) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
