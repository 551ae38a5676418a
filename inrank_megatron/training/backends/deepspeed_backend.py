"""The DeepSpeed backend: ZeRO stage 0-3 around megatron.core's GPTModel, torch AdamW inside
DeepSpeed's optimizer, megatron's LR scheduler, and InRank resizes that carry the optimizer state.

    torchrun --nproc_per_node 2 -m inrank_megatron.train --config configs/tiny-cpu.yaml \\
        parallel.backend=deepspeed parallel.tensor_model_parallel_size=1 \\
        parallel.deepspeed_config=configs/deepspeed/zero2.json

What comes from where:

- The DeepSpeed JSON holds ZeRO settings only; batch sizes, ``gradient_clipping`` and bf16/fp16
  are written into it from the YAML (:func:`deepspeed_config`); a JSON that sets them otherwise is
  refused (:func:`check_deepspeed_config`).
- ``torch.optim.AdamW`` over the param groups of every backend (``training.optim.param_groups``):
  dense matrices (decayed), 1-D parameters (not decayed) and the InRank factors in a group of
  their own (``inrank.lr_multiplier``, ``inrank.frobenius_decay``), which ZeRO also needs because
  it keeps one Adam ``step`` per group (a ``reset`` cut restarts the factors' step: core
  ``resize_state``). megatron's ``OptimizerParamScheduler``
  sets the groups' lr and weight decay once per optimizer step, as in the torch backend.
- ``mpu=`` is :class:`~inrank_megatron.training.backends.deepspeed_compat.MegatronMPU`, so that
  ZeRO partitions over megatron's data-parallel group and counts TP shards once in the norm.

A resize (the stage cut, cumulative capacity growth) is ``Backend.resize``: this rank's pieces of
the old optimizer state are kept (no copy), the engine is rebuilt around the module with the new
factors (:meth:`DeepSpeedBackend._rebuild`), and every parameter's fp32 master, Adam moments and
step move over by name, one parameter at a time, through the resize policy
(:func:`inrank_megatron.core.resize_state`). Every DeepSpeed workaround lives in
:mod:`~inrank_megatron.training.backends.deepspeed_compat`.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import os
import tempfile
from typing import Optional

import torch

from inrank_megatron.checkpoint_format import (
    DEEPSPEED_DIR, DEEPSPEED_META_FILE, GROWTH_FILE, CheckpointError, check_destination,
    check_pickles, read_deepspeed_meta, read_growth, safe_loading, safe_torch_load,
    write_deepspeed_meta,
)
from inrank_megatron.config import ConfigError, TrainConfig, data_parallel_size
from inrank_megatron.core.resize import MOMENTS
from inrank_megatron.growth.controller import named_inrank_layers
from inrank_megatron.rules import DEEPSPEED_KEY, read_deepspeed_json, zero_stage
from inrank_megatron.training.backends import deepspeed_compat as compat
from inrank_megatron.training.backends.base import Backend
from inrank_megatron.training.optim import (
    build_scheduler, factor_params, global_grad_norm, param_groups,
)

TAG = DEEPSPEED_DIR  # the DeepSpeed checkpoint lives in <step dir>/deepspeed/
# JSON keys the YAML owns: (DeepSpeed key, YAML key).
_FROM_YAML = (("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
              ("gradient_accumulation_steps", "train.global_batch_size / (train.micro_batch_size"
                                              " * data-parallel size)"),
              ("train_batch_size", "train.global_batch_size"),
              ("gradient_clipping", "train.clip_grad"))


# ------------------------------------------------------------------------------- configuration
def _world_size(world_size: Optional[int]) -> Optional[int]:
    if world_size is not None:
        return world_size
    env = os.environ.get("WORLD_SIZE", "")
    return int(env) if env.isdigit() and int(env) > 0 else None


def _yaml_values(cfg: TrainConfig, world_size: Optional[int]) -> dict:
    t = cfg.train
    values = {"train_micro_batch_size_per_gpu": t.micro_batch_size,
              "train_batch_size": t.global_batch_size, "gradient_clipping": float(t.clip_grad)}
    if world_size is not None:
        dp = data_parallel_size(cfg, world_size)
        values["gradient_accumulation_steps"] = t.global_batch_size // (t.micro_batch_size * dp)
    return values


def check_deepspeed_config(cfg: TrainConfig, world_size: Optional[int] = None) -> None:
    """Refuse, before training starts, a DeepSpeed JSON that DeepSpeed would reject, that
    contradicts the YAML, or that asks for what this backend does not support.

    Args:
        cfg: the run's configuration (a no-op unless ``parallel.backend=deepspeed``).
        world_size: processes of the run; default ``$WORLD_SIZE`` (without it the
            ``gradient_accumulation_steps`` comparison is skipped).

    Raises:
        ConfigError: naming the JSON key and the YAML key it conflicts with.
    """
    p, t = cfg.parallel, cfg.train
    if p.backend != "deepspeed":
        return
    ds = read_deepspeed_json(cfg.parallel.deepspeed_config)
    path = p.deepspeed_config
    where = f"{DEEPSPEED_KEY}={path!r}"
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{where} has a {key!r} section, which this backend does not use "
                              "(it builds torch AdamW and megatron's LR schedule from train.*); "
                              "remove it")
    if ds.get("zero_allow_untested_optimizer", True) is not True:
        raise ConfigError(f"{where} sets zero_allow_untested_optimizer="
                          f"{ds['zero_allow_untested_optimizer']!r}; the backend runs ZeRO with "
                          "torch AdamW, which needs true (or leave the key out)")
    for ds_key, value in _yaml_values(cfg, _world_size(world_size)).items():
        if ds_key in ds and ds[ds_key] != value:
            yaml_key = dict(_FROM_YAML)[ds_key]
            raise ConfigError(f"{where} sets {ds_key}={ds[ds_key]!r} but {yaml_key} gives "
                              f"{value!r}; remove {ds_key} from the JSON (the backend writes it "
                              "from the YAML) or make them agree")
    for name, precision in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
        if name not in ds:
            continue
        section = ds[name]
        enabled = section.get("enabled", False) if isinstance(section, dict) else section
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}: {name}.enabled={enabled!r}; expected true or false "
                              "(or leave the section out: train.precision decides)")
        if enabled != (t.precision == precision):
            raise ConfigError(f"{where} sets {name}.enabled={str(enabled).lower()} but "
                              f"train.precision={t.precision!r}; remove the {name} section (the "
                              "backend writes it from train.precision) or make them agree")
    if t.precision == "fp16" and not torch.cuda.is_available() and not _cpu_fp16_supported():
        raise ConfigError("train.precision='fp16' with parallel.backend=deepspeed: DeepSpeed's CPU "
                          "accelerator has no fp16 support on this machine (no mkldnn fp16); "
                          "expected fp32 or bf16")
    stage = zero_stage(cfg, ds)
    if stage == 0 and t.precision != "fp32":
        raise ConfigError(f"train.precision={t.precision!r} with ZeRO stage 0 ({where}, "
                          "parallel.zero_stage): DeepSpeed then wraps AdamW in its "
                          "FP16_UnfusedOptimizer, whose fp32 masters resizes cannot move; expected "
                          "train.precision=fp32 or zero_optimization.stage >= 1")
    for key in ("tensor_parallel", "sequence_parallel_size", "data_parallel_size", "pipeline"):
        if key in ds:
            raise ConfigError(f"{where} sets {key!r}: model parallelism comes from megatron "
                              "(parallel.tensor_model_parallel_size) and data parallelism takes "
                              "the remaining ranks; remove it")
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object, got {zero!r}")
    zero = dict(zero)
    if p.zero_stage is not None:
        zero["stage"] = p.zero_stage
    from pydantic import ValidationError

    from deepspeed.runtime import config as ds_config_module
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        ds_config_module._reject_removed_config_keys(ds)  # e.g. MiCS, elasticity
    except ds_config_module.DeepSpeedConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    try:
        zc = DeepSpeedZeroConfig(**zero)
    except ValidationError as error:
        first = error.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{where}: zero_optimization.{loc}: {first['msg']} (got "
                          f"{first.get('input')!r}); DeepSpeed would refuse it") from None
    for name in ("offload_param", "offload_optimizer"):
        offload = getattr(zc, name)
        if offload is not None and str(getattr(offload.device, "value", offload.device)) != "none":
            raise ConfigError(f"{where}: zero_optimization.{name} is not supported by this "
                              "backend (its optimizer is torch AdamW, whose state moves by name at "
                              "resizes; offloading needs DeepSpeed's CPU Adam); remove it")
    if zc.zero_hpz_partition_size > 1:
        raise ConfigError(f"{where}: zero_optimization.zero_hpz_partition_size="
                          f"{zc.zero_hpz_partition_size} (ZeRO++ hpZ) partitions parameters over "
                          "groups other than data parallelism, which resizes do not handle; "
                          "remove it")
    if zc.zero_quantized_weights or zc.zero_quantized_gradients:
        raise ConfigError(f"{where}: zero_optimization.zero_quantized_weights / "
                          "zero_quantized_gradients (ZeRO++) need CUDA kernels and break exact "
                          "state moves at resizes; remove them")


def _cpu_fp16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:  # noqa: BLE001 - older torch builds lack the op
        return False


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The JSON merged with the YAML: batch sizes, clipping, precision, ZeRO stage."""
    check_deepspeed_config(cfg, world_size)
    ds = copy.deepcopy(read_deepspeed_json(cfg.parallel.deepspeed_config))
    ds.update(_yaml_values(cfg, world_size))
    ds["zero_optimization"] = dict(ds.get("zero_optimization") or {})
    ds["zero_optimization"]["stage"] = zero_stage(cfg, ds)
    ds.pop("bfloat16", None)
    ds["bf16"] = dict(ds.get("bf16") or {}, enabled=cfg.train.precision == "bf16")
    ds["fp16"] = dict(ds.get("fp16") or {}, enabled=cfg.train.precision == "fp16")
    if cfg.train.precision == "fp16":
        ds["fp16"].setdefault("initial_scale_power", int(round(math.log2(
            cfg.train.initial_loss_scale))))
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 2**62)  # the training loop logs
    return ds


