"""Every workaround the DeepSpeed backend needs for DeepSpeed 0.19.8, in one place.

Each function names the DeepSpeed behaviour it works around. The backend
(:mod:`inrank_megatron.training.backends.deepspeed_backend`) decides *what* state goes where;
this module knows *how* to reach a parameter's fp32 master value and Adam moments inside each of
DeepSpeed's optimizers, one :class:`OptimizerLayout` subclass per layout
(:func:`optimizer_layout` picks an engine's):

- :class:`TorchLayout`: ZeRO stage 0, fp32: DeepSpeed hands back the client's
  ``torch.optim.AdamW``; state is ``optimizer.state[param]``, full tensors, and the
  ``safe_get_full_*`` getters return None.
- :class:`FlatLayout`: ZeRO stage 1/2 (``DeepSpeedZeroOptimizer``; ``BF16_Optimizer`` has the same
  layout): one flat fp32 partition per param group and rank, reached through each parameter's
  ``_hp_mapping``. Stage 0 with bf16/fp16 (``FP16_UnfusedOptimizer``) is refused by the backend's
  config check.
- :class:`Zero3Layout`: ZeRO stage 3 (``DeepSpeedZeroOptimizer_Stage3``): each rank owns a slice
  of the zero-padded flattened parameter in its sub-group's ``fp32_partitioned_groups_flat``.

:class:`LocalState` captures references to this rank's pieces of an engine's state (no copy), so
that a resize can rebuild the engine and then move the state parameter by parameter.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from inrank_megatron.core.resize import MOMENTS


# --------------------------------------------------------------------------------- process setup
def skip_shm_op_build() -> None:
    """Skip DeepSpeed's shared-memory comm op on CPU.

    DeepSpeed behaviour: every ``deepspeed.comm`` initialisation (``deepspeed.initialize`` calls it
    even when torch.distributed is up) JIT-builds ``ShareMemCommBuilder`` (~37 s the first time on
    these machines); the op only serves inference all-reduces. ``import deepspeed.comm.torch as m``
    returns the *torch* package (``deepspeed.comm`` re-exports ``torch``), so the module is patched
    through ``sys.modules``. A no-op with CUDA.
    """
    if torch.cuda.is_available():
        return
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


class MegatronMPU:
    """megatron.core ``parallel_state`` under the names DeepSpeed's ``mpu=`` asks for.

    DeepSpeed behaviour: it calls the pre-2021 Megatron names ``get_model_parallel_rank / world_size
    / group`` (checkpoint file naming, ``clip_grad_norm_``, ZeRO's gradient norm), which current
    ``parallel_state`` no longer has. Pipeline parallelism is not used with this backend, so the
    model-parallel group is the tensor-parallel group. Deliberately absent: the
    ``get_sequence_parallel_*`` names, which DeepSpeed reads as Ulysses sequence parallelism (a
    different thing from Megatron's sequence parallelism).
    """

    def __init__(self):
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list:
        return torch.distributed.get_process_group_ranks(self.get_data_parallel_group())


# ----------------------------------------------------------------------------- optimizer layouts
@dataclass
class _Piece:
    """This rank's piece of one parameter: elements ``[start, start + numel)`` of the flattened
    parameter, with views of the master value and each moment (None when this rank owns none)."""

    shape: torch.Size
    start: int
    numel: int
    tensors: Optional[dict]  # {None: master, "exp_avg": ..., "exp_avg_sq": ...}
    group: object  # process group the pieces are spread over (None: this rank holds it all)
    param_group: int


def _fresh_state(t: torch.Tensor, step: torch.Tensor) -> dict:
    """The Adam state AdamW would create for ``t`` (zero moments), at ``step``."""
    return {
        "step": step.clone().to(torch.float32),
        "exp_avg": torch.zeros_like(t),
        "exp_avg_sq": torch.zeros_like(t),
    }


class OptimizerLayout:
    """Where one of DeepSpeed's optimizers keeps each parameter's fp32 master, Adam moments and
    step: one subclass per layout (the module docstring lists them), picked for an engine by
    :func:`optimizer_layout`. Bound to one engine: a rebuilt engine needs its own.

    Args:
        engine: the DeepSpeed engine.
    """

    name = ""

    def __init__(self, engine):
        self.engine = engine

    @property
    def opt(self):
        """The engine's optimizer (DeepSpeed's wrapper, or the client AdamW at stage 0)."""
        return self.engine.optimizer

    def param_group_index(self) -> dict:
        """``{id(param): param-group index}`` of the engine's optimizer."""
        raise NotImplementedError

    def piece(self, p, param_group: int) -> _Piece:
        """References to this rank's piece of parameter ``p`` (no copy)."""
        raise NotImplementedError

    def group_steps(self) -> list:
        """Adam's ``step`` per param group (a float tensor; 0 before the first step). ZeRO keeps
        one step per flat group (per sub-group at stage 3), the client AdamW one per parameter;
        within a group they are equal here (every parameter steps every time)."""
        raise NotImplementedError

    def _step_states(self) -> list:
        """``(Adam state dict, param-group index)`` of every state that holds a ``step``."""
        raise NotImplementedError

    @torch.no_grad()
    def set_group_steps(self, steps: list) -> None:
        """Set Adam's ``step`` of each param group (state must exist).

        DeepSpeed behaviour: its loaders assume one step for the whole optimizer (ZeRO-3's
        ``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` gives every sub-group
        ``state[0]['step']``; ZeRO 1/2 save ``param_groups[0]["step"]`` as *the* step), while this
        backend lets the InRank factor group's step differ after a reset cut. The backend saves
        the per-group steps itself and re-applies them after ``load_checkpoint``.
        """
        for state, gi in self._step_states():
            if "step" in state:
                state["step"] = torch.tensor(float(steps[gi]), dtype=torch.float32)

    @torch.no_grad()
    def create_zeroed_state(self, steps: list) -> None:
        """Zero Adam moments with the given ``step`` per param group, before any ``engine.step()``.

        DeepSpeed behaviour: ZeRO (and torch AdamW) create optimizer state lazily in the first
        step, and the ``safe_set_full_optimizer_state`` setters need it to exist. The tensors are
        the ones AdamW would create (``zeros_like`` the flat partition, ``step`` a float scalar
        tensor), so the next step updates them in place.
        """
        raise NotImplementedError

    def relink(self) -> None:
        """Re-point parameters at the optimizer's current state tensors (ZeRO 1/2 only)."""

    @torch.no_grad()
    def write_local(self, param, value: torch.Tensor, key: Optional[str] = None) -> None:
        """Write this rank's slice of ``value`` (the full fp32 master, ``key=None``, or Adam
        moment ``key``) of ``param``. No collective."""
        raise NotImplementedError

    def refresh_model_params(self) -> None:
        """Collective: copy the fp32 masters into the module's (bit16 or fp32) parameters.

        DeepSpeed behaviour: ``deepspeed.initialize`` builds its masters *from* the module's
        parameters; after masters were written directly (a resize, with bf16 parameters that
        cannot hold the fp32 values), the module copy is only refreshed by the next optimizer
        step.
        """

    def keep_full(self, params) -> None:
        """Keep ``params`` materialised on every rank between steps (ZeRO-3 only)."""

    def _reduced_grads(self, params) -> tuple[list, Optional[list]]:
        """This rank's reduced gradients of ``params``, and the parameters to write them back to
        through the optimizer (None: the gradients are views, written in place)."""
        raise NotImplementedError

    def allreduce_partitioned_sequence_parallel_grads(self, params, group) -> None:
        """Collective over ``group`` (TP): sum the reduced gradients of ``params`` (those megatron
        marks ``sequence_parallel``: partial sums over sequence shards), between the accumulation
        boundary's backward and ``engine.step()``.

        DeepSpeed behaviour: ZeRO reduces gradients over data parallelism inside ``backward``
        (stage 2/3: in per-parameter hooks) and keeps the result in its own partitioned buffers,
        so there is no point *before* its reduction where megatron's TP sum
        (``finalize_model_grads``) could run. Summing over TP and averaging over DP commute, so
        the TP sum runs *after* it, on each rank's slice of the reduced gradient: TP peers have
        identical parameter shapes and data-parallel ranks, hence identical ZeRO partitions, and
        one flat all-reduce of the slices suffices.
        """
        if group is None or torch.distributed.get_world_size(group) == 1:
            return
        grads, setters = self._reduced_grads(params)
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors([g.detach().reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, group=group)
        synced = torch._utils._unflatten_dense_tensors(flat, [g.reshape(-1) for g in grads])
        if setters is None:
            for g, s in zip(grads, synced):
                g.detach().copy_(s.reshape(g.shape))
        else:
            for p, s in zip(setters, synced):
                self.opt.set_local_grad_for_param(s, p)


class TorchLayout(OptimizerLayout):
    """ZeRO stage 0, fp32: DeepSpeed hands back the client's ``torch.optim.AdamW``; its state is
    ``optimizer.state[param]``, full tensors.

    DeepSpeed behaviour: at stage 0 (fp32) the ``safe_get_full_*`` getters and setters return
    None, so the client AdamW's state is read and written directly."""

    name = "torch"

    def param_group_index(self) -> dict:
        return {id(p): gi for gi, g in enumerate(self.opt.param_groups) for p in g["params"]}

    def piece(self, p, param_group: int) -> _Piece:
        state = self.opt.state.get(p, {})
        tensors = {None: p.detach()}
        for key in MOMENTS:
            tensors[key] = state[key] if key in state else torch.zeros_like(p)
        return _Piece(p.shape, 0, p.numel(), tensors, None, param_group)

    def group_steps(self) -> list:
        out = []
        for g in self.opt.param_groups:
            steps = [
                self.opt.state[p]["step"]
                for p in g["params"]
                if "step" in self.opt.state.get(p, {})
            ]
            out.append(steps[0].clone() if steps else torch.tensor(0.0))
        return out

    def _step_states(self) -> list:
        return [
            (self.opt.state[p], gi)
            for gi, g in enumerate(self.opt.param_groups)
            for p in g["params"]
            if p in self.opt.state
        ]

    @torch.no_grad()
    def create_zeroed_state(self, steps: list) -> None:
        for gi, g in enumerate(self.opt.param_groups):
            for p in g["params"]:
                self.opt.state[p] = _fresh_state(p, steps[gi])

    @torch.no_grad()
    def write_local(self, param, value: torch.Tensor, key: Optional[str] = None) -> None:
        value = value.detach().to(torch.float32)
        if key is None:
            param.data.copy_(value.reshape(param.shape).to(param.dtype))
        else:
            self.opt.state[param][key].copy_(value.reshape(param.shape))

    def _reduced_grads(self, params) -> tuple[list, Optional[list]]:
        return [p.grad for p in params if p.grad is not None], None


class FlatLayout(OptimizerLayout):
    """ZeRO stage 1/2 (``DeepSpeedZeroOptimizer``; ``BF16_Optimizer`` has the same layout): one
    flat fp32 partition per param group and rank; each parameter's slice of it is its
    ``_hp_mapping`` (``lp_fragment_address`` inside the flattened parameter, ``hp_fragment`` /
    ``optim_fragment[key]`` inside the flat partition and its Adam state)."""

    name = "flat"

    def _partitions(self) -> list:
        """The flat fp32 partitions of ZeRO 1/2 (``single_partition_of_fp32_groups``) or of
        ``BF16_Optimizer`` (``fp32_groups_flat_partition``): same role, two names."""
        if hasattr(self.opt, "single_partition_of_fp32_groups"):
            return self.opt.single_partition_of_fp32_groups
        return self.opt.fp32_groups_flat_partition

    def param_group_index(self) -> dict:
        groups = (
            self.opt.bit16_groups if hasattr(self.opt, "bit16_groups") else self.opt.bf16_groups
        )
        return {id(p): gi for gi, group in enumerate(groups) for p in group}

    def piece(self, p, param_group: int) -> _Piece:
        mapping = getattr(p, "_hp_mapping", None)
        tensors = None
        start = numel = 0
        if mapping is not None:
            start = mapping.lp_fragment_address.start
            numel = mapping.lp_fragment_address.numel
            tensors = {None: mapping.hp_fragment}
            tensors.update({key: mapping.get_optim_state_fragment(key) for key in MOMENTS})
        return _Piece(p.shape, start, numel, tensors, p._dp_group, param_group)

    def group_steps(self) -> list:
        states = [self.opt.optimizer.state.get(flat, {}) for flat in self._partitions()]
        return [s["step"].clone() if "step" in s else torch.tensor(0.0) for s in states]

    def _step_states(self) -> list:
        return [
            (self.opt.optimizer.state[flat], gi)
            for gi, flat in enumerate(self._partitions())
            if flat in self.opt.optimizer.state
        ]

    @torch.no_grad()
    def create_zeroed_state(self, steps: list) -> None:
        for gi, flat in enumerate(self._partitions()):
            self.opt.optimizer.state[flat] = _fresh_state(flat, steps[gi])
        self.relink()

    def relink(self) -> None:
        """Point every parameter's ``_hp_mapping`` at the optimizer's current state tensors.

        DeepSpeed behaviour: ZeRO 1/2 and BF16_Optimizer link each parameter to its slice of the
        Adam state once (``_lazy_init_hp_params_optimizer_state``, guarded by
        ``_hp_optimizer_states_linked``): ZeRO 1/2 right after stepping its *first* param group,
        when the other groups have no state yet, so their parameters stay unlinked for good and
        ``safe_get_full_optimizer_state`` raises "exp_avg not found" for them.
        ``load_checkpoint`` replaces the state tensors but leaves the flag set (the getters then
        fail with TypeError or read stale tensors), and state created by
        :meth:`create_zeroed_state` is not linked at all. Call after the first step, after a load
        and after creating state.
        """
        if any(flat not in self.opt.optimizer.state for flat in self._partitions()):
            return  # nothing to link before the first step
        self.opt._hp_optimizer_states_linked = False
        self.opt._lazy_init_hp_params_optimizer_state()

    @torch.no_grad()
    def write_local(self, param, value: torch.Tensor, key: Optional[str] = None) -> None:
        """``safe_set_full_*`` semantics: each rank copies its fragment."""
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return
        address = mapping.lp_fragment_address
        target = mapping.hp_fragment if key is None else mapping.get_optim_state_fragment(key)
        target.data.copy_(
            value.detach().to(torch.float32).reshape(-1).narrow(0, address.start, address.numel)
        )

    def refresh_model_params(self) -> None:
        self.opt.update_lp_params()

    def _reduced_grads(self, params) -> tuple[list, Optional[list]]:
        return [
            p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
            for p in params
            if getattr(p, "_hp_mapping", None) is not None
        ], None


class Zero3Layout(OptimizerLayout):
    """ZeRO stage 3 (``DeepSpeedZeroOptimizer_Stage3``): rank ``r`` owns elements
    ``[r * n, (r + 1) * n)`` of the zero-padded flattened parameter (``n = ds_tensor.numel()``),
    stored at ``grad_position[param_id]`` of the sub-group's ``fp32_partitioned_groups_flat``."""

    name = "zero3"

    def _group_of_subgroup(self) -> list:
        """Param-group index of each sub-group (ZeRO-3 splits groups at ``sub_group_size``)."""
        return [
            self.opt.sub_group_to_group_id[i]
            for i in range(len(self.opt.fp32_partitioned_groups_flat))
        ]

    def param_group_index(self) -> dict:
        out = {}
        for sub, group_id in enumerate(self._group_of_subgroup()):
            for p in self.opt.fp16_groups[sub]:
                out[id(p)] = group_id
        return out

    def piece(self, p, param_group: int) -> _Piece:
        """``_get_fp32_opt_state_partition``'s arithmetic."""
        opt = self.opt
        sub, offset, numel = opt.grad_position[opt.get_param_id(p)]
        group = opt._get_param_partition_group(p)
        rank = torch.distributed.get_rank(group=group)
        flat = opt.fp32_partitioned_groups_flat[sub]
        state = opt.optimizer.state.get(flat, {})
        tensors = {None: flat.narrow(0, offset, numel)}
        for key in MOMENTS:
            tensors[key] = (
                state[key].narrow(0, offset, numel)
                if key in state
                else torch.zeros(numel, dtype=flat.dtype)
            )
        start = rank * numel
        owned = max(0, min(numel, p.ds_numel - start))  # the last rank's slice is zero-padded
        return _Piece(p.ds_shape, start, owned, tensors, group, param_group)

    def group_steps(self) -> list:
        steps = {}
        for sub, group_id in enumerate(self._group_of_subgroup()):
            state = self.opt.optimizer.state.get(self.opt.fp32_partitioned_groups_flat[sub], {})
            if "step" in state and group_id not in steps:
                steps[group_id] = state["step"].clone()
        return [
            steps.get(i, torch.tensor(0.0)) for i in range(len(self.opt.optimizer.param_groups))
        ]

    def _step_states(self) -> list:
        return [
            (self.opt.optimizer.state[flat], group_id)
            for flat, group_id in zip(
                self.opt.fp32_partitioned_groups_flat, self._group_of_subgroup()
            )
            if flat in self.opt.optimizer.state
        ]

    @torch.no_grad()
    def create_zeroed_state(self, steps: list) -> None:
        for sub, group_id in enumerate(self._group_of_subgroup()):
            flat = self.opt.fp32_partitioned_groups_flat[sub]
            self.opt.optimizer.state[flat] = _fresh_state(flat, steps[group_id])

    @torch.no_grad()
    def write_local(self, param, value: torch.Tensor, key: Optional[str] = None) -> None:
        """DeepSpeed behaviour: ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``
        narrow the *unpadded* value to ``[rank * n, (rank + 1) * n)`` and fail on the last rank
        when the numel is not divisible by the data-parallel size; here the value is zero-padded
        first."""
        opt = self.opt
        value = value.detach().to(torch.float32)
        sub, offset, numel = opt.grad_position[opt.get_param_id(param)]
        flat = opt.fp32_partitioned_groups_flat[sub]
        target = flat if key is None else opt.optimizer.state[flat][key]
        rank = torch.distributed.get_rank(group=opt._get_param_partition_group(param))
        padded = torch.zeros(
            numel * torch.distributed.get_world_size(group=opt._get_param_partition_group(param)),
            dtype=torch.float32,
        )
        padded[: value.numel()] = value.reshape(-1)
        target.narrow(0, offset, numel).copy_(padded.narrow(0, rank * numel, numel))

    def refresh_model_params(self) -> None:
        opt = self.opt
        with torch.no_grad():
            for sub in range(len(opt.fp32_partitioned_groups_flat)):
                opt._reassign_or_swap_out_partitioned_parameters(sub)  # what its step() does
            if opt.persistent_parameters:
                opt.persistent_parameters[0].all_gather(opt.persistent_parameters)

    def keep_full(self, params) -> None:
        """Collective: keep ZeRO-3 parameters materialised on every rank between steps.

        DeepSpeed behaviour: ZeRO-3 frees a parameter's full data (``param.data`` becomes an empty
        tensor) outside its module's forward/backward, but the InRank growth controller reads the
        factors between optimizer steps (spectra, the cut). DeepSpeed's own mechanism for
        parameters that stay materialised is persistence (``ds_persist``, chosen by
        ``stage3_param_persistence_threshold``); the factors are added to it explicitly. Their
        gradients and optimizer state stay partitioned; ``_post_step`` re-gathers them after each
        step, as it does for every persistent parameter.
        """
        persistent = self.opt.persistent_parameters  # the same list object as parameter_offload's
        have = {id(p) for p in persistent}
        added = []
        for p in params:
            if id(p) not in have:
                p.ds_persist = True
                persistent.append(p)
                added.append(p)
        if added:
            added[0].all_gather(added)

    def _reduced_grads(self, params) -> tuple[list, Optional[list]]:
        owned = [p for p in params if p.requires_grad]
        return [self.opt.get_local_fp32_grad_for_param(p) for p in owned], owned


def optimizer_layout(engine) -> OptimizerLayout:
    """The layout of the engine's optimizer: :class:`TorchLayout` (stage 0, fp32: the client
    AdamW), :class:`FlatLayout` (ZeRO 1/2, BF16_Optimizer) or :class:`Zero3Layout`."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return Zero3Layout(engine)
    if any(
        hasattr(opt, a) for a in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition")
    ):
        return FlatLayout(engine)
    if isinstance(opt, torch.optim.Optimizer):
        return TorchLayout(engine)
    raise NotImplementedError(
        f"DeepSpeed optimizer {type(opt).__name__} is not supported by the "
        "InRank DeepSpeed backend (expected torch AdamW or a ZeRO optimizer)"
    )


# ------------------------------------------------------------------------------ reading state
class LocalState:
    """References to this rank's pieces of an engine's fp32 masters and Adam moments, by name.

    Holding a :class:`LocalState` keeps the old engine's partitions alive after
    ``engine.destroy()`` (no copy is made). :meth:`full` reassembles one parameter at a time, so a
    resize never holds more than one parameter's full state at once beyond the partitions.

    Args:
        layout: the engine's :class:`OptimizerLayout`, after at least one optimizer step (or with
            state created by :meth:`OptimizerLayout.create_zeroed_state`).
        named_params: ``(name, param)`` of the parameters to capture; ``param`` must be one the
            engine's optimizer holds (for resized factors: the *old* parameter).
    """

    def __init__(self, layout: OptimizerLayout, named_params):
        self.group_steps = layout.group_steps()
        index = layout.param_group_index()
        layout.relink()
        self.pieces = {name: layout.piece(p, index[id(p)]) for name, p in named_params}

    def names(self) -> list:
        return list(self.pieces)

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
        """The full fp32 master (``key=None``) or moment ``key`` of parameter ``name``.

        Collective over the parameter's data-parallel group (every rank, same order): each element
        is owned by exactly one rank, so a sum of zero-filled buffers reassembles it exactly.
        """
        piece = self.pieces[name]
        if piece.group is None:
            return piece.tensors[key].detach().to(torch.float32).clone().reshape(piece.shape)
        buffer = torch.zeros(piece.shape.numel(), dtype=torch.float32)
        if piece.tensors is not None and piece.numel:
            buffer.narrow(0, piece.start, piece.numel).copy_(
                piece.tensors[key].detach().reshape(-1)[: piece.numel]
            )
        torch.distributed.all_reduce(buffer, group=piece.group)
        return buffer.reshape(piece.shape)


# ---------------------------------------------------------------------------- new parameters
def parameter_attributes(module) -> set:
    """Names of the attributes the module's parameters carry before DeepSpeed touches them
    (megatron's ``tensor_model_parallel``, ``partition_dim``, ``sequence_parallel``, ...)."""
    return {key for p in module.parameters() for key in vars(p)}


def strip_deepspeed_attributes(params, keep: set) -> None:
    """Remove what DeepSpeed attached to a parameter, keeping the names in ``keep``.

    DeepSpeed behaviour: ZeRO marks its parameters with attributes (stage 3: ``ds_id``,
    ``ds_numel``, ``ds_tensor``, bound ``all_gather``/``partition``...; stage 1/2: ``_hp_mapping``,
    ``_dp_group``, bound ``get_full_hp_param``...), and ``deepspeed.initialize`` treats a parameter
    that has ``ds_id`` as already converted. The InRank layers build a resized factor with
    ``replace_parameter``, which copies every attribute of the old parameter (to keep megatron's),
    so the new factor would claim the old one's ZeRO-3 shape and partition (a later reduce-scatter
    fails with "Cannot reduce scatter gradients whose size is not same as the params").
    """
    for p in params:
        for key in [k for k in vars(p) if k not in keep]:
            delattr(p, key)


# ------------------------------------------------------------------------ ZeRO-3 parameter sizes
def full_numel(p) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (``numel()`` is then 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


# ------------------------------------------------------------------------------ engine counters
ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def engine_counters(engine) -> dict:
    """The engine's step and sample counters (``deepspeed.initialize`` starts them at 0)."""
    return {name: getattr(engine, name) for name in ENGINE_COUNTERS}


def set_engine_counters(engine, counters: dict) -> None:
    for name, value in counters.items():
        setattr(engine, name, value)
