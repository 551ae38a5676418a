"""InRank's rank rule (spec section 3): explained ratio of a spectrum and the rank it selects.

Pure tensor math on a vector of singular values; no torch.distributed here.
"""

from __future__ import annotations

import torch

from inrank_megatron.core.validation import _where, check_finite, check_int, check_threshold

from inrank_megatron.core.names import RATIO_RULES


def _as_spectrum(s: torch.Tensor, name: str = "s") -> torch.Tensor:
    if not isinstance(s, torch.Tensor) or s.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-D tensor of singular values, got {type(s).__name__}"
            f"{'' if not isinstance(s, torch.Tensor) else ' of shape ' + str(tuple(s.shape))}"
        )
    if s.numel() < 2:
        raise ValueError(
            f"{name} must have at least 2 entries (the unbiased variance needs n >= 2), "
            f"got {s.numel()}"
        )
    check_finite(s, name)
    return s.detach().to(torch.float64)


def explained_ratios(s: torch.Tensor, rule: str = "variance") -> torch.Tensor:
    """Explained ratio ``g(s, k)`` for every ``k`` in ``0..n`` at once.

    ``variance`` (the spec's rule): ``g(s, k) = 1 - var(s_tail_k) / var(s)``, where ``s_tail_k`` is
    ``s`` with its first ``k`` entries set to zero and ``var`` is the unbiased variance over all
    ``n`` entries, zeros included. ``energy`` (opt-in): ``sum_{i<k} s_i^2 / sum_i s_i^2``.

    A spectrum with zero variance (all entries equal, e.g. all zero) explains nothing: every ratio is
    0, so no ``k`` passes a threshold in (0, 1). This is what the reference's ``0/0 = nan > alpha``
    comparison does.

    Args:
        s: singular values, 1-D, length ``n >= 2`` (any order; the spec's are descending).
        rule: ``"variance"`` or ``"energy"``.

    Returns:
        float64 tensor of length ``n + 1``; entry ``k`` is ``g(s, k)``.
    """
    if rule not in RATIO_RULES:
        raise ValueError(f"rule must be one of {RATIO_RULES}, got {rule!r}")
    s = _as_spectrum(s)
    n = s.numel()
    zero = s.new_zeros(1)
    sq = s * s
    if rule == "energy":
        total = sq.sum()
        if total == 0:
            return s.new_zeros(n + 1)
        return torch.cat([zero, torch.cumsum(sq, 0)]) / total
    # Tail sums over i >= k, for k = 0..n (entry n is the empty tail).
    tail_sum = torch.flip(torch.cumsum(torch.flip(torch.cat([s, zero]), [0]), 0), [0])
    tail_sq = torch.flip(torch.cumsum(torch.flip(torch.cat([sq, zero]), [0]), 0), [0])
    # Unbiased variance of a length-n vector whose non-zero entries are the tail.
    var_tail = (tail_sq - tail_sum * tail_sum / n) / (n - 1)
    var_all = var_tail[0]
    if var_all <= 0:
        return s.new_zeros(n + 1)
    return 1.0 - var_tail.clamp_min(0.0) / var_all


def explained_ratio(s: torch.Tensor, k: int, rule: str = "variance") -> float:
    """``g(s, k)`` of the spec (section 3, step 2) as a Python float. See :func:`explained_ratios`."""
    check_int(k, "k", low=0, high=s.numel() if isinstance(s, torch.Tensor) else None)
    return float(explained_ratios(s, rule)[k])


def check_rank_settings(
    rank: int, buffer: int, max_rank: int, threshold: float, *, layer: str | None = None
) -> None:
    """Validate the rank rule's settings; ValueError naming the bad argument and the allowed range."""
    check_int(max_rank, "max_rank", low=1, layer=layer)
    check_int(buffer, "buffer", low=0, layer=layer)
    if buffer >= max_rank:
        raise ValueError(f"{_where(layer)}buffer={buffer} must be < max_rank={max_rank}")
    check_int(rank, "rank", low=0, high=max_rank, layer=layer)
    check_threshold(threshold, "threshold", layer=layer)


def select_rank(
    s: torch.Tensor,
    rank: int,
    buffer: int,
    max_rank: int,
    threshold: float,
    *,
    rule: str = "variance",
    layer: str | None = None,
) -> int:
    """The spec's rank rule (section 3, step 3), exactly.

    New rank = the smallest ``k`` in ``[rank, min(rank + buffer, max_rank - buffer))`` whose explained
    ratio is strictly above ``threshold``; if none passes, the last ``k`` of that range. When the range
    is empty (``rank >= max_rank - buffer``: growth has stopped) the rank is returned unchanged. The
    result is never below ``rank``.

    Args:
        s: singular values of the active product, zero-padded to ``n = min(in, out)``.
        rank: current rank ``r``.
        buffer: buffer ``b``.
        max_rank: rank cap (``min(in, out) // 2`` in the reference); ``max_rank <= n``.
        threshold: ``alpha`` in (0, 1).
        rule: ``"variance"`` (the spec) or ``"energy"`` (opt-in).
        layer: layer name for error messages.

    Returns:
        The new rank (a Python int).
    """
    check_rank_settings(rank, buffer, max_rank, threshold, layer=layer)
    if isinstance(s, torch.Tensor) and s.dim() == 1 and max_rank > s.numel():
        raise ValueError(
            f"{_where(layer)}max_rank={max_rank} must be <= len(s)={s.numel()} "
            "(the spectrum is zero-padded to min(in, out))"
        )
    ratios = explained_ratios(s, rule)
    stop = min(rank + buffer, max_rank - buffer)
    if rank >= stop:
        return rank
    passing = (ratios[rank:stop] > threshold).nonzero()
    if passing.numel() == 0:
        return stop - 1
    return rank + int(passing[0])


def select_cut_rank(
    s: torch.Tensor,
    max_rank: int,
    threshold: float,
    *,
    rule: str = "variance",
    layer: str | None = None,
) -> int:
    """The rank a dense start (``inrank.start=dense``) cuts to: the rule of :func:`select_rank` over
    the whole range at once, since the spectrum is of a trained full-rank weight (or of its update)
    rather than of a growing slice: the smallest ``k`` in ``[1, max_rank]`` whose explained ratio
    is strictly above ``threshold``, else ``max_rank``.

    Args:
        s: singular values, length ``n = min(in, out)``.
        max_rank: the cap, ``1 <= max_rank <= n``.
        threshold: ``alpha`` in (0, 1).
        rule: ``"variance"`` or ``"energy"``.
        layer: layer name for error messages.

    Returns:
        The rank (a Python int).
    """
    check_int(max_rank, "max_rank", low=1, layer=layer)
    check_threshold(threshold, "threshold", layer=layer)
    if max_rank > s.numel():
        raise ValueError(f"{_where(layer)}max_rank={max_rank} must be <= len(s)={s.numel()}")
    ratios = explained_ratios(s, rule)
    passing = (ratios[1 : max_rank + 1] > threshold).nonzero()
    return max_rank if passing.numel() == 0 else 1 + int(passing[0])
