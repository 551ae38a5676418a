"""Training checkpoints: the save and the resume loads of the training loop (and the conversion
jobs), in the format :mod:`inrank_megatron.checkpoint` owns.

A save writes ``checkpoints/.step_000100.<pid>.tmp``: the backend's files (torch / megatron:
``model/`` and ``train.pt``; deepspeed: ``deepspeed/`` and ``inrank_deepspeed.json``),
``rng_<rank>.pt`` per rank, ``inrank_growth.json``, then ``meta.json`` last (with every other file's
size, which resume verifies); it renames the directory to ``step_000100`` and only then moves
``latest``, so an interrupted save leaves the previous checkpoint as the latest one. A step
directory that already exists is never replaced: this run did not write it.

Every load here runs under :func:`~inrank_megatron.checkpoint.safe_loading`: nothing in a
checkpoint can run code.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Optional

import numpy
import torch

from inrank_megatron.checkpoint import (
    GROWTH_FILE,
    CheckpointError,
    DiskSpaceError,
    Meta,
    check_free_space,
    free_bytes,
    is_complete,
    read_growth,
    read_latest,
    read_meta,
    record_files,
    safe_loading,
    safe_torch_load,
    saved_bytes,
    step_dir,
    write_growth,
    write_latest,
    write_meta,
)


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _portable_rng(state: dict) -> dict:
    """RNG state with numpy's array as a list, loadable with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    return dict(state, numpy=(name, keys.tolist(), pos, has_gauss, cached))


def _native_rng(state: dict) -> dict:
    name, keys, pos, has_gauss, cached = state["numpy"]
    return dict(
        state,
        numpy=(name, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached),
        python=(state["python"][0], tuple(state["python"][1]), state["python"][2]),
    )


def _broadcast_str(text: str) -> str:
    if not torch.distributed.is_initialized():
        return text
    box = [text]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _space_needed(root: str, estimate: Optional[int]) -> tuple:
    """``(bytes, where the number comes from)`` a save under ``root`` needs: the size of the
    checkpoint ``latest`` names (the previous save), else ``estimate`` (the planner's)."""
    latest = read_latest(root) if os.path.isdir(root) else None
    if latest is not None and os.path.isdir(latest):
        size = saved_bytes(latest)
        if size:
            return size, f"the size of {os.path.basename(latest)}"
    return estimate or 0, "tools/plan.py's estimate"


