"""Read a training checkpoint into full, unsharded fp32 tensors named as megatron's single-process
``GPTModel`` names them (:mod:`inrank_megatron.checkpoint.layout`), with its configuration and every
InRank layer's growth state.

    ckpt = load_checkpoint("runs/tiny-cpu")          # output.dir, its checkpoints/, or a step dir
    ckpt.tensors["decoder.layers.0.mlp.linear_fc1.A"]   # [allocated slots, 128], fp32
    ckpt.dense_weight("decoder.layers.0.mlp.linear_fc1")  # W0 + B[:, :k] A[:k], [512, 128]

No process group, no megatron model and no pickled code: the model's dist checkpoint
(``model/``, torch DCP files written by megatron's ``torch_dist`` strategy) is read item by item,
its ``.metadata`` through an unpickler that only admits DCP's own metadata classes, each tensor with
``torch.load(weights_only=True)``; ``meta.json`` and ``inrank_growth.json`` are JSON. Megatron's
``_extra_state`` objects (the pickled growth state) are skipped: ``inrank_growth.json`` holds the same.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Optional

import torch

from inrank_megatron.checkpoint import (
    GROWTH_FILE,
    META_FILE,
    MODEL_DIR,
    CheckpointError,
    Meta,
    read_dcp_metadata,
    read_growth,
    read_meta,
    resolve_checkpoint,
    safe_torch_load,
)
from inrank_megatron.config import ConfigError, TrainConfig, from_dict
from inrank_megatron.core.init import dense_start_role
from inrank_megatron.checkpoint.layout import (
    expected_shapes,
    inrank_layer_names,
    layer_kind,
    linear_shape,
    unmap_dist_key,
)

OPTIMIZER_PREFIXES = ("optimizer.",)


@dataclass
class InRankLayerState:
    """One InRank layer as recorded in ``inrank_growth.json``, with its full shape."""

    name: str
    kind: str  # fc1, fc2, qkv or proj
    mode: str  # efficient or cumulative
    rank: int
    buffer: int
    allocated_slots: int
    max_rank: int
    stage: str
    in_features: int
    out_features: int

    @property
    def active_slots(self) -> int:
        """Slots the forward pass uses: ``rank + buffer`` (spec section 2)."""
        return self.rank + self.buffer

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "rank": self.rank,
            "buffer": self.buffer,
            "active_slots": self.active_slots,
            "stage": self.stage,
            "max_rank": self.max_rank,
            "in_features": self.in_features,
            "out_features": self.out_features,
        }


@dataclass
class LoadedCheckpoint:
    """A training checkpoint in memory.

    Attributes:
        path: the step directory read.
        step: optimizer steps completed.
        cfg: the run's full configuration.
        meta: the checkpoint's :class:`~inrank_megatron.checkpoint.Meta`.
        layers: ``{name: InRankLayerState}`` of the InRank layers (empty for a dense model).
        tensors: ``{parameter name: fp32 tensor}``, full and unsharded, factors at their allocated
            slots, the word embedding at the padded vocabulary.
        vocab_size: the tokenizer's vocabulary (unpadded).
        padded_vocab_size: rows of the word embedding.
    """

    path: str
    step: int
    cfg: TrainConfig
    meta: Meta
    layers: dict
    tensors: dict
    vocab_size: int
    padded_vocab_size: int
    tokenizer_model: Optional[str] = None  # the SentencePiece model given instead of the recorded

    @property
    def mode(self) -> Optional[str]:
        """``"efficient"`` / ``"cumulative"``, or None for a dense model."""
        return self.cfg.inrank.mode if self.cfg.model.inrank else None

    def active_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:k]`` (``[k, in]``) and ``B[:, :k]`` (``[out, k]``) of InRank layer ``name``."""
        layer = self.layers[name]
        k = layer.active_slots
        A, B = self.tensors[name + ".A"][:k], self.tensors[name + ".B"][:, :k]
        if self.cfg.inrank.start == "dense" and layer.stage == "growing":
            # Stage 1 of a dense start: the identity factor is the identity (stored, it has only
            # felt weight decay), as the layer reads it.
            eye = torch.eye(k, dtype=A.dtype)
            if dense_start_role(layer.in_features, layer.out_features) == "B":
                A = eye
            else:
                B = eye
        return A, B

    def dense_weight(self, name: str) -> torch.Tensor:
        """The ``[out, in]`` weight InRank layer ``name`` applies: ``W0 + B[:, :k] A[:k]``
        (cumulative) or ``B[:, :k] A[:k]`` (efficient), formed in fp64, returned in fp32."""
        A, B = self.active_factors(name)
        W = B.double() @ A.double()
        w0 = self.tensors.get(name + ".w0")
        if w0 is not None:
            W = W + w0.double()
        return W.float()

    def dense_tensors(self, *, unpad_vocab: bool = True) -> dict:
        """All tensors with every InRank layer merged into a dense ``<name>.weight``; the vocabulary
        padding dropped unless ``unpad_vocab=False``."""
        out = {}
        for key, value in self.tensors.items():
            layer, _, role = key.rpartition(".")
            if not (layer in self.layers and role in ("A", "B", "w0")):
                out[key] = value
        for name in self.layers:
            out[name + ".weight"] = self.dense_weight(name)
        if unpad_vocab:
            out = unpad_vocabulary(out, self.vocab_size)
        return out


