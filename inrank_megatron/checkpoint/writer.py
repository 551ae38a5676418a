"""Writing a training checkpoint from tensors, outside training: what an import (Hugging Face,
:mod:`inrank_megatron.convert.from_hf`) and a layout conversion (:mod:`inrank_megatron.convert.layout`)
produce. The step directory is what the training loop writes (``model/`` megatron dist checkpoint
through megatron's own ``dist_checkpointing.save`` of a TP=1 model, ``inrank_growth.json``,
``meta.json`` last), without optimizer or RNG state.
"""

from __future__ import annotations

import contextlib
import os

import torch

from inrank_megatron.checkpoint.meta import (
    Meta,
    atomic_output_dir,
    record_files,
    write_growth,
    write_meta,
)
from inrank_megatron.config import TrainConfig


@contextlib.contextmanager
def single_process_megatron(seed: int):
    """megatron.core's parallel state at TP = PP = 1 in this process (a one-rank gloo group on an
    in-memory store), torn down afterwards; reuses a one-rank group that already exists."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from inrank_megatron.cpu_fallback import enable_cpu_fallback

    enable_cpu_fallback()
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError(
            "writing a checkpoint here runs in a single process; torch.distributed "
            f"is initialised with world size {dist.get_world_size()}"
        )
    own_state = not parallel_state.model_parallel_is_initialized()
    if own_state:
        parallel_state.initialize_model_parallel(1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        if own_state:
            parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def write_training_checkpoint(
    out_dir: str, cfg: TrainConfig, vocab_size: int, tensors: dict, growth: dict, meta: Meta
) -> None:
    """Write ``tensors`` (TP=1 names, padded vocabulary) as a training checkpoint step directory,
    atomically, through megatron's own ``dist_checkpointing.save`` of a TP=1 model."""
    from megatron.core import dist_checkpointing

    from inrank_megatron.growth.controller import GrowthController
    from inrank_megatron.models.gpt import build_model

    with single_process_megatron(cfg.train.seed), atomic_output_dir(out_dir) as tmp:
        model = build_model(cfg, vocab_size, 1)
        controller = GrowthController(model)
        controller.load_state_dict(growth)  # reshapes the factors to the recorded allocation
        own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        own = {k: v for k, v in own.items() if v is not None}
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        wrong = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
        if missing or unexpected or wrong:
            raise RuntimeError(
                f"imported tensors do not fit the model: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}, wrong shape {wrong[:4]}"
            )
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(tensors[key])
        os.makedirs(os.path.join(tmp, "model"))
        dist_checkpointing.save(model.sharded_state_dict(), os.path.join(tmp, "model"))
        write_growth(tmp, controller.state_dict())
        write_meta(tmp, meta.replace(files=record_files(tmp)))  # last, as the training loop does
