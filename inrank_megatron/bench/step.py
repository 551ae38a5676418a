"""What InRank saves per training step, measured: one GPT built by
:func:`inrank_megatron.models.gpt.build_gpt` timed as four arms, interleaved, in one launched job.

Arms (``ARMS``), each the same config, seed and synthetic batch:

- ``dense``: ``model.inrank=false``;
- ``stage1``: InRank in stage 1: every layer at its rank ``r`` plus the config's buffer ``b``
  active, all ``max_rank`` slots allocated (efficient mode) and updated by the optimizer;
- ``cut``: the same model after the cut (:meth:`InRankFactorsMixin.cut`): ``r`` slots, no buffer;
- ``fixed``: the fixed-rank baseline (``inrank.fixed_ranks``, :meth:`InRankFactorsMixin.fix_rank`):
  ``r`` slots from the start, no buffer, no growth, no cut.

``r`` per layer is ``--rank-fraction`` of d_model (clipped as the planner clips it:
:func:`inrank_megatron.planning.estimates.rank_after_cut`) or a run's learned ranks
(``--ranks-from``); stage 1 is measured at that ``r`` (its last and most expensive steps). Per
arm: forward / backward / optimizer time, tokens/s, the speedup over dense against the planner's
FLOP-ideal (:func:`inrank_megatron.planning.estimates.flops_per_token` at the slots the built model
uses), peak memory (``torch.cuda.max_memory_allocated``, or the process's peak RSS on CPU), and the bytes of
parameters, gradients and optimizer state. The stage-1 arm also times one rank check of all layers
(:meth:`GrowthController.step` at a due step); the cut arm times the cut.

``--attention local sdpa`` runs every arm with each core attention (``model.attention``),
interleaved too, and reports each attention's table and their step times and peak memory side by
side.

Arms run one after another inside one process per rank, rebuilt for every repeat (so only one
model is in memory at a time and its peak memory is its own), in the order dense, stage1, cut,
fixed, dense, ...; the medians over all timed steps are reported. The job goes through the
training launcher (``launch/torchrun.sh``, ``INRANK_TRAIN_MODULE=inrank_megatron.bench.step``),
with ``--tp`` processes.

From the medians, :func:`project_run` projects the config's whole schedule (``train.steps`` at
``train.global_batch_size`` sequences per step on one data-parallel replica: stage-1 steps at
stage-1 speed, the rest after the cut, plus every rank check and the cut) for InRank vs dense.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch

from inrank_megatron.config import (
    ATTENTIONS,
    ConfigError,
    TrainConfig,
    load_config,
)
from inrank_megatron import rules

ARMS = ("dense", "stage1", "cut", "fixed")
ARM_LABELS = {
    "dense": "dense",
    "stage1": "InRank stage 1",
    "cut": "InRank after cut",
    "fixed": "fixed-rank",
}
PRECISIONS = ("fp32", "bf16")
BACKENDS = ("torch", "deepspeed")
DEFAULT_DEEPSPEED_CONFIG = "configs/deepspeed/zero2.json"
SPEC_ENV = "INRANK_BENCH_SPEC"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class BenchOptions:
    """What ``tools/bench_step.py`` takes (see its ``--help``)."""

    config: str
    overrides: list = dataclasses.field(default_factory=list)
    rank_fraction: Optional[float] = None
    ranks_from: Optional[str] = None
    seq: Optional[int] = None
    micro: Optional[int] = None
    steps: int = 3
    repeats: int = 2
    tp: int = 1
    backend: str = "torch"
    precision: str = "fp32"
    arms: tuple = ARMS
    attentions: tuple = ()  # model.attention values to compare; empty: the config's
    peak_tflops: Optional[float] = None
    seed: int = 1234


# ------------------------------------------------------------------------------ learned ranks
def learned_ranks(cfg: TrainConfig, run: str) -> dict:
    """``{layer name: rank}`` a run learned, checked against ``cfg``'s InRank layers: the reader
    of ``inrank.fixed_ranks=RUN`` (:func:`inrank_megatron.training.fixed_ranks.
    resolve_fixed_ranks`: the latest checkpoint's growth state, else ``summary.json``).

    Raises:
        ConfigError: naming ``--ranks-from``: no such run, nothing to read, another architecture.
    """
    from inrank_megatron.training.fixed_ranks import KEY, resolve_fixed_ranks

    probe = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, inrank=True),
        inrank=dataclasses.replace(cfg.inrank, fixed_ranks=run),
    )
    try:
        return resolve_fixed_ranks(probe)
    except ConfigError as error:
        raise ConfigError(str(error).replace(f"{KEY}=", "--ranks-from=")) from None


# ----------------------------------------------------------------------------- configuration
def bench_overrides(opts: BenchOptions, cfg: TrainConfig, workdir: Optional[str] = None) -> list:
    """The config overrides the launched job runs with: the bench's sequence, micro-batch (one
    micro-batch per step), TP, backend and precision; with ``workdir``, also a fresh output
    directory and a dataset the job never reads (it trains on synthetic batches), so that the
    launcher's pre-flight of the run's files passes without the config's dataset."""
    seq = opts.seq or cfg.model.seq_length
    micro = opts.micro or cfg.train.micro_batch_size
    out = [
        f"model.seq_length={seq}",
        f"train.micro_batch_size={micro}",
        f"train.global_batch_size={micro}",
        f"parallel.tensor_model_parallel_size={opts.tp}",
        "parallel.pipeline_model_parallel_size=1",
        "parallel.sequence_parallel=false",
        f"parallel.backend={opts.backend}",
        f"train.precision={opts.precision}",
    ]
    if seq > cfg.model.max_positions():
        out.append(f"model.max_position_embeddings={seq}")
    if opts.backend == "deepspeed" and cfg.parallel.deepspeed_config is None:
        out.append(f"parallel.deepspeed_config={DEFAULT_DEEPSPEED_CONFIG}")
    elif opts.backend != "deepspeed":
        out += ["parallel.deepspeed_config=null", "parallel.zero_stage=null"]
    if workdir is not None:
        out += [
            f"output.dir={os.path.join(workdir, 'output')}",
            "output.resume=none",
            f"data.prefix={os.path.join(workdir, 'unused_text_document')}",
            "data.corpus=wiki",
        ]
    return out


