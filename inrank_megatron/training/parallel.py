"""Process groups and seeds of a training run: torch.distributed, then megatron's parallel state."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy
import torch


@dataclass
class ParallelGroups:
    """This rank's place in the TP x PP x DP layout."""

    rank: int
    world_size: int
    tp_size: int
    tp_rank: int
    pp_size: int
    dp_size: int
    dp_rank: int
    tp_group: object
    dp_group: object
    pp_rank: int = 0
    pp_group: object = None

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def init_parallel(tp: int, pp: int, *, backend: str, timeout_s: int = 1800) -> ParallelGroups:
    """Initialise torch.distributed from the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and
    megatron's parallel state."""
    from megatron.core import parallel_state

    from inrank_megatron.cpu_fallback import enable_cpu_fallback

    enable_cpu_fallback()
    if backend == "nccl":
        # The loop's small CPU tensors (loss averages, norms, gathered objects) go over gloo, the
        # model's CUDA tensors over NCCL.
        backend = "cpu:gloo,cuda:nccl"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    return ParallelGroups(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        tp_size=tp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_size=pp,
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
    )


def set_seeds(seed: int) -> None:
    """Same seed on every rank: megatron draws full weights on the CPU (TP-size independent), and
    its model-parallel RNG tracker forks per-TP-rank streams from it."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
