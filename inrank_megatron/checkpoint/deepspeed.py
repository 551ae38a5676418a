"""DeepSpeed checkpoints of this project: the checks a resume makes before DeepSpeed opens one, and
its consolidation into one fp32 state dict (TP shards joined), which ``tools/zero_to_fp32.py`` and
the backend conversion (:mod:`inrank_megatron.convert.backends`) read.

A step directory written by the deepspeed backend holds DeepSpeed's own checkpoint under
``deepspeed/`` (the tag :data:`TAG`) and ``inrank_deepspeed.json`` (ZeRO stage, TP/DP, every
parameter's full shape and TP partitioning). Every load here runs under
:func:`~inrank_megatron.checkpoint.safe_load.safe_loading`.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from inrank_megatron.checkpoint.meta import (
    DEEPSPEED_DIR,
    DEEPSPEED_META_FILE,
    GROWTH_FILE,
    CheckpointError,
    check_destination,
    read_deepspeed_meta,
    read_growth,
)
from inrank_megatron.checkpoint.safe_load import check_pickles, safe_loading, safe_torch_load
from inrank_megatron.config import ConfigError

TAG = DEEPSPEED_DIR  # the DeepSpeed checkpoint lives in <step dir>/deepspeed/


def check_deepspeed_checkpoint(path: str) -> None:
    """Refuse a checkpoint whose factor shapes contradict its recorded growth state.

    Reads ``inrank_growth.json`` and ``inrank_deepspeed.json`` only (no tensors). Each InRank
    layer's ``A`` / ``B`` must have ``allocated_slots`` slots, its active slots (rank + buffer)
    must fit, and a layer past the cut must hold exactly its rank.

    Raises:
        ConfigError: naming the checkpoint, the parameter and both numbers.
    """
    for name in (DEEPSPEED_META_FILE, GROWTH_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise ConfigError(
                f"output.resume: {path} is not a DeepSpeed checkpoint of this "
                f"project ({name} missing)"
            )
    try:
        shapes = {name: info["shape"] for name, info in read_deepspeed_meta(path)["params"].items()}
        growth = read_growth(path)
    except CheckpointError as error:
        raise ConfigError(f"output.resume: {error}") from None
    for layer, state in sorted(growth.items()):
        g, slots = state["growth"], int(state["allocated_slots"])
        where = (
            f"output.resume: checkpoint {path}, layer {layer}: {GROWTH_FILE} records "
            f"rank={g['rank']}, buffer={g['buffer']}, stage={g['stage']}, "
            f"allocated_slots={slots}"
        )
        if g["rank"] + g["buffer"] > slots or (g["stage"] == "fixed" and slots != g["rank"]):
            raise ConfigError(
                f"{where}, which is inconsistent (expected rank + buffer <= "
                "allocated_slots, and allocated_slots == rank after the cut)"
            )
        for role, dim in (("A", 0), ("B", 1)):
            name = f"{layer}.{role}"
            if name not in shapes:
                raise ConfigError(f"{where}, but the DeepSpeed checkpoint has no parameter {name}")
            if shapes[name][dim] != slots:
                raise ConfigError(
                    f"{where}, but its parameter {name} has shape {shapes[name]} "
                    f"({shapes[name][dim]} slots); the checkpoint's factors and "
                    "growth state do not belong together"
                )


def _model_state_file(ds_dir: str, stage: int, mp: int) -> str:
    if stage == 3:
        return os.path.join(ds_dir, f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt")
    return os.path.join(ds_dir, f"mp_rank_{mp:02d}_model_states.pt")


def _fp32_state_of_mp_rank(ds_dir: str, stage: int, mp: int, tp: int) -> dict:
    """The fp32 master state dict of one TP rank's model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    optim = [
        f
        for f in os.listdir(ds_dir)
        if f.endswith(f"mp_rank_{mp:02d}_optim_states.pt") and "zero_pp_rank" in f
    ]
    if stage == 0 and not optim:
        # ZeRO stage 0 in fp32 saves the full module; its parameters are the masters.
        state = safe_torch_load(_model_state_file(ds_dir, stage, mp), map_location="cpu")["module"]
        return {k: v.float() for k, v in state.items() if torch.is_tensor(v)}
    if tp == 1:
        return get_fp32_state_dict_from_zero_checkpoint(
            os.path.dirname(ds_dir), tag=os.path.basename(ds_dir)
        )
    # deepspeed.utils.zero_to_fp32 globs every *_optim_states.pt of the directory and expects one
    # per data-parallel rank; with TP it would see TP x DP files. Give it one TP rank's files.
    with tempfile.TemporaryDirectory() as root:
        view = os.path.join(root, TAG)
        os.makedirs(view)
        for f in os.listdir(ds_dir):
            if f"mp_rank_{mp:02d}_" in f:
                os.symlink(os.path.join(os.path.abspath(ds_dir), f), os.path.join(view, f))
        return get_fp32_state_dict_from_zero_checkpoint(root, tag=TAG)


