#!/usr/bin/env python
"""Export a training checkpoint as a Hugging Face GPT-2 directory.

Writes OUT_DIR with config.json and model.safetensors in the GPT2LMHeadModel layout (Conv1D weights
[in, out], fused c_attn in [q|k|v] order, tied embeddings, learned positions, the vocabulary padding
removed), every InRank layer merged dense (W = W0 + B[:, :k] A[:k] over its active slots), the
tokenizer (GPT-2 BPE: vocab.json, merges.txt, tokenizer_config.json; SentencePiece: the .model
file) and inrank_source.json (source checkpoint, step, ranks). The result loads offline with

    transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR)
    transformers.GPT2TokenizerFast.from_pretrained(OUT_DIR)     # GPT-2 BPE runs only

CKPT is a checkpoint step directory, a run's checkpoints/ directory or its output.dir (the latter
two follow `latest`). Configs GPT-2 cannot express (RoPE, SwiGLU, RMSNorm, untied output layer, no
biases) are refused. OUT_DIR must not exist; it is written under a temporary name and renamed at
the end, so a failed export leaves nothing behind.

    python tools/export_hf.py runs/tiny-cpu exports/tiny-cpu-hf
    python tools/export_hf.py runs/gpt2-small/checkpoints/step_022500 exports/gpt2-small --dtype bf16
"""

from __future__ import annotations

import sys


def parse_args(argv=None):
    from inrank_megatron.export.files import export_argument_parser

    return export_argument_parser(__doc__).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from inrank_megatron.training.console import quiet_third_party

    quiet_third_party(0)  # megatron-core's TE/apex fallback notices: nothing to act on here
    from inrank_megatron.checkpoint.reader import load_checkpoint, read_checkpoint_config
    from inrank_megatron.export import export_hf
    from inrank_megatron.export.hf_gpt2 import check_gpt2_exportable

    try:
        step_dir, _, cfg = read_checkpoint_config(args.checkpoint)
        check_gpt2_exportable(cfg)  # before reading the tensors
        ckpt = load_checkpoint(step_dir, tokenizer_model=args.tokenizer_model)
        result = export_hf(ckpt, args.out_dir, dtype=args.dtype)
    except (ValueError, OSError) as error:  # CheckpointError, UnsupportedModelError, exists
        print(f"export_hf.py: error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {result['path']}: {result['parameters']:,} parameters, "
        f"{result['bytes']:,} bytes of weights (step {ckpt.step}, {ckpt.mode or 'dense'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
