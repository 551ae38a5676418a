"""Exact spectrum of a factored matrix ``B @ A`` without forming it (spec section 3, "cheap, exact").

With ``k`` slots, ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QR), so
``B A = Q_B (R_B R_A^T) Q_A^T`` and the non-zero singular values of ``B A`` are those of the
``k x k`` core ``R_B R_A^T``. Cost ``O((in + out) k^2 + k^3)``; the ``in x out`` product never exists.

Only ``R`` factors are needed, and an ``R`` factor of a row-stacked matrix is the ``R`` factor of the
stacked per-block ``R`` factors (TSQR). That is what lets the tensor-parallel layers compute the
spectrum of sharded factors by exchanging ``k x k`` matrices: they call :func:`r_factor` on their
shard, gather, and call it again on the stack. No torch.distributed here.
"""

from __future__ import annotations

import torch

from inrank_megatron.core.validation import check_factors, check_matrix

_DTYPES = (torch.float32, torch.float64)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DTYPES:
        raise ValueError(
            f"dtype must be torch.float32 or torch.float64 (the spectrum is never "
            f"computed in half precision), got {dtype}"
        )


def r_factor(M: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``R`` of the thin QR of ``M`` (``[m, k]``), as a ``[k, k]`` matrix with ``R^T R = M^T M``.

    When ``m < k`` the ``[m, k]`` ``R`` is padded with zero rows, so that ``R`` factors of blocks of
    any height can be stacked and reduced again (TSQR).

    Args:
        M: ``[m, k]`` matrix (a factor or a stack of ``R`` factors).
        dtype: float32 (default) or float64.

    Returns:
        ``[k, k]`` tensor of ``dtype``.
    """
    _check_dtype(dtype)
    check_matrix(M, "M")
    m, k = M.shape
    # geqrf leaves R in the upper triangle of its first min(m, k) rows; it skips the copy and the
    # bookkeeping of linalg.qr(mode="r"), ~1.5 ms of a 4096 x 200 factor on a 2-core CPU.
    R = torch.geqrf(M.detach().to(dtype))[0][: min(m, k)].triu()  # (min(m, k), k)
    # QR is unique up to the signs of R's rows; fix them (diagonal >= 0) so that R does not depend
    # on how the rows of M were split (TSQR over TP shards vs one QR): the cut's factors then
    # agree across parallel layouts, not only their product.
    R = R * torch.where(R.diagonal() < 0, -1.0, 1.0).to(dtype)[:, None]
    if m < k:
        R = torch.cat([R, R.new_zeros(k - m, k)])
    return R


def spectrum_from_r(R_A: torch.Tensor, R_B: torch.Tensor, n: int) -> torch.Tensor:
    """Singular values of ``B @ A`` from ``R_A`` (of ``A^T``) and ``R_B`` (of ``B``).

    Args:
        R_A: ``[k, k]``, ``R`` factor of ``A^T``.
        R_B: ``[k, k]``, ``R`` factor of ``B``.
        n: ``min(in, out)``, the length to zero-pad (or cut) the spectrum to.

    Returns:
        Descending singular values, length ``n``, dtype of the ``R`` factors.
    """
    # The k x k core is small: form C C^T in float64 and take its eigenvalues. Squaring in float64
    # costs sqrt(eps64) ~ 1.5e-8 of s_max on the smallest values, far below the float32 R factors'
    # own error, and the symmetric eigensolver is ~25% faster than svdvals of C here.
    C = R_B.double() @ R_A.double().T
    s = torch.linalg.eigvalsh(C @ C.T).flip(0).clamp_(min=0).sqrt_().to(R_B.dtype)  # (k,)
    if s.numel() >= n:
        return s[:n].contiguous()
    return torch.cat([s, s.new_zeros(n - s.numel())])


def factor_spectrum(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    layer: str | None = None,
) -> torch.Tensor:
    """Singular values of ``B @ A``, descending, zero-padded to ``min(in, out)``.

    Args:
        A: ``[k, in]`` factor.
        B: ``[out, k]`` factor.
        dtype: float32 (default, as the reference) or float64.
        layer: layer name for error messages.

    Returns:
        Tensor of length ``min(in, out)`` and dtype ``dtype``.
    """
    _check_dtype(dtype)
    check_factors(A, B, layer=layer)
    n = min(A.shape[1], B.shape[0])
    return spectrum_from_r(r_factor(A.T, dtype=dtype), r_factor(B, dtype=dtype), n)
