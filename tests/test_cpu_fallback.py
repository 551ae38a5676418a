"""Pins down `inrank_megatron.cpu_fallback`: megatron.core's GPT trains on CPU/gloo.

- A tiny GPTModel (RoPE) from the local layer spec (no TE/apex, fusions off) trains 3 SGD steps on
  a fixed batch at TP=1 and TP=2 with the same seed; the losses agree across TP sizes and ranks.
  With `use_cpu_initialization=True` the master weights come from the CPU generator before they
  are split, so the TP=2 model is the TP=1 model sharded.
- `attention_mask=None` (Megatron builds the causal mask itself) gives the explicit mask's output.
- `enable_cpu_fallback()` is idempotent, and `get_cuda_rng_tracker().fork()` runs on the tracker's
  own stream: it restores the default (CPU) stream on exit and resumes where the last fork stopped.
- Sequence parallelism: Column/RowParallelLinear with `sequence_parallel=True` (all-gather and
  reduce-scatter through Megatron's global memory buffer) match a dense reference at TP=2. The GPT
  at TP=2 with SP matches TP=1 (the local spec's torch LayerNorm refuses SP, so that run uses the
  same dense layers with `inrank_megatron.models.gpt_spec`'s SP-capable norms).
"""

import pytest

from tests.distributed import run_distributed

SEED = 1234
VOCAB_SIZE = 128
SEQ_LENGTH = 16
MICRO_BATCH_SIZE = 2
STEPS = 3
LEARNING_RATE = 0.1


def _gpt_config(tensor_model_parallel_size, sequence_parallel):
    import torch
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        tensor_model_parallel_size=tensor_model_parallel_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def _build_gpt(tensor_model_parallel_size, sequence_parallel=False):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from inrank_megatron.cpu_fallback import enable_cpu_fallback
    from inrank_megatron.models.gpt_spec import get_gpt_block_inrank_spec

    assert enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    config = _gpt_config(tensor_model_parallel_size, sequence_parallel)
    # The local spec's WrappedTorchNorm refuses SP: the same dense layers with SP-capable norms.
    spec = (
        get_gpt_block_inrank_spec(config, None, layers=())
        if sequence_parallel
        else get_gpt_layer_local_spec()
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB_SIZE,
        max_sequence_length=SEQ_LENGTH,
        # RoPE allocates its inv_freq on torch.cuda.current_device(): one more path to cover.
        position_embedding_type="rope",
    )


def _fixed_batch():
    import torch

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB_SIZE, (MICRO_BATCH_SIZE, SEQ_LENGTH + 1), generator=generator)
    position_ids = torch.arange(SEQ_LENGTH).unsqueeze(0).expand(MICRO_BATCH_SIZE, -1)
    # Megatron's mask convention: True marks a position that may NOT be attended to.
    causal_mask = torch.triu(torch.ones(SEQ_LENGTH, SEQ_LENGTH, dtype=torch.bool), diagonal=1)
    attention_mask = causal_mask.view(1, 1, SEQ_LENGTH, SEQ_LENGTH)
    return tokens[:, :-1], position_ids, attention_mask, tokens[:, 1:]


def _train_gpt(rank, world_size, sequence_parallel=False):
    """SGD on one fixed batch; returns the loss before each step (TP size = world size)."""
    import torch
    from megatron.core import parallel_state

    model = _build_gpt(tensor_model_parallel_size=world_size, sequence_parallel=sequence_parallel)
    input_ids, position_ids, attention_mask, labels = _fixed_batch()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    losses = []
    for _ in range(STEPS):
        model.zero_grad()
        # (B, S) per-token losses; the vocab-parallel cross entropy already reduces over TP.
        loss = model(input_ids, position_ids, attention_mask, labels=labels).mean()
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                # Under SP, replicated parameters (norms) see only this rank's sequence chunk:
                # sum their grads over TP, as finalize_model_grads'
                # _allreduce_non_tensor_model_parallel_grads does.
                if sequence_parallel and getattr(param, "sequence_parallel", False):
                    torch.distributed.all_reduce(param.grad, group=tp_group)
                param.add_(param.grad, alpha=-LEARNING_RATE)
        losses.append(loss.item())
    return losses


def _causal_mask_from_megatron(rank, world_size):
    """Max |difference| of logits with attention_mask=None against the explicit causal mask."""
    import torch

    model = _build_gpt(tensor_model_parallel_size=world_size)
    input_ids, position_ids, attention_mask, _ = _fixed_batch()
    with torch.no_grad():
        explicit = model(input_ids, position_ids, attention_mask)
        implicit = model(input_ids, position_ids, None)
    return (explicit - implicit).abs().max().item()


