"""The one training loop: megatron.core GPTModel with the InRank spec, any backend, through both
InRank stages, with evaluation, metrics, checkpoints and resume.

Per optimizer step: forward/backward each micro-batch, ``backend.step()`` (reduce, clip, AdamW,
LR schedule), then ``controller.step(step)`` (due rank checks, the stage cut) and
``backend.resize(...)`` for any reallocation, so growth always sees the updated weights and the
optimizer state follows the factors.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch

from inrank_megatron.checkpoint import CHECKPOINTS_DIR, Meta, read_meta
from inrank_megatron.config import TrainConfig, save_config, to_dict
from inrank_megatron.core.validation import NonFiniteValueError
from inrank_megatron.growth.controller import GrowthController
from inrank_megatron.models.gpt import build_model
from inrank_megatron.checkpoint import manager as ckpt
from inrank_megatron.training import finite
from inrank_megatron.training.backends import build_backend
from inrank_megatron.training.console import Console
from inrank_megatron.training.data import (
    build_datasets,
    data_report,
    eval_microbatches,
    prepare_data,
    step_microbatches,
)
from inrank_megatron.training.parallel import (
    ParallelGroups,
    init_parallel,
    rng_state,
    set_rng_state,
    set_seeds,
)
from inrank_megatron.training.stop import StopRequest, deferred, reason, step_sync
from inrank_megatron.training.throughput import Throughput, default_peak_tflops


class _Averager:
    """Mean of a per-rank scalar over the data-parallel group."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def __call__(self, values) -> float:
        t = torch.tensor([float(sum(values)), float(len(values))], dtype=torch.float64)
        if self.groups.dp_size > 1:
            torch.distributed.all_reduce(t, group=self.groups.dp_group)
        return (t[0] / t[1]).item()


