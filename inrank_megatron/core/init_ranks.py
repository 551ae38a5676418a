"""The ranks the rule reaches on an untrained layer: the fixed point of spec section 3 applied to the
efficient-mode initialisation (spec section 2) alone.

Why this exists (docs/results.md): in ``efficient`` mode ``W = B A`` starts as the product of two
kaiming-uniform factors, whose ``r + b`` active slots carry a flat random spectrum. The rule applied
to that spectrum alone grows the rank check after check to a fixed point set only by the layer shape,
the buffer, the threshold and the cap: for the reference settings (b = 100, alpha = 0.9) it is 255
(768 x 3072), 287 (1024 x 4096) and 312 (1280 x 5120), the ranks the paper reports for GPT-2 S, M
and L, and 41 / 43 for tiny-cpu's 128 x 512 layers, the ranks its runs learn. Where a run's ranks
equal this fixed point, they were set by the initialisation, not by what the layer learned.

Pure tensor math; no torch.distributed.
"""

from __future__ import annotations

from typing import Optional

import torch

from inrank_megatron.core.init import init_factors
from inrank_megatron.core.rank_rule import select_rank
from inrank_megatron.core.spectrum import factor_spectrum


def init_rank_trajectory(in_features: int, out_features: int, *, rank: int, buffer: int,
                         max_rank: int, threshold: float, rule: str = "variance",
                         init_scale: float = 1.0, seed: int = 0,
                         max_checks: Optional[int] = None, init: str = "kaiming") -> list[int]:
    """The ranks successive checks select on the untrained efficient-mode init of one layer.

    Each check computes the spectrum of the active product ``B[:, :r+b] @ A[:r+b]`` (the QR route of
    :func:`factor_spectrum`, as training does) and applies :func:`select_rank`; the factors never
    change. The trajectory stops when a check keeps the rank (the fixed point) or after
    ``max_checks`` checks.

    Args:
        in_features, out_features: the full (unsharded) layer shape.
        rank, buffer, max_rank, threshold, rule: the rank rule's settings (``inrank.*``).
        init_scale: ``inrank.init_scale``.
        seed: seed of the factor draw (the fixed point barely depends on it).
        max_checks: stop after this many checks (None: at the fixed point).
        init: ``inrank.init``; ``"spectral"`` factorises a normal dense draw, as megatron's
            ``init_method`` of a GPT layer (the rule is scale-invariant, so its std does not
            matter).

    Returns:
        ``[rank, rank after check 1, ...]``; its last entry is the fixed point.
    """
    generator = torch.Generator().manual_seed(seed)
    factors = init_factors("efficient", in_features, out_features, max_rank,
                           init_scale=init_scale, generator=generator, init=init,
                           dense_init=torch.nn.init.normal_ if init == "spectral" else None)
    trajectory = [rank]
    while max_checks is None or len(trajectory) <= max_checks:
        k = min(rank + buffer, max_rank)
        s = factor_spectrum(factors.A[:k], factors.B[:, :k])  # zero-padded to min(in, out)
        new = select_rank(s, rank, buffer, max_rank, threshold, rule=rule)
        if new == rank:
            break
        rank = new
        trajectory.append(rank)
    return trajectory