def check_options(opts: BenchOptions) -> tuple[TrainConfig, TrainConfig, Optional[dict]]:
    """Validate everything before a process starts. Returns ``(config as given, config the job
    runs, the learned ranks of --ranks-from or None)``.

    Raises:
        ConfigError: a bad option, config or layout (one line naming it).
    """
    if opts.rank_fraction is not None and opts.ranks_from is not None:
        raise ConfigError("--rank-fraction and --ranks-from are exclusive; give one")
    if opts.rank_fraction is not None and not 0 < opts.rank_fraction <= 1:
        raise ConfigError(f"--rank-fraction={opts.rank_fraction}: expected a value in (0, 1]")
    for name in ("steps", "repeats", "tp"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"--{name}={getattr(opts, name)}: expected a positive integer")
    for name in ("seq", "micro"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name}={value}: expected a positive integer")
    if opts.backend not in BACKENDS:
        raise ConfigError(f"--backend={opts.backend!r}: expected one of {BACKENDS}")
    if opts.precision not in PRECISIONS:
        raise ConfigError(f"--precision={opts.precision!r}: expected one of {PRECISIONS}")
    bad = [a for a in opts.attentions if a not in ATTENTIONS]
    if bad or len(set(opts.attentions)) != len(opts.attentions):
        raise ConfigError(
            f"--attention {list(opts.attentions)}: expected distinct values of {list(ATTENTIONS)}"
        )
    unknown = [a for a in opts.arms if a not in ARMS]
    if unknown or not opts.arms:
        raise ConfigError(f"--arms {list(opts.arms)}: expected some of {list(ARMS)}")
    if not os.path.isfile(opts.config):
        raise ConfigError(f"--config {opts.config!r}: file not found")
    cfg = load_config(opts.config, list(opts.overrides))
    inrank_arms = [a for a in opts.arms if a != "dense"]
    if inrank_arms and cfg.inrank.mode != "efficient":
        raise ConfigError(
            f"inrank.mode={cfg.inrank.mode!r}: the bench's stage-1 / cut / fixed arms "
            "are efficient mode's; expected inrank.mode=efficient"
        )
    ranks = learned_ranks(cfg, opts.ranks_from) if opts.ranks_from is not None else None
    job = load_config(opts.config, [*opts.overrides, *bench_overrides(opts, cfg)])
    rules.validate(job, opts.tp)
    for attention in opts.attentions:  # e.g. selective recompute needs local attention
        rules.validate(_with_attention(job, attention), opts.tp)
    if job.parallel.backend == "deepspeed":
        from inrank_megatron.deepspeed_json import check_deepspeed_config

        check_deepspeed_config(job, opts.tp)
    if (
        job.parallel.backend != "torch"
        and job.train.precision == "bf16"
        and not torch.cuda.is_available()
    ):
        raise ConfigError("--precision bf16 with --backend deepspeed needs a GPU; expected fp32")
    return cfg, job, ranks


