"""inrank-megatron: InRank (incremental low-rank learning, arXiv 2306.11250) for Megatron-Core GPT
training. The math lives in :mod:`inrank_megatron.core` (no distributed code); layers, the growth
controller, optimizer backends and the training loop build on it.

The public names below are imported lazily, so that light entry points (``launch_env``, the
config checks of the launch scripts) do not pay for importing torch and megatron.
"""

import importlib

_EXPORTS = {
    "FactorResize": "inrank_megatron.core",
    "GrowthState": "inrank_megatron.core",
    "InRankConfig": "inrank_megatron.core",
    "explained_ratio": "inrank_megatron.core",
    "factor_spectrum": "inrank_megatron.core",
    "select_rank": "inrank_megatron.core",
    "truncate": "inrank_megatron.core",
    "enable_cpu_fallback": "inrank_megatron.cpu_fallback",
    "InRankLinear": "inrank_megatron.layers",
    "named_inrank_layers": "inrank_megatron.layers",
    "InRankColumnParallelLinear": "inrank_megatron.tensor_parallel",
    "InRankRowParallelLinear": "inrank_megatron.tensor_parallel",
    "get_gpt_layer_inrank_spec": "inrank_megatron.models.gpt_spec",
    "get_gpt_block_inrank_spec": "inrank_megatron.models.gpt_spec",
    "GrowthController": "inrank_megatron.growth.controller",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'inrank_megatron' has no attribute {name!r}")
