"""Model checkpoints through megatron.core dist_checkpointing, with InRank growth state.

A checkpoint directory holds megatron's sharded model state (loadable at another TP size) and
``inrank_growth.json``: every InRank layer's growth state and allocation. Loading reads the growth
state first and reshapes the factors to the recorded allocation (after the cut they are smaller
than a freshly built model's), then loads the tensors in place.
"""

from __future__ import annotations

import json
import os

import torch
from megatron.core import dist_checkpointing

GROWTH_FILE = "inrank_growth.json"


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_model_checkpoint(path: str, model, controller) -> None:
    """Save ``model`` (megatron ``sharded_state_dict``) and the controller's growth state to
    ``path`` (created; must not hold another checkpoint). Collective: call on every rank."""
    if _rank() == 0:
        os.makedirs(path, exist_ok=True)
        if os.path.exists(os.path.join(path, GROWTH_FILE)):
            raise FileExistsError(f"{path} already holds a checkpoint; refusing to overwrite it")
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)
    if _rank() == 0:
        tmp = os.path.join(path, GROWTH_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(controller.state_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(path, GROWTH_FILE))
    _barrier()


def read_growth_state(path: str) -> dict:
    """The growth state recorded in checkpoint ``path``."""
    file = os.path.join(path, GROWTH_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a complete InRank checkpoint: {GROWTH_FILE} missing")
    with open(file) as f:
        return json.load(f)


def load_model_checkpoint(path: str, model, controller) -> None:
    """Load a checkpoint written by :func:`save_model_checkpoint` into ``model`` built at any TP
    size. Collective: call on every rank."""
    controller.load_state_dict(read_growth_state(path))
    with torch.no_grad():
        state = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(state, strict=True)
