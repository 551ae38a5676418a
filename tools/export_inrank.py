#!/usr/bin/env python
"""Export a training checkpoint in InRank-native form: the factors kept, the smaller model.

Writes OUT_DIR with model.safetensors (each InRank layer as its active factors A[:k] [k, in] and
B[:, :k] [out, k], plus W0 in cumulative mode; every other tensor dense; the vocabulary padding
removed) and inrank.json (per-layer rank, buffer, active slots and shapes, mode, parameter counts,
the full training config, tokenizer, source). Load it with

    model = inrank_megatron.inference.load(OUT_DIR)
    python tools/generate.py --checkpoint OUT_DIR --prompt "..."

CKPT is a checkpoint step directory, a run's checkpoints/ directory or its output.dir. OUT_DIR must
not exist; it is written under a temporary name and renamed at the end.

    python tools/export_inrank.py runs/tiny-cpu exports/tiny-cpu-inrank
"""

from __future__ import annotations

import sys


def parse_args(argv=None):
    from inrank_megatron.export.files import export_argument_parser

    return export_argument_parser(__doc__).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from inrank_megatron.checkpoint.reader import load_checkpoint
    from inrank_megatron.export import export_inrank

    try:
        ckpt = load_checkpoint(args.checkpoint, tokenizer_model=args.tokenizer_model)
        result = export_inrank(ckpt, args.out_dir, dtype=args.dtype)
    except (ValueError, OSError) as error:
        print(f"export_inrank.py: error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {result['path']}: {result['parameters']:,} parameters "
        f"({result['parameters'] / result['dense_parameters']:.3f} of the dense "
        f"{result['dense_parameters']:,}), {result['bytes']:,} bytes of weights "
        f"(step {ckpt.step}, {ckpt.mode or 'dense'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
