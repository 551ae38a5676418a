"""The architecture of a GPT as numbers, without megatron: the shapes of its layers, which the
config's checks, the planner, export and inference read from here.

A transformer layer has four linears (megatron's local spec: SelfAttention's ``linear_qkv`` /
``linear_proj``, MLP's ``linear_fc1`` / ``linear_fc2``); :data:`LAYER_KINDS` names them as
``inrank.layers`` does and :func:`linear_shapes` gives their full (unsharded) ``(in, out)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


# The transformer-layer linears, by the name ``inrank.layers`` uses.
LAYER_KINDS = ("fc1", "fc2", "qkv", "proj")
# Megatron's tensor-parallel split of each: column-parallel (``out`` split) or row-parallel (``in``).
COLUMN_PARALLEL = {"qkv": True, "proj": False, "fc1": True, "fc2": False}


def linear_shapes(hidden_size: int, ffn_hidden_size: int, activation: str) -> dict:
    """``{kind: (in, out)}`` of a transformer layer's linears, full (unsharded), in module order
    (qkv, proj, fc1, fc2).

    No GQA: ``num_query_groups`` = heads, so qkv is ``hidden -> 3 * hidden``. SwiGLU's fc1 holds
    ``[gate; up]``: ``hidden -> 2 * ffn`` (megatron's ``MLP`` with ``gated_linear_unit``).
    """
    h, f = hidden_size, ffn_hidden_size
    fc1_out = 2 * f if activation == "swiglu" else f
    return {"qkv": (h, 3 * h), "proj": (h, h), "fc1": (h, fc1_out), "fc2": (f, h)}


@dataclass
class GPTShape:
    """Architecture of a GPT (GPT-2 style: learned positions, LayerNorm, GELU, tied embeddings)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    vocab_size: int  # padded vocabulary (divisible by make_vocab_size_divisible_by * TP)
    ffn_hidden_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    normalization: str = "LayerNorm"
    activation: str = "gelu"
    position_embedding_type: str = "learned_absolute"
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    extra: dict = field(default_factory=dict)  # more TransformerConfig fields


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """The vocabulary padded to a multiple of ``divisible_by``, which TP must divide.

    Megatron pads to a multiple of ``divisible_by * tp``, so the embedding's shape (and the random
    stream of the initialisation after it) changes with the TP size; padding independently of TP
    keeps a TP=2 model equal to the TP=1 model and checkpoints reshardable.
    """
    padded = ((vocab_size + divisible_by - 1) // divisible_by) * divisible_by
    if padded % tp:
        raise ValueError(
            f"model.make_vocab_size_divisible_by={divisible_by} gives a padded "
            f"vocabulary of {padded}, not divisible by the tensor-parallel size {tp}; "
            "choose a multiple of the TP size"
        )
    return padded


def shape_from_config(cfg, vocab_size: int, tp: int = 1) -> GPTShape:
    """The :class:`GPTShape` of a TrainConfig's ``model`` section, for a tokenizer of
    ``vocab_size`` ids (padded here)."""
    m = cfg.model
    return GPTShape(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        seq_length=m.seq_length,
        vocab_size=padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp),
        ffn_hidden_size=m.ffn(),
        max_position_embeddings=m.max_positions(),
        normalization=m.normalization,
        activation=m.activation,
        position_embedding_type=m.position_embedding_type,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        add_bias_linear=m.add_bias_linear,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
    )