# --------------------------------------------------------------------------- the launched job
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _now() -> float:
    _sync()
    return time.perf_counter()


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: reset VmHWM (peak RSS) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS"
    return 0, "unknown"


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _state_tensors(state) -> list:
    """Optimizer state tensors (moments; the 0-d step counters left out)."""
    return [
        v for s in state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0
    ]


def _memory(backend, model) -> dict:
    """Bytes of parameters, gradients and optimizer state on this rank (gradients read after a
    backward pass, before the optimizer clears them)."""
    params = _tensor_bytes(model.parameters())
    grads = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    if backend.name == "deepspeed":
        zero = backend.engine.optimizer
        tensors = (
            _state_tensors(getattr(zero, "optimizer", zero).state)
            if hasattr(getattr(zero, "optimizer", zero), "state")
            else []
        )
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            tensors += list(getattr(zero, attr, []) or [])
        optim = _tensor_bytes(tensors)
    else:
        optim = _tensor_bytes(_state_tensors(backend.optimizer.state))
    return {"params": params, "grads": grads, "optimizer": optim}


def synthetic_batch(cfg: TrainConfig, vocab_size: int, seed: int) -> dict:
    """One micro-batch of random token ids (the step's cost does not depend on the text)."""
    gen = torch.Generator().manual_seed(seed)
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, vocab_size, (b, s + 1), generator=gen)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return {
        k: v.to(device)
        for k, v in {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s),
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
        }.items()
    }


def _with_attention(cfg: TrainConfig, attention: str) -> TrainConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention))


def _arm_config(cfg: TrainConfig, arm: str) -> TrainConfig:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, inrank=arm != "dense"))
    return cfg


def _target_ranks(cfg: TrainConfig, layers, spec: dict) -> dict:
    """``{layer name: r}``: the run's learned ranks, or the planner's rank at the fraction."""
    from inrank_megatron.planning.estimates import rank_after_cut

    given = spec.get("ranks")
    out = {}
    for name, layer in layers:
        if given is not None:  # checked against this model's layers by learned_ranks
            out[name] = int(given[name])
        else:
            out[name] = rank_after_cut(
                cfg, layer.full_in_features, layer.full_out_features, spec.get("rank_fraction")
            )
        g = layer.growth
        if not 0 <= out[name] <= g.max_rank - g.buffer:
            raise ConfigError(
                f"layer {name}: rank {out[name]} + buffer {g.buffer} does not fit "
                f"max_rank {g.max_rank}"
            )
    return out


