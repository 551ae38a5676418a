"""Frobenius decay of a factorised weight (Khodak et al., "Initialization and Regularization of
Factorized Neural Layers", arXiv 2105.01029): the penalty is on the product,

    P = lambda/2 ||B A||_F^2 = lambda/2 tr((A A^T)(B^T B)) = lambda/2 sum(G_A * G_B),

with ``G_A = A A^T`` and ``G_B = B^T B`` (``k x k``, ``k`` the active slots; both symmetric), not
on each factor (which is what weight decay on ``A`` and ``B`` penalises: ``||A||^2 + ||B||^2``,
an upper bound of ``2 ||B A||_*`` that depends on how the product is split). Its gradients are

    dP/dA = lambda G_B A,    dP/dB = lambda B G_A,

``k x k`` products: the ``in x out`` product is never formed. When a factor is sharded (tensor
parallelism), its Gram matrix is the sum of the shards' and everything else is local; the caller
passes the full Gram matrices in. No torch.distributed here.
"""

from __future__ import annotations

import torch


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 (bf16/fp16 factors), fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


class FrobeniusPenalty(torch.autograd.Function):
    """``lambda/2 ||B A||_F^2`` from the full Gram matrices; backward gives ``A`` and ``B`` the
    gradients above, each times its own ``scale`` (``0`` where another process contributes a
    replicated factor's gradient, see ``InRankFactorsMixin.frobenius_penalty``).

    Args (of ``apply``):
        A: ``[k, in_shard]`` active slots of ``A``.
        B: ``[out_shard, k]`` active slots of ``B``.
        gram_A: ``[k, k]`` ``A A^T`` of the full ``A`` (no grad).
        gram_B: ``[k, k]`` ``B^T B`` of the full ``B`` (no grad).
        coefficient: ``lambda``.
        scale_A, scale_B: multipliers on the gradients of ``A`` and ``B``.

    Returns:
        The penalty, a scalar in the Gram matrices' dtype.
    """

    @staticmethod
    def forward(
        ctx, A, B, gram_A, gram_B, coefficient: float, scale_A: float = 1.0, scale_B: float = 1.0
    ):
        ctx.save_for_backward(A, B, gram_A, gram_B)
        ctx.settings = (coefficient, scale_A, scale_B)
        return 0.5 * coefficient * (gram_A * gram_B).sum()

    @staticmethod
    def backward(ctx, grad):
        A, B, gram_A, gram_B = ctx.saved_tensors
        coefficient, scale_A, scale_B = ctx.settings
        dtype = gram_A.dtype
        grad_A = (grad * coefficient * scale_A) * (gram_B @ A.to(dtype))  # (k, in_shard)
        grad_B = (grad * coefficient * scale_B) * (B.to(dtype) @ gram_A)  # (out_shard, k)
        return grad_A.to(A.dtype), grad_B.to(B.dtype), None, None, None, None, None
