"""Count the bytes that torch.distributed collectives move, by wrapping them (tests and
``tools/bench_tp_comm.py``). Megatron calls ``torch.distributed.all_reduce`` and the
module-level ``dist_all_gather_func`` / ``dist_reduce_scatter_func`` of its ``mappings`` and ``layers``;
all are wrapped."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class CollectiveRecord:
    op: str
    shape: tuple
    nbytes: int  # bytes of the full (post-gather / pre-scatter) tensor on this rank


@contextlib.contextmanager
def count_collectives():
    """Context manager yielding a list that fills with :class:`CollectiveRecord` per call."""
    from megatron.core.tensor_parallel import layers, mappings

    records: list[CollectiveRecord] = []
    dist = torch.distributed
    originals = {
        (dist, "all_reduce"): dist.all_reduce,
        (dist, "all_gather_into_tensor"): dist.all_gather_into_tensor,
        (dist, "reduce_scatter_tensor"): dist.reduce_scatter_tensor,
        (mappings, "dist_all_gather_func"): mappings.dist_all_gather_func,
        (mappings, "dist_reduce_scatter_func"): mappings.dist_reduce_scatter_func,
        (layers, "dist_all_gather_func"): layers.dist_all_gather_func,
        (layers, "dist_reduce_scatter_func"): layers.dist_reduce_scatter_func,
    }

    def wrap(name, fn, big_arg):
        def counted(*args, **kwargs):
            t = args[big_arg]
            records.append(CollectiveRecord(name, tuple(t.shape), t.numel() * t.element_size()))
            return fn(*args, **kwargs)
        return counted

    # all_reduce(tensor), all_gather(output, input), reduce_scatter(output, input): the full tensor
    # is argument 0, 0 and 1 respectively.
    big = {"all_reduce": 0, "all_gather_into_tensor": 0, "reduce_scatter_tensor": 1,
           "dist_all_gather_func": 0, "dist_reduce_scatter_func": 1}
    try:
        for (mod, name), fn in originals.items():
            setattr(mod, name, wrap(name.replace("dist_", "").replace("_func", ""), fn, big[name]))
        yield records
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)
