#!/usr/bin/env python
"""Compare training runs side by side from their run directories.

One row per run: validation loss and ppl at the end and at the last step every run evaluated,
parameters at the end (after the cut), mean/min/max final InRank rank, tokens seen, wall time of
the last launch and the median logged training throughput; then the validation loss at every step
all runs evaluated, and the config keys whose values differ between the runs (output.dir aside),
with each run's value. Runs of different configs are compared on what they share.

    python tools/compare_runs.py runs/tiny-cpu runs/tiny-cpu-dense
    python tools/compare_runs.py runs/a runs/b runs/c --markdown --plot compare.png

Reads config.yaml, metrics.csv, ranks.csv and summary.json (written by the training loop). A
directory that is missing or holds no run is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from inrank_megatron.training.compare import (
    RunDirError,
    compare_runs,
    format_table,
    plot_valid_loss,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="compare_runs.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory (output.dir)")
    parser.add_argument(
        "--markdown", action="store_true", help="Markdown tables instead of aligned plain text"
    )
    parser.add_argument(
        "--plot",
        metavar="OUT.png",
        help="also write one PNG overlaying the runs' valid-loss curves",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        comparison = compare_runs(args.runs)
    except RunDirError as error:
        print(f"compare_runs.py: error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(format_table(comparison, markdown=args.markdown))
    if args.plot:
        try:
            print(f"\nplot: {plot_valid_loss(comparison, args.plot)}")
        except OSError as error:
            print(
                f"compare_runs.py: error: --plot {args.plot}: {error.strerror or error}",
                file=sys.stderr,
            )
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
