"""Truncation of factors to their best rank-``r`` approximation, re-factorised balanced (spec section 4).

With ``B A = Q_B M Q_A^T``, ``M = R_B R_A^T = U S V^T`` (``k x k``), the rank-``r`` truncation
``U_r S_r V_r^T`` of ``B A`` is ``B' A'`` with balanced factors
``B' = Q_B U_r S_r^{1/2}`` and ``A' = S_r^{1/2} V_r^T Q_A^T``. Both are linear maps of the old
factors along the slot dimension, with no ``Q`` needed:

    B' = B @ P_B,   P_B = R_A^T V_r S_r^{-1/2}        # (k, r)
    A' = P_A @ A,   P_A = S_r^{-1/2} U_r^T R_B        # (r, k)

(check: ``B R_A^T V S^{-1/2} = Q_B R_B R_A^T V S^{-1/2} = Q_B U S^{1/2}``). So a sharded factor is
truncated locally from ``k x k`` maps that every rank computes identically, and an optimizer can
carry the first moment through the same maps. Singular values at (numerical) zero get a zero map:
those directions carry nothing. No torch.distributed here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from inrank_megatron.core.spectrum import r_factor
from inrank_megatron.core.validation import check_factors, check_int


class TruncationMaps(NamedTuple):
    """Slot-dimension maps of a truncation: ``A' = P_A @ A``, ``B' = B @ P_B`` (float64)."""

    P_A: torch.Tensor  # (r, k)
    P_B: torch.Tensor  # (k, r)
    singular_values: torch.Tensor  # (k,) all singular values of B A, descending


def truncation_maps(R_A: torch.Tensor, R_B: torch.Tensor, rank: int) -> TruncationMaps:
    """Maps that truncate ``B A`` to rank ``rank`` with balanced factors.

    Args:
        R_A: ``[k, k]`` ``R`` factor of ``A^T`` (see :func:`inrank_megatron.core.r_factor`).
        R_B: ``[k, k]`` ``R`` factor of ``B``.
        rank: target rank, ``1 <= rank <= k``.

    Returns:
        :class:`TruncationMaps` in float64.
    """
    k = R_A.shape[0]
    check_int(rank, "rank", low=1, high=k)
    R_A = R_A.to(torch.float64)
    R_B = R_B.to(torch.float64)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)  # (k, k), (k,), (k, k)
    # Singular vectors are unique up to a sign per pair: make each U column's largest entry
    # positive, so that the balanced factors (not only their product) are reproducible.
    flip = torch.where(U.gather(0, U.abs().argmax(0, keepdim=True))[0] < 0, -1.0, 1.0)
    U, Vh = U * flip, Vh * flip[:, None]
    tol = S[0] * k * torch.finfo(torch.float64).eps if k else 0.0
    S_r = S[:rank]
    inv_sqrt = torch.where(S_r > tol, S_r.clamp_min(tol).rsqrt(), torch.zeros_like(S_r))
    P_B = R_A.T @ Vh[:rank].T * inv_sqrt  # (k, r)
    P_A = inv_sqrt[:, None] * (U[:, :rank].T @ R_B)  # (r, k)
    return TruncationMaps(P_A, P_B, S)


def truncate(
    A: torch.Tensor, B: torch.Tensor, rank: int, *, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the best rank-``rank`` approximation of ``B @ A`` (Eckart-Young).

    Args:
        A: ``[k, in]`` factor (only the active slots: slice before calling).
        B: ``[out, k]`` factor.
        rank: target rank, ``1 <= rank <= k``.
        layer: layer name for error messages.

    Returns:
        ``(A', B')`` of shapes ``[rank, in]`` and ``[out, rank]`` in the dtype of ``A``, with
        ``B' A' = U_r S_r V_r^T`` and ``B'^T B' = A' A'^T = S_r`` (balanced).
    """
    k = check_factors(A, B, layer=layer)
    check_int(rank, "rank", low=1, high=k, layer=layer)
    maps = truncation_maps(
        r_factor(A.T, dtype=torch.float64), r_factor(B, dtype=torch.float64), rank
    )
    A_new = (maps.P_A @ A.detach().to(torch.float64)).to(A.dtype)
    B_new = (B.detach().to(torch.float64) @ maps.P_B).to(B.dtype)
    return A_new, B_new


def svd_factors(
    W: torch.Tensor, rank: int, *, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the best rank-``rank`` approximation of a dense ``W``.

    :func:`truncate` of the trivial factorisation with ``min(in, out)`` slots (``W = I W`` or
    ``W I``), so the factors are :func:`truncation_maps`'s, signs fixed: every process computing
    them from the same ``W`` gets the same factors.

    Args:
        W: ``[out, in]`` matrix.
        rank: target rank, ``1 <= rank <= min(in, out)``.
        layer: layer name for error messages.

    Returns:
        ``(A [rank, in], B [out, rank])`` in the dtype of ``W``, with ``B A = U_r S_r V_r^T``
        and ``B^T B = A A^T = S_r``.
    """
    n_out, n_in = W.shape
    eye = torch.eye(min(n_out, n_in), dtype=W.dtype, device=W.device)
    return (
        truncate(W, eye, rank, layer=layer)
        if n_out <= n_in
        else truncate(eye, W, rank, layer=layer)
    )
