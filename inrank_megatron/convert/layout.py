"""Layout conversions of torch-backend checkpoints: ``reshard`` and ``to_dense``.

``reshard``: our torch-backend checkpoints store the model *and* the AdamW moments as megatron dist
checkpoints, sharded like the parameters with global offsets, and the growth state as JSON; none of
it depends on the TP/DP layout it was written at. Resharding therefore validates the target layout
against the config (divisibility, heads, batch), rewrites ``meta.json`` and the saved config for
it, and drops the per-rank RNG streams (which cannot carry over to another set of ranks); the
tensors are copied unchanged. The training loop loads them at the new layout.
"""

from __future__ import annotations

import os
import shutil

from inrank_megatron.checkpoint import (
    META_FILE,
    CheckpointError,
    check_destination,
    check_pickles,
    new_work_dir,
    read_meta,
    record_files,
    resolve_checkpoint,
    write_meta,
)
from inrank_megatron.config import ConfigError, from_dict, to_dict
from inrank_megatron import rules


def reshard(src: str, dst: str, *, tp: int, pp: int = 1, world_size: int | None = None) -> dict:
    """Write a copy of checkpoint ``src`` for TP=``tp``, PP=``pp`` at ``dst``; returns its meta.

    Args:
        src: a step directory (or a run / checkpoints directory: its latest step).
        dst: the new step directory (must not exist; written to a temporary name, then renamed).
        tp, pp: the target layout.
        world_size: the target number of processes (default: ``tp * pp`` x the source DP size).

    Raises:
        ConfigError / FileNotFoundError: bad input; nothing is written and ``src`` is untouched.
    """
    try:
        src = resolve_checkpoint(src)
        meta = read_meta(src)
        check_pickles(src)  # copied files must be as safe to load as resumed ones
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    if meta.backend != "torch":
        raise ConfigError(
            f"{src} was written by backend {meta.backend!r}; convert it to a "
            "torch (dist) checkpoint first (convert_checkpoint.py from-deepspeed)"
        )
    try:
        dst = check_destination(src, dst)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    cfg = from_dict(meta.config)
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    world = world_size or tp * pp * meta.dp
    rules.validate(cfg, world)  # ConfigError naming the key that does not divide
    tmp = new_work_dir(dst)
    try:
        shutil.copytree(
            src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("rng_*.pt", META_FILE)
        )
        new_meta = meta.replace(
            tp=tp,
            pp=pp,
            dp=world // (tp * pp),
            world_size=world,
            config=to_dict(cfg),
            resharded_from=os.path.abspath(src),
            files=record_files(tmp),
        )
        write_meta(tmp, new_meta)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return new_meta.to_json()


def to_dense(src: str, dst: str) -> dict:
    """Merge every InRank layer into a plain weight (``W0 + B[:, :k] A[:k]``) and write a
    weights-only checkpoint of the dense twin (``model.inrank=false``) at ``dst``: megatron's
    dense GPT loads it, and the training loop continues from it with a fresh optimizer.

    Returns the new checkpoint's meta.
    """
    import dataclasses

    from inrank_megatron.checkpoint.reader import load_checkpoint
    from inrank_megatron.checkpoint.writer import write_training_checkpoint
    from inrank_megatron.models.shape import padded_vocab_size

    check_destination(resolve_checkpoint(src), dst)
    ckpt = load_checkpoint(src)
    cfg = from_dict(to_dict(ckpt.cfg))
    cfg.model = dataclasses.replace(cfg.model, inrank=False)
    tensors = ckpt.dense_tensors(unpad_vocab=False)
    padded = padded_vocab_size(ckpt.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
    assert tensors["embedding.word_embeddings.weight"].shape[0] == padded
    meta = ckpt.meta.replace(
        weights_only=True, config=to_dict(cfg), files=None, merged_from=os.path.abspath(ckpt.path)
    )
    write_training_checkpoint(dst, cfg, ckpt.vocab_size, tensors, {}, meta)
    return meta.to_json()
