"""InRank's mathematics (spec sections 2-4): no torch.distributed anywhere in this package."""

from inrank_megatron.core.config import MODES, InRankConfig
from inrank_megatron.core.growth import STAGES, GrowthState
from inrank_megatron.core.init import init_factors
from inrank_megatron.core.rank_rule import RULES, explained_ratio, explained_ratios, select_rank
from inrank_megatron.core.resize import POLICIES, FactorResize, map_slot_state
from inrank_megatron.core.spectrum import factor_spectrum, r_factor, spectrum_from_r
from inrank_megatron.core.truncation import TruncationMaps, truncate, truncation_maps

__all__ = [
    "MODES", "POLICIES", "RULES", "STAGES", "FactorResize", "GrowthState", "InRankConfig",
    "TruncationMaps", "explained_ratio", "explained_ratios", "factor_spectrum", "init_factors",
    "map_slot_state", "r_factor", "select_rank", "spectrum_from_r", "truncate", "truncation_maps",
]
