"""Build megatron.core's ``GPTModel`` with InRank layers (or dense, a flag away)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from inrank_megatron.core.config import InRankConfig
from inrank_megatron.models.gpt_spec import get_gpt_block_inrank_spec
from inrank_megatron.models.shape import GPTShape, padded_vocab_size, shape_from_config  # noqa: F401

_ACTIVATIONS = {"gelu": F.gelu}


def transformer_config(
    shape: GPTShape,
    *,
    tp: int = 1,
    pp: int = 1,
    sequence_parallel=False,
    params_dtype=torch.float32,
    bf16=False,
    fp16=False,
    recompute: str = "none",
    recompute_num_layers: Optional[int] = None,
) -> TransformerConfig:
    """A TransformerConfig for megatron's local (no TE/apex) path with fusions off.

    ``recompute`` is ``model.recompute`` (none / selective / full, with ``recompute_num_layers``
    for full: :func:`inrank_megatron.models.recompute.recompute_fields`)."""
    from inrank_megatron.models.recompute import recompute_fields

    if shape.activation == "swiglu":
        act, gated = F.silu, True
    elif shape.activation in _ACTIVATIONS:
        act, gated = _ACTIVATIONS[shape.activation], False
    else:
        raise ValueError(f"model.activation must be 'gelu' or 'swiglu', got {shape.activation!r}")
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        ffn_hidden_size=shape.ffn_hidden_size or 4 * shape.hidden_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        use_cpu_initialization=True,
        params_dtype=params_dtype,
        bf16=bf16,
        fp16=fp16,
        pipeline_dtype=params_dtype,
        normalization=shape.normalization,
        activation_func=act,
        gated_linear_unit=gated,
        add_bias_linear=shape.add_bias_linear,
        hidden_dropout=shape.hidden_dropout,
        attention_dropout=shape.attention_dropout,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        **recompute_fields(recompute, recompute_num_layers, shape.num_layers // pp),
        **shape.extra,
    )


def build_gpt(
    shape: GPTShape,
    config: TransformerConfig,
    *,
    inrank: Optional[InRankConfig],
    inrank_layers=("fc1", "fc2"),
    layer_numbers=None,
    pre_process=True,
    post_process=True,
    vp_stage=None,
    attention: str = "local",
) -> GPTModel:
    """megatron.core ``GPTModel`` with InRank layers (``inrank=None``: the dense baseline, built
    through the same spec code with no InRank linears).

    ``attention`` is the core attention (``model.attention``): ``local`` (megatron's
    DotProductAttention) or ``sdpa`` (:class:`inrank_megatron.models.attention.
    SDPADotProductAttention`). With recompute on (``config.recompute_granularity``) the
    recomputed forward keeps the autocast state of the first one
    (:func:`inrank_megatron.models.recompute.keep_autocast_in_recompute`).

    Initialisation does not depend on the TP size: megatron draws full weights on the CPU
    (``use_cpu_initialization``) and the InRank layers draw full factors, then keep their shard.
    """
    spec = get_gpt_block_inrank_spec(
        config,
        inrank,
        layers=inrank_layers if inrank else (),
        layer_numbers=layer_numbers,
        vp_stage=vp_stage,
        attention=attention,
    )
    if config.recompute_granularity is not None:
        from inrank_megatron.models.recompute import keep_autocast_in_recompute

        keep_autocast_in_recompute()
    from inrank_megatron.cpu_fallback import tensor_cuda_is_identity

    with tensor_cuda_is_identity():  # the tied embedding's copy on the last pipeline stage
        return GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=shape.vocab_size,
            max_sequence_length=shape.max_position_embeddings or shape.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
            position_embedding_type=shape.position_embedding_type,
            vp_stage=vp_stage,
        )


def build_model(cfg, vocab_size: int, tp: int) -> GPTModel:
    """The GPTModel of a training config (this rank's pipeline stage of it) with fp32 master
    weights; bf16/fp16 run under autocast. The pipeline layout is megatron's parallel state (1
    outside a PP job).

    Args:
        cfg: a :class:`~inrank_megatron.config.TrainConfig` (its ``model``, ``inrank`` and
            ``parallel.sequence_parallel``).
        vocab_size: the tokenizer's vocabulary (padded here for ``tp``).
        tp: the tensor-parallel size.
    """
    from megatron.core import parallel_state

    shape = shape_from_config(cfg, vocab_size, tp)
    config = transformer_config(
        shape,
        tp=tp,
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=cfg.parallel.sequence_parallel,
        recompute=cfg.model.recompute,
        recompute_num_layers=cfg.model.recompute_num_layers,
    )
    inrank = cfg.inrank.to_core() if cfg.model.inrank else None
    return build_gpt(
        shape,
        config,
        inrank=inrank,
        inrank_layers=tuple(cfg.inrank.layers),
        attention=cfg.model.attention,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
