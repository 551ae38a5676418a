"""ModuleSpecs that make megatron.core's own ``GPTModel`` train with InRank layers.

``get_gpt_layer_inrank_spec`` is megatron's local (no TE, no apex) transformer-layer spec with the
chosen linear layers swapped for their InRank twins: by default the MLP's ``linear_fc1`` and
``linear_fc2`` (the paper; attention stays dense), optionally ``linear_qkv`` / ``linear_proj``. Its
norms are torch norms that accept sequence parallelism (megatron's local ``WrappedTorchNorm``
refuses it). ``get_gpt_block_inrank_spec`` builds the whole block, so that the final norm accepts SP
too and dense and InRank transformer layers can mix.

    spec = get_gpt_block_inrank_spec(transformer_config, InRankConfig(rank=2, buffer=16))
    model = GPTModel(config=transformer_config, transformer_layer_spec=spec, vocab_size=..., ...)
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from inrank_megatron.core.config import InRankConfig
from inrank_megatron.tensor_parallel.layers import (
    InRankColumnParallelLinear,
    InRankRowParallelLinear,
)

LAYER_KINDS = ("fc1", "fc2", "qkv", "proj")
ATTENTIONS = ("local", "sdpa")


class SequenceParallelTorchNorm:
    """torch ``LayerNorm`` / ``RMSNorm`` built from megatron's norm arguments, accepting sequence
    parallelism: its parameters carry ``sequence_parallel`` so that their gradients (partial sums
    over sequence shards) are summed over TP, as megatron's ``FusedLayerNorm`` does."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(
                f"normalization must be 'LayerNorm' or 'RMSNorm', got {config.normalization!r}"
            )
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm


def _check_layers(layers: Iterable[str]) -> tuple:
    layers = tuple(layers)
    bad = [x for x in layers if x not in LAYER_KINDS]
    if bad:
        raise ValueError(f"inrank layers {bad} are not InRank-able; choose from {LAYER_KINDS}")
    return layers


def get_gpt_layer_inrank_spec(
    inrank_config: Optional[InRankConfig] = None,
    *,
    layers: Iterable[str] = ("fc1", "fc2"),
    normalization: str = "LayerNorm",
    qk_layernorm: bool = False,
    attention: str = "local",
) -> ModuleSpec:
    """A megatron.core transformer-layer ModuleSpec with InRank linear layers.

    Args:
        inrank_config: InRank settings shared by the layers (default: the spec's defaults).
        layers: which linears are InRank: any of ``fc1``, ``fc2``, ``qkv``, ``proj``; an empty
            tuple gives megatron's dense local layer (with SP-capable norms).
        normalization: ``"LayerNorm"`` or ``"RMSNorm"``.
        qk_layernorm: as megatron's local spec.
        attention: core attention: ``local`` (megatron's DotProductAttention) or ``sdpa``
            (:class:`inrank_megatron.models.attention.SDPADotProductAttention`).

    Returns:
        ModuleSpec of a ``TransformerLayer``.
    """
    layers = _check_layers(layers)
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    cfg = inrank_config or InRankConfig()
    spec = copy.deepcopy(
        get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    )
    sub = spec.submodules
    sub.input_layernorm = SequenceParallelTorchNorm
    sub.pre_mlp_layernorm = SequenceParallelTorchNorm
    if attention == "sdpa":
        from inrank_megatron.models.attention import SDPADotProductAttention

        sub.self_attention.submodules.core_attention = SDPADotProductAttention
    column = ModuleSpec(module=InRankColumnParallelLinear, params={"inrank_config": cfg})
    row = ModuleSpec(module=InRankRowParallelLinear, params={"inrank_config": cfg})
    if "fc1" in layers:
        sub.mlp.submodules.linear_fc1 = column
    if "fc2" in layers:
        sub.mlp.submodules.linear_fc2 = row
    if "qkv" in layers:
        sub.self_attention.submodules.linear_qkv = column
    if "proj" in layers:
        sub.self_attention.submodules.linear_proj = row
    return spec


def get_gpt_block_inrank_spec(
    config: TransformerConfig,
    inrank_config: Optional[InRankConfig] = None,
    *,
    layers: Iterable[str] = ("fc1", "fc2"),
    layer_numbers: Optional[Iterable[int]] = None,
    qk_layernorm: bool = False,
    vp_stage: Optional[int] = None,
    attention: str = "local",
) -> TransformerBlockSubmodules:
    """The transformer block of this pipeline stage: InRank layers where asked, dense elsewhere,
    and an SP-capable final norm. Pass it as ``GPTModel(transformer_layer_spec=...)``.

    Args:
        config: the model's TransformerConfig (num_layers, pipeline layout, normalization).
        inrank_config: InRank settings.
        layers: which linears of an InRank transformer layer are InRank.
        layer_numbers: 1-based global transformer-layer numbers that are InRank (default: all).
        qk_layernorm: as megatron's local spec.
        vp_stage: virtual pipeline stage.
        attention: core attention, ``local`` or ``sdpa``.
    """
    _check_layers(layers)
    if getattr(config, "gated_linear_unit", False) and "fc1" in tuple(layers):
        raise ValueError(
            "inrank layers include fc1 but the model uses a gated linear unit "
            "(SwiGLU): InRank fc1 does not support gated activations"
        )
    if layer_numbers is not None:
        layer_numbers = set(layer_numbers)
        bad = sorted(n for n in layer_numbers if not 1 <= n <= config.num_layers)
        if bad:
            raise ValueError(f"inrank layer_numbers {bad} outside 1..{config.num_layers}")
    inrank = get_gpt_layer_inrank_spec(
        inrank_config,
        layers=layers,
        normalization=config.normalization,
        qk_layernorm=qk_layernorm,
        attention=attention,
    )
    dense = get_gpt_layer_inrank_spec(
        inrank_config,
        layers=(),
        normalization=config.normalization,
        qk_layernorm=qk_layernorm,
        attention=attention,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    num = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    specs = [
        inrank if layer_numbers is None or offset + i + 1 in layer_numbers else dense
        for i in range(num)
    ]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=SequenceParallelTorchNorm)