def _enable_twice_and_fork(rank, world_size):
    import logging

    import torch
    from megatron.core import parallel_state, tensor_parallel

    from inrank_megatron.cpu_fallback import enable_cpu_fallback

    assert enable_cpu_fallback()
    patched = (torch.cuda.current_device, tensor_parallel.random._get_cuda_rng_state)
    logger = logging.getLogger(tensor_parallel.random.__name__)
    filters = list(logger.filters)
    assert enable_cpu_fallback()
    assert (torch.cuda.current_device, tensor_parallel.random._get_cuda_rng_state) == patched
    assert logger.filters == filters

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()

    default_state = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        first = torch.randn(4)
    assert torch.equal(torch.get_rng_state(), default_state), "fork() did not restore the CPU state"
    with tensor_parallel.get_cuda_rng_tracker().fork():
        second = torch.randn(4)

    # model_parallel_cuda_manual_seed seeds the model-parallel stream with seed + 2718 + tp_rank.
    expected = torch.Generator().manual_seed(SEED + 2718)
    assert torch.equal(first, torch.randn(4, generator=expected))
    assert torch.equal(second, torch.randn(4, generator=expected))
    # And the default stream is the data-parallel seed itself.
    default = torch.Generator().manual_seed(SEED)
    assert torch.equal(torch.randn(4), torch.randn(4, generator=default))
    return True


def _sequence_parallel_linear_pair(rank, world_size):
    """Max |difference| of (output, input grad) of an SP column->row pair against dense math."""
    import torch
    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel

    from inrank_megatron.cpu_fallback import enable_cpu_fallback

    assert enable_cpu_fallback()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    config = ModelParallelConfig(
        tensor_model_parallel_size=world_size,
        sequence_parallel=True,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
    )
    hidden, ffn = 64, 128
    init_method = torch.nn.init.xavier_normal_
    column = tensor_parallel.ColumnParallelLinear(
        hidden, ffn, config=config, init_method=init_method, bias=False
    )
    row = tensor_parallel.RowParallelLinear(
        ffn,
        hidden,
        config=config,
        init_method=init_method,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
    )

    generator = torch.Generator().manual_seed(0)
    full_input = torch.randn(SEQ_LENGTH, MICRO_BATCH_SIZE, hidden, generator=generator)  # (S, B, H)
    output_weight = torch.randn(SEQ_LENGTH, MICRO_BATCH_SIZE, hidden, generator=generator)
    chunk = SEQ_LENGTH // world_size
    rows = slice(rank * chunk, (rank + 1) * chunk)

    local_input = full_input[rows].clone().requires_grad_()  # (S/TP, B, H)
    hidden_states, _ = column(local_input)  # all-gathers the sequence: (S, B, F/TP)
    output, _ = row(hidden_states)  # reduce-scatters the sequence: (S/TP, B, H)
    (output * output_weight[rows]).sum().backward()

    def gather(shard, dim):
        shards = [torch.empty_like(shard) for _ in range(world_size)]
        torch.distributed.all_gather(shards, shard.detach().contiguous())
        return torch.cat(shards, dim=dim)

    column_weight, row_weight = gather(column.weight, 0), gather(row.weight, 1)
    dense_input = full_input.clone().requires_grad_()
    dense_output = dense_input @ column_weight.t() @ row_weight.t()
    (dense_output * output_weight).sum().backward()
    return (
        (output - dense_output[rows]).abs().max().item(),
        (local_input.grad - dense_input.grad[rows]).abs().max().item(),
    )


@pytest.fixture(scope="module")
def tp1_losses():
    (losses,) = run_distributed(_train_gpt, 1)
    return losses


def test_enable_cpu_fallback_twice_is_harmless_and_fork_uses_tracker_stream():
    assert run_distributed(_enable_twice_and_fork, 1) == [True]


@pytest.mark.slow
def test_gpt_losses_match_across_tensor_parallel_sizes(tp1_losses):
    tp2_losses = run_distributed(_train_gpt, 2)

    assert tp2_losses[0] == tp2_losses[1], "TP ranks disagree"
    assert len(tp1_losses) == STEPS
    assert tp1_losses[-1] < tp1_losses[0], f"SGD did not reduce the loss: {tp1_losses}"
    # Bit-identical on the machine this was written on; the tolerance leaves room for a CPU whose
    # GEMM blocks the split (TP=2) and unsplit (TP=1) reductions differently.
    assert tp2_losses[0] == pytest.approx(tp1_losses, rel=1e-6, abs=1e-6)


def test_gpt_builds_causal_mask_on_cpu():
    assert run_distributed(_causal_mask_from_megatron, 1) == [0.0]


def test_sequence_parallel_linear_pair_matches_dense():
    for output_error, input_grad_error in run_distributed(_sequence_parallel_linear_pair, 2):
        assert output_error < 1e-5
        assert input_grad_error < 1e-5


@pytest.mark.slow
def test_gpt_sequence_parallel_losses_match_tp1(tp1_losses):
    sp_losses = run_distributed(_train_gpt, 2, sequence_parallel=True)
    assert sp_losses[0] == sp_losses[1], "TP ranks disagree"
    assert sp_losses[0] == pytest.approx(tp1_losses, rel=1e-6, abs=1e-6)