def _build_arm(cfg: TrainConfig, arm: str, groups, vocab: int, spec: dict):
    """The arm's model and backend (same seed every time); with the cut's wall time."""
    from inrank_megatron.layers.base import named_inrank_layers
    from inrank_megatron.training.backends import build_backend
    from inrank_megatron.models.gpt import build_model
    from inrank_megatron.training.parallel import set_seeds

    set_seeds(cfg.train.seed)
    model = build_model(cfg, vocab, groups.tp_size)
    layers = named_inrank_layers(model)
    ranks = _target_ranks(cfg, layers, spec) if layers else {}
    cut_s = None
    if arm == "cut":
        t0 = _now()
    for name, layer in layers:
        if arm == "fixed":  # inrank.fixed_ranks: exactly r slots from the start
            layer.fix_rank(ranks[name])
            continue
        if cfg.inrank.start == "low_rank":  # stage 1 at r + b; a full-rank or dense one at all
            layer.growth.rank = ranks[name]
        if arm == "cut":
            layer.cut(0, rank=ranks[name])
    if arm == "cut":
        cut_s = _now() - t0
    slots = {name: layer.active_slots for name, layer in layers}
    return model, build_backend(cfg, model, groups), slots, cut_s


def _forward(backend, batch):
    """The backend's forward of one micro-batch (torch: ``TorchBackend.forward``; DeepSpeed:
    the engine's, as ``DeepSpeedBackend.forward_backward`` runs it)."""
    if backend.name == "deepspeed":
        return backend.loss(backend.engine, batch)
    return backend.forward(batch)


def _backward(backend, loss) -> None:
    if backend.name == "deepspeed":
        backend.engine.backward(loss)
    else:
        backend.backward(loss, 1)


def _free(backend, model) -> None:
    if backend.name == "deepspeed":
        backend.engine.destroy()
    del backend, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rank_check_seconds(model, cfg: TrainConfig) -> tuple[float, int]:
    """One rank check of all layers, as the loop runs it (``GrowthController.step`` at a due
    step: spectra by TSQR, the rule, the agreement check). Returns ``(seconds, layers)``."""
    from inrank_megatron.growth.controller import GrowthController

    controller = GrowthController(model, stage1_steps=None)
    step = cfg.inrank.warmup if cfg.inrank.warmup >= 1 else cfg.inrank.gap
    t0 = _now()
    report = controller.step(step)
    return _now() - t0, len(report.checks)


def measure(cfg: TrainConfig, groups, spec: dict, log=None) -> dict:
    """Run the arms interleaved on this rank (collective over the job), with each attention of
    ``spec["attentions"]`` (default the config's). Returns ``{attention: {arm: ...}}``: per-arm
    lists of per-step times and the arm's memory, slots, rank-check and cut times."""
    from inrank_megatron.planning.estimates import tokenizer_vocab_size

    vocab = tokenizer_vocab_size(cfg)
    batch = synthetic_batch(cfg, vocab, spec["seed"])
    attentions = spec.get("attentions") or [cfg.model.attention]
    by_attention = {
        att: {
            a: {
                "forward_s": [],
                "backward_s": [],
                "optimizer_s": [],
                "cpu_s": [],
                "peak_bytes": [],
                "rank_check_s": [],
                "cut_s": [],
            }
            for a in spec["arms"]
        }
        for att in attentions
    }
    for repeat, attention, arm in itertools.product(
        range(spec["repeats"]), attentions, spec["arms"]
    ):
        acfg = _arm_config(_with_attention(cfg, attention), arm)
        _reset_peak_memory()
        model, backend, slots, cut_s = _build_arm(acfg, arm, groups, vocab, spec)
        out = by_attention[attention][arm]
        out["slots"] = slots
        if cut_s is not None:
            out["cut_s"].append(cut_s)
        for i in range(spec["steps"] + 1):  # the first step warms up (allocations, kernels)
            t0, c0 = _now(), time.process_time()
            loss = _forward(backend, batch)
            t1 = _now()
            _backward(backend, loss)
            t2 = _now()
            if i == 1:  # the optimizer state exists from the first step on
                out["memory"] = _memory(backend, model)
            backend.step()
            t3, c3 = _now(), time.process_time()
            if i:
                out["cpu_s"].append(c3 - c0)
                out["forward_s"].append(t1 - t0)
                out["backward_s"].append(t2 - t1)
                out["optimizer_s"].append(t3 - t2)
        out["loss"] = float(loss.detach().float())
        out["peak_bytes"].append(_peak_memory()[0])
        out["peak_kind"] = _peak_memory()[1]
        if arm == "stage1":
            seconds, n = _rank_check_seconds(model, acfg)
            out["rank_check_s"].append(seconds)
            out["rank_check_layers"] = n
        if log:
            total = [
                sum(t)
                for t in zip(
                    out["forward_s"][-spec["steps"] :],
                    out["backward_s"][-spec["steps"] :],
                    out["optimizer_s"][-spec["steps"] :],
                )
            ]
            log(
                f"bench: repeat {repeat + 1}/{spec['repeats']} {arm:<6} {attention:<5} "
                f"{statistics.median(total):.3f} s/step"
            )
        _free(backend, model)
        del model, backend
    return by_attention


