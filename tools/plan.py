#!/usr/bin/env python
"""Plan a run before launching it: parameters, memory per GPU and training FLOPs of a config's GPT,
dense and InRank, and whether its TP/PP/DP layout fits the cluster.

    python tools/plan.py --config configs/gpt2-medium.yaml --nodes 2 --gpus-per-node 8
    python tools/plan.py --config configs/gpt-13b.yaml --nodes 1 --gpus-per-node 8 \\
        parallel.tensor_model_parallel_size=8 --rank-fraction 0.25

What it prints (inrank_megatron/planning.py has the formulas and their sources):

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
  - training FLOPs per token of the matmuls (linears, attention, logits), dense and InRank.

Overrides are the training CLI's: section.key=value, read as YAML. Exit status: 0 if every
layout check passes, 1 if one fails, 2 for a bad argument or configuration (a run that does
not fit the GPU memory is reported, not an error).
"""

from __future__ import annotations

import argparse
import sys

from inrank_megatron.config import ConfigError, load_config
from inrank_megatron.planning import (
    DEFAULT_GPU_MEMORY_GIB, DEFAULT_RANK_FRACTION, format_plan, plan,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="YAML",
                        help="Training configuration, e.g. configs/gpt2-medium.yaml.")
    parser.add_argument("--nodes", type=int, default=1, metavar="N",
                        help="Nodes of the run (default: 1).")
    parser.add_argument("--gpus-per-node", type=int, default=8, metavar="G",
                        help="GPUs per node (default: 8). The world size is N x G.")
    parser.add_argument("--rank-fraction", type=float, default=DEFAULT_RANK_FRACTION,
                        metavar="F",
                        help="InRank rank after the cut as a fraction of d_model, in (0, 1] "
                        f"(default: {DEFAULT_RANK_FRACTION}, the paper's 'at most 33%% of the "
                        "ranks'); clipped to what the rank rule can reach.")
    parser.add_argument("--gpu-memory-gib", type=float, default=DEFAULT_GPU_MEMORY_GIB,
                        metavar="GIB",
                        help="Memory of one GPU for the fit check, GiB (default: "
                        f"{DEFAULT_GPU_MEMORY_GIB:g}, an 80 GB A100/H100).")
    parser.add_argument("--vocab-size", type=int, default=None, metavar="V",
                        help="Tokenizer ids before padding (default: 50257 for gpt2; the "
                        "SentencePiece model's size, or 8000 when its file is missing).")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="Overrides applied after the file, as for training.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = plan(cfg, args.nodes, args.gpus_per_node, rank_fraction=args.rank_fraction,
                      vocab_size=args.vocab_size, config_path=args.config,
                      gpu_memory_gib=args.gpu_memory_gib)
    except (ConfigError, ValueError, OSError) as error:
        print(f"plan.py: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(format_plan(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
