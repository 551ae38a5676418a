#!/usr/bin/env python
"""Convert InRank training checkpoints.

    # another tensor / pipeline layout (growth state and learned ranks preserved; --pp N too)
    python tools/convert_checkpoint.py reshard runs/x/checkpoints/step_000200 \
        runs/y/checkpoints/step_000200 --tp 4
    # then train on: output.dir=runs/y output.resume=runs/y/checkpoints/step_000200 \
    #     parallel.tensor_model_parallel_size=4
    # merge W0 + B A into plain weights: a checkpoint of the dense megatron GPT (model.inrank=false)
    python tools/convert_checkpoint.py to-dense runs/x runs/x-dense/checkpoints/step_000200
    # DeepSpeed ZeRO (any stage, TP, DP) -> torch dist checkpoint, Adam moments included
    python tools/convert_checkpoint.py from-deepspeed runs/ds runs/t/checkpoints/step_000200
    # then: parallel.backend=torch output.resume=runs/t/checkpoints/step_000200 (any TP/DP layout)
    # torch dist checkpoint -> DeepSpeed at a chosen ZeRO stage and layout
    python tools/convert_checkpoint.py to-deepspeed runs/t runs/ds3/checkpoints/step_000200 \
        --deepspeed-config configs/deepspeed/zero3.json --tp 2 --world-size 4
    # then: parallel.backend=deepspeed parallel.deepspeed_config=configs/deepspeed/zero3.json ...

from-deepspeed / to-deepspeed run as a job on the DeepSpeed side's processes (TP x DP): started
here on this machine, or on the launched ranks under torchrun / srun / mpirun.

A source may be a step directory, or a run / checkpoints directory (its latest step). Bad input
(missing or partial checkpoint, a layout that does not divide) is one line on stderr and exit 2;
the source is never modified and the destination appears only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reshard", help="write the checkpoint for another TP (/PP) layout")
    r.add_argument("src", help="step directory (or run / checkpoints directory: its latest step)")
    r.add_argument("dst", help="new step directory (must not exist)")
    r.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    r.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (1)")
    r.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="target number of processes (default: TP x PP x the source's DP size)",
    )
    d = sub.add_parser(
        "to-dense",
        help="merge W0 + B A into plain weights: a checkpoint of the "
        "dense twin (model.inrank=false), weights only",
    )
    d.add_argument("src", help="step directory (or run / checkpoints directory: its latest step)")
    d.add_argument("dst", help="new step directory (must not exist)")
    for name, text in (
        ("from-deepspeed", "DeepSpeed checkpoint -> torch (dist) checkpoint"),
        ("to-deepspeed", "torch (dist) checkpoint -> DeepSpeed checkpoint"),
    ):
        c = sub.add_parser(
            name,
            help=f"{text}, model and optimizer state (Adam moments, steps, "
            "LR schedule, growth state)",
        )
        c.add_argument(
            "src", help="step directory (or run / checkpoints directory: its latest step)"
        )
        c.add_argument("dst", help="new step directory (must not exist)")
        c.add_argument(
            "--deepspeed-config",
            default=None,
            help="to-deepspeed: the target's DeepSpeed JSON (required); from-deepspeed: "
            "the JSON the source trained with (default: the path its config records)",
        )
        c.add_argument(
            "--tokenizer-model",
            default=None,
            help="SentencePiece model, when the recorded path does not resolve here",
        )
        if name == "to-deepspeed":
            c.add_argument(
                "--zero-stage",
                type=int,
                default=None,
                help="override the JSON's zero_optimization.stage",
            )
            c.add_argument("--tp", type=int, default=None, help="target TP size (the source's)")
            c.add_argument(
                "--world-size",
                type=int,
                default=None,
                help="target processes (default: TP x the source's PP x DP)",
            )
    args = p.parse_args(argv)

    from inrank_megatron.convert import reshard, to_dense

    try:
        if args.command in ("from-deepspeed", "to-deepspeed"):
            from inrank_megatron.convert import convert_backend

            options = {k: getattr(args, k, None) for k in ("zero_stage", "tp", "world_size")}
            meta = convert_backend(
                args.src,
                args.dst,
                direction=args.command,
                deepspeed_config=args.deepspeed_config,
                tokenizer_model=args.tokenizer_model,
                **options,
            )
            if os.environ.get("RANK", "0") == "0":
                print(
                    f"wrote {args.dst}: step {meta['step']}, backend {meta['backend']}, "
                    f"TP={meta['tp']} DP={meta['dp']} ({meta['world_size']} processes)"
                )
            return 0
        if args.command == "to-dense":
            meta = to_dense(args.src, args.dst)
            print(f"wrote {args.dst}: dense twin of step {meta['step']} (weights only)")
            return 0
        meta = reshard(args.src, args.dst, tp=args.tp, pp=args.pp, world_size=args.world_size)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, CheckpointError
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.dst}: step {meta['step']}, TP={meta['tp']} PP={meta['pp']} "
        f"DP={meta['dp']} ({meta['world_size']} processes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