def worker_main(argv=None) -> int:
    """The launched job's entry (``INRANK_TRAIN_MODULE=inrank_megatron.bench.step``): the
    training CLI's arguments (``--config C overrides``); the bench's spec from ``$INRANK_BENCH_SPEC``."""
    from inrank_megatron.launch_env import init_distributed_env
    from inrank_megatron.train import parse_args
    from inrank_megatron.training.parallel import init_parallel, shutdown

    args = parse_args(argv)
    env = init_distributed_env()
    with open(os.environ[SPEC_ENV]) as f:
        spec = json.load(f)
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    groups = init_parallel(cfg.parallel.tensor_model_parallel_size, 1, backend=env["backend"])
    rank0 = groups.rank == 0
    try:
        by_attention = measure(
            cfg,
            groups,
            spec,
            log=(lambda m: print(m, file=sys.stderr, flush=True)) if rank0 else None,
        )
    except ConfigError as error:
        if rank0:
            print(f"error: {error}", file=sys.stderr)
        shutdown()
        return 2
    if rank0:
        result = {
            "by_attention": by_attention,
            "device": _device_name(),
            "threads": torch.get_num_threads(),
            "world_size": groups.world_size,
        }
        tmp = spec["result"] + ".part"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, spec["result"])
    shutdown()
    return 0


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------ analysis
def _median(values) -> Optional[float]:
    return statistics.median(values) if values else None


