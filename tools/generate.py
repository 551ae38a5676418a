#!/usr/bin/env python
"""Sample text from a trained model in one plain PyTorch process (no megatron, no process group).

--checkpoint takes an InRank-native export (tools/export_inrank.py), a Hugging Face GPT-2
directory (tools/export_hf.py), or a training checkpoint (step directory, checkpoints/ or
output.dir); the tokenizer is the one the model was trained with (recorded in the export or the
checkpoint's config). The same --seed gives the same text.

    python tools/generate.py --checkpoint exports/tiny-cpu-inrank --prompt "The history of"
    python tools/generate.py --checkpoint runs/tiny-cpu --prompt "In 1990" --max-new-tokens 100 \\
        --temperature 0.8 --top-k 40 --top-p 0.95 --seed 0
    python tools/generate.py --checkpoint exports/x --prompt "..." --temperature 0     # greedy
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="Export directory or training checkpoint.",
    )
    parser.add_argument("--prompt", required=True, help="Text to continue.")
    parser.add_argument(
        "--max-new-tokens", type=int, default=50, help="Tokens to sample (default 50)."
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="Softmax temperature; 0 is greedy (default 0.8).",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=40,
        help="Sample among the k most likely tokens; 0 disables (default 40).",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        help="Nucleus sampling mass; 1 disables (default 0.95).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (default 0).")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=1,
        help="Independent samples (seeds seed, seed + 1, ...).",
    )
    parser.add_argument(
        "--tokenizer-model",
        metavar="PATH",
        help="SentencePiece model to use instead of the recorded one.",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if (
        args.max_new_tokens < 0
        or args.temperature < 0
        or not 0 < args.top_p <= 1
        or args.top_k < 0
        or args.num_samples < 1
    ):
        print(
            "generate.py: error: expected --max-new-tokens >= 0, --temperature >= 0, "
            "--top-k >= 0, 0 < --top-p <= 1, --num-samples >= 1",
            file=sys.stderr,
        )
        return 2
    from inrank_megatron.inference import generate_text

    try:
        texts = generate_text(
            args.checkpoint,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            num_samples=args.num_samples,
            tokenizer_model=args.tokenizer_model,
        )
    except (ValueError, OSError) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2
    print("\n\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
