"""Tensor-parallel InRank layers for megatron.core (twins of Column/RowParallelLinear)."""

from inrank_megatron.tensor_parallel.layers import (
    InRankColumnParallelLinear,
    InRankRowParallelLinear,
    allreduce_sequence_parallel_grads,
)
from inrank_megatron.tensor_parallel.tsqr import tsqr_r

__all__ = [
    "InRankColumnParallelLinear",
    "InRankRowParallelLinear",
    "allreduce_sequence_parallel_grads",
    "tsqr_r",
]
