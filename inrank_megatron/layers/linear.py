"""``InRankLinear``: a single-process linear layer ``y = x (W0 + B A)^T + bias`` with InRank growth."""

from __future__ import annotations

from typing import Optional

import torch

from inrank_megatron.core.config import InRankConfig
from inrank_megatron.layers.base import InRankFactorsMixin


class InRankLinear(InRankFactorsMixin, torch.nn.Module):
    """Drop-in for ``nn.Linear(in_features, out_features)`` whose weight is learned as low-rank
    factors (efficient: ``W = B A``) or as a low-rank update of a frozen ``W0`` (cumulative).

    Args:
        in_features: input width.
        out_features: output width.
        config: InRank settings (default: the spec's defaults).
        bias: learn an additive bias (initialised to zero, as the reference).
        dtype: parameter dtype.
        device: parameter device.
        name: layer name used in errors and reports.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: Optional[InRankConfig] = None,
        *,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
        name: Optional[str] = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_inrank(
            config or InRankConfig(),
            in_features,
            out_features,
            params_dtype=dtype,
            device=device,
            layer=name,
        )
        self.bias = (
            torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
            if bias
            else None
        )

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight this layer applies (for tests and export; never in forward)."""
        A, B = self.active_factors()
        W = B @ A
        return W + self.w0 if self.w0 is not None else W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.active_factors()
        y = (x @ A.T) @ B.T  # (..., k) then (..., out)
        if self.w0 is not None:
            y = y + x @ self.w0.T
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        g = self.growth
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"mode={self.inrank_config.mode}, rank={g.rank}, buffer={g.buffer}, "
            f"max_rank={g.max_rank}, stage={g.stage}, bias={self.bias is not None}"
        )
