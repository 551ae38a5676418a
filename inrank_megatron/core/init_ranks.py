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

from inrank_megatron.core.init import dense_start_factors, init_factors
from inrank_megatron.core.rank_rule import select_cut_rank, select_rank
from inrank_megatron.core.spectrum import factor_spectrum, spectrum_from_r


def init_rank_trajectory(
    in_features: int,
    out_features: int,
    *,
    rank: int,
    buffer: int,
    max_rank: int,
    threshold: float,
    rule: str = "variance",
    init_scale: float = 1.0,
    seed: int = 0,
    max_checks: Optional[int] = None,
    init: str = "kaiming",
) -> list[int]:
    """The ranks successive checks select on the untrained efficient-mode init of one layer.

    Each check computes the spectrum of the active product ``B[:, :r+b] @ A[:r+b]`` (the core route
    of :func:`factor_spectrum`, in float64) and applies :func:`select_rank`; the factors never
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
    factors = init_factors(
        "efficient",
        in_features,
        out_features,
        max_rank,
        init_scale=init_scale,
        generator=generator,
        init=init,
        dense_init=torch.nn.init.normal_ if init == "spectral" else None,
    )
    # The QR route of factor_spectrum with the R factors taken from the Cholesky factors of the
    # Gram matrices in float64: each check then costs O(k^3), not O((in + out) k^2). The Grams
    # cover the first `formed` slots only, doubled when a check needs more: the fixed point is
    # usually far below max_rank (GPT-2 medium: 287 of 512), and forming all max_rank slots was
    # about half of tools/plan.py's time on the big configs (13B: 2,560 slots of 20,480 x 5,120).
    formed, gram_A, gram_B = 0, None, None
    n = min(in_features, out_features)
    trajectory = [rank]
    while max_checks is None or len(trajectory) <= max_checks:
        k = min(rank + buffer, max_rank)
        if k > formed:
            formed = min(max(k, 2 * formed), max_rank)
            A, B = factors.A[:formed].double(), factors.B[:, :formed].double()
            gram_A, gram_B = A @ A.T, B.T @ B  # (formed, formed)
        R_A = torch.linalg.cholesky(gram_A[:k, :k]).T  # R of A[:k]^T, diagonal > 0
        R_B = torch.linalg.cholesky(gram_B[:k, :k]).T
        s = spectrum_from_r(R_A, R_B, n)  # zero-padded to min(in, out)
        new = select_rank(s, rank, buffer, max_rank, threshold, rule=rule)
        if new == rank:
            break
        rank = new
        trajectory.append(rank)
    return trajectory


def init_cut_rank(
    in_features: int,
    out_features: int,
    *,
    start: str,
    signal: str,
    max_rank: int,
    threshold: float,
    rule: str = "variance",
    init_scale: float = 1.0,
    init: str = "kaiming",
    seed: int = 0,
) -> Optional[int]:
    """The rank the cut of ``inrank.start=full_rank|dense`` would pick on the untrained layer, or
    None when the init says nothing (``signal="update"``: the update is zero at init, so the rank
    can only come from training).

    Args:
        in_features, out_features: the full layer shape.
        start: ``"full_rank"`` (the factors' init over ``min(in, out)`` slots) or ``"dense"``
            (a dense layer's normal init; the rule is scale-invariant, its std does not matter).
        signal, max_rank, threshold, rule, init_scale, init: ``inrank.*``.
        seed: seed of the draw.

    Returns:
        :func:`select_cut_rank` on the init's spectrum, or None.
    """
    if start not in ("full_rank", "dense"):
        raise ValueError(
            f"start must be full_rank or dense (low_rank grows: "
            f"init_rank_trajectory), got {start!r}"
        )
    if signal == "update":
        return None
    generator = torch.Generator().manual_seed(seed)
    n = min(in_features, out_features)
    if start == "dense":
        factors = dense_start_factors(
            in_features, out_features, dense_init=torch.nn.init.normal_, generator=generator
        )
    else:
        factors = init_factors(
            "efficient",
            in_features,
            out_features,
            n,
            init_scale=init_scale,
            generator=generator,
            init=init,
            dense_init=torch.nn.init.normal_ if init == "spectral" else None,
        )
    s = factor_spectrum(factors.A, factors.B)
    return select_cut_rank(s, max_rank, threshold, rule=rule)
