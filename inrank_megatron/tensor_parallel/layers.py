"""Tensor-parallel InRank linear layers: twins of megatron.core's ``ColumnParallelLinear`` and
``RowParallelLinear`` (same constructor arguments, ``(output, bias)`` return, ``sharded_state_dict``),
whose weight is ``W = B A`` (efficient) or ``W0 + B A`` (cumulative).

Factor layout follows the base layer's split, and the rank dimension is never split:

- column-parallel (``W`` split along ``out``): ``B`` split along dim 0, ``A`` replicated;
- row-parallel (``W`` split along ``in``): ``A`` split along dim 1, ``B`` replicated.

Efficient mode moves rank-sized activations over TP instead of full-width ones (``k`` = active slots):

- column: ``h = x A^T`` is computed locally; its gradient (``[tokens, k]``) is all-reduced in
  backward (dense all-reduces the ``[tokens, in]`` input gradient). Under sequence parallelism
  ``h`` is all-gathered along the sequence (dense gathers ``x``);
- row: the partial ``x_p A_p^T`` (``[tokens, k]``) is all-reduced (dense all-reduces ``[tokens, out]``)
  or reduce-scattered under sequence parallelism, then ``B`` is applied locally.

Cumulative mode keeps ``W0``'s dense TP path and adds the low-rank branch. Under sequence
parallelism the replicated factor's gradient is a partial sum over sequence shards: it carries
``sequence_parallel=True`` so that Megatron's ``finalize_model_grads`` (or
:func:`allreduce_sequence_parallel_grads`) sums it over TP, as Megatron does for LayerNorm weights.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none

from inrank_megatron.core.config import InRankConfig
from inrank_megatron.layers.base import InRankFactorsMixin
from inrank_megatron.tensor_parallel.tsqr import tsqr_r


def _shard(size: int, world_size: int, rank: int, *, what: str, layer: str) -> slice:
    if size % world_size:
        raise ValueError(
            f"layer {layer}: {what}={size} is not divisible by the tensor-parallel "
            f"size {world_size}"
        )
    per = size // world_size
    return slice(rank * per, (rank + 1) * per)


class _InRankParallelLinear(InRankFactorsMixin, torch.nn.Module):
    """What both TP layers share: argument checks, factor shards, TSQR, checkpoint sharding."""

    # Which factor is sharded over TP, and along which of its dims.
    _sharded_role: str
    _sharded_dim: int

    def _setup(
        self,
        input_size,
        output_size,
        *,
        config,
        inrank_config,
        bias,
        skip_bias_add,
        stride,
        is_expert,
        tp_group,
        layer_kind,
    ):
        self.input_size = input_size
        self.output_size = output_size
        self.config = config
        self.skip_bias_add = skip_bias_add
        self.is_expert = is_expert
        name = f"{layer_kind}({input_size}->{output_size})"
        if inrank_config is None:
            raise ValueError(
                f"layer {name}: inrank_config is required (build through "
                "get_gpt_layer_inrank_spec or pass inrank_config=InRankConfig(...))"
            )
        if stride != 1:
            raise ValueError(
                f"layer {name}: stride={stride} (a gated/strided linear, e.g. SwiGLU "
                "fc1) is not supported by InRank layers; use a non-gated activation"
            )
        if is_expert:
            raise ValueError(
                f"layer {name}: is_expert=True (MoE experts) is not supported by InRank layers"
            )
        if getattr(config, "gradient_accumulation_fusion", False):
            raise ValueError(
                f"layer {name}: gradient_accumulation_fusion=True is not supported by "
                "InRank layers; set it False"
            )
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=False)
        self.tp_world_size = get_pg_size(self.tp_group)
        self.tp_rank = get_pg_rank(self.tp_group)
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_world_size > 1
        return name

    def _finish_params(self):
        sharded = self.A if self._sharded_role == "A" else self.B
        replicated = self.B if self._sharded_role == "A" else self.A
        set_tensor_model_parallel_attributes(sharded, True, self._sharded_dim, 1)
        for p in (self.A, self.B):
            setattr(p, "allreduce", True)
        # Under SP the replicated factor sees only this rank's sequence shard: partial gradient.
        setattr(replicated, "sequence_parallel", self.sequence_parallel)
        if self.bias is not None:
            setattr(self.bias, "allreduce", True)
            if self._bias_sharded:
                set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
            else:
                setattr(self.bias, "sequence_parallel", self.sequence_parallel)

    def _make_bias(self, bias: bool, size: int, dtype) -> None:
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(size, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _reduce_r(self, R: torch.Tensor, role: str) -> torch.Tensor:
        if role != self._sharded_role or self.tp_world_size == 1:
            return R
        return tsqr_r(R, self.tp_group)

    def _reduce_gram(self, gram: torch.Tensor, role: str) -> torch.Tensor:
        if role != self._sharded_role or self.tp_world_size == 1:
            return gram
        gram = gram.contiguous()
        torch.distributed.all_reduce(gram, group=self.tp_group)  # k x k, never in x out
        return gram

    def _frobenius_grad_scale(self, role: str) -> float:
        # Under SP a replicated factor's gradient is summed over TP (it is marked
        # sequence_parallel); every rank computes the same penalty gradient, so one rank adds it.
        if role != self._sharded_role and self.sequence_parallel and self.tp_rank > 0:
            return 0.0
        return 1.0

    def _output(self, output: torch.Tensor):
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None

    def backward_dw(self) -> None:
        """Delayed weight-gradient computation is not used (megatron's MLP calls this)."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Factors sharded along their TP axis, ``w0`` like the dense weight, growth state as an
        object (see megatron's ``ColumnParallelLinear.sharded_state_dict``)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state_dict = self.state_dict(prefix="", keep_vars=True)
        axis = {self._sharded_role: self._sharded_dim, "w0": self._w0_dim}
        if self._bias_sharded:
            axis["bias"] = 0
        sharded = make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            axis,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        if sharded_offsets:
            # megatron stacks the layers of a block along a prepended axis, which needs equal
            # shapes; after the cut each layer has its own rank, so factors get one key per layer.
            layer = "_".join(str(offset) for _, offset, _ in sharded_offsets)
            factors = {role: state_dict[role] for role in ("A", "B")}
            per_layer = make_sharded_tensors_for_checkpoint(
                factors,
                f"{prefix}layer{layer}.",
                axis,
                (),
                tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
            for role in ("A", "B"):
                sharded[prefix + role] = per_layer[f"{prefix}layer{layer}.{role}"]
        return sharded

    def __repr__(self):
        g = self.growth
        return (
            f"{type(self).__name__}(in_features={self.input_size}, out_features="
            f"{self.output_size}, mode={self.inrank_config.mode}, rank={g.rank}, "
            f"buffer={g.buffer}, max_rank={g.max_rank}, stage={g.stage}, "
            f"bias={self.bias is not None}, TP={self.tp_world_size})"
        )


class InRankColumnParallelLinear(_InRankParallelLinear):
    """InRank twin of ``megatron.core.tensor_parallel.ColumnParallelLinear``.

    ``Y = X W^T + b`` with ``W`` split along its output dimension: ``B`` (``[out/tp, slots]``) is
    sharded, ``A`` (``[slots, in]``) replicated.

    Args:
        input_size, output_size: full layer shape.
        config: megatron ``ModelParallelConfig`` / ``TransformerConfig``.
        init_method: the dense layer's init; ``inrank.init=spectral`` factorises a full weight
            drawn with it, ``inrank.start=dense`` starts from it (the kaiming init ignores it,
            as the reference).
        bias: learn a bias (sharded like the output; zero-initialised).
        gather_output: all-gather the output over TP.
        skip_bias_add: return the bias instead of adding it.
        inrank_config: InRank settings (passed by the spec's ``params``).
        tp_group: tensor-parallel group (default: megatron's).
        Other arguments are accepted for megatron's contract and must keep their defaults.
    """

    _sharded_role = "B"
    _sharded_dim = 0
    _w0_dim = 0
    _bias_sharded = True

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Optional[Callable] = None,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        skip_bias_add: bool = False,
        skip_weight_param_allocation: bool = False,
        embedding_activation_buffer: Any = None,
        grad_output_buffer: Any = None,
        is_expert: bool = False,
        tp_comm_buffer_name: Optional[str] = None,
        disable_grad_reduce: bool = False,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        inrank_config: Optional[InRankConfig] = None,
    ):
        super().__init__()
        name = self._setup(
            input_size,
            output_size,
            config=config,
            inrank_config=inrank_config,
            bias=bias,
            skip_bias_add=skip_bias_add,
            stride=stride,
            is_expert=is_expert,
            tp_group=tp_group,
            layer_kind="column",
        )
        if (
            skip_weight_param_allocation
            or disable_grad_reduce
            or getattr(config, "defer_embedding_wgrad_compute", False)
        ):
            raise ValueError(
                f"layer {name}: skip_weight_param_allocation / disable_grad_reduce / "
                "defer_embedding_wgrad_compute are not supported by InRank layers"
            )
        self.gather_output = gather_output
        out_slice = _shard(
            output_size, self.tp_world_size, self.tp_rank, what="output_size", layer=name
        )
        self.output_size_per_partition = out_slice.stop - out_slice.start
        self._init_inrank(
            inrank_config,
            input_size,
            output_size,
            out_slice=out_slice,
            params_dtype=config.params_dtype,
            layer=name,
            dense_init=init_method,
        )
        self._make_bias(bias, self.output_size_per_partition, config.params_dtype)
        self._finish_params()

    def forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ):
        """Args: input_ ``[s, b, in]`` (``[s/tp, b, in]`` under sequence parallelism).
        Returns: ``(output, bias)`` with output ``[s, b, out/tp]`` (or ``out`` when gathered)."""
        if weight is not None:
            raise ValueError(
                "InRankColumnParallelLinear has no dense weight to replace "
                "(weight= is for megatron's shared-embedding output layer)"
            )
        A, B = self.active_factors()
        h = input_ @ A.T  # (s, b, k) or (s/tp, b, k)
        if self.sequence_parallel:
            h = gather_from_sequence_parallel_region(h, group=self.tp_group)  # (s, b, k)
        elif self.tp_world_size > 1:
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)  # bwd: all-reduce k
        out = h @ B.T  # (s, b, out/tp)
        if self.w0 is not None:
            if self.sequence_parallel:
                x = gather_from_sequence_parallel_region(input_, group=self.tp_group)
            else:
                x = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
            out = out + x @ self.w0.T
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        out, bias = self._output(out)
        if gather and self.tp_world_size > 1:
            out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, bias


