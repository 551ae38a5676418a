#!/usr/bin/env python
"""Benchmark what a checkpoint save costs the step loop, with and without train.async_save: the
config trained twice (launch/torchrun.sh, --nproc processes), each run saving at --save-step and
at its last step, and the two printed side by side: the median step, the seconds the loop spent
in the save call, the step at which `latest` moved to the checkpoint, the stall (the time the save
added to the run) and the checkpoint's size; then the stall carried over to --project-params
parameters (the write scales with the checkpoint's bytes). A benchmark, not a test: on a shared
machine check `uptime` and report the load with the numbers.

    python tools/bench_save.py --config configs/gpt2-small.yaml model.seq_length=128 \\
        train.micro_batch_size=1 train.global_batch_size=1 train.precision=fp32 \\
        data.prefix=null data.corpus=wiki --project-params 355e6       # gpt2-small on CPU

Trailing section.key=value arguments override the config (as the training CLI's). Exit status 0,
1 when a run fails, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import sys

from inrank_megatron.bench.save import format_results, run_bench


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="training YAML")
    p.add_argument("--steps", type=int, default=12, help="steps per run (default 12)")
    p.add_argument(
        "--save-step",
        type=int,
        default=5,
        help="the measured save's step (also train.save_interval; default 5)",
    )
    p.add_argument("--nproc", type=int, default=1, help="processes per run (default 1)")
    p.add_argument(
        "--project-params",
        type=float,
        default=0.0,
        help="also print the stall projected to this many parameters (355e6: gpt2-medium)",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    if not 2 <= args.save_step < args.steps - 2:
        print(
            f"error: --save-step={args.save_step} must leave steps before and after it: "
            f"expected 2 <= --save-step < --steps - 2 = {args.steps - 2}",
            file=sys.stderr,
        )
        return 2
    try:
        results = run_bench(
            args.config,
            args.overrides,
            steps=args.steps,
            save_step=args.save_step,
            nproc=args.nproc,
        )
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(format_results(results, project_to=int(args.project_params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
