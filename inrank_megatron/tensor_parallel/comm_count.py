"""Count the collectives a rank makes and the bytes they move, by wrapping them (tests and
``tools/bench_tp_comm.py``). Megatron calls ``torch.distributed.all_reduce`` and the
module-level ``dist_all_gather_func`` / ``dist_reduce_scatter_func`` of its ``mappings`` and ``layers``;
DeepSpeed's ``deepspeed.comm`` calls ``torch.distributed``'s functions by attribute. All are wrapped,
and so are ``broadcast``, ``all_gather`` and ``barrier`` (whose counts tests compare across ranks:
ranks making different numbers of collectives hang)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class CollectiveRecord:
    op: str
    shape: tuple
    nbytes: int  # bytes of the full (post-gather / pre-scatter) tensor on this rank; 0: barrier


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
        (dist, "broadcast"): dist.broadcast,
        (dist, "all_gather"): dist.all_gather,
        (dist, "barrier"): dist.barrier,
        (mappings, "dist_all_gather_func"): mappings.dist_all_gather_func,
        (mappings, "dist_reduce_scatter_func"): mappings.dist_reduce_scatter_func,
        (layers, "dist_all_gather_func"): layers.dist_all_gather_func,
        (layers, "dist_reduce_scatter_func"): layers.dist_reduce_scatter_func,
    }

    def wrap(name, fn, big_arg):
        position, keyword = big_arg

        def counted(*args, **kwargs):
            t = (
                None
                if position is None
                else args[position]
                if len(args) > position
                else kwargs[keyword]
            )
            if t is None:  # barrier
                shape, nbytes = (), 0
            elif isinstance(t, (list, tuple)):  # all_gather's output list
                shape = (len(t), *t[0].shape) if t else (0,)
                nbytes = sum(x.numel() * x.element_size() for x in t)
            else:
                shape, nbytes = tuple(t.shape), t.numel() * t.element_size()
            records.append(CollectiveRecord(name, shape, nbytes))
            return fn(*args, **kwargs)

        return counted

    # The full (post-gather / pre-scatter) tensor's position and keyword in each signature
    # (deepspeed.comm passes keywords); a barrier has none.
    big = {
        "all_reduce": (0, "tensor"),
        "broadcast": (0, "tensor"),
        "all_gather": (0, "tensor_list"),
        "barrier": (None, None),
        "all_gather_into_tensor": (0, "output_tensor"),
        "reduce_scatter_tensor": (1, "input"),
        "dist_all_gather_func": (0, "output_tensor"),
        "dist_reduce_scatter_func": (1, "input"),
    }
    try:
        for (mod, name), fn in originals.items():
            setattr(mod, name, wrap(name.replace("dist_", "").replace("_func", ""), fn, big[name]))
        yield records
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)


def mlp_comm_bytes(
    hidden: int,
    ffn: int,
    *,
    slots: int,
    tokens: int,
    sequence_parallel=False,
    seq_length: int = 1024,
) -> dict:
    """Bytes this rank's collectives move in one forward + backward of an MLP (fc1 -> GELU -> fc2),
    InRank (efficient mode, ``slots`` active) vs megatron's dense Column/RowParallelLinear pair.
    Call on every rank of an initialised TP group.

    Returns:
        ``{"inrank": bytes, "dense": bytes}``.
    """
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from inrank_megatron.core.config import InRankConfig
    from inrank_megatron.tensor_parallel.layers import (
        InRankColumnParallelLinear,
        InRankRowParallelLinear,
    )

    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
    )
    buffer = min(100, slots - 1)
    icfg = InRankConfig(rank=slots - buffer, buffer=buffer, stage1_steps=None)
    init = torch.nn.init.xavier_normal_
    pairs = {
        "inrank": (
            InRankColumnParallelLinear(
                hidden, ffn, config=config, init_method=init, inrank_config=icfg
            ),
            InRankRowParallelLinear(
                ffn,
                hidden,
                config=config,
                init_method=init,
                input_is_parallel=True,
                inrank_config=icfg,
            ),
        ),
        "dense": (
            ColumnParallelLinear(hidden, ffn, config=config, init_method=init),
            RowParallelLinear(
                ffn,
                hidden,
                config=config,
                init_method=init,
                bias=True,
                input_is_parallel=True,
                skip_bias_add=False,
            ),
        ),
    }
    batch = tokens // seq_length
    seq = seq_length // tp if sequence_parallel else seq_length
    out = {}
    for name, (fc1, fc2) in pairs.items():
        x = torch.randn(seq, batch, hidden, requires_grad=True)
        with count_collectives() as records:
            h, _ = fc1(x)
            y, _ = fc2(torch.nn.functional.gelu(h))
            y.sum().backward()
        out[name] = sum(r.nbytes for r in records)
    return out