class InRankRowParallelLinear(_InRankParallelLinear):
    """InRank twin of ``megatron.core.tensor_parallel.RowParallelLinear``.

    ``Y = X W^T + b`` with ``W`` split along its input dimension: ``A`` (``[slots, in/tp]``) is
    sharded, ``B`` (``[out, slots]``) replicated; the bias is not sharded.

    Args:
        input_size, output_size: full layer shape.
        config: megatron ``ModelParallelConfig`` / ``TransformerConfig``.
        init_method: the dense layer's init; ``inrank.init=spectral`` factorises a full weight
            drawn with it, ``inrank.start=dense`` starts from it (the kaiming init ignores it,
            as the reference).
        bias: learn a bias (zero-initialised).
        input_is_parallel: the input is already split along its last dim (required under SP).
        skip_bias_add: return the bias instead of adding it.
        inrank_config: InRank settings (passed by the spec's ``params``).
        tp_group: tensor-parallel group (default: megatron's).
    """

    _sharded_role = "A"
    _sharded_dim = 1
    _w0_dim = 1
    _bias_sharded = False

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Optional[Callable] = None,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: Optional[str] = None,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        inrank_config: Optional[InRankConfig] = None,
    ):
        super().__init__()
        name = self._setup(
            input_size,
            output_size,
            config=config,
            inrank_config=inrank_config,
            bias=bias,
            skip_bias_add=skip_bias_add,
            stride=stride,
            is_expert=is_expert,
            tp_group=tp_group,
            layer_kind="row",
        )
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError(
                f"layer {name}: sequence_parallel=True needs input_is_parallel=True "
                "(the input must arrive split along its last dimension)"
            )
        self.input_is_parallel = input_is_parallel
        in_slice = _shard(
            input_size, self.tp_world_size, self.tp_rank, what="input_size", layer=name
        )
        self.input_size_per_partition = in_slice.stop - in_slice.start
        self._init_inrank(
            inrank_config,
            input_size,
            output_size,
            in_slice=in_slice,
            params_dtype=config.params_dtype,
            layer=name,
            dense_init=init_method,
        )
        self._make_bias(bias, output_size, config.params_dtype)
        self._finish_params()

    def forward(self, input_: torch.Tensor):
        """Args: input_ ``[s, b, in/tp]`` (or ``[s, b, in]`` when not ``input_is_parallel``).
        Returns: ``(output, bias)`` with output ``[s, b, out]`` (``[s/tp, b, out]`` under SP)."""
        if not self.input_is_parallel and self.tp_world_size > 1:
            input_ = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        A, B = self.active_factors()
        h = input_ @ A.T  # (s, b, k): partial sum over this rank's input columns
        if self.sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)  # (s/tp, b, k)
        elif self.tp_world_size > 1:
            h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)  # all-reduce k
        out = h @ B.T  # (s, b, out)
        if self.w0 is not None:
            dense = input_ @ self.w0.T  # partial (s, b, out)
            if self.sequence_parallel:
                dense = reduce_scatter_to_sequence_parallel_region(dense, group=self.tp_group)
            elif self.tp_world_size > 1:
                dense = reduce_from_tensor_model_parallel_region(dense, group=self.tp_group)
            out = out + dense
        return self._output(out)


def allreduce_sequence_parallel_grads(model: torch.nn.Module, group=None) -> None:
    """Sum over TP the gradients of parameters marked ``sequence_parallel`` (replicated factors,
    norms and row biases under SP), as megatron's ``finalize_model_grads`` does. For training loops
    that do not use megatron's DDP."""
    grads = [
        p.grad
        for p in model.parameters()
        if getattr(p, "sequence_parallel", False) and p.grad is not None
    ]
    if not grads:
        return
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
