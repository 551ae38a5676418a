#!/usr/bin/env python
"""Time one InRank rank check: the QR route (``factor_spectrum`` + ``select_rank``) against what the
reference does (``torch.linalg.svdvals`` of the dense ``in x out`` product, then the same rule).

Prints a table with both medians, their ratio, and whether both routes select the same rank.
A benchmark, not a test.

    python tools/bench_rank_check.py                # GPT-2 small and medium MLP shapes, k = 102, 200
    python tools/bench_rank_check.py --repeats 9 --shapes 1024x4096 --slots 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from inrank_megatron.core import factor_spectrum, select_rank


def _median_time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench(shapes, slots_list, repeats: int, buffer: int, threshold: float, seed: int = 0):
    """Rows of (shape, k, median QR s, median dense s, ratio, rank QR, rank dense)."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for d_in, d_out in shapes:
        for k in slots_list:
            # A decaying spectrum so the rule has something to find.
            A = torch.randn(k, d_in, generator=gen) / d_in**0.5
            B = torch.randn(d_out, k, generator=gen) * torch.logspace(0, -2, k)
            max_rank = min(d_in, d_out) // 2
            rank = max(0, k - buffer)

            def qr_route():
                return select_rank(factor_spectrum(A, B), rank, buffer, max_rank, threshold)

            def dense_route():
                s = torch.linalg.svdvals(B @ A)
                return select_rank(s, rank, buffer, max_rank, threshold)

            t_qr, r_qr = _median_time(qr_route, repeats)
            t_dense, r_dense = _median_time(dense_route, repeats)
            rows.append((f"{d_in}x{d_out}", k, t_qr, t_dense, t_dense / t_qr, r_qr, r_dense))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["768x3072", "1024x4096"],
        help="layer shapes IN x OUT (default: GPT-2 small and medium fc1)",
    )
    p.add_argument(
        "--slots",
        nargs="+",
        type=int,
        default=[102, 200],
        help="active slots k = rank + buffer (default: 102 200)",
    )
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per cell (median)")
    p.add_argument("--buffer", type=int, default=100, help="buffer b of the rule")
    p.add_argument("--threshold", type=float, default=0.9, help="alpha of the rule")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    except ValueError:
        p.error(f"--shapes takes IN x OUT like 1024x4096, got {args.shapes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(shapes, args.slots, args.repeats, args.buffer, args.threshold)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats, fp32"
    )
    print(
        f"{'shape':>10} {'k':>5} {'QR route ms':>12} {'dense svdvals ms':>17} {'ratio':>7} "
        f"{'rank QR':>8} {'rank dense':>10}"
    )
    for shape, k, t_qr, t_dense, ratio, r_qr, r_dense in rows:
        print(
            f"{shape:>10} {k:>5} {t_qr * 1e3:>12.2f} {t_dense * 1e3:>17.1f} {ratio:>6.1f}x "
            f"{r_qr:>8} {r_dense:>10}"
        )


if __name__ == "__main__":
    main()