def analyse(cfg: TrainConfig, job: TrainConfig, raw: dict, opts: BenchOptions) -> dict:
    """Medians, tokens/s, speedups against the planner's FLOP-ideal, MFU, and the projection."""
    from inrank_megatron.planning.estimates import flops_per_token
    from inrank_megatron.training.throughput import layer_slots

    tokens = job.train.micro_batch_size * job.model.seq_length  # per step, one replica
    arms = {}
    for arm, r in raw["arms"].items():
        step = [f + b + o for f, b, o in zip(r["forward_s"], r["backward_s"], r["optimizer_s"])]
        flops = flops_per_token(
            job,
            inrank=arm != "dense",
            layer_slots=layer_slots(job.model.num_layers, r["slots"]) if arm != "dense" else None,
        ).total
        arms[arm] = {
            "forward_s": _median(r["forward_s"]),
            "backward_s": _median(r["backward_s"]),
            "optimizer_s": _median(r["optimizer_s"]),
            "step_s": _median(step),
            "steps_timed": len(step),
            "tokens_per_s": tokens / _median(step),
            "flops_per_token": flops,
            "memory": r["memory"],
            "peak_bytes": max(r["peak_bytes"]),
            "peak_kind": r["peak_kind"],
            "slots": sorted(set(r["slots"].values())),
            "rank_check_s": _median(r["rank_check_s"]),
            "cut_s": _median(r["cut_s"]),
            "rank_check_layers": r.get("rank_check_layers"),
            "loss": r["loss"],
            "cpu_s": _median(r.get("cpu_s", [])),
        }
        if opts.peak_tflops:
            achieved = flops * arms[arm]["tokens_per_s"] / raw["world_size"]
            # Model FLOPs utilisation of the arm's own model (InRank's factor matmuls for InRank).
            arms[arm]["mfu"] = achieved / (opts.peak_tflops * 1e12)
            arms[arm]["tflops_per_gpu"] = achieved / 1e12
    if "dense" in arms:
        d = arms["dense"]
        for a in arms.values():
            a["speedup"] = d["step_s"] / a["step_s"]
            a["flop_ideal"] = d["flops_per_token"] / a["flops_per_token"]
            a["ratio_of_ideal"] = a["speedup"] / a["flop_ideal"]
            if "cuda" not in a["peak_kind"] and a["cpu_s"] and d["cpu_s"]:
                # On a shared CPU the process's CPU seconds move less with other load than wall
                # time does (time slices lost to other processes are not counted).
                a["cpu_speedup"] = d["cpu_s"] / a["cpu_s"]
                a["cpu_ratio_of_ideal"] = a["cpu_speedup"] / a["flop_ideal"]
    out = {
        "config": opts.config,
        "seq": job.model.seq_length,
        "micro": job.train.micro_batch_size,
        "tp": opts.tp,
        "backend": opts.backend,
        "precision": opts.precision,
        "steps": opts.steps,
        "repeats": opts.repeats,
        "device": raw["device"],
        "threads": raw["threads"],
        "ranks": f"learned ({opts.ranks_from})"
        if opts.ranks_from
        else (
            f"{opts.rank_fraction:g} x d_model"
            if opts.rank_fraction is not None
            else "the rank the config's rule reaches"
        ),
        "arms": arms,
    }
    out["projection"] = project_run(cfg, job, arms)
    return out


def project_run(cfg: TrainConfig, job: TrainConfig, arms: dict) -> Optional[dict]:
    """The config's whole schedule at its global batch on one data-parallel replica of the bench's
    processes: a step is ``global / micro`` micro-batches (forward + backward) and one optimizer
    step. InRank: ``stage1_steps`` at stage-1 speed, the rest at the cut's, plus every rank check
    (:func:`inrank_megatron.planning.estimates.rank_checks`) and the cut; dense: every step at dense speed."""
    from inrank_megatron.planning.estimates import rank_checks

    if not {"dense", "stage1", "cut"} <= set(arms):
        return None
    accumulation = cfg.train.global_batch_size / job.train.micro_batch_size

    def step(arm):
        a = arms[arm]
        return accumulation * (a["forward_s"] + a["backward_s"]) + a["optimizer_s"]

    steps = cfg.train.steps
    stage1 = min(cfg.inrank.stage1_steps if cfg.inrank.stage1_steps is not None else steps, steps)
    checks = rank_checks(cfg)
    check_s = arms["stage1"]["rank_check_s"] or 0.0
    cut_s = arms["cut"]["cut_s"] or 0.0
    train_s = stage1 * step("stage1") + (steps - stage1) * step("cut")
    inrank_s = train_s + checks * check_s + cut_s
    dense_s = steps * step("dense")
    gap = cfg.inrank.gap
    return {
        "steps": steps,
        "stage1_steps": stage1,
        "rank_checks": checks,
        "gap": gap,
        "global_batch": cfg.train.global_batch_size,
        "accumulation": accumulation,
        "step_s": {a: step(a) for a in ("dense", "stage1", "cut")},
        "dense_s": dense_s,
        "inrank_s": inrank_s,
        "speedup": dense_s / inrank_s,
        "rank_checks_s": checks * check_s,
        "rank_checks_share": checks * check_s / inrank_s,
        "check_share_of_gap_steps": check_s / (gap * step("stage1")),
        "check_share_of_gap_bench_steps": check_s / (gap * arms["stage1"]["step_s"]),
        "cut_s": cut_s,
    }


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _f(x, fmt) -> str:
    return "-" if x is None else format(x, fmt)


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s:.0f} s"


