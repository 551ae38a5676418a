"""What every export writes the same way: an output directory that appears whole or not at all,
the tokenizer that goes with the model, and a note of where the export came from."""

from __future__ import annotations

import json
import os
import shutil

from inrank_megatron.checkpoint.reader import CheckpointError, LoadedCheckpoint

SOURCE_FILE = "inrank_source.json"
SENTENCEPIECE_FILE = "sentencepiece.model"


def dir_bytes(path: str, *names: str) -> int:
    """Bytes of the named files under ``path`` (all regular files when none are named)."""
    names = names or tuple(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    return sum(os.path.getsize(os.path.join(path, n)) for n in names)


def checkpoint_tokenizer(ckpt: LoadedCheckpoint):
    """The tokenizer a checkpoint was trained with."""
    from inrank_megatron.data.tokenizers import build_tokenizer

    d = ckpt.cfg.data
    if d.tokenizer == "gpt2":
        return build_tokenizer("gpt2")
    model = ckpt.tokenizer_model or d.tokenizer_model
    if not model or not os.path.isfile(model):
        raise CheckpointError(
            f"SentencePiece model {model!r} (data.tokenizer_model) not found; "
            "pass --tokenizer-model"
        )
    return build_tokenizer("sentencepiece", model)


def write_tokenizer(out_dir: str, ckpt: LoadedCheckpoint) -> dict:
    """Copy the SentencePiece model next to an export (GPT-2 BPE needs no file: it ships with the
    package); return the tokenizer's entry for the export's metadata."""
    if ckpt.cfg.data.tokenizer == "gpt2":
        return {"kind": "gpt2"}
    tokenizer = checkpoint_tokenizer(ckpt)
    shutil.copyfile(tokenizer.model_path, os.path.join(out_dir, SENTENCEPIECE_FILE))
    return {"kind": "sentencepiece", "model": SENTENCEPIECE_FILE, **tokenizer.describe()}


def write_provenance(out_dir: str, ckpt: LoadedCheckpoint, *, fmt: str, **extra) -> None:
    """``inrank_source.json``: the checkpoint, step and InRank ranks an export came from, and its
    tokenizer (which ``inrank_megatron.inference``, ``tools/generate.py`` and ``import_hf``
    read), plus the ``extra`` entries of the format."""
    source = {
        "format": fmt,
        "checkpoint": os.path.abspath(ckpt.path),
        "step": ckpt.step,
        "mode": ckpt.mode,
        "tokenizer": write_tokenizer(out_dir, ckpt),
        "ranks": {name: layer.rank for name, layer in ckpt.layers.items()},
        **extra,
    }
    with open(os.path.join(out_dir, SOURCE_FILE), "w") as f:
        json.dump(source, f, indent=1)


def export_argument_parser(doc: str):
    """The command line both export tools take: CKPT OUT_DIR [--dtype] [--tokenizer-model]."""
    import argparse

    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="Training checkpoint (step directory, checkpoints/ or output.dir).",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="Directory to create.")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="Weight dtype (default fp32).",
    )
    parser.add_argument(
        "--tokenizer-model",
        metavar="PATH",
        help="SentencePiece model, when the "
        "checkpoint's recorded data.tokenizer_model does not resolve from here.",
    )
    return parser
