"""InRank's mathematics (spec sections 2-4): no torch.distributed anywhere in this package.

Names are imported lazily (``inrank_megatron.core.names`` holds the settings' vocabulary without
torch, for config checks that should not pay for importing it).
"""

import importlib

from inrank_megatron.core.names import INITS, MODES, POLICIES, RATIO_RULES, STAGES  # noqa: F401

_EXPORTS = {
    "InRankConfig": "config",
    "GrowthState": "growth",
    "init_factors": "init",
    "explained_ratio": "rank_rule",
    "explained_ratios": "rank_rule",
    "select_rank": "rank_rule",
    "FactorResize": "resize",
    "map_slot_state": "resize",
    "factor_spectrum": "spectrum",
    "r_factor": "spectrum",
    "spectrum_from_r": "spectrum",
    "TruncationMaps": "truncation",
    "truncate": "truncation",
    "truncation_maps": "truncation",
    "svd_factors": "truncation",
}

__all__ = sorted(["INITS", "MODES", "POLICIES", "RATIO_RULES", "STAGES", *_EXPORTS])


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"inrank_megatron.core.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'inrank_megatron.core' has no attribute {name!r}")
