#!/usr/bin/env python
"""Plot a training run: per-layer InRank ranks over optimizer steps (a dashed line at the cut to
stage 2) above the train loss with validation points and ppl. A dense run gets the loss only.

Reads metrics.csv, ranks.csv and events.csv written by the training loop's MetricsWriter in
RUN_DIR; writes one PNG (default RUN_DIR/ranks.png) and prints its path.

    python tools/plot_run.py runs/gpt-125m-inrank
    python tools/plot_run.py runs/gpt-125m-dense --out dense.png
"""

from __future__ import annotations

import argparse
import sys

from inrank_megatron.training.plot import plot_run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="Run directory holding metrics.csv.")
    parser.add_argument("--out", metavar="PNG", help="Output PNG (default: RUN_DIR/ranks.png).")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except ValueError as error:
        print(f"plot_run.py: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
