"""Let megatron.core's GPT train on CPU, under torch.distributed on gloo.

megatron-core 0.16.1 assumes a CUDA device in a handful of places that the local (no TE, no apex)
GPT path goes through: RNG bookkeeping, ``device=torch.cuda.current_device()`` allocations
(rotary and attention buffers, the sequence-parallel gather buffers, ``GlobalMemoryBuffer``), the
causal mask built with ``device="cuda"`` and ``torch.cuda.synchronize()``. On a CPU-only torch
each of those raises "Torch not compiled with CUDA enabled". ``enable_cpu_fallback()`` points them
at the CPU so that

    GPTModel(config, get_gpt_layer_local_spec(), ...)   # use_cpu_initialization=True, fusions off

builds, runs forward and backward, and gives the same losses at every tensor-parallel size.

Scope: the model path only. Megatron's DDP, optimizers and dist_checkpointing are GPU-first
(``device='cuda'`` literals, ``'torch.cuda.FloatTensor'`` type checks) and are left alone.
The patches are process-wide (they replace ``torch.cuda`` attributes), so call this only in
processes that run Megatron models, not in DeepSpeed ones, which pick their CPU accelerator by
themselves.

Usage::

    from inrank_megatron.cpu_fallback import enable_cpu_fallback

    enable_cpu_fallback()            # before model_parallel_cuda_manual_seed / building the model
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
"""

import contextlib
import logging

import torch

_CPU = torch.device("cpu")
_enabled = False


def _cpu_current_device() -> torch.device:
    return _CPU


def _cpu_synchronize(device=None) -> None:
    pass


def _cpu_get_rng_state(device="cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
    torch.default_generator.set_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(seed)


def _megatron_get_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    # `get_state()` already returns a copy, so `clone` needs no work; `graph_safe` concerns CUDA
    # graphs, which do not exist on CPU.
    return torch.default_generator.get_state()


def _megatron_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe=False) -> None:
    torch.default_generator.set_state(new_state)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    # Same as megatron.core.transformer.utils.get_default_causal_mask, on CPU.
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    # Same as megatron.core.transformer.utils.get_sliding_window_causal_mask, on CPU.
    m = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


class _DropCpuRngChangedWarning(logging.Filter):
    """Drops ``CudaRNGStatesTracker.fork``'s "CPU RNG state changed within GPU RNG context".

    With one generator that warning fires on every fork that draws a random number (dropout with
    p > 0), although the fork restored the state exactly as it does on GPU.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


def enable_cpu_fallback() -> bool:
    """Point megatron.core's CUDA-only calls at the CPU; idempotent.

    A no-op when CUDA is available. Patches attributes of ``torch.cuda`` and of megatron.core
    modules in memory; nothing on disk changes.

    Returns:
        True if the fallback is active (now or from an earlier call), False when CUDA is available
        and nothing was patched.
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True

    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as tp_random

    # `device=torch.cuda.current_device()` is how megatron.core allocates buffers (RoPE inv_freq,
    # attention and sequence-parallel gather buffers in tensor_parallel/mappings.py and layers.py,
    # utils.GlobalMemoryBuffer.get_tensor); torch's version calls _lazy_init() and raises.
    # Returning the CPU device makes them all land on CPU. This is also what makes sequence
    # parallelism's global memory buffer (parallel_state._set_global_memory_buffer) work.
    torch.cuda.current_device = _cpu_current_device

    # Pipeline p2p_communication, timers and dist_checkpointing call torch.cuda.synchronize();
    # CPU ops are synchronous.
    torch.cuda.synchronize = _cpu_synchronize

    # CudaRNGStatesTracker.add() and model_parallel_cuda_manual_seed() seed and snapshot "the CUDA
    # generator" through these; rerun_state_machine saves and restores it. On CPU there is one
    # generator, so the CUDA streams Megatron tracks become states of the CPU generator.
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = _cpu_manual_seed

    # CudaRNGStatesTracker.fork() swaps the "model-parallel-rng" state in and out through these
    # module-level helpers: _get_cuda_rng_state calls torch.cuda.random.get_rng_state (raises)
    # and _set_cuda_rng_state defers the set through torch.cuda._lazy_call (never runs without
    # CUDA). Pointed at the CPU generator, fork() saves the CPU state, runs its body on the
    # tracker's stored state, stores the advanced state back and restores the CPU state: the same
    # determinism, and the same TP-size (in)dependence, as Megatron's two streams on GPU.
    tp_random._get_cuda_rng_state = _megatron_get_rng_state
    tp_random._set_cuda_rng_state = _megatron_set_rng_state

    # fork() then sees "the CPU state" change whenever its body draws a random number and logs a
    # warning meant for GPU runs; here that change is the forked stream itself.
    logging.getLogger(tp_random.__name__).addFilter(_DropCpuRngChangedWarning())

    # FusedScaleMaskSoftmax.forward_torch_softmax builds the causal / sliding-window mask with
    # device="cuda" (transformer/utils.py) when GPTModel gets attention_mask=None.
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask

    # megatron's linear autograd function decorates its backward with custom_bwd(device_type=
    # "cuda"): a backward run under CPU autocast (bf16/fp16) gets bf16 gradients against the fp32
    # weight it saved ("expected m1 and m2 to have the same dtype"). Run it under CPU autocast in
    # the forward's dtype, as custom_bwd does for CUDA; autograd casts the weight gradient back
    # to the parameter's fp32.
    from megatron.core.tensor_parallel import layers as tp_layers

    function = tp_layers.LinearWithGradAccumulationAndAsyncCommunication
    function.forward = staticmethod(_remember_cpu_autocast(function.forward))
    function.backward = staticmethod(_backward_under_cpu_autocast(function.backward))

    _enabled = True
    return True


def _remember_cpu_autocast(forward):
    def wrapped(ctx, *args, **kwargs):
        ctx.cpu_autocast = (
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        )
        return forward(ctx, *args, **kwargs)

    return wrapped


def _backward_under_cpu_autocast(backward):
    def wrapped(ctx, *grads):
        dtype = getattr(ctx, "cpu_autocast", None)
        if dtype is None:
            return backward(ctx, *grads)
        with torch.autocast("cpu", dtype=dtype):
            return backward(ctx, *grads)

    return wrapped


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """Within the block, ``Tensor.cuda()`` returns the tensor itself on a CPU-only torch (a no-op
    context with CUDA).

    Scoped, not process-wide: only ``GPTModel`` construction at pipeline size > 1 needs it, where
    megatron's ``LanguageModule.setup_embeddings_and_output_layer`` moves the last stage's copy of
    the tied word embedding with ``weight.data = weight.data.cuda()`` before all-reducing it over
    the embedding group (first and last stage).
    """
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original
