"""Activation recompute (``model.recompute``) as megatron.core does it, plus the autocast state.

megatron's ``TransformerConfig`` fields do the work: ``recompute_granularity='selective'`` makes
``SelfAttention`` checkpoint its core attention, ``'full'`` makes ``TransformerBlock`` checkpoint
whole layers (``recompute_method='block'``: the first ``recompute_num_layers`` of the stage). Both
go through ``megatron.core.tensor_parallel.checkpoint`` (``random.CheckpointFunction``), which
restores the CPU, CUDA and model-parallel RNG states before re-running the forward, so dropout
draws the same masks. InRank layers need nothing more: a recomputed forward reads the same
``active_slots``, because ranks change only after the optimizer step, never between a micro-batch's
forward and its backward.

What ``CheckpointFunction`` does not restore is the autocast state: megatron trains in bf16/fp16
parameters and never autocasts, but the torch and megatron backends here run bf16/fp16 as
autocast over fp32 weights, and backward runs outside the autocast region. The recomputed forward
would then run in fp32 and its gradients would not be those of the forward that made the loss.
:func:`keep_autocast_in_recompute` wraps the checkpointed function so that it re-enters the
autocast state of the first forward (as ``torch.utils.checkpoint`` does).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

_DEVICE_TYPES = ("cuda", "cpu")
_patched = False


def recompute_fields(
    recompute: str, recompute_num_layers: Optional[int], layers_per_stage: int
) -> dict:
    """TransformerConfig fields for ``model.recompute`` (none / selective / full)."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "block",
            "recompute_num_layers": recompute_num_layers or layers_per_stage,
        }
    raise ValueError(f"model.recompute must be none, selective or full, got {recompute!r}")


def _with_autocast_of_now(function):
    """``function`` run under the autocast state current at this call, wherever it runs later."""
    states = [
        (d, torch.get_autocast_dtype(d)) for d in _DEVICE_TYPES if torch.is_autocast_enabled(d)
    ]

    @functools.wraps(function)
    def run(*args):
        with contextlib.ExitStack() as stack:
            for device, dtype in states:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            return function(*args)

    return run


def keep_autocast_in_recompute() -> None:
    """Make ``megatron.core.tensor_parallel.checkpoint`` (what TransformerBlock and SelfAttention
    call) recompute under the autocast state of the first forward; idempotent, process-wide."""
    global _patched
    if _patched:
        return
    from megatron.core import tensor_parallel

    original = tensor_parallel.checkpoint

    @functools.wraps(original)
    def checkpoint(function, distribute_saved_activations, *args):
        return original(_with_autocast_of_now(function), distribute_saved_activations, *args)

    tensor_parallel.checkpoint = checkpoint
    _patched = True
