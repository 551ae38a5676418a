"""Initial values of InRank factors (spec section 2), drawn full-size so that a sharded layer can
take its shard and equal the unsharded layer for the same seed, whatever the TP size."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class FactorInit(NamedTuple):
    A: torch.Tensor  # (slots, in)
    B: torch.Tensor  # (out, slots)
    w0: Optional[torch.Tensor]  # (out, in) in cumulative mode, else None


def init_factors(mode: str, in_features: int, out_features: int, slots: int, *,
                 init_scale: float = 1.0, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32) -> FactorInit:
    """Draw full (unsharded) factors.

    ``efficient``: A and B ``kaiming_uniform_(a=sqrt(5))`` times ``init_scale``, as the reference
    (the fan-in of B is its slot count, the pre-allocated ``max_rank``).
    ``cumulative``: W0 orthogonal (gain ``init_scale``), A kaiming-uniform, B zero, so ``B A = 0``
    and the layer starts at ``W0``.

    Args:
        mode: ``"efficient"`` or ``"cumulative"``.
        in_features, out_features: full layer shape.
        slots: allocated rank slots.
        init_scale: multiplier on the init.
        generator: CPU generator (default: torch's global one).
        dtype: parameter dtype (drawn in fp32, then cast).
    """
    A = torch.empty(slots, in_features)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    A.mul_(init_scale)
    B = torch.empty(out_features, slots)
    w0 = None
    if mode == "efficient":
        torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
        B.mul_(init_scale)
    elif mode == "cumulative":
        B.zero_()
        w0 = torch.empty(out_features, in_features)
        torch.nn.init.orthogonal_(w0, gain=init_scale, generator=generator)
        w0 = w0.to(dtype)
    else:
        raise ValueError(f"mode must be 'efficient' or 'cumulative', got {mode!r}")
    return FactorInit(A.to(dtype), B.to(dtype), w0)
