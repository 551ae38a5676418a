"""Training checkpoints: the save and the resume loads of the training loop (and the conversion
jobs), in the format :mod:`inrank_megatron.checkpoint` owns.

A save writes ``checkpoints/.step_000100.<pid>.tmp``: the backend's files (torch / megatron:
``model/`` and ``train.pt``; deepspeed: ``deepspeed/`` and ``inrank_deepspeed.json``),
``rng_<rank>.pt`` per rank, ``inrank_growth.json``, then ``meta.json`` last (with every other file's
size, which resume verifies); it renames the directory to ``step_000100`` and only then moves
``latest``, so an interrupted save leaves the previous checkpoint as the latest one. A step
directory that already exists is never replaced: this run did not write it.

Every load here runs under :func:`~inrank_megatron.checkpoint.safe_loading`: nothing in a
checkpoint can run code.
"""

from __future__ import annotations

import os
import shutil

import numpy
import torch

from inrank_megatron.checkpoint import (
    GROWTH_FILE, CheckpointError, Meta, read_growth, record_files, safe_loading, safe_torch_load,
    step_dir, write_growth, write_latest, write_meta,
)


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _portable_rng(state: dict) -> dict:
    """RNG state with numpy's array as a list, loadable with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    return dict(state, numpy=(name, keys.tolist(), pos, has_gauss, cached))


def _native_rng(state: dict) -> dict:
    name, keys, pos, has_gauss, cached = state["numpy"]
    return dict(state, numpy=(name, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached),
                python=(state["python"][0], tuple(state["python"][1]), state["python"][2]))


def _broadcast_str(text: str) -> str:
    if not torch.distributed.is_initialized():
        return text
    box = [text]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save_training_checkpoint(root: str, step: int, *, controller, backend, groups, rng: dict,
                             meta: Meta) -> str:
    """Collective. Writes step ``step`` under ``root`` (a run's ``checkpoints/``) and points
    ``latest`` at it; ``meta.step`` is set to ``step``. Returns the checkpoint directory.

    Raises:
        CheckpointError: the step directory exists already (another run's, or this directory was
            resumed from a later step): nothing is replaced.
    """
    final = step_dir(root, step)
    tmp = ""
    if groups.rank == 0:
        os.makedirs(root, exist_ok=True)
        if not os.path.exists(final):
            tmp = os.path.join(root, f".step_{step:06d}.{os.getpid()}.tmp")
            os.makedirs(tmp)
    tmp = _broadcast_str(tmp)  # every rank learns the name, or that there is none
    if not tmp:
        raise CheckpointError(f"{final} exists; refusing to replace a checkpoint this run did "
                              "not write")
    backend.save(tmp)
    part = os.path.join(tmp, f"rng_{groups.rank:05d}.pt")
    torch.save(_portable_rng(rng), part + ".part")
    os.replace(part + ".part", part)
    growth = controller.full_state_dict()  # collective over pipeline stages
    _barrier()
    if groups.rank == 0:
        write_growth(tmp, growth)
        write_meta(tmp, meta.replace(step=step, files=record_files(tmp)))
        os.rename(tmp, final)
        write_latest(root, final)
    _barrier()
    return final


def load_growth_state(path: str, controller) -> None:
    """Restore growth state and reshape reallocated factors (before the backend is built).

    Raises:
        CheckpointError: naming ``inrank_growth.json`` when it parses but does not hold a growth
            state these layers accept (a stage, rank or key that no save writes).
    """
    try:
        controller.load_state_dict(read_growth(path))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{os.path.join(path, GROWTH_FILE)}: {error}; expected the growth "
                              "state of every InRank layer as the save wrote it") from None


def load_model_weights(path: str, model) -> None:
    """Collective: only the model tensors of ``path/model`` (a megatron dist checkpoint)."""
    from megatron.core import dist_checkpointing

    with torch.no_grad(), safe_loading(path):
        state = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                        os.path.join(path, "model"))
    model.load_state_dict(state["model"], strict=True)


def load_backend_state(path: str, backend) -> None:
    """Collective: the backend's model and optimizer state from ``path``, nothing run from it."""
    with safe_loading(path):
        backend.load(path)


def load_rng_state(path: str, rank: int) -> dict:
    """This rank's RNG state (``weights_only``: no pickled code runs)."""
    file = os.path.join(path, f"rng_{rank:05d}.pt")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} missing: checkpoint {path} was written by fewer ranks")
    return _native_rng(safe_torch_load(file))


def remove_partial_saves(root: str) -> None:
    """Delete this run's interrupted saves (``.step_*.<pid>.tmp`` under ``root``): only names
    that a save of this project creates, inside the run's own ``checkpoints/``."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(".step_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
