#!/usr/bin/env python
"""Import a local Hugging Face GPT-2 directory as a training checkpoint (nothing is downloaded).

    # continued training that starts exactly at the pretrained model: W = W0 + B A, B = 0
    python tools/import_hf.py hf/gpt2 ckpt/gpt2-cumulative --mode cumulative \\
        --config configs/gpt2-small.yaml inrank.rank=2 inrank.buffer=100
    # low-rank from the pretrained weights: truncated SVD, balanced factors, fixed rank
    python tools/import_hf.py hf/gpt2 ckpt/gpt2-r128 --mode efficient --rank 128
    python tools/import_hf.py hf/gpt2 ckpt/gpt2-t09 --mode efficient --threshold 0.9

HF_DIR holds config.json and model.safetensors (pickled .bin weights are refused). The architecture
(model.*) comes from its config.json; everything else from --config and section.key=value
overrides, as for training (data.tokenizer defaults to gpt2 for GPT-2's 50257-id vocabulary).
--rank R truncates every InRank layer to rank R; --threshold T picks per layer the smallest rank
whose explained ratio (inrank.rule) exceeds T; both must fit under the layer's max_rank
(inrank.max_rank, default min(in, out) // 2).

OUT_CKPT becomes a checkpoint step directory in the training loop's layout (model/ megatron dist
checkpoint, reshardable to any TP size; inrank_growth.json; meta.json at step 0) without optimizer
or RNG state (meta.json: "weights_only": true); it is written under a temporary name and renamed at
the end. Export it back with tools/export_hf.py, or load it with inrank_megatron.inference.load.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Local Hugging Face GPT-2 directory.")
    parser.add_argument("out", metavar="OUT_CKPT", help="Checkpoint step directory to create.")
    parser.add_argument("--mode", required=True, choices=("cumulative", "efficient"),
                        help="InRank parametrisation of the imported model.")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--rank", type=int, help="Efficient mode: rank of every InRank layer.")
    how.add_argument("--threshold", type=float, help="Efficient mode: per-layer rank from this "
                     "explained-ratio threshold, in (0, 1).")
    parser.add_argument("--config", metavar="YAML", help="Training config to start from.")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="Config overrides, as for training.")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from inrank_megatron.export import import_hf

    try:
        result = import_hf(args.hf_dir, args.out, mode=args.mode, rank=args.rank,
                           threshold=args.threshold, config_path=args.config,
                           overrides=args.overrides)
    except (ValueError, OSError) as error:  # ConfigError, CheckpointError, unsupported, exists
        print(f"import_hf.py: error: {error}", file=sys.stderr)
        return 2
    ranks = sorted(set(result["ranks"].values()))
    print(f"wrote {result['path']} ({args.mode}; InRank ranks {ranks})")
    for note in result["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