def train(
    cfg: TrainConfig,
    *,
    resume_path=None,
    fixed_ranks=None,
    dist_backend: str = "gloo",
    stop: Optional[StopRequest] = None,
) -> dict:
    """Run the configured job on this rank.

    Args:
        cfg: the run's configuration, validated (:func:`inrank_megatron.rules.validate`).
        resume_path: the checkpoint to resume (:mod:`inrank_megatron.checkpoint.resume`).
        fixed_ranks: ``inrank.fixed_ranks`` resolved by the pre-flight
            (:func:`~inrank_megatron.training.fixed_ranks.resolve_fixed_ranks`); None: resolved
            here when needed.
        dist_backend: the torch.distributed backend (gloo or nccl).
        stop: the signals this process recorded and its time budget (training/stop.py);
            default: ``train.exit_duration_mins`` from now, no signal handlers.

    Returns:
        The summary (also written to summary.json); ``stopped`` names what ended the run early
        (``"SIGTERM"``, ``"SIGUSR1"``, ``"time limit"``), None otherwise.
    """
    t0 = time.time()
    groups = init_parallel(
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        backend=dist_backend,
    )
    out = cfg.output.dir
    ckpt_root = os.path.join(out, CHECKPOINTS_DIR)
    if groups.rank == 0:
        os.makedirs(out, exist_ok=True)
        ckpt.remove_partial_saves(
            ckpt_root
        )  # this output.dir's interrupted saves (we hold its lock)
        save_config(cfg, os.path.join(out, "config.yaml"))
        prepare_data(cfg)
    torch.distributed.barrier()

    from inrank_megatron.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_model)
    datasets = build_datasets(cfg, tokenizer, groups.dp_size)
    set_seeds(cfg.train.seed)
    model = build_model(cfg, tokenizer.vocab_size, groups.tp_size)
    controller = GrowthController(
        model, stage1_steps=cfg.inrank.stage1_steps if cfg.model.inrank else None
    )
    if resume_path is None and cfg.model.inrank and cfg.inrank.fixed_ranks is not None:
        if fixed_ranks is None:  # a resumed run takes its ranks from the checkpoint
            from inrank_megatron.training.fixed_ranks import resolve_fixed_ranks

            fixed_ranks = resolve_fixed_ranks(cfg)
        for name, layer in controller.layers:
            layer.fix_rank(fixed_ranks[name])
    start_step, weights_only = 0, False
    if resume_path is not None:
        meta = read_meta(resume_path)
        start_step = meta.step
        ckpt.load_growth_state(resume_path, controller)  # reshapes cut factors before the build
        # A checkpoint with only weights (tools/import_hf.py): load them before the backend copies
        # the module, and start the optimizer fresh.
        weights_only = meta.weights_only
        if weights_only:
            ckpt.load_model_weights(resume_path, model)
    backend = build_backend(cfg, model, groups)
    if resume_path is not None and not weights_only:
        ckpt.load_backend_state(resume_path, backend)
        same_layout = (meta.world_size, meta.tp, meta.pp) == (
            groups.world_size,
            groups.tp_size,
            groups.pp_size,
        )
        if same_layout and not meta.resharded_from:
            set_rng_state(ckpt.load_rng_state(resume_path, groups.rank))
        else:  # another layout (or resharded): per-rank streams cannot carry over; derive new ones
            set_seeds(cfg.train.seed + start_step)

    schedule = None
    if groups.pp_size > 1:
        from inrank_megatron.training.pipeline import PipelineSchedule

        schedule = PipelineSchedule(backend, groups, cfg)
    all_ranks = controller.all_ranks()  # collective over pipeline stages
    writer = None
    if groups.rank == 0:
        from inrank_megatron.training.metrics import MetricsWriter

        writer = MetricsWriter(
            out,
            tensorboard=cfg.output.tensorboard,
            csv=cfg.output.csv,
            resume_step=start_step if resume_path is not None else None,
        )
        if resume_path is not None:
            writer.log_event(start_step, "resume", resume_path)
        else:
            writer.log_ranks(0, all_ranks, None)
    mean = _Averager(groups)
    t = cfg.train
    last_step = min(t.steps, t.exit_after_step or t.steps)
    valid_batches = (
        eval_microbatches(datasets.valid, cfg, groups.dp_size, groups.dp_rank)
        if datasets.valid is not None
        else []
    )

    def evaluate(step):
        if not valid_batches:
            return None
        loss = mean(
            [
                schedule.eval_loss(b) if schedule else backend.eval_loss(b).item()
                for b in valid_batches
            ]
        )
        if writer:
            writer.log_eval(step, split="valid", loss=loss)
            console.valid(step, loss)
        return loss

    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    console = meter = None
    if groups.rank == 0:
        console = Console(last_step, start_step)
        peak, source = _peak_tflops(cfg)
        meter = Throughput(
            cfg,
            vocab_size=tokenizer.vocab_size,
            world_size=groups.world_size,
            peak_tflops=peak,
            first_step=start_step,
            last_step=last_step,
            window=t.log_interval,
        )
        console.start(data_report(cfg, groups.dp_size), peak, source)
    ranks_now = dict(all_ranks)  # every layer's rank, as the checks and the cut report them
    slots_now = controller.all_slots()  # what the forward computes with (collective)
    stage = _stage(controller)
    history, val_loss = [], None
    latest = resume_path  # the checkpoint a non-finite fault leaves as the latest
    from inrank_megatron.planning.estimates import checkpoint_bytes

    checkpoint_size = checkpoint_bytes(cfg)  # what the first save needs free (then: the last's)
    stop = stop or StopRequest.for_config(cfg, rank=groups.rank)
    stopped, done_step = None, start_step
    writes = ckpt.AsyncWrites() if t.async_save else None  # train.async_save's write in flight
    step_s, saves = [], []  # each step's wall time (saves included); each save's timing
    save_started = []

    def written(path, step):
        """The last save's write completed at ``step``: ``latest`` names ``path`` now."""
        saves[-1]["latest_at"] = step
        # From the save's start to its end (async: the steps in between included): what a stop,
        # which waits for its save, keeps in hand (train.exit_duration_mins).
        stop.timed_save(time.time() - save_started[-1])
        return path

    for step in range(start_step + 1, last_step + 1):
        tic = time.time()
        micro = step_microbatches(datasets.train, step - 1, cfg, groups.dp_size, groups.dp_rank)
        if schedule:
            losses = schedule.forward_backward(micro)
        else:
            # One host sync per step, after the last micro-batch (not one per micro-batch).
            losses = torch.stack(
                [
                    backend.forward_backward(b, len(micro), last=i == len(micro) - 1)
                    for i, b in enumerate(micro)
                ]
            ).tolist()
        # The step's one host sync: the same loss, stop decision and state of an async save's
        # writers on every rank.
        loss, votes = step_sync(
            losses, groups, [*stop.flags(), writes is not None and writes.writing()]
        )
        stopped = reason(votes[:-1])
        if writes is not None and writes.pending and not votes[-1]:  # every writer is done
            latest = written(writes.finish(), step)
        finite.check_loss(loss, step, model, controller, groups, latest)  # before the update
        info = backend.step()
        try:
            report = controller.step(step)
        except NonFiniteValueError:  # a rank check met NaN/inf factors (the update made them)
            raise finite.fault(step, "InRank factors", model, controller, groups, latest) from None
        if report.resizes:
            backend.resize(report.resizes, cfg.inrank.resize_policy)
        seconds = time.time() - tic
        if meter:  # at the slots and stage this step computed with, before its check or cut
            flops = meter.flops_per_token(slots_now)
            meter.step(step, stage, tokens_per_step, seconds, flops)
        # Every stage's checks (each holds its own layers): (layer, new rank, explained ratio).
        parts = controller.over_pipeline(
            ([(c.layer, c.new_rank, c.explained_ratio) for c in report.checks], report.cut)
        )
        checks, cut = [c for part, _ in parts for c in part], any(p[1] for p in parts)
        if cut:
            all_ranks = controller.all_ranks()
            ranks_now = dict(all_ranks)
        ranks_now.update({layer: r for layer, r, _ in checks})
        if checks or cut:
            slots_now = controller.all_slots()
        history.append(loss)
        stage = _stage(controller)
        if writer:
            if step % t.log_interval == 0 or step == last_step or stopped or checks or cut:
                tflops, mfu = meter.rates(tokens_per_step / seconds, flops)
                writer.log_train(
                    step,
                    loss=loss,
                    lr=info["lr"],
                    grad_norm=info["grad_norm"],
                    tokens_per_s=tokens_per_step / seconds,
                    stage=stage,
                    loss_scale=info["loss_scale"],
                    tflops_per_device=tflops,
                    mfu=mfu,
                    elapsed_s=meter.elapsed(),
                    eta_s=meter.interval().eta_s,
                )
            if step % t.log_interval == 0 or step == last_step or stopped:
                console.step(
                    step,
                    loss=loss,
                    lr=info["lr"],
                    stage=stage,
                    ranks=ranks_now,
                    grad_norm=info["grad_norm"],
                    rates=meter.interval(),
                )
            if checks:
                writer.log_ranks(
                    step,
                    {layer: r for layer, r, _ in checks},
                    {layer: ratio for layer, _, ratio in checks},
                )
            if cut:
                writer.log_event(step, "cut", f"stage 2 at ranks {sorted(set(all_ranks.values()))}")
                writer.log_ranks(step, all_ranks, None)
                console.cut(step, all_ranks)
        if t.eval_interval and step % t.eval_interval == 0:
            val_loss = evaluate(step)
        if console:
            console.tick(loss, stage)
        stop.timed_step(time.time() - tic)
        done_step = step
        if (t.save_interval and step % t.save_interval == 0) or step == last_step or stopped:
            save_tic = time.time()
            finite.check_parameters(step, model, controller, groups, latest)
            with deferred():  # a signal now stops after the save, not inside it
                if writes is not None and writes.pending:  # one write in flight at a time
                    latest = written(writes.finish(), step)
                save_started.append(time.time())
                path = ckpt.save_training_checkpoint(
                    ckpt_root,
                    step,
                    controller=controller,
                    backend=backend,
                    groups=groups,
                    rng=rng_state(),
                    estimate=checkpoint_size,
                    writes=writes,
                    keep_last=cfg.output.keep_last,
                    meta=Meta(
                        step=step,
                        consumed_samples=step * t.global_batch_size,
                        world_size=groups.world_size,
                        tp=groups.tp_size,
                        pp=groups.pp_size,
                        dp=groups.dp_size,
                        backend=backend.name,
                        config=to_dict(cfg),
                    ),
                )
                saves.append({"step": step, "blocking_s": None, "latest_at": None})
                if path is None and (step == last_step or stopped):  # the run ends here
                    path = writes.finish()
                if path is not None:
                    latest = written(path, step)
            saves[-1]["blocking_s"] = time.time() - save_tic
        step_s.append(time.time() - tic)
        if stopped:
            break
    if console:
        console.close()
        console.throughput(meter.summary())
    if done_step == t.steps and (not t.eval_interval or t.steps % t.eval_interval):
        val_loss = evaluate(t.steps)
    summary = {
        "steps": done_step,
        "finished": done_step == t.steps,
        "stopped": stopped if done_step < last_step else None,  # a stop at the end is the end
        "step_s": step_s,
        "saves": saves,
        "train_loss_last": history[-1] if history else None,
        "train_losses": history,
        "valid_loss": val_loss,
        "valid_ppl": math.exp(min(val_loss, 50)) if val_loss is not None else None,
        "ranks": controller.all_ranks(),
        "stage": (controller.layers[0][1].growth.stage if controller.layers else "dense"),
        "wall_s": time.time() - t0,
        "world_size": groups.world_size,
        "throughput": meter.summary() if meter else None,
        "parameters": _parameter_counts(model, groups),
        "run_dir": out,
        "checkpoint": latest,
        "metrics_csv": os.path.join(out, "metrics.csv") if cfg.output.csv else None,
        "plot": None,
    }
    if groups.rank == 0:
        writer.close()
        if cfg.output.plot:
            from inrank_megatron.training.plot import plot_run

            summary["plot"] = plot_run(out)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _stage(controller: GrowthController) -> str:
    """``fixed`` once cut (or fixed from the start), ``growing`` in stage 1, ``dense`` without
    InRank layers."""
    if any(l.growth.stage == "fixed" for _, l in controller.layers):
        return "fixed"
    return "growing" if controller.layers else "dense"


