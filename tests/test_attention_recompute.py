"""``model.attention`` and ``model.recompute`` on megatron's GPTModel with InRank layers.

- SDPA core attention (inrank_megatron.models.attention) gives the losses and gradients of
  megatron's local DotProductAttention (fp32, 1e-5) at TP 1 and 2, sequence parallelism included,
  and the module alone its outputs with the causal default and with an explicit mask.
- Selective and full activation recompute give the losses and gradients of no recompute (fp32,
  rel 1e-6) over AdamW steps through rank checks and the stage cut (the recomputed forward uses the
  same active slots), at TP 1 and 2, with local and SDPA attention.
- Under bf16 autocast (the torch and megatron backends), the recomputed forward re-enters autocast:
  gradients equal those of no recompute (megatron's CheckpointFunction alone recomputes in fp32).
- The config keys' cross-key rules (recompute vs attention and the pipeline stage).
"""

import pytest
import torch

from tests.distributed import run_distributed

SEQ, BATCH, VOCAB = 16, 2, 128


def _build(
    world_size,
    sequence_parallel,
    *,
    attention="local",
    recompute="none",
    recompute_num_layers=None,
    seed=1234,
    layers=("fc1", "fc2", "proj"),
):
    from megatron.core import tensor_parallel

    from inrank_megatron import InRankConfig
    from inrank_megatron.models.gpt import GPTShape, build_gpt, transformer_config

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    shape = GPTShape(
        num_layers=3,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=256,
        seq_length=SEQ,
        vocab_size=VOCAB,
    )
    config = transformer_config(
        shape,
        tp=world_size,
        sequence_parallel=sequence_parallel,
        recompute=recompute,
        recompute_num_layers=recompute_num_layers,
    )
    icfg = InRankConfig(rank=2, buffer=6, warmup=2, gap=2, stage1_steps=5)
    model = build_gpt(shape, config, inrank=icfg, inrank_layers=layers, attention=attention)
    return model, icfg


def _batch():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return tokens[:, :-1], tokens[:, 1:], pos