def consolidate_checkpoint(step_dir: str) -> dict:
    """One fp32 state dict of the full model (TP shards joined) from a DeepSpeed checkpoint of
    ours at any ZeRO stage, keyed by the model's parameter names, plus the growth state.

    Args:
        step_dir: a training checkpoint directory (``.../checkpoints/step_000100``).

    Returns:
        ``{"state_dict": {name: fp32 tensor}, "inrank_growth": {...}, "meta": {...}}``.
    """
    ds_dir = os.path.join(step_dir, TAG)
    if not os.path.isfile(os.path.join(step_dir, DEEPSPEED_META_FILE)) or not os.path.isdir(ds_dir):
        raise FileNotFoundError(
            f"{step_dir} is not a DeepSpeed checkpoint of this project "
            f"({DEEPSPEED_META_FILE} or {TAG}/ missing)"
        )
    meta = read_deepspeed_meta(step_dir)
    tp, stage = meta["tp"], meta["zero_stage"]
    check_pickles(step_dir)  # refuse a file that names code before DeepSpeed opens any
    with safe_loading(step_dir):  # DeepSpeed's zero_to_fp32 loads with weights_only=False
        shards = [_fp32_state_of_mp_rank(ds_dir, stage, mp, tp) for mp in range(tp)]
    state = {}
    for name in shards[0]:
        info = meta["params"].get(name)
        if tp > 1 and info is not None and info["tensor_model_parallel"]:
            state[name] = torch.cat([s[name] for s in shards], dim=info["partition_dim"])
        else:
            state[name] = shards[0][name]
    missing = sorted(set(meta["params"]) - set(state))
    if missing:
        raise ValueError(f"{step_dir}: consolidated state lacks parameters {missing[:3]}")
    growth = read_growth(step_dir)
    return {
        "state_dict": {k: v.contiguous() for k, v in state.items()},
        "inrank_growth": growth,
        "meta": meta,
    }


def save_consolidated(step_dir: str, out: str) -> dict:
    """Write :func:`consolidate_checkpoint` to ``out``: ``.pt`` (torch.save of the whole dict) or
    ``.safetensors`` (the state dict; growth state and meta as JSON metadata). Returns it."""
    check_destination(step_dir, out)
    if not out.endswith((".safetensors", ".pt")):
        raise ValueError(f"{out}: expected a .pt or .safetensors output path")
    result = consolidate_checkpoint(step_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(out)}.",
        suffix=".part",
        dir=os.path.dirname(os.path.abspath(out)),
    )
    os.close(fd)
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(
            result["state_dict"],
            tmp,
            metadata={
                "inrank_growth": json.dumps(result["inrank_growth"]),
                "inrank_deepspeed": json.dumps(result["meta"]),
            },
        )
    else:
        torch.save(result, tmp)
    if os.path.lexists(out):  # appeared meanwhile: still never overwritten
        os.unlink(tmp)
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    os.rename(tmp, out)
    return result
