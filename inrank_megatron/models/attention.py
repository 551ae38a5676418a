"""Core attention over ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), a drop-in for
megatron.core's local ``DotProductAttention`` in a layer spec's ``core_attention``.

megatron's local attention materialises the ``[b, heads/tp, s, s]`` scores and keeps the softmax
output for backward (``O(s^2)`` memory per layer). SDPA dispatches to the flash or memory-efficient
kernels on GPU, which keep only the output and the per-row log-sum-exp (``O(s)``), and to the math
kernel on CPU. The causal mask is SDPA's ``is_causal`` (never an ``[s, s]`` tensor); an explicit
``attention_mask`` is passed through.

Same constructor and forward contract as megatron's ``DotProductAttention``
(``megatron/core/transformer/dot_product_attention.py``): query ``[sq, b, heads/tp, hn]``, key and
value ``[sk, b, groups/tp, hn]``, a boolean ``attention_mask`` with True where attention is masked
out, output ``[sq, b, heads/tp * hn]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPADotProductAttention(MegatronModule):
    """megatron's ``core_attention`` computed by ``F.scaled_dot_product_attention``.

    Args:
        config: the model's TransformerConfig.
        layer_number: 1-based layer number (megatron's contract; no query-key layer scaling here).
        attn_mask_type: the mask type used when ``attention_mask`` is None (causal for GPT).
        attention_type: ``"self"`` (megatron's contract; unused).
        attention_dropout: dropout probability (default ``config.attention_dropout``).
        softmax_scale: scale of ``Q K^T`` (default ``1 / sqrt(head dim)``).
        cp_comm_type: must be None (no context parallelism).
        pg_collection: process groups (default: megatron's).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "SDPADotProductAttention: context parallelism is not supported; "
                "expected context_parallel_size=1"
            )
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ValueError(
                "SDPADotProductAttention: sliding windows and softmax offsets are "
                "not supported; use megatron's DotProductAttention (attention=local)"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        # megatron's apply_query_key_layer_scaling divides the scale by the layer number and its
        # fp32 softmax multiplies it back: the product is 1 / sqrt(hn) either way.
        self.softmax_scale = (
            softmax_scale
            if softmax_scale is not None
            else 1.0 / math.sqrt(divide(projection_size, config.num_attention_heads))
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Args: query ``[sq, b, np, hn]``, key / value ``[sk, b, ng, hn]``, attention_mask
        (bool, True = masked out, broadcastable to ``[b, np, sq, sk]``) or None.
        Returns: context ``[sq, b, np * hn]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                "SDPADotProductAttention: packed sequences and attention bias are not supported"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, hn)
        causal, mask = False, None
        if attention_mask is not None:
            mask = ~attention_mask
        elif mask_type == AttnMaskType.causal:
            if sq != sk:  # as megatron's local attention, whose default mask is [sq, sq]
                raise ValueError(
                    f"SDPADotProductAttention: a causal mask needs equal query and "
                    f"key lengths without attention_mask, got {sq} and {sk}"
                )
            causal = True
        p = self.dropout_p if self.training else 0.0
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if p > 0 and not self.config.sequence_parallel:
            # As DotProductAttention: dropout draws from the model-parallel RNG stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    dropout_p=p,
                    is_causal=causal,
                    scale=self.softmax_scale,
                    enable_gqa=groups > 1,
                )
        else:
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=p,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=groups > 1,
            )
        # (b, np, sq, hn) -> (sq, b, np * hn)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """No parameters (megatron's DotProductAttention has none without a learnable offset)."""
        return {}