# ---------------------------------------------------------------------------------- the backend
class DeepSpeedBackend(Backend):
    """Args: cfg (TrainConfig), model (megatron GPTModel on this rank), groups (ParallelGroups)."""

    name = "deepspeed"

    def __init__(self, cfg, model, groups):
        super().__init__(cfg, model, groups)
        compat.skip_shm_op_build()
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.ds_config = deepspeed_config(cfg, groups.world_size)
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.mpu = compat.MegatronMPU()
        self._megatron_attributes = compat.parameter_attributes(model)
        self.engine = self._build_engine()
        self.scheduler = build_scheduler(cfg, self.engine.optimizer)
        self.scheduler.step(0)  # set the step-0 learning rate in the groups

    # ---- engine -------------------------------------------------------------------------------

    def _build_engine(self):
        import deepspeed

        t = self.cfg.train
        optimizer = torch.optim.AdamW(param_groups(self.model, self.cfg), lr=t.lr,
                                      betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                      weight_decay=t.weight_decay)
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                               config=copy.deepcopy(self.ds_config), mpu=self.mpu)
        compat.keep_full(engine, factor_params(self.model))
        self._state_linked = False
        return engine

    # ---- one optimizer step -----------------------------------------------------------------

    def forward_backward(self, batch: dict, num_microbatches: int, *, last: bool) -> torch.Tensor:
        """DeepSpeed's protocol per micro-batch: forward, ``engine.backward`` (which divides by
        ``gradient_accumulation_steps``, as the torch backend divides by ``num_microbatches``),
        ``engine.step`` (a no-op before the accumulation boundary). The boundary's step is
        :meth:`step`'s."""
        engine = self.engine
        gas = engine.gradient_accumulation_steps()
        if num_microbatches != gas:
            raise ValueError(f"{num_microbatches} micro-batches per step, but the DeepSpeed config "
                             f"has gradient_accumulation_steps={gas}")
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary != last:
            raise RuntimeError("DeepSpeed's micro-step counter is out of step with the loop "
                               f"(boundary={boundary}, last={last})")
        loss = self.loss(engine, batch)
        penalty = self.frobenius_penalty() if last else None
        # engine.backward divides by gradient_accumulation_steps (= num_microbatches).
        engine.backward(loss if penalty is None else loss + num_microbatches * penalty)
        if not last:
            engine.step()
        return loss.detach()

    def step(self) -> dict:
        engine = self.engine
        if self.groups.tp_size > 1 and self.cfg.parallel.sequence_parallel:
            partial = [p for p in self.model.parameters() if getattr(p, "sequence_parallel", False)]
            compat.allreduce_sequence_parallel_grads(engine, partial, self.groups.tp_group)
        norm = None
        if compat.optimizer_layout(engine) == "torch":
            # Stage 0 in fp32 clips inside engine.step (deepspeed.runtime.utils.clip_grad_norm_)
            # without keeping the norm; the gradients are already averaged over DP here.
            params = [p for g in engine.optimizer.param_groups for p in g["params"]]
            norm = global_grad_norm(params, tp_group=self.groups.tp_group,
                                    tp_rank=self.groups.tp_rank)
        engine.step()
        if not self._state_linked:
            compat.relink_optimizer_state(engine)
            self._state_linked = True
        self.scheduler.step(1)
        if norm is None:
            norm = engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        scale = engine._get_optimizer_loss_scale() if self.cfg.train.precision == "fp16" else None
        return {"grad_norm": norm, "lr": self.lr(), "loss_scale": scale}

    def lr(self) -> float:
        return self.engine.optimizer.param_groups[0]["lr"]

    # ---- resize ------------------------------------------------------------------------------

    def _rebuild(self, resizes) -> None:
        """Destroy the engine and build a new one around the resized factors (``Backend.resize``
        moves every parameter's fp32 master and Adam moments to it by name, through
        :func:`inrank_megatron.core.resize_state` for the resized factors, bit for bit for the
        rest). Engine counters (``global_steps``, ``global_samples``, micro-steps) and megatron's
        scheduler continue.

        Memory: :meth:`export_state`'s references keep this rank's old partitions alive until the
        move is done (no copy), the new engine allocates its own, and at most one parameter's full
        master and moments are materialised at a time (``tools/bench_resize.py`` measures the
        peak).
        """
        compat.strip_deepspeed_attributes([new for e in resizes for _, _, new in e.pairs()],
                                          self._megatron_attributes)
        counters = compat.engine_counters(self.engine)
        self.engine.destroy()
        self.engine = None
        gc.collect()
        self.engine = self._build_engine()
        compat.set_engine_counters(self.engine, counters)
        self.scheduler.optimizer = self.engine.optimizer
        self.scheduler.step(0)  # the current lr and weight decay into the new groups

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """DeepSpeed's checkpoint under ``path/deepspeed/`` (module, ZeRO partitions, our LR
        scheduler as client state) and ``path/inrank_deepspeed.json`` (shapes, TP layout)."""
        self.engine.save_checkpoint(path, tag=TAG, save_latest=False, client_state={
            "inrank_scheduler": self.scheduler.state_dict(),
            "inrank_adam_steps": [float(s) for s in compat.group_steps(self.engine)]})
        if self.groups.rank == 0:
            meta = {"zero_stage": self.stage, "tp": self.groups.tp_size, "dp": self.groups.dp_size,
                    "precision": self.cfg.train.precision, "params": {}}
            for name, p in self.model.named_parameters():
                shape = getattr(p, "ds_shape", p.shape)
                meta["params"][name] = {
                    "shape": list(shape),
                    "tensor_model_parallel": bool(getattr(p, "tensor_model_parallel", False)),
                    "partition_dim": int(getattr(p, "partition_dim", -1))}
            write_deepspeed_meta(path, meta)
        torch.distributed.barrier()

    def load(self, path: str) -> None:
        check_deepspeed_checkpoint(path)
        load_path, client = self.engine.load_checkpoint(
            path, tag=TAG, load_module_strict=True, load_optimizer_states=True,
            load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"{os.path.join(path, TAG)}: no DeepSpeed checkpoint (written "
                                    "by another backend?)")
        # ZeRO-3 restores one Adam step for every group; the factor group's may differ.
        compat.set_group_steps(self.engine, client["inrank_adam_steps"])
        compat.relink_optimizer_state(self.engine)
        self._state_linked = True
        compat.refresh_model_params(self.engine)
        self.scheduler.load_state_dict(client["inrank_scheduler"])


    # ---- backend-neutral state ---------------------------------------------------------------

    def export_state(self, named=None):
        named = named if named is not None else self._trainable()
        state = compat.LocalState(self.engine, named)  # this rank's pieces, referenced now

        def items():
            for name, _ in named:
                step = float(state.group_steps[state.pieces[name].param_group])
                yield name, state.full(name), {k: state.full(name, k) for k in MOMENTS}, step

        return items()

    def import_state(self, items) -> None:
        """Zeroed state is created first, then each item's master and moments are written to this
        rank's partitions. ZeRO keeps one Adam step per param group: the items of one group
        must agree (a ValueError names the parameter otherwise)."""
        groups = param_groups(self.model, self.cfg)
        group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        steps = [None] * len(groups)
        compat.create_zeroed_state(self.engine, [torch.tensor(0.0)] * len(groups))
        params = dict(self._trainable())
        for name, master, moments, step in items:
            p = params.pop(name)
            gi = group_of[id(p)]
            if steps[gi] is None:
                steps[gi] = float(step)
            elif steps[gi] != float(step):
                raise ValueError(f"parameter {name} has Adam step {step:g}, other parameters of "
                                 f"its DeepSpeed param group {groups[gi]['name']!r} have "
                                 f"{steps[gi]:g}; ZeRO keeps one step per group")
            compat.write_local(self.engine, p, master)
            for k in MOMENTS:
                compat.write_local(self.engine, p, moments[k], k)
        if params:
            raise RuntimeError(f"import_state: no state given for {sorted(params)[:3]}")
        compat.set_group_steps(self.engine, [s or 0.0 for s in steps])
        compat.relink_optimizer_state(self.engine)
        self._state_linked = True
        compat.refresh_model_params(self.engine)


