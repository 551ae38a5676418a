from inrank_megatron.layers.base import InRankFactorsMixin, inrank_layers, name_inrank_layers
from inrank_megatron.layers.linear import InRankLinear

__all__ = ["InRankFactorsMixin", "InRankLinear", "inrank_layers", "name_inrank_layers"]
