#!/usr/bin/env python
"""Bytes moved over tensor parallelism per forward + backward of one MLP: InRank (efficient mode)
vs megatron's dense ColumnParallelLinear/RowParallelLinear pair, counted by wrapping the
collectives (``inrank_megatron.tensor_parallel.comm_count``). Runs TP gloo processes on CPU.

    python tools/bench_tp_comm.py                           # d=1024, ffn=4096, TP=2, k=102 and 200
    python tools/bench_tp_comm.py --tp 4 --slots 64 128 --sequence-parallel
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.multiprocessing as mp


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state

    from inrank_megatron.cpu_fallback import enable_cpu_fallback
    from inrank_megatron.tensor_parallel.comm_count import mlp_comm_bytes

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    rows = []
    for k in args.slots:
        got = mlp_comm_bytes(
            args.hidden,
            args.ffn,
            slots=k,
            tokens=args.tokens,
            sequence_parallel=args.sequence_parallel,
            seq_length=args.seq_length,
        )
        rows.append((k, got["inrank"], got["dense"]))
    if rank == 0:
        queue.put(rows)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=1024, help="d_model (default 1024, GPT-2 medium)")
    p.add_argument("--ffn", type=int, default=4096, help="MLP width (default 4096)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (processes)")
    p.add_argument(
        "--slots",
        type=int,
        nargs="+",
        default=[102, 200],
        help="active slots k = rank + buffer (default 102 200)",
    )
    p.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch")
    p.add_argument("--seq-length", type=int, default=1024, help="sequence length")
    p.add_argument("--sequence-parallel", action="store_true", help="count with SP on")
    args = p.parse_args(argv)
    if args.tokens % args.seq_length:
        p.error(f"--tokens={args.tokens} must be a multiple of --seq-length={args.seq_length}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(args.tp, port, args, queue), nprocs=args.tp, join=True, start_method="spawn"
    )
    rows = queue.get()
    print(
        f"MLP {args.hidden} -> {args.ffn} -> {args.hidden}, TP={args.tp}, {args.tokens} tokens, "
        f"SP={'on' if args.sequence_parallel else 'off'}; bytes per rank per forward+backward"
    )
    print(
        f"{'k':>5} {'InRank MB':>10} {'dense MB':>9} {'dense/InRank':>13} {'per token InRank':>17} "
        f"{'per token dense':>16}"
    )
    for k, inrank, dense in rows:
        print(
            f"{k:>5} {inrank / 2**20:>10.2f} {dense / 2**20:>9.2f} {dense / inrank:>12.1f}x "
            f"{inrank / args.tokens:>17.0f} {dense / args.tokens:>16.0f}"
        )


if __name__ == "__main__":
    main()
