#!/usr/bin/env python
"""Time the DeepSpeed backend's resize (the stage cut) against one training step, and measure the
peak extra memory it takes, under ZeRO 1/2/3 on CPU processes (gloo).

Each stage runs in fresh processes: a megatron GPT with InRank fc1/fc2 (default hidden 1024,
6 layers: ~66M parameters, ~790 MB of fp32 master + Adam moments over the data-parallel ranks),
a few training steps, then every layer is cut to ``--rank`` and ``backend.resize`` moves the
optimizer state. Per stage (rank 0's numbers; the ranks are symmetric):

    opt MB      this rank's fp32 masters + moments before the cut
    step s      median wall time of one training step (forward, backward, ZeRO step)
    cut s       the layers' SVD truncation (InRank, not the backend)
    resize s    backend.resize: engine rebuild + state moved by name
    resize/step the ratio
    +RSS MB     peak resident memory during resize minus resident memory before it
    +RSS/opt    that, relative to this rank's optimizer state

A benchmark, not a test.

    python tools/bench_resize.py                          # ZeRO 1, 2, 3; hidden 1024, 6 layers
    python tools/bench_resize.py --stages 2 --layers 2 --hidden 256 --steps 2
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rank_body(rank: int, world_size: int, port: int, stage: int, args: dict, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        queue.put((rank, _measure(stage, args)))
    except BaseException as error:  # noqa: BLE001 - report, the parent fails the run
        import traceback

        queue.put((rank, {"error": f"{error!r}\n{traceback.format_exc()}"}))


def _measure(stage: int, args: dict) -> dict:
    import torch

    torch.set_num_threads(args["threads"])
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=3600))
    from megatron.core import parallel_state

    from inrank_megatron.config import from_dict
    from inrank_megatron.layers.base import named_inrank_layers
    from inrank_megatron.training.backends import deepspeed_compat as compat
    from inrank_megatron.training.backends.deepspeed_backend import DeepSpeedBackend
    from inrank_megatron.models.gpt import build_model
    from inrank_megatron.training.parallel import init_parallel, set_seeds

    tmp = tempfile.mkdtemp()
    ds_json = os.path.join(tmp, "zero.json")
    with open(ds_json, "w") as f:
        json.dump({"zero_optimization": {"stage": stage}}, f)
    world = torch.distributed.get_world_size()
    cfg = from_dict(
        {
            "model": {
                "num_layers": args["layers"],
                "hidden_size": args["hidden"],
                "num_attention_heads": args["hidden"] // 64,
                "seq_length": args["seq"],
            },
            "inrank": {"rank": 2, "buffer": args["buffer"], "stage1_steps": None},
            "parallel": {"backend": "deepspeed", "deepspeed_config": ds_json},
            "train": {
                "micro_batch_size": 1,
                "global_batch_size": world,
                "lr": 1e-4,
                "lr_warmup_steps": 1,
                "steps": 100,
            },
            "data": {"tokenizer_model": "unused"},
        }
    )
    groups = init_parallel(1, 1, backend="gloo")
    set_seeds(1234)
    model = build_model(cfg, args["vocab"], 1)
    layers = named_inrank_layers(model)
    for _, layer in layers:
        layer.set_rank(args["rank"])  # active slots = rank + buffer, cut to rank
    backend = DeepSpeedBackend(cfg, model, groups)
    gen = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
    tokens = torch.randint(0, args["vocab"], (1, args["seq"] + 1), generator=gen)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(1, args["seq"]),
        "position_ids": torch.arange(args["seq"]).unsqueeze(0),
    }

    def one_step():
        t0 = time.perf_counter()
        backend.forward_backward(batch, 1, last=True)
        backend.step()
        return time.perf_counter() - t0

    one_step()  # warm-up (creates the optimizer state)
    step_s = statistics.median(one_step() for _ in range(args["steps"]))
    named = [(n, p) for n, p in model.named_parameters()]
    state = compat.LocalState(backend.layout, named)
    opt_bytes = 12 * sum(piece.numel for piece in state.pieces.values())  # fp32 x 3
    del state
    gc.collect()
    torch.distributed.barrier()
    t0 = time.perf_counter()
    events = [layer.cut(100) for _, layer in layers]
    cut_s = time.perf_counter() - t0
    gc.collect()
    torch.distributed.barrier()
    rss_before = _rss_mb()
    peak_ok = _reset_peak_rss()
    t0 = time.perf_counter()
    backend.resize(events, "project")
    resize_s = time.perf_counter() - t0
    peak = _rss_mb("VmHWM")
    del events
    after_step_s = one_step()  # the rebuilt engine trains
    backend.engine.destroy()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    params = sum(compat.full_numel(p) for p in model.parameters())
    return {
        "stage": stage,
        "opt_mb": opt_bytes / 2**20,
        "step_s": step_s,
        "cut_s": cut_s,
        "resize_s": resize_s,
        "extra_rss_mb": (peak - rss_before) if peak_ok else float("nan"),
        "rss_mb": rss_before,
        "after_step_s": after_step_s,
        "params_after_cut": params,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(stage: int, args: dict, world_size: int = 2, timeout: float = 3600) -> list:
    """Spawn ``world_size`` processes measuring ``stage``; their result dicts in rank order."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    os.environ.setdefault("OMP_NUM_THREADS", str(args["threads"]))
    procs = [
        ctx.Process(target=_rank_body, args=(r, world_size, port, stage, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results = {}
    try:
        deadline = time.time() + timeout
        while len(results) < world_size:
            rank, result = queue.get(timeout=max(1.0, deadline - time.time()))
            if "error" in result:
                raise RuntimeError(f"rank {rank} failed:\n{result['error']}")
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def bench(stages, args: dict) -> list:
    """One row per ZeRO stage (rank 0's numbers)."""
    return [run_stage(stage, args)[0] for stage in stages]


def format_table(rows) -> str:
    head = (
        f"{'ZeRO':>4} {'opt MB':>8} {'step s':>7} {'cut s':>6} {'resize s':>8} "
        f"{'resize/step':>11} {'+RSS MB':>8} {'+RSS/opt':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['stage']:>4} {r['opt_mb']:>8.0f} {r['step_s']:>7.2f} {r['cut_s']:>6.2f} "
            f"{r['resize_s']:>8.2f} {r['resize_s'] / r['step_s']:>11.2f} "
            f"{r['extra_rss_mb']:>8.0f} {r['extra_rss_mb'] / r['opt_mb']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        choices=(0, 1, 2, 3),
        help="ZeRO stages to measure (each in fresh processes)",
    )
    p.add_argument("--hidden", type=int, default=1024, help="model width (heads = hidden / 64)")
    p.add_argument("--layers", type=int, default=6, help="transformer layers")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--seq", type=int, default=128, help="sequence length of the training step")
    p.add_argument("--buffer", type=int, default=100, help="InRank buffer (active = rank + buffer)")
    p.add_argument("--rank", type=int, default=100, help="rank every layer is cut to")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    args = {
        k: getattr(a, k)
        for k in ("hidden", "layers", "vocab", "seq", "buffer", "rank", "steps", "threads")
    }
    rows = bench(a.stages, args)
    print(
        f"2 processes (DP=2), hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, "
        f"seq {a.seq}, InRank fc1/fc2 cut to rank {a.rank} from {a.rank + a.buffer} active "
        "slots; "
        f"{rows[0]['params_after_cut'] / 1e6:.1f}M parameters after the cut"
    )
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
