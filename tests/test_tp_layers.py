"""Tensor-parallel InRank layers at TP = 1, 2, 4 (gloo, CPU): outputs and every parameter gradient
(gathered) equal the TP=1 layer and a dense reference ``x W^T + b`` with ``W = W0 + B A``, in both
modes, with bias on/off, skip_bias_add on/off, sequence parallelism on/off and odd shapes; the
spectrum from TSQR equals the core's on the gathered factors on every rank; the Frobenius decay's
value and gradients equal autograd of lambda/2 ||B A||_F^2 on the dense product; efficient-mode
layers move rank-sized tensors over TP, and the decay one k x k matrix (collectives counted); bad
layer settings fail at build time."""

import itertools

import pytest
import torch

from tests.distributed import run_distributed

IN, OUT, SEQ, BATCH = 48, 80, 8, 2


def _cases():
    for kind, mode, bias, skip, sp in itertools.product(
        ("column", "row"), ("efficient", "cumulative"), (True, False), (False, True), (False, True)
    ):
        if skip and not bias:
            continue
        yield kind, mode, bias, skip, sp


def _full(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _layer_body(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    from inrank_megatron import InRankConfig, enable_cpu_fallback
    from inrank_megatron.core import factor_spectrum
    from inrank_megatron.tensor_parallel import (
        InRankColumnParallelLinear,
        InRankRowParallelLinear,
        allreduce_sequence_parallel_grads,
    )

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    group = parallel_state.get_tensor_model_parallel_group()

    def gather(t, dim):
        if world_size == 1:
            return t.detach().clone()
        parts = [torch.empty_like(t) for _ in range(world_size)]
        torch.distributed.all_gather(parts, t.detach().contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    def shard(t, dim):
        return t.chunk(world_size, dim=dim)[rank].contiguous()

    results = {}
    for case in _cases():
        kind, mode, bias, skip, sp = case
        config = ModelParallelConfig(
            tensor_model_parallel_size=world_size,
            sequence_parallel=sp and world_size > 1,
            use_cpu_initialization=True,
            params_dtype=torch.float64,
            gradient_accumulation_fusion=False,
        )
        icfg = InRankConfig(mode=mode, rank=3, buffer=4, stage1_steps=None)  # k = 7
        torch.manual_seed(1234)
        cls = InRankColumnParallelLinear if kind == "column" else InRankRowParallelLinear
        extra = {"gather_output": False} if kind == "column" else {"input_is_parallel": True}
        layer = cls(
            IN,
            OUT,
            config=config,
            init_method=None,
            bias=bias,
            skip_bias_add=skip,
            inrank_config=icfg,
            **extra,
        )
        # Full factors, then this rank's shard: values independent of the TP size.
        slots = layer.allocated_slots  # 24 (efficient: max_rank) or 7 (cumulative: active)
        B_full, A_full, b_full = _full((OUT, slots), 1), _full((slots, IN), 2), _full((OUT,), 3)
        with torch.no_grad():
            if kind == "column":
                layer.B.copy_(shard(B_full, 0))
                layer.A.copy_(A_full)
                if bias:
                    layer.bias.copy_(shard(b_full, 0))
            else:
                layer.A.copy_(shard(A_full, 1))
                layer.B.copy_(B_full)
                if bias:
                    layer.bias.copy_(b_full)
        x = _full((SEQ, BATCH, IN), 4).requires_grad_(False)
        g = _full((SEQ, BATCH, OUT), 5)
        x_in = x
        if kind == "row":
            x_in = shard(x, 2)
        if sp and world_size > 1 and kind == "column":
            x_in = shard(x, 0)
        x_in = x_in.clone().requires_grad_(True)
        out, out_bias = layer(x_in)
        # Output layout: column -> out sharded on dim 2 (+ seq on dim 0 under SP: no, column
        # under SP gathers the sequence); row -> full, or seq-sharded under SP.
        if kind == "column":
            g_local = shard(g, 2)
        else:
            g_local = shard(g, 0) if (sp and world_size > 1) else g
        y = out + out_bias if skip else out
        y.backward(g_local)
        allreduce_sequence_parallel_grads(layer, group)
        if kind == "column":
            y_full = gather(y, 2)
            gB, gA = gather(layer.B.grad, 0), layer.A.grad.clone()
            gb = gather(layer.bias.grad, 0) if bias else None
            gx = gather(x_in.grad, 0) if (sp and world_size > 1) else x_in.grad.clone()
            w0 = gather(layer.w0, 0) if layer.w0 is not None else None
        else:
            y_full = gather(y, 0) if (sp and world_size > 1) else y.detach().clone()
            gA, gB = gather(layer.A.grad, 1), layer.B.grad.clone()
            gb = layer.bias.grad.clone() if bias else None
            gx = gather(x_in.grad, 2)
            w0 = gather(layer.w0, 1) if layer.w0 is not None else None
        # Dense reference on the full tensors.
        k = layer.active_slots
        W = (B_full[:, :k] @ A_full[:k]).requires_grad_(True)
        W_total = W + w0 if w0 is not None else W
        xr = x.clone().requires_grad_(True)
        br = b_full.clone().requires_grad_(True) if bias else None
        y_ref = torch.nn.functional.linear(xr, W_total, br)
        y_ref.backward(g)
        dense_err = max(
            (y_full - y_ref).abs().max().item(),
            (gB[:, :k] - W.grad @ A_full[:k].T).abs().max().item(),
            (gA[:k] - B_full[:, :k].T @ W.grad).abs().max().item(),
            (gx - xr.grad).abs().max().item(),
            (gb - br.grad).abs().max().item() if bias else 0.0,
        )
        # Spectrum from shards (TSQR) vs the core on the gathered active factors.
        s = layer.spectrum(torch.float64)
        s_ref = factor_spectrum(A_full[:k], B_full[:, :k], dtype=torch.float64)
        # Frobenius decay from shards (k x k Gram all-reduce; under SP the replicated factor's
        # gradient from one rank, then summed like its data gradient) vs autograd of
        # lambda/2 ||B A||_F^2 on the dense product of the full factors.
        layer.zero_grad()
        penalty = layer.frobenius_penalty(0.3)
        penalty.backward()
        allreduce_sequence_parallel_grads(layer, group)
        sharded_dim = 0 if kind == "column" else 1
        pA = gather(layer.A.grad, 1) if kind == "row" else layer.A.grad.clone()
        pB = gather(layer.B.grad, sharded_dim) if kind == "column" else layer.B.grad.clone()
        Ar, Br = A_full[:k].clone().requires_grad_(), B_full[:, :k].clone().requires_grad_()
        ref = 0.3 / 2 * (Br @ Ar).pow(2).sum()
        ref.backward()
        frob_err = max(
            (penalty - ref).abs().item(),
            (pA[:k] - Ar.grad).abs().max().item(),
            (pB[:, :k] - Br.grad).abs().max().item(),
            pA[k:].abs().sum().item() + pB[:, k:].abs().sum().item(),
        )  # inactive: 0
        results[case] = dict(
            y=y_full,
            gA=gA,
            gB=gB,
            gx=gx,
            gb=gb,
            dense_err=dense_err,
            spec_err=(s - s_ref).abs().max().item(),
            spectrum=s,
            frob_err=frob_err / ref.item(),
        )
    return results


@pytest.mark.slow
def test_tp_layers_match_tp1_and_dense():
    ref = run_distributed(_layer_body, 1)[0]
    for case, r in ref.items():
        assert r["dense_err"] < 1e-10, (case, r["dense_err"])
        assert r["frob_err"] < 1e-12, (case, r["frob_err"])
    for tp in (2, 4):
        per_rank = run_distributed(_layer_body, tp)
        for case, r0 in ref.items():
            for rank, res in enumerate(per_rank):
                r = res[case]
                assert r["dense_err"] < 1e-10, (tp, rank, case, r["dense_err"])
                assert r["spec_err"] < 1e-10, (tp, rank, case)
                assert r["frob_err"] < 1e-12, (tp, rank, case, r["frob_err"])
                for key in ("y", "gA", "gB", "gx"):
                    assert torch.allclose(r[key], r0[key], atol=1e-10, rtol=0), (tp, case, key)
                # TSQR: bit-identical spectrum on every rank of the group.
                assert torch.equal(r["spectrum"], per_rank[0][case]["spectrum"])


def _comm_body(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from inrank_megatron import InRankConfig, enable_cpu_fallback
    from inrank_megatron.tensor_parallel import InRankColumnParallelLinear, InRankRowParallelLinear
    from inrank_megatron.tensor_parallel.comm_count import count_collectives

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    out = {}
    for sp in (False, True):
        config = ModelParallelConfig(
            tensor_model_parallel_size=world_size,
            sequence_parallel=sp,
            use_cpu_initialization=True,
            params_dtype=torch.float32,
            gradient_accumulation_fusion=False,
        )
        icfg = InRankConfig(rank=3, buffer=4, stage1_steps=None)
        init = torch.nn.init.xavier_normal_
        layers = {
            "inrank_column": InRankColumnParallelLinear(
                IN, OUT, config=config, init_method=init, bias=True, inrank_config=icfg
            ),
            "dense_column": ColumnParallelLinear(
                IN, OUT, config=config, init_method=init, bias=True
            ),
            "inrank_row": InRankRowParallelLinear(
                OUT,
                IN,
                config=config,
                init_method=init,
                bias=True,
                input_is_parallel=True,
                skip_bias_add=False,
                inrank_config=icfg,
            ),
            "dense_row": RowParallelLinear(
                OUT,
                IN,
                config=config,
                init_method=init,
                bias=True,
                input_is_parallel=True,
                skip_bias_add=False,
            ),
        }
        for name, layer in layers.items():
            # Under SP a column layer's input is sequence-sharded; a row layer's is hidden-sharded.
            seq = SEQ // world_size if sp and "column" in name else SEQ
            width = IN if "column" in name else OUT // world_size
            x = torch.randn(seq, BATCH, width, requires_grad=True)
            with count_collectives() as fwd:
                y, _ = layer(x)
            with count_collectives() as bwd:
                y.sum().backward()
            out[(sp, name)] = ([(r.op, r.shape) for r in fwd], [(r.op, r.shape) for r in bwd])
            if name.startswith("inrank"):
                with count_collectives() as frobenius:
                    layer.frobenius_penalty(0.1).backward()
                out[(sp, name, "frobenius")] = [(r.op, r.shape) for r in frobenius]
    return out


@pytest.mark.slow
def test_efficient_layers_move_rank_sized_tensors():
    res = run_distributed(_comm_body, 2)[0]
    k, tokens = 7, SEQ * BATCH
    # Column: backward all-reduces the (tokens, k) gradient of x A^T; dense: (tokens, in).
    assert res[(False, "inrank_column")] == ([], [("all_reduce", (SEQ, BATCH, k))])
    assert res[(False, "dense_column")][1] == [("all_reduce", (SEQ, BATCH, IN))]
    # Row: forward all-reduces the (tokens, k) partial; dense: (tokens, out).
    assert res[(False, "inrank_row")] == ([("all_reduce", (SEQ, BATCH, k))], [])
    assert res[(False, "dense_row")][0] == [("all_reduce", (SEQ, BATCH, IN))]
    # Sequence parallel: k-wide all-gather / reduce-scatter instead of full-width ones.
    assert res[(True, "inrank_column")] == (
        [("all_gather", (SEQ, BATCH, k))],
        [("reduce_scatter", (SEQ, BATCH, k))],
    )
    # (megatron's dense column re-gathers its input in backward for the weight gradient)
    assert res[(True, "dense_column")] == (
        [("all_gather", (SEQ, BATCH, IN))],
        [("all_gather", (SEQ, BATCH, IN)), ("reduce_scatter", (SEQ, BATCH, IN))],
    )
    assert res[(True, "inrank_row")] == (
        [("reduce_scatter", (SEQ, BATCH, k))],
        [("all_gather", (SEQ, BATCH, k))],
    )
    assert tokens * k < tokens * IN
    # Frobenius decay: one k x k all-reduce (the sharded factor's Gram matrix), never in x out.
    for sp in (False, True):
        for name in ("inrank_column", "inrank_row"):
            assert res[(sp, name, "frobenius")] == [("all_reduce", (k, k))], (sp, name)


def _bad_body(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    from inrank_megatron import InRankConfig, enable_cpu_fallback
    from inrank_megatron.tensor_parallel import InRankColumnParallelLinear, InRankRowParallelLinear

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    msgs = []
    cfg = ModelParallelConfig(
        tensor_model_parallel_size=2,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
    )
    sp = ModelParallelConfig(
        tensor_model_parallel_size=2,
        use_cpu_initialization=True,
        sequence_parallel=True,
        gradient_accumulation_fusion=False,
    )
    icfg = InRankConfig(rank=3, buffer=4, stage1_steps=None)
    attempts = [
        lambda: InRankColumnParallelLinear(48, 81, config=cfg, inrank_config=icfg),
        lambda: InRankRowParallelLinear(49, 80, config=cfg, inrank_config=icfg),
        lambda: InRankRowParallelLinear(
            48, 80, config=sp, inrank_config=icfg, input_is_parallel=False
        ),
        lambda: InRankColumnParallelLinear(
            48, 80, config=cfg, inrank_config=icfg.replace(buffer=30)
        ),
        lambda: InRankColumnParallelLinear(48, 80, config=cfg, inrank_config=icfg, stride=2),
        lambda: InRankColumnParallelLinear(48, 80, config=cfg),
    ]
    for attempt in attempts:
        try:
            attempt()
            msgs.append(None)
        except ValueError as e:
            msgs.append(str(e))
    return msgs


@pytest.mark.slow
def test_bad_layer_settings_fail_at_build_time():
    msgs = run_distributed(_bad_body, 2)[0]
    assert "output_size=81 is not divisible by the tensor-parallel size 2" in msgs[0]
    assert "input_size=49 is not divisible" in msgs[1]
    assert "sequence_parallel=True needs input_is_parallel=True" in msgs[2]
    assert "buffer=30 must be < max_rank=24" in msgs[3]
    assert "stride=2" in msgs[4]
    assert "inrank_config is required" in msgs[5]
