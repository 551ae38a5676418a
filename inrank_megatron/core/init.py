"""Initial values of InRank factors (spec section 2), drawn full-size so that a sharded layer can
take its shard and equal the unsharded layer for the same seed, whatever the TP size."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from inrank_megatron.core.names import INITS


class FactorInit(NamedTuple):
    A: torch.Tensor  # (slots, in)
    B: torch.Tensor  # (out, slots)
    w0: Optional[torch.Tensor]  # (out, in) in cumulative mode, else None


def dense_init_weight(
    in_features: int,
    out_features: int,
    *,
    dense_init: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The full ``[out, in]`` fp32 weight a dense layer of this shape would start from.

    ``dense_init`` is megatron's ``init_method`` of the layer (it fills a tensor in place from
    torch's global CPU RNG, as megatron's ``_initialize_affine_weight_cpu`` draws the master
    weight under ``use_cpu_initialization``); ``None`` is ``torch.nn.Linear``'s default
    (``kaiming_uniform_(a=sqrt(5))``). With a ``generator`` the draw comes from it (and advances
    it) instead of the global RNG, which is left as it was.
    """
    W = torch.empty(out_features, in_features)
    if dense_init is None:
        torch.nn.init.kaiming_uniform_(W, a=math.sqrt(5), generator=generator)
    elif generator is None:
        dense_init(W)
    else:  # an init_method draws from the global RNG: lend it the generator's state
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.set_state(generator.get_state())
            dense_init(W)
            generator.set_state(torch.default_generator.get_state())
    return W


def init_factors(
    mode: str,
    in_features: int,
    out_features: int,
    slots: int,
    *,
    init_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    init: str = "kaiming",
    dense_init: Optional[Callable] = None,
) -> FactorInit:
    """Draw full (unsharded) factors.

    ``efficient``, ``init="kaiming"``: A and B ``kaiming_uniform_(a=sqrt(5))`` times
    ``init_scale``, as the reference (the fan-in of B is its slot count, the pre-allocated
    ``max_rank``).
    ``efficient``, ``init="spectral"`` (Khodak et al., arXiv 2105.01029): the balanced
    factors of the truncated SVD of a standard dense init ``W`` (:func:`dense_init_weight`):
    ``B = U_s S_s^{1/2}``, ``A = S_s^{1/2} V_s^T`` over all ``s = slots`` allocated slots, each
    times ``init_scale``. Slot ``i`` holds the ``i``-th singular direction, so the first ``k``
    slots (the active ones) multiply to the best rank-``k`` approximation of ``W`` for every
    ``k``: rank growth adds ``W``'s next directions.
    ``cumulative``: W0 orthogonal (gain ``init_scale``), A kaiming-uniform, B zero, so ``B A = 0``
    and the layer starts at ``W0`` (``init`` must be ``"kaiming"``: there is no product to
    initialise).

    Args:
        mode: ``"efficient"`` or ``"cumulative"``.
        in_features, out_features: full layer shape.
        slots: allocated rank slots.
        init_scale: multiplier on each factor (on W0's gain in cumulative mode).
        generator: CPU generator (default: torch's global one).
        dtype: parameter dtype (drawn in fp32, then cast).
        init: ``"kaiming"`` (the reference) or ``"spectral"``.
        dense_init: spectral: the dense layer's init method (see :func:`dense_init_weight`).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "spectral":
        if mode != "efficient":
            raise ValueError(
                f"init='spectral' needs mode='efficient' (in {mode} mode B A starts "
                "at zero), got mode={mode!r}"
            )
        from inrank_megatron.core.truncation import svd_factors

        W = dense_init_weight(in_features, out_features, dense_init=dense_init, generator=generator)
        A, B = svd_factors(W.double(), slots)
        return FactorInit((A * init_scale).to(dtype), (B * init_scale).to(dtype), None)
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


def dense_start_factors(
    in_features: int,
    out_features: int,
    *,
    dense_init: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
) -> FactorInit:
    """``inrank.start=dense``'s stage-1 factors: a dense layer's initial weight ``W``
    (:func:`dense_init_weight`) in the factor :func:`dense_start_role` names, the
    ``min(in, out)`` identity in the other, so that ``B A = W`` exactly."""
    W = dense_init_weight(in_features, out_features, dense_init=dense_init, generator=generator)
    eye = torch.eye(min(in_features, out_features))
    if dense_start_role(in_features, out_features) == "B":
        return FactorInit(eye, W, None)
    return FactorInit(W, eye, None)


def dense_start_role(in_features: int, out_features: int) -> str:
    """With ``inrank.start=dense``, the factor that holds the dense weight in stage 1: ``"B"``
    (``[out, in]``, with ``A`` the ``in x in`` identity) when ``out >= in``, else ``"A"`` (``B`` the
    ``out x out`` identity). The identity factor does not train; until the cut, readers of the
    factors (the layer, checkpoint exports) take it as the exact identity, whatever is stored."""
    return "B" if out_features >= in_features else "A"