def _train(world_size, sequence_parallel, steps=7, **variant):
    """Losses, every step's gradients (this rank's shards) and the growth history."""
    from megatron.core import parallel_state

    from inrank_megatron.growth.controller import GrowthController
    from inrank_megatron.tensor_parallel import allreduce_sequence_parallel_grads

    model, icfg = _build(world_size, sequence_parallel, **variant)
    model.train()
    group = parallel_state.get_tensor_model_parallel_group()
    controller = GrowthController(model, stage1_steps=icfg.stage1_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens, labels, pos = _batch()
    losses, grads, history = [], [], []
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = model(tokens, pos, attention_mask=None, labels=labels).float().mean()
        loss.backward()
        allreduce_sequence_parallel_grads(model, group)
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        losses.append(loss.item())
        report = controller.step(step)
        history.append((step, [(c.layer, c.new_rank) for c in report.checks], report.cut))
        if report.resizes:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return losses, grads, history


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _max_rel(run, ref):
    """Largest relative difference of losses and gradients between two _train results."""
    (la, ga, ha), (lb, gb, hb) = run, ref
    assert ha == hb
    worst = max(abs(x - y) / abs(y) for x, y in zip(la, lb))
    for sa, sb in zip(ga, gb):
        assert sa.keys() == sb.keys()
        worst = max([worst] + [_rel(sa[n], sb[n]) for n in sb])
    return worst


def _body(rank, world_size, sequence_parallel):
    from megatron.core import parallel_state

    from inrank_megatron import enable_cpu_fallback

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    ref = _train(world_size, sequence_parallel)
    out = {"checks": [h[0] for h in ref[2] if h[1]], "cut": [h[0] for h in ref[2] if h[2]]}
    # One forward/backward: over AdamW steps fp32 reorderings compound (Adam divides by |g|).
    out["sdpa"] = _max_rel(
        _train(world_size, sequence_parallel, steps=1, attention="sdpa"),
        _train(world_size, sequence_parallel, steps=1),
    )
    out["selective"] = _max_rel(_train(world_size, sequence_parallel, recompute="selective"), ref)
    out["full"] = _max_rel(_train(world_size, sequence_parallel, recompute="full"), ref)
    out["full_1_layer"] = _max_rel(
        _train(world_size, sequence_parallel, recompute="full", recompute_num_layers=1), ref
    )
    sdpa = _train(world_size, sequence_parallel, attention="sdpa")
    out["full_sdpa"] = _max_rel(
        _train(world_size, sequence_parallel, attention="sdpa", recompute="full"), sdpa
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world_size,sequence_parallel", [(1, False), (2, False), (2, True)])
def test_sdpa_and_recompute_equal_reference(world_size, sequence_parallel):
    for out in run_distributed(_body, world_size, sequence_parallel):
        assert out["checks"] == [2, 4] and out["cut"] == [5]  # through rank checks and the cut
        assert out["sdpa"] < 1e-5
        for key in ("selective", "full", "full_1_layer", "full_sdpa"):
            assert out[key] < 1e-6, key


def _modules_body(rank, world_size):
    """megatron's DotProductAttention and SDPADotProductAttention on the same q, k, v."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from inrank_megatron import enable_cpu_fallback
    from inrank_megatron.models.attention import SDPADotProductAttention
    from inrank_megatron.models.gpt import GPTShape, transformer_config

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)  # local attention forks its stream
    config = transformer_config(
        GPTShape(
            num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=SEQ, vocab_size=VOCAB
        )
    )
    kw = dict(
        config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )
    local, sdpa = DotProductAttention(**kw), SDPADotProductAttention(**kw)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(SEQ, BATCH, 4, 16, generator=gen) for _ in range(3))
    # An explicit mask (True = masked out): causal plus the first 3 keys hidden from batch 1.
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).expand(BATCH, 1, SEQ, SEQ).clone()
    mask[1, :, 4:, :3] = True
    out = {}
    for name, attention_mask in (("causal", None), ("mask", mask)):
        a, b = local(q, k, v, attention_mask), sdpa(q, k, v, attention_mask)
        out[name] = (tuple(b.shape), _rel(b, a))
    with pytest.raises(ValueError, match="equal query and key lengths"):
        sdpa(q[:1], k, v, None)
    return out


def test_sdpa_module_equals_local_attention():
    out = run_distributed(_modules_body, 1)[0]
    for name in ("causal", "mask"):
        shape, rel = out[name]
        assert shape == (SEQ, BATCH, 64) and rel < 1e-5, name


def _autocast_body(rank, world_size, keep_autocast):
    from megatron.core import parallel_state

    from inrank_megatron import enable_cpu_fallback
    from inrank_megatron.models import recompute

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    if not keep_autocast:  # megatron's own checkpoint, as before keep_autocast_in_recompute
        recompute._patched = True
    # The transformer block alone, every linear InRank: megatron's dense linears autocast for
    # "cuda" only (custom_fwd), so their backward fails under CPU autocast, recompute or not.
    x = torch.randn(SEQ, BATCH, 64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for mode in ("none", "full"):
        model, _ = _build(1, False, recompute=mode, layers=("fc1", "fc2", "qkv", "proj"))
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.decoder(x.clone().requires_grad_(), attention_mask=None)
        (out.float() ** 2).mean().backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.decoder.named_parameters()}
    return max(_rel(grads["full"][n], grads["none"][n]) for n in grads["none"])


def test_full_recompute_keeps_autocast():
    assert run_distributed(_autocast_body, 1, True)[0] == 0.0
    # Without it the recomputed layers run in fp32: gradients differ at bf16 precision.
    assert run_distributed(_autocast_body, 1, False)[0] > 1e-3


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.recompute=selective", "model.attention=sdpa"], "model.recompute=selective"),
        (["model.recompute_num_layers=2"], "model.recompute_num_layers=2 is only read"),
        (["model.recompute=full", "model.recompute_num_layers=5"], "exceeds the 4 transformer"),
    ],
)
def test_recompute_rules(overrides, message):
    from inrank_megatron.config import ConfigError, load_config
    from inrank_megatron import rules

    cfg = load_config("tests/tiny.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        rules.validate(cfg, 2)
    ok = load_config(
        "tests/tiny.yaml",
        ["model.recompute=full", "model.attention=sdpa", "model.recompute_num_layers=4"],
    )
    rules.validate(ok, 2)