def _no_space(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps: DCP's per-rank failures, causes) is ENOSPC."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        todo += [e.__cause__, e.__context__]
        todo += [f[0] for f in (getattr(e, "failures", None) or {}).values()]
    return False


def _first_failure(error: Optional[BaseException], groups) -> Optional[tuple]:
    """Collective: ``(rank, ENOSPC?, one line)`` of the lowest rank whose ``error`` is set, or
    None when no rank failed; every rank learns the same answer, so none waits in a collective
    another one skipped."""
    failures = getattr(error, "failures", None)  # DCP's CheckpointException: the rank's own
    cause = failures[min(failures)][0] if failures else error
    mine = (
        None
        if error is None
        else (
            groups.rank,
            _no_space(error),
            f"{type(cause).__name__}: {' '.join(str(cause).split())}",
        )
    )
    if not torch.distributed.is_initialized():
        return mine
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return next((f for f in every if f is not None), None)


def save_training_checkpoint(
    root: str,
    step: int,
    *,
    controller,
    backend,
    groups,
    rng: dict,
    meta: Meta,
    estimate: Optional[int] = None,
    writes: Optional["AsyncWrites"] = None,
    keep_last: Optional[int] = None,
) -> Optional[str]:
    """Collective. Writes step ``step`` under ``root`` (a run's ``checkpoints/``) and points
    ``latest`` at it; ``meta.step`` is set to ``step``; with ``keep_last``, then deletes this
    run's older checkpoints beyond the newest ``keep_last`` (:func:`prune_checkpoints`).

    First, rank 0 compares the free space of ``root`` with the previous save's size (``latest``),
    or ``estimate`` (the planner's) before the first one.

    Args:
        writes: ``train.async_save``: the model and optimizer state go to a background writer
            (a snapshot taken now); the rest of the save (``meta.json``, the check of its files,
            the rename, ``latest``, the pruning) runs when :meth:`AsyncWrites.finish` completes
            it. A failure of the background write surfaces there.

    Returns:
        The checkpoint directory, or None while ``writes`` writes it.

    Raises:
        CheckpointError: the step directory exists already (another run's, or this directory was
            resumed from a later step): nothing is replaced.
        DiskSpaceError: too little free space (nothing written), or the write ran out of space
            (ENOSPC on any rank; its partial directory removed). ``latest`` is untouched.
    """
    final = step_dir(root, step)
    tmp, problem, need = "", "", 0
    if groups.rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(final):
            problem = (
                f"exists:{final} exists; refusing to replace a checkpoint this run did not write"
            )
        else:
            try:
                need, source = _space_needed(root, estimate)
                check_free_space(root, need, source)
                tmp = os.path.join(root, f".step_{step:06d}.{os.getpid()}.tmp")
                os.makedirs(tmp)
            except OSError as error:  # makedirs on a full disk
                full = error.errno == errno.ENOSPC
                problem = (
                    f"space:{_stopped(root, step, error)}" if full else f"error:{root}: {error}"
                )
            except DiskSpaceError as error:
                problem = f"space:{_stopped(root, step, error)}"
    tmp, problem = _broadcast_str(tmp + "\n" + problem).split("\n", 1)  # every rank learns both
    if problem:
        kind, text = problem.split(":", 1)
        raise (DiskSpaceError if kind == "space" else CheckpointError)(text)
    error, request = None, None
    try:
        # The torch backend's save takes async_save (rules.py refuses it with the others).
        request = backend.save(tmp, async_save=True) if writes is not None else backend.save(tmp)
        part = os.path.join(tmp, f"rng_{groups.rank:05d}.pt")
        torch.save(_portable_rng(rng), part + ".part")
        os.replace(part + ".part", part)
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        error = e
    _write_failed(_first_failure(error, groups), root, step, tmp, groups, need)
    growth = controller.full_state_dict()  # collective over pipeline stages

    def complete():
        _barrier()  # every rank's files are written
        error = None
        if groups.rank == 0:
            try:
                write_growth(tmp, growth)
                write_meta(tmp, meta.replace(step=step, files=record_files(tmp)))
            except OSError as e:
                error = e
        _write_failed(_first_failure(error, groups), root, step, tmp, groups, need)
        # Verified: every file meta.json records is on disk at its size.
        reason = _broadcast_str(is_complete(tmp) or "" if groups.rank == 0 else "")
        if reason:
            raise CheckpointError(
                f"checkpoint of step {step} failed verification: {reason}; latest is untouched"
            )
        if groups.rank == 0:
            os.rename(tmp, final)
            write_latest(root, final)
            if keep_last:
                prune_checkpoints(root, keep_last)
        _barrier()

    if writes is None:
        complete()
        return final
    writes.start(
        request,
        complete,
        final,
        lambda error: _write_failed(_first_failure(error, groups), root, step, tmp, groups, need),
    )
    return None


class AsyncWrites:
    """``train.async_save``: the checkpoint being written in the background, at most one.

    The state is snapshotted when the save is called (megatron's async request forks a writer
    process: copy-on-write memory on CPU, host copies of device tensors on GPU), so the steps
    that follow cannot change what is written. The loop asks every step whether this rank's
    writer still runs (:meth:`writing`, a vote on the step's one all-reduce) and completes the
    write on all ranks together once none does (:meth:`finish`): megatron's finalisation (every
    rank's write results gathered, its metadata), then ``meta.json``, the check of every file it
    records, the rename and ``latest``. Until then ``latest`` names the previous checkpoint.
    """

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue()
        self.pending: Optional[str] = None  # the step directory it becomes
        self._failed = None  # what a failed write does: see start

    def start(self, request, complete, final: str, failed) -> None:
        """Collective: start ``request``'s writer; ``complete`` runs at :meth:`finish`, and
        ``failed(error)`` when the writer failed (it removes the partial save and raises the
        one-line error: no space left on device, or what failed)."""
        request.add_finalize_fn(complete)
        self._queue.schedule_async_request(request)
        self.pending, self._failed = final, failed

    def writing(self) -> bool:
        """Whether this rank's writer still runs (no collective)."""
        if self.pending is None:
            return False
        caller = self._queue.async_calls[0].async_caller
        return not caller.is_current_async_call_done(blocking=False, no_dist=True)

    def finish(self) -> Optional[str]:
        """Collective: wait for the write in flight (if any) and complete it. Returns its step
        directory, now ``latest``, or None when nothing was in flight."""
        if self.pending is None:
            return None
        final, self.pending = self.pending, None
        try:
            self._queue.maybe_finalize_async_calls(blocking=True, no_dist=True)
        except CheckpointError:  # complete() said what failed
            raise
        except BaseException as error:  # noqa: BLE001 - megatron's CheckpointException of a
            if isinstance(error, KeyboardInterrupt):  # writer: on every rank, as one line
                raise
            self._failed(error)
        return final


def _stopped(root: str, step: int, error: BaseException) -> str:
    """The one line of a save that did not happen for want of space (``latest`` untouched)."""
    latest = read_latest(root) if os.path.isdir(root) else None
    kept = f"latest is still {os.path.basename(latest)}" if latest else "no checkpoint was saved"
    return (
        f"stopped at step {step}: {' '.join(str(error).split())}; {kept} (free space, then "
        "continue with output.resume=auto)"
    )


def _write_failed(
    failure: Optional[tuple], root: str, step: int, tmp: str, groups, need: int
) -> None:
    """After a failed write on any rank (``failure`` from :func:`_first_failure`): rank 0 removes
    the partial directory and says what happened; every rank raises it, DiskSpaceError when the
    disk is full. ENOSPC often reaches us without its errno (torch's zip writer reports
    ``unexpected pos``), so a write that failed with less free than the save needed
    (rank 0's ``need``) counts as one too."""
    if failure is None:
        return
    rank, no_space, text = failure
    message = ""
    if groups.rank == 0:
        free = free_bytes(root)
        shutil.rmtree(tmp, ignore_errors=True)
        if no_space or free < need:
            message = "space:" + _stopped(
                root,
                step,
                OSError(
                    errno.ENOSPC,
                    f"no space left on device writing {os.path.basename(tmp)} in "
                    f"{root} ({free:,} bytes free then; the partial save was removed)",
                ),
            )
        else:
            message = (
                f"error:saving step {step} in {root} failed on rank {rank}: {text}; the "
                "partial save was removed and latest is untouched"
            )
    kind, text = _broadcast_str(message).split(":", 1)
    raise (DiskSpaceError if kind == "space" else CheckpointError)(text)


def load_growth_state(path: str, controller) -> None:
    """Restore growth state and reshape reallocated factors (before the backend is built).

    Raises:
        CheckpointError: naming ``inrank_growth.json`` when it parses but does not hold a growth
            state these layers accept (a stage, rank or key that no save writes).
    """
    try:
        controller.load_state_dict(read_growth(path))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"{os.path.join(path, GROWTH_FILE)}: {error}; expected the growth "
            "state of every InRank layer as the save wrote it"
        ) from None


