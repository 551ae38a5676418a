from inrank_megatron.layers.base import InRankFactorsMixin, named_inrank_layers
from inrank_megatron.layers.linear import InRankLinear

__all__ = ["InRankFactorsMixin", "InRankLinear", "named_inrank_layers"]
