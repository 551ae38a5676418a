"""Training checkpoints: InRank growth state + the backend's model and optimizer state + per-rank
RNG state + data position, written so that a crash mid-save never leaves a checkpoint that looks
complete.

Layout under ``<output.dir>/checkpoints/``::

    step_000100/inrank_growth.json  every InRank layer's growth state and allocation
    step_000100/<backend files>     written by ``backend.save`` (torch: ``model/``, a megatron dist
                                    checkpoint, and ``optim/rank_*.pt``; deepspeed: its own)
    step_000100/rng_00000.pt        RNG state per rank
    step_000100/meta.json           written last, inside the temporary directory
    latest                          "step_000100", replaced atomically after the rename

A save writes ``.step_000100.tmp`` and renames it; ``latest`` moves only after the rename, so an
interrupted save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy
import torch

from inrank_megatron.checkpointing import GROWTH_FILE

META = "meta.json"
LATEST = "latest"


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def _portable_rng(state: dict) -> dict:
    """RNG state with numpy's array as a list, loadable with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    return dict(state, numpy=(name, keys.tolist(), pos, has_gauss, cached))


def _native_rng(state: dict) -> dict:
    name, keys, pos, has_gauss, cached = state["numpy"]
    return dict(state, numpy=(name, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached),
                python=(state["python"][0], tuple(state["python"][1]), state["python"][2]))


def save_training_checkpoint(root: str, step: int, *, controller, backend, groups, rng: dict,
                             meta: dict) -> str:
    """Collective. Returns the checkpoint directory."""
    final = step_dir(root, step)
    tmp = os.path.join(root, f".step_{step:06d}.tmp")
    if groups.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        os.makedirs(tmp)
    _barrier()
    backend.save(tmp)
    part = os.path.join(tmp, f"rng_{groups.rank:05d}.pt")
    torch.save(_portable_rng(rng), part + ".part")
    os.replace(part + ".part", part)
    growth = controller.full_state_dict()  # collective over pipeline stages
    _barrier()
    if groups.rank == 0:
        _write_text(os.path.join(tmp, GROWTH_FILE),
                    json.dumps(growth, indent=1, sort_keys=True))
        _write_text(os.path.join(tmp, META), json.dumps(dict(meta, step=step), indent=1))
        if os.path.exists(final):  # re-saving a step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text(os.path.join(root, LATEST), os.path.basename(final) + "\n")
    _barrier()
    return final


def read_meta(path: str) -> dict:
    """``meta.json`` of a complete checkpoint; FileNotFoundError naming the path otherwise."""
    file = os.path.join(path, META)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a complete checkpoint ({META} missing: an "
                                "interrupted save, or not a checkpoint directory)")
    with open(file) as f:
        return json.load(f)


def latest_checkpoint(root: str):
    """The directory named by ``root/latest``, or None when there is none."""
    file = os.path.join(root, LATEST)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        path = os.path.join(root, f.read().strip())
    read_meta(path)
    return path


def load_growth_state(path: str, controller) -> None:
    """Restore growth state and reshape reallocated factors (before the backend is built)."""
    with open(os.path.join(path, GROWTH_FILE)) as f:
        controller.load_state_dict(json.load(f))


def load_model_weights(path: str, model) -> None:
    """Collective: only the model tensors of ``path/model`` (a megatron dist checkpoint)."""
    from megatron.core import dist_checkpointing

    with torch.no_grad():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                        os.path.join(path, "model"))
    model.load_state_dict(state["model"], strict=True)


def load_rng_state(path: str, rank: int) -> dict:
    """This rank's RNG state (``weights_only``: no pickled code runs)."""
    file = os.path.join(path, f"rng_{rank:05d}.pt")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} missing: checkpoint {path} was written by fewer ranks")
    return _native_rng(torch.load(file, weights_only=True))