def format_report(res: dict) -> str:
    """The result as plain aligned tables: one report per attention, then, with several, their
    step times and peak memory side by side."""
    from inrank_megatron.text_table import aligned_table

    by = res.get("by_attention")
    if not by:
        return _format_one(res)
    out = [_format_one(dict(r, attention=att)) for att, r in by.items()]
    first = next(iter(by))
    header = (
        ["arm"]
        + [f"{att} step s" for att in by]
        + [f"{att} vs {first}" for att in list(by)[1:]]
        + [f"{att} peak MB" for att in by]
    )
    rows = []
    for arm in by[first]["arms"]:
        steps = [by[att]["arms"][arm]["step_s"] for att in by]
        rows.append(
            [ARM_LABELS[arm]]
            + [_f(x, ".3f") for x in steps]
            + [_f(steps[0] / x, ".3f") + "x" for x in steps[1:]]
            + [_mb(by[att]["arms"][arm]["peak_bytes"]) for att in by]
        )
    out.append(
        "model.attention compared (medians; speed of each over the first):\n"
        + "\n".join(aligned_table(header, rows))
        + "\n"
    )
    return "\n".join(out)


def _format_one(res: dict) -> str:
    from inrank_megatron.text_table import aligned_table

    attention = f", attention {res['attention']}" if "attention" in res else ""
    out = [
        f"bench_step: {res['config']}, seq {res['seq']}, micro {res['micro']}, TP {res['tp']}, "
        f"backend {res['backend']}, {res['precision']}{attention}, {res['steps']} steps x "
        f"{res['repeats']} repeats (interleaved, medians), {res['device']}, "
        f"{res['threads']} threads/process; ranks {res['ranks']}"
    ]
    mfu = any("mfu" in a for a in res["arms"].values())
    header = [
        "arm",
        "slots",
        "fwd s",
        "bwd s",
        "opt s",
        "step s",
        "tok/s",
        "speedup",
        "FLOP-ideal",
        "achieved/ideal",
        "params MB",
        "grads MB",
        "optim MB",
        "peak MB",
    ]
    cpu = any("cpu_speedup" in a for a in res["arms"].values())
    if cpu:
        header[10:10] = ["cpu s", "cpu speedup", "cpu/ideal"]
    if mfu:
        header[7:7] = ["MFU"]
    rows = []
    for arm, a in res["arms"].items():
        slots = "/".join(str(s) for s in a["slots"]) or "-"
        row = [
            ARM_LABELS[arm],
            slots,
            _f(a["forward_s"], ".3f"),
            _f(a["backward_s"], ".3f"),
            _f(a["optimizer_s"], ".3f"),
            _f(a["step_s"], ".3f"),
            _f(a["tokens_per_s"], ".0f"),
            _f(a.get("speedup"), ".3f") + "x",
            _f(a.get("flop_ideal"), ".3f") + "x",
            _f(a.get("ratio_of_ideal"), ".2f"),
            _mb(a["memory"]["params"]),
            _mb(a["memory"]["grads"]),
            _mb(a["memory"]["optimizer"]),
            _mb(a["peak_bytes"]),
        ]
        if cpu:
            row[10:10] = [
                _f(a.get("cpu_s"), ".3f"),
                _f(a.get("cpu_speedup"), ".3f") + "x",
                _f(a.get("cpu_ratio_of_ideal"), ".2f"),
            ]
        if mfu:
            row[7:7] = [_f(a.get("mfu"), ".1%")]
        rows.append(row)
    out += aligned_table(header, rows, left=2)
    kind = next(iter(res["arms"].values()))["peak_kind"]
    out.append(
        f"  achieved/ideal = speedup / FLOP-ideal (planning.flops_per_token at the built "
        f"slots); peak MB = {kind} of the arm's process (this rank)"
    )
    if cpu:
        out.append(
            "  cpu s = the process's CPU seconds per step (all threads, OpenMP spinning "
            "included): time slices lost to other processes are not in it"
        )
    s1 = res["arms"].get("stage1")
    p = res.get("projection")
    if s1 and s1["rank_check_s"] is not None:
        line = (
            f"rank check of all {s1['rank_check_layers']} InRank layers: {s1['rank_check_s']:.3f} s"
        )
        if p:
            line += (
                f" = {p['check_share_of_gap_bench_steps']:.2%} of {p['gap']} stage-1 bench "
                f"steps (gap), {p['check_share_of_gap_steps']:.3%} of {p['gap']} steps at the "
                f"config's global batch {p['global_batch']}"
            )
        out.append(line)
    if p:
        out.append(
            f"whole run projected ({p['steps']} steps of {p['global_batch']} x "
            f"{res['seq']} tokens on one replica = {p['accumulation']:g} micro-batches per "
            f"step; {p['stage1_steps']} stage-1 steps, {p['rank_checks']} rank checks, one "
            f"cut of {p['cut_s']:.2f} s):"
        )
        out.append(
            f"  dense {_duration(p['dense_s'])}, InRank {_duration(p['inrank_s'])}: "
            f"{p['speedup']:.3f}x; rank checks {_duration(p['rank_checks_s'])} = "
            f"{p['rank_checks_share']:.4%} of the InRank run"
        )
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ driver
def run_bench(opts: BenchOptions, *, stream=None) -> dict:
    """Validate, launch the job through ``launch/torchrun.sh`` (``--tp`` processes), analyse.

    Raises:
        ConfigError: bad options (before anything starts).
        RuntimeError: the launched job failed (its output went to ``stream``).
    """
    cfg, job, ranks = check_options(opts)
    with tempfile.TemporaryDirectory(prefix="bench_step.") as tmp:
        attentions = list(opts.attentions) or [job.model.attention]
        spec = {
            "arms": list(opts.arms),
            "attentions": attentions,
            "steps": opts.steps,
            "repeats": opts.repeats,
            "seed": opts.seed,
            "ranks": ranks,
            "rank_fraction": opts.rank_fraction,
            "result": os.path.join(tmp, "result.json"),
        }
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        env = dict(
            os.environ,
            INRANK_TRAIN_MODULE="inrank_megatron.bench.step",
            **{SPEC_ENV: os.path.join(tmp, "spec.json")},
            PYTHON=sys.executable,
        )
        cmd = [
            "bash",
            os.path.join(REPO, "launch", "torchrun.sh"),
            "--nproc",
            str(opts.tp),
            opts.config,
            *opts.overrides,
            *bench_overrides(opts, cfg, tmp),
        ]
        stream = stream or sys.stderr
        with subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            for line in proc.stdout:  # the job's progress and warnings, as they come
                stream.write(line)
            returncode = proc.wait()
        if returncode != 0 or not os.path.isfile(spec["result"]):
            raise RuntimeError(f"the bench job failed (exit {returncode}): {' '.join(cmd)}")
        with open(spec["result"]) as f:
            raw = json.load(f)
    results = {
        att: analyse(cfg, job, {**raw, "arms": arms}, opts)
        for att, arms in raw["by_attention"].items()
    }
    res = dict(results[attentions[0]], attention=attentions[0])
    if len(results) > 1:
        res["by_attention"] = results
    return res


if __name__ == "__main__":
    sys.exit(worker_main())
