"""TSQR over a process group: the ``R`` factor of a matrix whose rows are sharded, from the
per-shard ``R`` factors (spec section 3): ``k x k`` traffic per rank, never the factor itself."""

from __future__ import annotations

import torch

from inrank_megatron.core.spectrum import r_factor


def tsqr_r(R_local: torch.Tensor, group) -> torch.Tensor:
    """``R`` (``[k, k]``) of the row-stacked full matrix, given this rank's shard's ``R``.

    Every rank gathers the same stack in rank order and factorises it the same way, so the result
    is bit-identical on all ranks of ``group``.
    """
    world = torch.distributed.get_world_size(group)
    if world == 1:
        return R_local
    stack = R_local.new_empty((world * R_local.shape[0], R_local.shape[1]))
    torch.distributed.all_gather_into_tensor(stack, R_local.contiguous(), group=group)
    return r_factor(stack, dtype=R_local.dtype)
