"""Move a training checkpoint between backends, optimizer state included
(``tools/convert_checkpoint.py from-deepspeed`` / ``to-deepspeed`` are the CLI).

- ``torch`` checkpoints hold the model and AdamW's moments as one megatron dist checkpoint,
  sharded like the parameters, so they load at any TP/DP layout.
- ``deepspeed`` checkpoints are DeepSpeed's own: ZeRO partitions, bound to the layout (TP x DP)
  and ZeRO stage they were written at.

A conversion therefore runs as a short collective job at the DeepSpeed side's layout (the source's
for ``from-deepspeed``, the target's for ``to-deepspeed``): every rank builds the model twice (the
growth state restored first, so factor shapes are the checkpoint's), loads the source through its
backend's own ``load``, streams every parameter's fp32 master, Adam moments and step to the
target backend (:meth:`~inrank_megatron.training.backends.base.Backend.export_state` /
``import_state``: one parameter's full state at a time), carries the LR schedule, growth state,
data position and (same layout) RNG streams, and saves through the target backend's ``save``. The
result resumes with ``output.resume=<dst>`` under the other backend and continues the source run.

Without a launcher the CLI starts the processes itself on this machine (gloo, or NCCL with CUDA);
under torchrun / srun / mpirun the job uses the launched ranks. Everything that can be checked
without tensors (checkpoint complete, backends, layout, DeepSpeed JSON, destination) is checked
before any process starts; the destination appears only when complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Optional

from inrank_megatron.checkpoint import (
    Meta,
    check_destination,
    check_pickles,
    new_work_dir,
    read_deepspeed_meta,
    read_meta,
)
from inrank_megatron.config import ConfigError, TrainConfig, from_dict, to_dict
from inrank_megatron import rules
from inrank_megatron.deepspeed_json import read_deepspeed_json

DIRECTIONS = ("from-deepspeed", "to-deepspeed")


@dataclasses.dataclass
class ConversionPlan:
    """What :func:`run_conversion` does, checked by :func:`plan_conversion`."""

    direction: str
    src: str  # the source step directory
    dst: str  # the step directory to create
    step: int
    src_meta: dict
    src_cfg: dict  # the config the source backend is rebuilt with (to_dict form)
    dst_cfg: dict  # the config recorded in (and loaded with) the destination
    world_size: int
    vocab_size: int

    @property
    def same_ranks(self) -> bool:
        """Whether the source's per-rank RNG streams belong to this job's ranks."""
        return (
            self.world_size == self.src_meta["world_size"]
            and self.dst_cfg["parallel"]["tensor_model_parallel_size"] == self.src_meta["tp"]
        )


def _readable_json(path: str, what: str) -> str:
    """The absolute path of a readable DeepSpeed JSON (ConfigError naming ``what`` otherwise)."""
    read_deepspeed_json(path, key=what)
    return os.path.abspath(path)


def plan_conversion(
    src: str,
    dst: str,
    *,
    direction: str,
    deepspeed_config: Optional[str] = None,
    zero_stage: Optional[int] = None,
    tp: Optional[int] = None,
    world_size: Optional[int] = None,
    tokenizer_model: Optional[str] = None,
) -> ConversionPlan:
    """Check a conversion without touching tensors.

    Args:
        src: a step directory (or a run / checkpoints directory: its latest step).
        dst: the step directory to create (must not exist).
        direction: ``from-deepspeed`` (DeepSpeed -> torch) or ``to-deepspeed``.
        deepspeed_config: the DeepSpeed JSON. ``to-deepspeed``: required (the target's ZeRO
            settings). ``from-deepspeed``: the one the source trained with (default: the path its
            config records; ZeRO-3's ``sub_group_size`` shapes the saved partitions).
        zero_stage: ``to-deepspeed``: overrides the JSON's ``zero_optimization.stage``.
        tp, world_size: ``to-deepspeed``: the target layout (default: the source's TP, and TP x
            the source's PP x DP processes; DeepSpeed runs without pipeline stages).
            ``from-deepspeed`` runs at the source's layout; the torch checkpoint it writes loads
            at any.
        tokenizer_model: SentencePiece model when the recorded relative path does not resolve.

    Raises:
        ConfigError / CheckpointError: naming the argument, key or file; nothing is written.
    """
    from inrank_megatron.checkpoint.reader import checkpoint_vocab_size, read_checkpoint_config
    from inrank_megatron.checkpoint.deepspeed import check_deepspeed_checkpoint
    from inrank_megatron.deepspeed_json import check_deepspeed_config

    if direction not in DIRECTIONS:
        raise ConfigError(f"direction {direction!r}; expected one of {DIRECTIONS}")
    step_dir, meta, cfg = read_checkpoint_config(src)
    check_pickles(step_dir)  # a file that names code is refused before any process starts
    dst = check_destination(step_dir, dst)
    backend = meta.backend
    want = "deepspeed" if direction == "from-deepspeed" else "torch"
    if backend != want:
        raise ConfigError(
            f"{step_dir} was written by backend {backend!r}; {direction} expects a "
            f"{want!r} checkpoint"
        )
    if meta.weights_only:
        raise ConfigError(
            f"{step_dir} holds weights only (no optimizer state to convert); "
            "resume it directly with any parallel.backend"
        )
    if cfg.train.precision == "fp16":
        raise ConfigError(
            f"{step_dir} trained with train.precision='fp16': the two backends' "
            "loss scalers keep different state; convert bf16 or fp32 runs"
        )
    src_cfg, dst_cfg = from_dict(to_dict(cfg)), from_dict(to_dict(cfg))
    if direction == "from-deepspeed":
        if any(v is not None for v in (zero_stage, tp, world_size)):
            raise ConfigError(
                "from-deepspeed runs at the DeepSpeed checkpoint's own layout and "
                "stage; --zero-stage/--tp/--world-size are for to-deepspeed (the "
                "torch checkpoint it writes resumes at any TP/DP layout)"
            )
        check_deepspeed_checkpoint(step_dir)
        recorded_stage = read_deepspeed_meta(step_dir)["zero_stage"]
        path = deepspeed_config or cfg.parallel.deepspeed_config
        if path is None or not os.path.isfile(path):
            raise ConfigError(
                f"the source's DeepSpeed JSON {path!r} (parallel.deepspeed_config) "
                f"is not found from {os.getcwd()}; pass --deepspeed-config with the "
                "JSON it trained with"
            )
        src_cfg.parallel.deepspeed_config = _readable_json(path, "--deepspeed-config")
        src_cfg.parallel.zero_stage = recorded_stage
        dst_cfg.parallel.backend = "torch"
        dst_cfg.parallel.deepspeed_config = None
        dst_cfg.parallel.zero_stage = None
        world = meta.world_size
        check_deepspeed_config(src_cfg, world)
    else:
        if deepspeed_config is None:
            raise ConfigError(
                "to-deepspeed needs --deepspeed-config (the target's ZeRO settings, "
                "e.g. configs/deepspeed/zero2.json)"
            )
        if zero_stage is not None and zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage {zero_stage}; expected 0, 1, 2 or 3")
        for name, value in (("--tp", tp), ("--world-size", world_size)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} {value}; expected a positive integer")
        for c in (src_cfg, dst_cfg):  # DeepSpeed runs TP x DP; the torch source loads at any
            c.parallel.pipeline_model_parallel_size = 1
        dst_cfg.parallel.backend = "deepspeed"
        dst_cfg.parallel.deepspeed_config = _readable_json(deepspeed_config, "--deepspeed-config")
        dst_cfg.parallel.zero_stage = zero_stage
        if tp is not None:
            dst_cfg.parallel.tensor_model_parallel_size = tp
            src_cfg.parallel.tensor_model_parallel_size = tp
        world = world_size or dst_cfg.parallel.tensor_model_parallel_size * meta.pp * meta.dp
        rules.validate(src_cfg, world)
        check_deepspeed_config(dst_cfg, world)
    rules.validate(dst_cfg, world)
    rules.validate(dst_cfg, scopes=("machine",))  # what this machine cannot run (megatron, no CUDA)
    vocab = checkpoint_vocab_size(cfg, tokenizer_model)
    return ConversionPlan(
        direction=direction,
        src=os.path.abspath(step_dir),
        dst=dst,
        step=meta.step,
        src_meta=meta.to_json(),
        src_cfg=to_dict(src_cfg),
        dst_cfg=to_dict(dst_cfg),
        world_size=world,
        vocab_size=vocab,
    )


def _build(cfg: TrainConfig, plan: ConversionPlan, groups):
    """Model (with the checkpoint's growth state and factor shapes), controller and backend."""
    from inrank_megatron.growth.controller import GrowthController
    from inrank_megatron.checkpoint import manager as ckpt
    from inrank_megatron.training.backends import build_backend
    from inrank_megatron.models.gpt import build_model

    model = build_model(cfg, plan.vocab_size, groups.tp_size)
    controller = GrowthController(
        model, stage1_steps=cfg.inrank.stage1_steps if cfg.model.inrank else None
    )
    ckpt.load_growth_state(plan.src, controller)
    return controller, build_backend(cfg, model, groups)


def run_conversion(plan: ConversionPlan, *, dist_backend: str = "gloo") -> dict:
    """Collective: one call per rank of a ``plan.world_size``-process job (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` in the environment). Returns the new meta."""
    import torch

    from inrank_megatron.checkpoint import manager as ckpt
    from inrank_megatron.training.backends import deepspeed_compat as compat
    from inrank_megatron.training.parallel import (
        init_parallel,
        rng_state,
        set_seeds,
        shutdown,
    )

    src_cfg, dst_cfg = from_dict(plan.src_cfg), from_dict(plan.dst_cfg)
    tp = dst_cfg.parallel.tensor_model_parallel_size
    groups = init_parallel(tp, 1, backend=dist_backend)
    try:
        if groups.world_size != plan.world_size:
            raise ConfigError(
                f"the conversion runs on {plan.world_size} processes (the DeepSpeed "
                f"side's layout), launched with {groups.world_size}"
            )
        set_seeds(src_cfg.train.seed)
        _, source = _build(src_cfg, plan, groups)
        ckpt.load_backend_state(plan.src, source)
        controller, target = _build(dst_cfg, plan, groups)
        target.import_state(source.export_state())
        target.scheduler.load_state_dict(source.scheduler.state_dict())
        target.scheduler.step(0)  # the restored step's lr and weight decay into the groups
        if target.name == "deepspeed":  # what DeepSpeed's own run counts after plan.step steps
            t = dst_cfg.train
            compat.set_engine_counters(
                target.engine,
                {
                    "global_steps": plan.step,
                    "global_samples": plan.step * t.global_batch_size,
                    "micro_steps": plan.step * target.engine.gradient_accumulation_steps(),
                    "skipped_steps": 0,
                },
            )
        if plan.same_ranks:
            rng = ckpt.load_rng_state(plan.src, groups.rank)
        else:  # what the loop derives when it resumes at another layout
            set_seeds(dst_cfg.train.seed + plan.step)
            rng = rng_state()
        meta = Meta.from_json(plan.src_meta).replace(
            world_size=groups.world_size,
            tp=groups.tp_size,
            pp=groups.pp_size,
            dp=groups.dp_size,
            backend=target.name,
            config=plan.dst_cfg,
            converted_from=plan.src,
        )
        # A checkpoints/ of our own next to dst (a fresh name: nothing of the user's is touched).
        box = [new_work_dir(plan.dst) if groups.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        root = box[0]
        try:
            written = ckpt.save_training_checkpoint(
                root,
                plan.step,
                controller=controller,
                backend=target,
                groups=groups,
                rng=rng,
                meta=meta,
            )
            if groups.rank == 0:
                os.rename(written, plan.dst)
        finally:
            if groups.rank == 0:
                shutil.rmtree(root, ignore_errors=True)
        torch.distributed.barrier()
        return meta.replace(step=plan.step).to_json()
    finally:
        shutdown()


def _spawned(rank: int, plan: ConversionPlan, port: int, dist_backend: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(plan.world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    run_conversion(plan, dist_backend=dist_backend)


def convert_backend(src: str, dst: str, *, direction: str, **options) -> dict:
    """Plan, then run the conversion: on the launched ranks under torchrun / srun / mpirun (the
    launch must have ``plan.world_size`` processes), else on that many local processes started
    here. Returns the destination's meta. Options: see :func:`plan_conversion`."""
    from inrank_megatron.launch_env import DIST_VARS, free_port, init_distributed_env

    plan = plan_conversion(src, dst, direction=direction, **options)
    resolved = dict(os.environ)
    env = init_distributed_env(resolved)
    if env["launcher"] != "single":
        os.environ.update({name: resolved[name] for name in DIST_VARS})  # for env:// rendezvous
        if env["world_size"] != plan.world_size:
            raise ConfigError(
                f"launched with {env['world_size']} processes; this conversion "
                f"runs on {plan.world_size} (the DeepSpeed side's TP x DP layout)"
            )
        return run_conversion(plan, dist_backend=env["backend"])
    import torch.multiprocessing

    torch.multiprocessing.start_processes(
        _spawned,
        args=(plan, free_port(), env["backend"]),
        nprocs=plan.world_size,
        start_method="spawn",
    )
    return read_meta(plan.dst).to_json()