def unpad_vocabulary(tensors: dict, vocab_size: int) -> dict:
    """The word embedding (and an untied output layer) cut to the tokenizer's ``vocab_size`` rows."""
    out = dict(tensors)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in out:
            out[key] = out[key][:vocab_size]
    return out


# --------------------------------------------------------------------------------- DCP reading
def read_dist_tensors(model_dir: str, *, skip_prefixes=()) -> dict:
    """Every tensor of a megatron ``torch_dist`` checkpoint directory, assembled from its chunks,
    by checkpoint key (stacked layers and all). Byte objects (``_extra_state``) are skipped, and so
    are keys starting with one of ``skip_prefixes``."""
    meta_file = os.path.join(model_dir, ".metadata")
    if not os.path.isfile(meta_file):
        raise CheckpointError(
            f"{model_dir}: no .metadata (not a megatron torch_dist checkpoint, "
            "or an incomplete one)"
        )
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with open(meta_file, "rb") as f:
        metadata = read_dcp_metadata(f, meta_file)
    out, filled = {}, {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and not key.startswith(tuple(skip_prefixes)):
            out[key] = torch.zeros(md.size, dtype=md.properties.dtype)
            filled[key] = 0
    files: dict = {}
    try:
        for index, info in sorted(
            metadata.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)
        ):
            if index.fqn not in out:
                continue
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(
                    f"{model_dir}: {index.fqn} is stored with transforms "
                    f"{info.transform_descriptors}, which this reader does not support"
                )
            stream = files.get(info.relative_path)
            if stream is None:
                stream = files[info.relative_path] = open(
                    os.path.join(model_dir, info.relative_path), "rb"
                )
            stream.seek(info.offset)
            chunk = safe_torch_load(
                io.BytesIO(stream.read(info.length)), model_dir, map_location="cpu"
            )
            target = out[index.fqn]
            offsets = tuple(index.offset) if index.offset is not None else (0,) * target.dim()
            view = target[tuple(slice(o, o + n) for o, n in zip(offsets, chunk.shape))]
            if view.shape != chunk.shape:
                raise CheckpointError(
                    f"{model_dir}: chunk of {index.fqn} at {offsets} with shape "
                    f"{tuple(chunk.shape)} does not fit {tuple(target.shape)}"
                )
            view.copy_(chunk)
            filled[index.fqn] += chunk.numel()
    except OSError as error:
        raise CheckpointError(f"{model_dir}: cannot read checkpoint data: {error}") from None
    finally:
        for stream in files.values():
            stream.close()
    missing = [k for k, n in filled.items() if n != out[k].numel()]
    if missing:
        raise CheckpointError(
            f"{model_dir}: tensors {missing[:3]} are only partly stored (an incomplete checkpoint)"
        )
    return out