def _peak_tflops(cfg: TrainConfig) -> tuple:
    """``(peak TFLOP/s per device or None, where it comes from)``: ``train.peak_tflops``, else the
    CUDA device's known peak at the training precision."""
    if cfg.train.peak_tflops is not None:
        return cfg.train.peak_tflops, "train.peak_tflops"
    if not torch.cuda.is_available():
        return None, "on CPU"
    name = torch.cuda.get_device_name()
    peak = default_peak_tflops(name, cfg.train.precision)
    return peak, f"{name}, {cfg.train.precision}" if peak else f"no known peak for {name}"


def _parameter_counts(model, groups: ParallelGroups) -> dict:
    """Trainable parameters of the full model (TP shards and pipeline stages summed, replicas
    once)."""
    from inrank_megatron.training.optim import is_tp_duplicate

    # ZeRO-3 partitions parameters in place (numel 0); ds_numel keeps the real size.
    # The last pipeline stage's copy of the tied word embedding (megatron's ``shared``) once.
    n = torch.tensor(
        [
            sum(
                int(getattr(p, "ds_numel", p.numel()))
                for p in model.parameters()
                if not is_tp_duplicate(p, groups.tp_rank) and not getattr(p, "shared", False)
            )
        ],
        dtype=torch.float64,
    )
    for size, group in ((groups.tp_size, groups.tp_group), (groups.pp_size, groups.pp_group)):
        if size > 1:
            torch.distributed.all_reduce(n, group=group)
    return {"total": int(n.item())}
