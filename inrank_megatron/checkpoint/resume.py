"""Which checkpoint a run resumes from (``output.resume``), checked before anything is loaded.

    path = resolve_resume(cfg, world_size)   # a step directory, or None for a fresh start

``auto`` takes the newest complete step directory of ``output.dir/checkpoints`` (the one ``latest``
names unless a save was killed between its rename and the move of ``latest``); a named one must be
complete. Either way the checkpoint must have been trained with this run's ``model.*``,
``inrank.*`` and tokenizer (:func:`inrank_megatron.config.diff_incompatible`), by this backend
(or hold weights only), and its pickled files must name no code. Torch is imported only for that
scan (:func:`~inrank_megatron.checkpoint.safe_load.check_pickles`).
"""

from __future__ import annotations

import os
import re

from inrank_megatron.checkpoint.meta import (
    CHECKPOINTS_DIR,
    CheckpointError,
    complete_step_dirs,
    is_complete,
    read_latest,
    read_meta,
)
from inrank_megatron.checkpoint.safe_load import check_pickles
from inrank_megatron.config import (
    ConfigError,
    TrainConfig,
    diff_incompatible,
    format_value,
    from_dict,
    get_value,
)


def resolve_resume(cfg: TrainConfig, world_size: int):
    """The checkpoint to resume from (or None), checked against this run's config and layout, its
    pickled files checked for code (nothing is loaded yet)."""
    resume = cfg.output.resume
    if resume == "none":
        return None
    try:
        if resume == "auto":
            path = auto_resume_path(os.path.join(cfg.output.dir, CHECKPOINTS_DIR))
            if path is None:
                return None
        else:
            path = resume
            if not os.path.isdir(path):
                raise ConfigError(f"output.resume={resume!r}: no such checkpoint directory")
            reason = is_complete(path)
            if reason:
                raise ConfigError(
                    f"output.resume={resume!r} is not a complete checkpoint: {reason}"
                )
        meta = read_meta(path)
        check_pickles(path)
    except CheckpointError as e:
        raise ConfigError(f"output.resume={resume!r}: {e}") from None
    saved = from_dict(meta.config)
    changed = diff_incompatible(saved, cfg)
    if changed:
        needed = " ".join(f"{key}={format_value(get_value(saved, key))}" for key in changed)
        now = ", ".join(f"{key}={format_value(get_value(cfg, key))}" for key in changed)
        raise ConfigError(
            f"output.resume: checkpoint {path} was trained with {needed} (this run: "
            f"{now}); resume with those values (or start a new output.dir)"
        )
    # A weights-only checkpoint (tools/import_hf.py, to-dense) is a megatron dist checkpoint of the
    # model and nothing else: every backend starts from it with a fresh optimizer.
    if meta.backend != cfg.parallel.backend and not meta.weights_only:
        raise ConfigError(
            f"output.resume: checkpoint {path} was written by backend "
            f"{meta.backend!r}, this run uses parallel.backend="
            f"{cfg.parallel.backend!r}; convert it with tools/convert_checkpoint.py "
            f"{'from' if meta.backend == 'deepspeed' else 'to'}-deepspeed"
        )
    root = os.path.join(cfg.output.dir, CHECKPOINTS_DIR)
    later = sorted(
        n
        for n in (os.listdir(root) if os.path.isdir(root) else ())
        if re.fullmatch(r"step_\d{6,}", n) and int(n[5:]) > meta.step
    )
    if later:
        # A later step directory is there but was not taken: say why (truncated, a file missing).
        broken = next(
            (
                f" ({n} is not complete: {reason})"
                for n in later
                if (reason := is_complete(os.path.join(root, n)))
            ),
            "",
        )
        raise ConfigError(
            f"output.resume: {root} already holds {', '.join(later[:3])}, after the "
            f"resumed step {meta.step}{broken}; this run would have to replace "
            "them: resume the newest one, move them out of the way, or choose "
            "another output.dir"
        )
    if meta.step >= cfg.train.steps:
        raise ConfigError(
            f"output.resume: checkpoint {path} is at step {meta.step}, "
            f"train.steps={cfg.train.steps}: nothing left to train; expected "
            f"train.steps > {meta.step}"
        )
    return path


def auto_resume_path(root: str):
    """``output.resume=auto``: the newest complete (verified) step directory of ``root``, which
    is the one ``latest`` names unless a save was killed between its rename and the move of
    ``latest``, or ``latest`` is missing; None when ``root`` holds no step directory at all.

    Raises:
        CheckpointError: step directories exist but none is complete (never start fresh over
            them), or ``latest`` names something other than a step directory of ``root``.
    """
    read_latest(root)  # refuses a latest that points anywhere else
    complete = complete_step_dirs(root)
    if complete:
        return complete[-1]
    steps = (
        sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    )
    if not steps:
        return None
    raise CheckpointError(
        f"{root} holds {', '.join(steps)} but no complete checkpoint "
        f"({is_complete(os.path.join(root, steps[-1]))}); refusing to start "
        "fresh over them: resume one with output.resume=<step dir>, or choose "
        "another output.dir"
    )
