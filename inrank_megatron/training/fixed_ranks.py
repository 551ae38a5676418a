"""The fixed-rank baseline (``inrank.fixed_ranks``): which rank each InRank layer trains at.

A fixed-rank run answers "is it the growth, or just the rank?": the same low-rank model trained at
fixed ranks from step 1. The ranks come from the key as

    inrank.fixed_ranks=40       every InRank layer at rank 40
    inrank.fixed_ranks=0.33     each layer at round(0.33 * min(in, out)), at least 1
    inrank.fixed_ranks=runs/x   each layer at the final rank run ``runs/x`` learned (its latest
                                checkpoint's growth state, else its summary.json), by layer name

    ranks = resolve_fixed_ranks(cfg)                # {layer name: rank}; ConfigError if bad
    for name, layer in controller.layers:           # before the optimizer is built
        layer.fix_rank(ranks[name])
"""

from __future__ import annotations

import json
import math
import os

from inrank_megatron.checkpoint import (
    CHECKPOINTS_DIR,
    GROWTH_FILE,
    LATEST,
    CheckpointError,
    read_growth,
)
from inrank_megatron.config import ConfigError, TrainConfig, load_config
from inrank_megatron.checkpoint.layout import inrank_layer_names, layer_kind, linear_shape

KEY = "inrank.fixed_ranks"
SUMMARY = "summary.json"  # inrank_megatron.training.loop writes it at the end of a run
CONFIG = "config.yaml"


def fraction_rank(fraction: float, full_rank: int) -> int:
    """``fraction`` of ``full_rank``, rounded half up, at least 1."""
    return max(1, min(full_rank, math.floor(fraction * full_rank + 0.5)))


def _layer_shapes(cfg: TrainConfig) -> dict[str, tuple[int, int]]:
    """``{InRank layer name: (in, out)}`` of a configuration (``{}`` for a dense model)."""
    return {name: linear_shape(cfg, layer_kind(name)) for name in inrank_layer_names(cfg)}


def read_run_ranks(run_dir: str) -> tuple[dict[str, int], TrainConfig]:
    """The final per-layer ranks of a run directory and the configuration that trained them.

    The latest checkpoint (``checkpoints/latest``) is read first: its ``inrank_growth.json`` holds
    every layer's rank and its ``meta.json`` the configuration; a run without checkpoints gives
    ``summary.json``'s ``ranks`` and ``config.yaml``.

    Raises:
        ConfigError: naming ``inrank.fixed_ranks`` and the directory or file at fault.
    """
    where = f"{KEY}={run_dir!r}"
    if not os.path.isdir(run_dir):
        raise ConfigError(
            f"{where}: no such run directory (expected an integer rank, a fraction "
            "in (0, 1] or the output.dir of a finished run)"
        )
    try:
        if os.path.isfile(os.path.join(run_dir, CHECKPOINTS_DIR, LATEST)):
            from inrank_megatron.checkpoint.reader import read_checkpoint_config

            try:
                step_dir, _, cfg = read_checkpoint_config(run_dir)
                growth = read_growth(step_dir)
            except CheckpointError as error:
                raise ConfigError(f"{where}: {error}") from None
            source = os.path.join(step_dir, GROWTH_FILE)
            ranks = {name: entry["growth"]["rank"] for name, entry in growth.items()}
        elif os.path.isfile(os.path.join(run_dir, SUMMARY)):
            source = os.path.join(run_dir, SUMMARY)
            with open(source) as f:
                ranks = json.load(f)["ranks"]
            cfg = load_config(os.path.join(run_dir, CONFIG))
        else:
            raise ConfigError(
                f"{where}: holds neither a checkpoint (checkpoints/latest) nor "
                f"{SUMMARY}; expected the output.dir of a finished run"
            )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where}: cannot read its ranks: {error}") from None
    bad = [n for n, r in ranks.items() if isinstance(r, bool) or not isinstance(r, int)]
    if bad:
        raise ConfigError(f"{where}: {source} records a non-integer rank for layer {bad[0]}")
    return ranks, cfg


def resolve_fixed_ranks(cfg: TrainConfig) -> dict[str, int]:
    """``{InRank layer name: rank}`` for ``cfg``'s ``inrank.fixed_ranks`` (``{}`` when null or
    the model is dense).

    Raises:
        ConfigError: naming ``inrank.fixed_ranks``: a rank over a layer's full rank, a run
            directory that is missing or unreadable, or whose InRank layers differ from this
            model's in name or shape (naming the first such layer).
    """
    value = cfg.inrank.fixed_ranks
    shapes = _layer_shapes(cfg)
    if value is None or not shapes:
        return {}
    if not isinstance(value, str):
        ranks = {}
        for name, (n_in, n_out) in shapes.items():
            n = min(n_in, n_out)
            rank = fraction_rank(value, n) if isinstance(value, float) else value
            if not 1 <= rank <= n:
                raise ConfigError(
                    f"{KEY}={value}: rank {rank} for layer {name} ({n_in} -> "
                    f"{n_out}); expected 1..{n}, a fraction in (0, 1] or a run "
                    "directory"
                )
            ranks[name] = rank
        return ranks
    ranks, source_cfg = read_run_ranks(value)
    source_shapes = _layer_shapes(source_cfg)
    where = f"{KEY}={value!r}"
    for name, shape in shapes.items():
        if name not in source_shapes or name not in ranks:
            raise ConfigError(
                f"{where}: that run has no InRank layer {name} (it has "
                f"{len(source_shapes)} InRank layers); expected a run of the same "
                "architecture and inrank.layers"
            )
        if source_shapes[name] != shape:
            raise ConfigError(
                f"{where}: layer {name} is {source_shapes[name][0]} -> "
                f"{source_shapes[name][1]} there, {shape[0]} -> {shape[1]} here; "
                "expected a run of the same architecture"
            )
        if not 1 <= ranks[name] <= min(shape):
            raise ConfigError(
                f"{where}: layer {name} has rank {ranks[name]} there; expected 1..{min(shape)}"
            )
    extra = sorted(set(source_shapes) - set(shapes))
    if extra:
        raise ConfigError(
            f"{where}: that run has InRank layer {extra[0]}, which this model "
            "does not; expected a run of the same architecture and inrank.layers"
        )
    return {name: ranks[name] for name in shapes}