# ----------------------------------------------------------------------- checkpoint inspection
def check_deepspeed_checkpoint(path: str) -> None:
    """Refuse a checkpoint whose factor shapes contradict its recorded growth state.

    Reads ``inrank_growth.json`` and ``inrank_deepspeed.json`` only (no tensors). Each InRank
    layer's ``A`` / ``B`` must have ``allocated_slots`` slots, its active slots (rank + buffer)
    must fit, and a layer past the cut must hold exactly its rank.

    Raises:
        ConfigError: naming the checkpoint, the parameter and both numbers.
    """
    for name in (DEEPSPEED_META_FILE, GROWTH_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise ConfigError(f"output.resume: {path} is not a DeepSpeed checkpoint of this "
                              f"project ({name} missing)")
    try:
        shapes = {name: info["shape"] for name, info in read_deepspeed_meta(path)["params"].items()}
        growth = read_growth(path)
    except CheckpointError as error:
        raise ConfigError(f"output.resume: {error}") from None
    for layer, state in sorted(growth.items()):
        g, slots = state["growth"], int(state["allocated_slots"])
        where = (f"output.resume: checkpoint {path}, layer {layer}: {GROWTH_FILE} records "
                 f"rank={g['rank']}, buffer={g['buffer']}, stage={g['stage']}, "
                 f"allocated_slots={slots}")
        if g["rank"] + g["buffer"] > slots or (g["stage"] == "fixed" and slots != g["rank"]):
            raise ConfigError(f"{where}, which is inconsistent (expected rank + buffer <= "
                              "allocated_slots, and allocated_slots == rank after the cut)")
        for role, dim in (("A", 0), ("B", 1)):
            name = f"{layer}.{role}"
            if name not in shapes:
                raise ConfigError(f"{where}, but the DeepSpeed checkpoint has no parameter {name}")
            if shapes[name][dim] != slots:
                raise ConfigError(f"{where}, but its parameter {name} has shape {shapes[name]} "
                                  f"({shapes[name][dim]} slots); the checkpoint's factors and "
                                  "growth state do not belong together")


def _model_state_file(ds_dir: str, stage: int, mp: int) -> str:
    if stage == 3:
        return os.path.join(ds_dir, f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt")
    return os.path.join(ds_dir, f"mp_rank_{mp:02d}_model_states.pt")


def _fp32_state_of_mp_rank(ds_dir: str, stage: int, mp: int, tp: int) -> dict:
    """The fp32 master state dict of one TP rank's model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    optim = [f for f in os.listdir(ds_dir)
             if f.endswith(f"mp_rank_{mp:02d}_optim_states.pt") and "zero_pp_rank" in f]
    if stage == 0 and not optim:
        # ZeRO stage 0 in fp32 saves the full module; its parameters are the masters.
        state = safe_torch_load(_model_state_file(ds_dir, stage, mp), map_location="cpu")["module"]
        return {k: v.float() for k, v in state.items() if torch.is_tensor(v)}
    if tp == 1:
        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ds_dir),
                                                        tag=os.path.basename(ds_dir))
    # deepspeed.utils.zero_to_fp32 globs every *_optim_states.pt of the directory and expects one
    # per data-parallel rank; with TP it would see TP x DP files. Give it one TP rank's files.
    with tempfile.TemporaryDirectory() as root:
        view = os.path.join(root, TAG)
        os.makedirs(view)
        for f in os.listdir(ds_dir):
            if f"mp_rank_{mp:02d}_" in f:
                os.symlink(os.path.join(os.path.abspath(ds_dir), f), os.path.join(view, f))
        return get_fp32_state_dict_from_zero_checkpoint(root, tag=TAG)


def consolidate_checkpoint(step_dir: str) -> dict:
    """One fp32 state dict of the full model (TP shards joined) from a DeepSpeed checkpoint of
    ours at any ZeRO stage, keyed by the model's parameter names, plus the growth state.

    Args:
        step_dir: a training checkpoint directory (``.../checkpoints/step_000100``).

    Returns:
        ``{"state_dict": {name: fp32 tensor}, "inrank_growth": {...}, "meta": {...}}``.
    """
    ds_dir = os.path.join(step_dir, TAG)
    if not os.path.isfile(os.path.join(step_dir, DEEPSPEED_META_FILE)) or not os.path.isdir(ds_dir):
        raise FileNotFoundError(f"{step_dir} is not a DeepSpeed checkpoint of this project "
                                f"({DEEPSPEED_META_FILE} or {TAG}/ missing)")
    meta = read_deepspeed_meta(step_dir)
    tp, stage = meta["tp"], meta["zero_stage"]
    check_pickles(step_dir)  # refuse a file that names code before DeepSpeed opens any
    with safe_loading(step_dir):  # DeepSpeed's zero_to_fp32 loads with weights_only=False
        shards = [_fp32_state_of_mp_rank(ds_dir, stage, mp, tp) for mp in range(tp)]
    state = {}
    for name in shards[0]:
        info = meta["params"].get(name)
        if tp > 1 and info is not None and info["tensor_model_parallel"]:
            state[name] = torch.cat([s[name] for s in shards], dim=info["partition_dim"])
        else:
            state[name] = shards[0][name]
    missing = sorted(set(meta["params"]) - set(state))
    if missing:
        raise ValueError(f"{step_dir}: consolidated state lacks parameters {missing[:3]}")
    growth = read_growth(step_dir)
    return {"state_dict": {k: v.contiguous() for k, v in state.items()},
            "inrank_growth": growth, "meta": meta}


def save_consolidated(step_dir: str, out: str) -> dict:
    """Write :func:`consolidate_checkpoint` to ``out``: ``.pt`` (torch.save of the whole dict) or
    ``.safetensors`` (the state dict; growth state and meta as JSON metadata). Returns it."""
    check_destination(step_dir, out)
    if not out.endswith((".safetensors", ".pt")):
        raise ValueError(f"{out}: expected a .pt or .safetensors output path")
    result = consolidate_checkpoint(step_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".part",
                               dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(result["state_dict"], tmp,
                  metadata={"inrank_growth": json.dumps(result["inrank_growth"]),
                            "inrank_deepspeed": json.dumps(result["meta"])})
    else:
        torch.save(result, tmp)
    if os.path.lexists(out):  # appeared meanwhile: still never overwritten
        os.unlink(tmp)
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    os.rename(tmp, out)
    return result