# ------------------------------------------------------------------------------------- loading
def checkpoint_vocab_size(cfg: TrainConfig, tokenizer_model: Optional[str] = None) -> int:
    """The tokenizer's vocabulary size for a run's config.

    Args:
        cfg: the run's configuration (``data.tokenizer``, ``data.tokenizer_model``).
        tokenizer_model: a SentencePiece model to use instead of the recorded path (which is
            relative to the directory training ran in).
    """
    from inrank_megatron.data.tokenizers import build_tokenizer

    model = tokenizer_model or cfg.data.tokenizer_model
    if cfg.data.tokenizer == "sentencepiece" and (not model or not os.path.isfile(model)):
        raise CheckpointError(
            f"the checkpoint was trained with the SentencePiece model data.tokenizer_model="
            f"{cfg.data.tokenizer_model!r}, not found from {os.getcwd()}; run from the training "
            "directory or pass the model file (--tokenizer-model)"
        )
    try:
        return build_tokenizer(
            cfg.data.tokenizer, model if cfg.data.tokenizer == "sentencepiece" else None
        ).vocab_size
    except ValueError as error:
        raise CheckpointError(f"tokenizer of the checkpoint: {error}") from None


def read_checkpoint_config(path: str) -> tuple[str, Meta, TrainConfig]:
    """``(step directory, meta.json, config)`` of a checkpoint, without reading its tensors (to
    refuse early what a tool cannot handle)."""
    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    try:
        cfg = from_dict(meta.config, origin=f" in {step_dir}/{META_FILE}")
    except (ValueError, KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(f"{step_dir}/{META_FILE}: without a valid config: {error}") from None
    return step_dir, meta, cfg


def load_checkpoint(path: str, *, tokenizer_model: Optional[str] = None) -> LoadedCheckpoint:
    """A training checkpoint, fully in memory, checked against its own records.

    Args:
        path: a step directory, a run's ``checkpoints/`` directory or its ``output.dir`` (the
            latter two follow ``latest``).
        tokenizer_model: SentencePiece model file, when the recorded relative path does not
            resolve from the current directory.

    Returns:
        :class:`LoadedCheckpoint`.

    Raises:
        CheckpointError: missing or partial checkpoint, unreadable files, a backend layout without
            ``model/``, tensors missing or unexpected, or factor shapes that contradict
            ``inrank_growth.json`` (the message names the layer).
    """
    step_dir, meta, cfg = read_checkpoint_config(path)
    model_dir = os.path.join(step_dir, MODEL_DIR)
    if not os.path.isdir(model_dir):
        hint = (
            f"convert it first: tools/convert_checkpoint.py from-deepspeed {step_dir} <new "
            "step dir>"
            if meta.backend == "deepspeed"
            else f"checkpoints of backend {meta.backend!r} keep the model elsewhere"
        )
        raise CheckpointError(
            f"{step_dir}: no {MODEL_DIR}/ (a megatron dist checkpoint of the model); {hint}"
        )
    growth = read_growth(step_dir)
    vocab_size = checkpoint_vocab_size(cfg, tokenizer_model)
    tensors = {}
    # The torch backend stores AdamW's moments in the same dist checkpoint, under "optimizer.".
    for key, tensor in read_dist_tensors(model_dir, skip_prefixes=OPTIMIZER_PREFIXES).items():
        tensors.update(unmap_dist_key(key, tensor))
    tensors = {k: v.float() for k, v in tensors.items()}
    layers = _layer_states(cfg, growth, step_dir)
    padded = tensors.get("embedding.word_embeddings.weight")
    padded = padded.shape[0] if padded is not None else 0
    _check_tensors(cfg, tensors, layers, padded, vocab_size, step_dir)
    return LoadedCheckpoint(
        path=step_dir,
        step=meta.step,
        cfg=cfg,
        meta=meta,
        layers=layers,
        tensors=tensors,
        vocab_size=vocab_size,
        padded_vocab_size=padded,
        tokenizer_model=tokenizer_model,
    )


def _layer_states(cfg: TrainConfig, growth: dict, step_dir: str) -> dict:
    names = inrank_layer_names(cfg)
    where = f"{step_dir}/{GROWTH_FILE}"
    missing = [n for n in names if n not in growth]
    extra = [n for n in growth if n not in names]
    if missing or extra:
        raise CheckpointError(
            f"{where} does not match the config's InRank layers: missing "
            f"{missing[:3]}, unexpected {extra[:3]}"
        )
    layers = {}
    for name in names:
        entry = growth[name]
        try:
            g = entry["growth"]
            kind = layer_kind(name)
            n_in, n_out = linear_shape(cfg, kind)
            layer = InRankLayerState(
                name=name,
                kind=kind,
                mode=cfg.inrank.mode,
                rank=int(g["rank"]),
                buffer=int(g["buffer"]),
                allocated_slots=int(entry["allocated_slots"]),
                max_rank=int(g["max_rank"]),
                stage=str(g["stage"]),
                in_features=n_in,
                out_features=n_out,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"{where}: layer {name}: malformed growth state ({error!r})"
            ) from None
        if not 0 <= layer.rank <= layer.max_rank <= min(n_in, n_out) or layer.buffer < 0:
            raise CheckpointError(
                f"{where}: layer {name}: rank={layer.rank}, buffer="
                f"{layer.buffer}, max_rank={layer.max_rank} are inconsistent "
                f"for a {n_in} -> {n_out} layer"
            )
        if layer.active_slots > layer.allocated_slots:
            raise CheckpointError(
                f"{where}: layer {name}: rank + buffer = {layer.active_slots} "
                f"active slots exceed the {layer.allocated_slots} allocated"
            )
        layers[name] = layer
    return layers


def _check_tensors(cfg, tensors, layers, padded, vocab_size, step_dir) -> None:
    if padded < vocab_size:
        raise CheckpointError(
            f"{step_dir}: the word embedding has {padded} rows, fewer than the "
            f"tokenizer's {vocab_size} ids"
        )
    # Factor shapes against the recorded allocation first: that error names the layer.
    for name, layer in layers.items():
        A, B = tensors.get(name + ".A"), tensors.get(name + ".B")
        if A is None or B is None:
            raise CheckpointError(
                f"{step_dir}: layer {name}: factors A/B missing from the model checkpoint"
            )
        want_A = (layer.allocated_slots, layer.in_features)
        want_B = (layer.out_features, layer.allocated_slots)
        if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
            raise CheckpointError(
                f"{step_dir}: layer {name}: factor shapes A {tuple(A.shape)}, B {tuple(B.shape)} "
                f"contradict {GROWTH_FILE} (rank {layer.rank}, buffer {layer.buffer}, "
                f"{layer.allocated_slots} allocated slots: expected A {want_A}, B {want_B})"
            )
    expected = expected_shapes(
        cfg,
        padded,
        {n: l.allocated_slots for n, l in layers.items()},
        cumulative=cfg.model.inrank and cfg.inrank.mode == "cumulative",
    )
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{step_dir}: the model checkpoint does not match its config: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{step_dir}: {key} has shape {tuple(tensors[key].shape)}, the "
                f"config implies {tuple(shape)}"
            )
    for key, value in tensors.items():  # never export NaN/inf weights
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{step_dir}: {key} holds NaN or inf; not a usable checkpoint")
