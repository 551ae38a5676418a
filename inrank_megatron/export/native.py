"""The InRank-native export: the model as it trained, factors kept.

A directory with ``model.safetensors`` (InRank layers as their active factors ``A[:k]`` (``[k, in]``)
and ``B[:, :k]`` (``[out, k]``), plus ``w0`` in cumulative mode; every other tensor dense; the
vocabulary unpadded; names as :mod:`inrank_megatron.checkpoint.layout`) and ``inrank.json`` (format
version, the full training configuration, the vocabulary size, each InRank layer's rank, buffer,
active slots and shapes, parameter counts, tokenizer, source checkpoint). Efficient mode is the
smaller model: a ``k``-slot layer holds ``k (in + out)`` numbers instead of ``in * out``.

    export_inrank(load_checkpoint("runs/tiny-cpu"), "exports/tiny-inrank")
    model = inrank_megatron.inference.load("exports/tiny-inrank")
"""

from __future__ import annotations

import json
import os

import torch

from inrank_megatron.config import ConfigError, from_dict, to_dict
from inrank_megatron.checkpoint.reader import CheckpointError, LoadedCheckpoint, unpad_vocabulary
from inrank_megatron.checkpoint.meta import atomic_output_dir
from inrank_megatron.export.files import dir_bytes, write_tokenizer
from inrank_megatron.checkpoint.layout import expected_shapes

INRANK_JSON = "inrank.json"
WEIGHTS = "model.safetensors"
FORMAT = "inrank-megatron-export"
VERSION = 1
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_tensors(ckpt: LoadedCheckpoint) -> dict:
    """The export's tensors: InRank layers cut to their active slots, the vocabulary unpadded."""
    out = {}
    for key, value in ckpt.tensors.items():
        layer, _, role = key.rpartition(".")
        if layer in ckpt.layers and role in ("A", "B"):
            continue
        out[key] = value
    for name in ckpt.layers:
        out[name + ".A"], out[name + ".B"] = ckpt.active_factors(name)
    return {k: v.contiguous() for k, v in unpad_vocabulary(out, ckpt.vocab_size).items()}


def dense_parameter_count(ckpt: LoadedCheckpoint) -> int:
    """Parameters of the same model with every InRank layer dense (vocabulary unpadded)."""
    n = 0
    for key, value in native_tensors(ckpt).items():
        layer, _, role = key.rpartition(".")
        if layer in ckpt.layers and role in ("A", "B", "w0"):
            continue
        n += value.numel()
    return n + sum(l.in_features * l.out_features for l in ckpt.layers.values())


def export_inrank(ckpt: LoadedCheckpoint, out_dir: str, *, dtype: str = "fp32") -> dict:
    """Write the InRank-native export of ``ckpt`` to ``out_dir`` (atomically; must not exist).

    Returns:
        ``{"path", "parameters", "dense_parameters", "bytes"}``.
    """
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    tensors = {k: v.to(_DTYPES[dtype]).contiguous() for k, v in native_tensors(ckpt).items()}
    total = sum(t.numel() for t in tensors.values())
    dense = dense_parameter_count(ckpt)
    layers = {}
    for name, layer in ckpt.layers.items():
        k = layer.active_slots
        layers[name] = dict(
            layer.summary(),
            A=[k, layer.in_features],
            B=[layer.out_features, k],
            w0=name + ".w0" in tensors,
        )
    with atomic_output_dir(out_dir, source=ckpt.path) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype,
            "vocab_size": ckpt.vocab_size,
            "mode": ckpt.mode,
            "layers": layers,
            "parameters": {"total": total, "dense_equivalent": dense},
            "tokenizer": write_tokenizer(tmp, ckpt),
            "source": {"checkpoint": os.path.abspath(ckpt.path), "step": ckpt.step},
            "config": to_dict(ckpt.cfg),
        }
        with open(os.path.join(tmp, INRANK_JSON), "w") as f:
            json.dump(meta, f, indent=1)
    return {
        "path": out_dir,
        "parameters": total,
        "dense_parameters": dense,
        "bytes": dir_bytes(out_dir, WEIGHTS),
    }


def is_inrank_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INRANK_JSON))


def read_inrank_export(path: str) -> tuple[dict, dict]:
    """``(inrank.json, tensors in fp32)`` of an InRank-native export, shapes checked against the
    recorded ranks and configuration.

    Raises:
        CheckpointError: not an export, another format version, or tensors that contradict
            ``inrank.json`` (naming the layer).
    """
    from safetensors.torch import load_file

    meta_file, weights = os.path.join(path, INRANK_JSON), os.path.join(path, WEIGHTS)
    if not os.path.isfile(meta_file) or not os.path.isfile(weights):
        raise CheckpointError(
            f"{path}: not an InRank-native export ({INRANK_JSON} and {WEIGHTS} expected)"
        )
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CheckpointError(
                f"{meta_file}: format {meta.get('format')!r} version "
                f"{meta.get('version')!r}; expected {FORMAT!r} version {VERSION}"
            )
        cfg = from_dict(meta["config"], origin=f" in {meta_file}")
        layers = meta["layers"]
        slots = {name: int(layer["active_slots"]) for name, layer in layers.items()}
    except (ValueError, KeyError, TypeError, ConfigError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{meta_file}: malformed ({error!r})") from None
    tensors = {k: v.float() for k, v in load_file(weights).items()}
    for name, layer in layers.items():
        for role in ("A", "B"):
            t = tensors.get(f"{name}.{role}")
            if t is None or list(t.shape) != list(layer[role]):
                raise CheckpointError(
                    f"{path}: layer {name}: {role} has shape "
                    f"{None if t is None else tuple(t.shape)}, {INRANK_JSON} records rank "
                    f"{layer['rank']} with {layer['active_slots']} active slots ({role} "
                    f"{tuple(layer[role])})"
                )
    expected = expected_shapes(
        cfg, int(meta["vocab_size"]), slots, cumulative=meta.get("mode") == "cumulative"
    )
    bad = sorted(set(expected) ^ set(tensors)) or [
        k for k, s in expected.items() if tuple(tensors[k].shape) != tuple(s)
    ]
    if bad:
        raise CheckpointError(f"{path}: {WEIGHTS} does not match {INRANK_JSON}: {bad[:4]}")
    meta["_config"] = cfg
    return meta, tensors
