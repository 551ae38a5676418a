#!/usr/bin/env python
"""Import a local Hugging Face GPT-2 directory as a run directory that training continues
(nothing is downloaded).

    # fine-tune an export of ours (its tokenizer and vocabulary padding come along), then continue
    python tools/import_hf.py hf-out runs/ft --mode cumulative data.prefix=data/mine_text_document
    launch/torchrun.sh runs/ft/config.yaml train.steps=200
    python tools/export_hf.py runs/ft hf-ft

    # continued training that starts exactly at the pretrained model: W = W0 + B A, B = 0
    python tools/import_hf.py hf/gpt2 runs/gpt2-cumulative --mode cumulative \\
        --config configs/gpt2-small.yaml inrank.rank=2 inrank.buffer=100
    # low-rank from the pretrained weights: truncated SVD, balanced factors, fixed rank
    python tools/import_hf.py hf/gpt2 runs/gpt2-r128 --mode efficient --rank 128
    python tools/import_hf.py hf/gpt2 runs/gpt2-t09 --mode efficient --threshold 0.9

HF_DIR holds config.json and model.safetensors (pickled .bin weights are refused). The architecture
(model.*) comes from its config.json; the tokenizer from its files (sentencepiece.model, or GPT-2's
vocab.json + merges.txt; with neither, a 50257-id vocabulary is GPT-2's BPE); the vocabulary
padding from an export of ours (tools/export_hf.py keeps it, so the round trip is loss-exact);
everything else from --config and section.key=value overrides, as for training. An inrank.buffer
that nobody set shrinks to fit the model. Every setting import chooses is printed and recorded in
meta.json ("imported_from": "changed").
--rank R truncates every InRank layer to rank R; --threshold T picks per layer the smallest rank
whose explained ratio (inrank.rule) exceeds T; both must fit under the layer's max_rank
(inrank.max_rank, default min(in, out) // 2).

RUN_DIR (must not exist, or be empty; RUN_DIR/checkpoints/step_000000 means RUN_DIR) receives
checkpoints/step_000000 (model/ megatron dist checkpoint, reshardable to any TP size;
inrank_growth.json; meta.json with "weights_only": true: no optimizer or RNG state),
checkpoints/latest, the SentencePiece model if the export had one, and config.yaml with
output.dir=RUN_DIR and output.resume=auto, the config that continues it. It is written under a
temporary name and renamed at the end.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Local Hugging Face GPT-2 directory.")
    parser.add_argument(
        "out",
        metavar="RUN_DIR",
        help="Run directory to create (its checkpoints/step_000000, latest and config.yaml).",
    )
    parser.add_argument(
        "--mode",
        required=True,
        choices=("cumulative", "efficient"),
        help="InRank parametrisation of the imported model.",
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--rank", type=int, help="Efficient mode: rank of every InRank layer.")
    how.add_argument(
        "--threshold",
        type=float,
        help="Efficient mode: per-layer rank from this explained-ratio threshold, in (0, 1).",
    )
    parser.add_argument("--config", metavar="YAML", help="Training config to start from.")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="Config overrides, as for training.",
    )
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from inrank_megatron.training.console import quiet_third_party

    quiet_third_party(0)  # megatron-core's TE/apex fallback notices: nothing to act on here
    from inrank_megatron.config import format_value
    from inrank_megatron.convert import import_hf

    try:
        result = import_hf(
            args.hf_dir,
            args.out,
            mode=args.mode,
            rank=args.rank,
            threshold=args.threshold,
            config_path=args.config,
            overrides=args.overrides,
        )
    except (ValueError, OSError) as error:  # ConfigError, CheckpointError, unsupported, exists
        print(f"import_hf.py: error: {error}", file=sys.stderr)
        return 2
    ranks = sorted(set(result["ranks"].values()))
    print(
        f"wrote {result['path']}: {result['checkpoint']} ({args.mode}; InRank ranks {ranks}) "
        f"and {result['config']}"
    )
    for change in result["changes"]:
        print(
            f"set {change['key']}={format_value(change['value'])} (was "
            f"{format_value(change['was'])}): {change['why']}"
        )
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"continue it: launch/torchrun.sh {result['config']} [section.key=value ...]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