def load_model_weights(path: str, model) -> None:
    """Collective: only the model tensors of ``path/model`` (a megatron dist checkpoint)."""
    from megatron.core import dist_checkpointing

    with torch.no_grad(), safe_loading(path):
        state = dist_checkpointing.load(
            {"model": model.sharded_state_dict()}, os.path.join(path, "model")
        )
    model.load_state_dict(state["model"], strict=True)


def load_backend_state(path: str, backend) -> None:
    """Collective: the backend's model and optimizer state from ``path``, nothing run from it."""
    with safe_loading(path):
        backend.load(path)


def load_rng_state(path: str, rank: int) -> dict:
    """This rank's RNG state (``weights_only``: no pickled code runs)."""
    file = os.path.join(path, f"rng_{rank:05d}.pt")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} missing: checkpoint {path} was written by fewer ranks")
    return _native_rng(safe_torch_load(file))


def remove_partial_saves(root: str) -> None:
    """Delete this run's interrupted saves (``.step_*.<pid>.tmp`` under ``root``): only names
    that a save of this project creates, inside the run's own ``checkpoints/``."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(".step_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ------------------------------------------------------------------------- output.keep_last
_STEP = re.compile(r"step_(\d{6,})")


def written_here(path: str, output_dir: str) -> bool:
    """Whether step directory ``path`` is, untouched, what a training save into ``output_dir``
    wrote: its ``meta.json`` names this ``output.dir`` in its config and no conversion, import or
    weights-only copy, and the directory holds exactly the files the save recorded
    (:attr:`Meta.files`: none added, none missing, none resized)."""
    try:
        meta = read_meta(path)
    except CheckpointError:
        return False
    if (
        meta.files is None
        or meta.weights_only
        or any((meta.resharded_from, meta.merged_from, meta.converted_from, meta.imported_from))
    ):
        return False
    written_for = (meta.config.get("output") or {}).get("dir")
    if not isinstance(written_for, str) or os.path.realpath(written_for) != os.path.realpath(
        output_dir
    ):
        return False
    return record_files(path) == meta.files


def prune_checkpoints(root: str, keep_last: int) -> list:
    """``output.keep_last`` (torchtitan's ``keep_latest_k``): delete the step directories of
    ``root`` (``<output.dir>/checkpoints``) that this run wrote (:func:`written_here`) but the
    newest ``keep_last`` of them. Nothing is deleted unless ``latest`` names a complete
    checkpoint, and only directories older than it; anything else (a checkpoint copied in, one a
    user added a file to) is neither deleted nor counted. Each goes by a rename to the name of an
    interrupted save first (``.step_NNNNNN.<pid>.tmp``, which :func:`remove_partial_saves`
    clears), so a crash midway never leaves part of one under its step name.

    Returns:
        The deleted step directories, oldest first.
    """
    latest = read_latest(root)
    if latest is None or is_complete(latest) is not None:
        return []
    output_dir = os.path.dirname(os.path.abspath(root))
    ours = sorted(
        (int(m.group(1)), os.path.join(root, name))
        for name in os.listdir(root)
        if (m := _STEP.fullmatch(name)) and written_here(os.path.join(root, name), output_dir)
    )
    latest_step = int(_STEP.fullmatch(os.path.basename(latest)).group(1))
    keep = {path for _, path in ours[-keep_last:]}
    deleted = []
    for step, path in ours:
        if path in keep or step >= latest_step:
            continue
        trash = os.path.join(root, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(path)
    return deleted
