"""inrank-megatron: InRank (incremental low-rank learning, arXiv 2306.11250) for Megatron-Core GPT
training. The math lives in :mod:`inrank_megatron.core` (no distributed code); layers, the growth
controller, optimizer backends and the training loop build on it."""

from inrank_megatron.core import (
    FactorResize, GrowthState, InRankConfig, explained_ratio, factor_spectrum, select_rank, truncate,
)
from inrank_megatron.cpu_fallback import enable_cpu_fallback
from inrank_megatron.layers import InRankLinear, inrank_layers, name_inrank_layers

__all__ = [
    "FactorResize", "GrowthState", "InRankConfig", "InRankLinear", "enable_cpu_fallback",
    "explained_ratio", "factor_spectrum", "inrank_layers", "name_inrank_layers", "select_rank",
    "truncate",
]
