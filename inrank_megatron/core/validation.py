"""Argument checks shared by the core: every failure is a ValueError naming the argument, the layer
(where known) and the allowed range. Nothing is ever clamped silently."""

from __future__ import annotations

import numbers

import torch


def _where(layer: str | None) -> str:
    return f"layer {layer}: " if layer else ""


def check_int(
    value, name: str, *, low: int | None = None, high: int | None = None, layer: str | None = None
) -> int:
    """``value`` must be an int (bools rejected) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{_where(layer)}{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{_where(layer)}{name}={value} is out of range; allowed [{lo}, {hi}]")
    return value


def check_threshold(value, name: str, *, layer: str | None = None) -> float:
    """``value`` must be a real number strictly inside (0, 1)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 < float(value) < 1.0
    ):
        raise ValueError(
            f"{_where(layer)}{name} must be a number in the open interval (0, 1), got {value!r}"
        )
    return float(value)


class NonFiniteValueError(ValueError):
    """A factor or spectrum holds NaN or inf (the training loop turns it into a run fault)."""


def check_finite(t: torch.Tensor, name: str, *, layer: str | None = None) -> None:
    """``t`` must hold no NaN or inf."""
    # One reduction first: the sum of finite values is finite unless it overflows, so the
    # element-wise check runs only when something may be wrong.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
        raise NonFiniteValueError(
            f"{_where(layer)}{name} contains {bad}; factors and spectra must be finite"
        )


def check_matrix(t, name: str, *, layer: str | None = None) -> torch.Tensor:
    """``t`` must be a finite 2-D floating tensor."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{_where(layer)}{name} must be a 2-D floating-point tensor, got {shape}")
    check_finite(t, name, layer=layer)
    return t


def check_factors(A: torch.Tensor, B: torch.Tensor, *, layer: str | None = None) -> int:
    """``A`` is ``[k, in]`` and ``B`` is ``[out, k]`` with the same ``k``; returns ``k``."""
    check_matrix(A, "A", layer=layer)
    check_matrix(B, "B", layer=layer)
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{_where(layer)}factor shapes do not match: A is {tuple(A.shape)} ([k, in]) "
            f"and B is {tuple(B.shape)} ([out, k]); A.shape[0] must equal B.shape[1]"
        )
    return A.shape[0]
