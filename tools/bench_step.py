#!/usr/bin/env python
"""Benchmark what InRank saves per training step: the same megatron GPT (the config's) as dense,
as InRank in stage 1 (rank + buffer active, all max_rank slots allocated), after the cut, and at
fixed rank, interleaved in one launched job (launch/torchrun.sh, --tp processes).

Per arm: forward / backward / optimizer seconds, tokens/s, speedup over dense next to the
planner's FLOP-ideal (inrank_megatron/planning/) and their ratio, bytes of parameters, gradients
and optimizer state, peak memory (CUDA max allocated, or peak RSS on CPU); the time of one rank
check of all layers and its share of the steps between two checks; and the config's whole run
projected (stage-1 steps at stage-1 speed, the rest after the cut, every rank check and the cut)
for InRank vs dense. A benchmark, not a test: on a shared machine run it with few steps and read
the medians.

    python tools/bench_step.py --config configs/gpt2-small.yaml --seq 256 --micro 4 --steps 3
    python tools/bench_step.py --config configs/gpt2-medium.yaml --ranks-from runs/m --json m.json
    python tools/bench_step.py --config configs/gpt2-medium.yaml --seq 1024 --micro 8 \\
        --precision bf16 --peak-tflops 989                                   # one GPU, with MFU
    python tools/bench_step.py --config configs/tiny-cpu.yaml --tp 2 --seq 64 --micro 2
    python tools/bench_step.py --config configs/gpt2-small.yaml --seq 1024 --micro 8 \\
        --precision bf16 --attention local sdpa          # megatron's attention vs SDPA

Trailing section.key=value arguments override the config (as the training CLI's). Exit status 0,
1 when the launched job fails, 2 for a bad argument or configuration (before anything starts).
"""

from __future__ import annotations

import argparse
import json
import sys

from inrank_megatron.bench.step import (
    ARMS,
    BACKENDS,
    PRECISIONS,
    BenchOptions,
    format_report,
    run_bench,
)
from inrank_megatron.config import ATTENTIONS, ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, metavar="YAML", help="training config")
    ranks = p.add_mutually_exclusive_group()
    ranks.add_argument(
        "--rank-fraction",
        type=float,
        default=None,
        metavar="F",
        help="rank r of every InRank layer as a fraction of d_model, clipped to "
        "what the rank rule can reach (default: the rank the config's rule "
        "will reach, planning.estimates.expected_rank)",
    )
    ranks.add_argument(
        "--ranks-from",
        default=None,
        metavar="RUN",
        help="a run directory (or checkpoint) whose learned per-layer ranks to use "
        "(summary.json, ranks.csv or the checkpoint's growth state)",
    )
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the config's)")
    p.add_argument(
        "--micro",
        type=int,
        default=None,
        help="micro-batch size; one micro-batch per timed step (default: the config's)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed steps per arm and repeat (default 3; one more warm-up step is not timed)",
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="rounds over the arms, each arm rebuilt (default 2)"
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel processes (default 1)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="optimizer backend (default torch; deepspeed uses the config's "
        "parallel.deepspeed_config or configs/deepspeed/zero2.json)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 or bf16 autocast (default fp32)",
    )
    p.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="arms to run, in this order (default all)",
    )
    p.add_argument(
        "--attention",
        nargs="+",
        choices=ATTENTIONS,
        default=[],
        metavar="A",
        help="core attentions (model.attention) to run every arm with and compare: "
        "local and/or sdpa (default: the config's)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        metavar="T",
        help="the device's dense peak TFLOP/s, to print MFU (H200 bf16: 989)",
    )
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    opts = BenchOptions(
        config=a.config,
        overrides=a.overrides,
        rank_fraction=a.rank_fraction,
        ranks_from=a.ranks_from,
        seq=a.seq,
        micro=a.micro,
        steps=a.steps,
        repeats=a.repeats,
        tp=a.tp,
        backend=a.backend,
        precision=a.precision,
        arms=tuple(a.arms),
        attentions=tuple(a.attention),
        peak_tflops=a.peak_tflops,
    )
    try:
        result = run_bench(opts)
    except ConfigError as error:
        print(f"bench_step.py: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"bench_step.py: {error}", file=sys.stderr)
        return 1
    print(format_report(result), end="")
    if a.json:
        tmp = a.json + ".part"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        import os

        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
