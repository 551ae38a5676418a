"""Loading checkpoint files without running code hidden in them.

Pickle can call any function while loading. The files a checkpoint holds are read here, or by our
dependencies while :func:`safe_loading` is active, so that nothing but tensors and plain data is
ever built:

- torch DCP ``model/.metadata`` (megatron's ``torch_dist`` format, read by torch with plain
  ``pickle.load``): :class:`DCPMetadataUnpickler`, which admits DCP's own metadata classes,
  ``torch.Size`` and dtypes only; megatron's loader is given
  :func:`safe_filesystem_reader`, which reads through it.
- every ``torch.load`` (ours; DeepSpeed's checkpoint engine and ``zero_to_fp32``, which pass
  ``weights_only=False``; DCP's byte items; megatron's ``common.pt``): forced to
  ``weights_only=True``, with the few plain-data classes DeepSpeed's own files name
  (:data:`DEEPSPEED_SAFE_GLOBALS`) allowed.

A refused file raises :class:`UnsafeCheckpointError` naming the file and the global it asked for.
torch is imported when a loader is called, never at import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pickle
import re
import threading

from inrank_megatron.checkpoint.meta import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that names code (a global outside the allowed types)."""

    def __init__(self, file: str, refused: str):
        super().__init__(
            f"{file}: refusing to load {refused} (checkpoint files may hold only "
            "tensors and plain data; nothing from this file was run)"
        )
        self.file, self.refused = file, refused

    def __reduce__(self):
        # torch DCP gathers a failed read's exception from every rank with all_gather_object,
        # which unpickles it as cls(*args): rebuild from (file, refused), not the message.
        return type(self), (self.file, self.refused)


# --------------------------------------------------------------------------------- DCP metadata
# The only globals a DCP ``.metadata`` pickle may name: torch.distributed.checkpoint's dataclasses,
# torch.Size and dtypes (what torch 2.13's FileSystemWriter pickles for megatron's torch_dist).
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
        "BytesIOWriteData",
    },
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
}


class DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata``; any other global raises ``pickle.UnpicklingError``."""

    def find_class(self, module, name):
        import torch

        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_dcp_metadata(stream, file: str):
    """A DCP ``Metadata`` from ``stream`` (the open ``.metadata`` file ``file``).

    Raises:
        UnsafeCheckpointError: it names a global outside the DCP metadata classes.
        CheckpointError: it is not a readable pickle.
    """
    try:
        return DCPMetadataUnpickler(stream).load()
    except pickle.UnpicklingError as error:
        refused = _refused_global(error)
        if refused:
            raise UnsafeCheckpointError(file, refused) from None
        raise CheckpointError(f"{file}: unreadable checkpoint metadata: {error}") from None
    except (EOFError, AttributeError, ImportError, TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: unreadable checkpoint metadata: {error!r}") from None


def _refused_global(error: Exception):
    match = re.search(r"GLOBAL (\S+?)(?:\s|$)", str(error))
    return match.group(1) if match else None


@functools.lru_cache(maxsize=None)
def _safe_reader_class():
    # Built on first use: megatron and torch.distributed.checkpoint are imported only then.
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeFileSystemReader(CachedMetadataFileSystemReader):
        """megatron's cached ``FileSystemReader`` with ``.metadata`` read by
        :class:`DCPMetadataUnpickler` instead of ``pickle.load`` (torch's
        ``FileSystemReader.read_metadata``)."""

        def read_metadata(self, *args, **kwargs) -> Metadata:
            if self._cached_metadata is None:
                path = self._get_metadata_path(kwargs.get("rank"))
                with self.fs.create_stream(path, "rb") as stream:
                    metadata = read_dcp_metadata(stream, str(path))
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                self._cached_metadata = metadata
            return self._cached_metadata

        def read_data(self, plan, planner):
            """torch's ``read_data``; a byte item refused or unreadable while loading is reported
            with the ``.distcp`` file and the item holding it (the loader sees only bytes)."""
            load_bytes = planner.load_bytes

            def load_named(read_item, value):
                file = os.path.join(
                    str(self.path), self.storage_data[read_item.storage_index].relative_path
                )
                where = f"{file} (item {read_item.dest_index.fqn})"
                with loading_item(where):  # refusals name the item
                    try:
                        return load_bytes(read_item, value)
                    except CheckpointError:
                        raise
                    except Exception as error:  # noqa: BLE001 - a corrupt item: one line
                        text = " ".join(str(error).split())
                        raise CheckpointError(
                            f"{where}: unreadable ({type(error).__name__}: {text})"
                        ) from None

            planner.load_bytes = load_named
            try:
                return super().read_data(plan, planner)
            finally:
                del planner.load_bytes

    return SafeFileSystemReader


def safe_filesystem_reader(checkpoint_dir: str):
    """A torch DCP ``FileSystemReader`` of ``checkpoint_dir`` (megatron's cached one) whose
    metadata load runs no code: ``.metadata`` goes through :class:`DCPMetadataUnpickler`."""
    return _safe_reader_class()(checkpoint_dir)


# ------------------------------------------------------------------------------------ torch.load
# Plain-data classes DeepSpeed 0.19's own checkpoint files name (model states and ZeRO optimizer
# partitions): found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3 saves.
DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _safe_globals() -> list:
    found = []
    for module, name in DEEPSPEED_SAFE_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # DeepSpeed not installed: its files cannot occur
            continue
    return found


def safe_torch_load(f, file: str | None = None, **kwargs):
    """``torch.load(f, weights_only=True)`` with DeepSpeed's plain-data classes allowed; a file
    that names anything else raises :class:`UnsafeCheckpointError` naming ``file`` (default:
    ``f`` itself when it is a path)."""
    import torch

    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    where = file or (os.fspath(f) if isinstance(f, (str, os.PathLike)) else "checkpoint data")
    load = _ORIGINAL_LOAD or torch.load
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return load(f, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        refused = _refused_global(error)
        if refused:
            raise UnsafeCheckpointError(where, refused) from None
        # Not code but not a pickle either (zeroed or overwritten bytes): torch's message is a
        # paragraph about weights_only around the one line that says what it met.
        found = re.search(
            r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)",
            str(error),
            re.DOTALL,
        )
        reason = " ".join((found.group(1) if found else str(error).splitlines()[0]).split())
        raise CheckpointError(f"{where}: not a readable torch.save file ({reason})") from None


_ORIGINAL_LOAD = None
_LOCK = threading.Lock()
_DEPTH = 0
_ITEM = threading.local()  # what an in-memory load reads: see loading_item


@contextlib.contextmanager
def loading_item(where: str):
    """Within this block, a refused or unreadable in-memory ``torch.load`` names ``where`` (a DCP
    byte item: its ``.distcp`` file and key) instead of the whole checkpoint."""
    _ITEM.where = where
    try:
        yield
    finally:
        _ITEM.where = None


@contextlib.contextmanager
def safe_loading(where: str):
    """Within this block, every ``torch.load`` in the process (DeepSpeed's, DCP's, megatron's,
    ours) loads with ``weights_only=True`` and megatron's dist-checkpoint loads read ``.metadata``
    through :class:`DCPMetadataUnpickler`. ``where`` (the checkpoint) names what a refused
    in-memory item came from. Re-entrant."""
    global _ORIGINAL_LOAD, _DEPTH
    import torch
    from torch.distributed.checkpoint.api import CheckpointException
    from megatron.core.dist_checkpointing.strategies import torch as megatron_torch_strategy

    with _LOCK:
        _DEPTH += 1
        if _DEPTH == 1:
            _ORIGINAL_LOAD = torch.load
            saved = (
                megatron_torch_strategy._get_filesystem_reader,
                os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"),
                os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None),
            )

            def load(f, map_location=None, pickle_module=None, **kwargs):
                del pickle_module
                item = (
                    None
                    if isinstance(f, (str, os.PathLike))
                    else getattr(_ITEM, "where", None) or where
                )
                return safe_torch_load(f, item, map_location=map_location, **kwargs)

            torch.load = load
            megatron_torch_strategy._get_filesystem_reader = (
                lambda checkpoint_dir, cache_metadata=False: safe_filesystem_reader(checkpoint_dir)
            )
            # A second guard for code that bound torch.serialization.load before this block.
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    except CheckpointException as error:  # DCP's wrapper of every rank's failed read
        raise dcp_failure(error, where) from None
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                torch.load = _ORIGINAL_LOAD
                _ORIGINAL_LOAD = None
                megatron_torch_strategy._get_filesystem_reader = saved[0]
                for name, value in (
                    ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", saved[1]),
                    ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", saved[2]),
                ):
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


def dcp_failure(error: BaseException, where: str) -> Exception:
    """The exception to report for torch DCP's ``CheckpointException`` (a ``BaseException``
    holding every failed rank's exception and stack, printed as one traceback per rank): the
    lowest failed rank's own :class:`CheckpointError` (a refused item, a full disk), else a
    CheckpointError naming ``where`` (the checkpoint) and that rank's exception in one line."""
    failures = getattr(error, "failures", None) or {}
    if not failures:
        return CheckpointError(f"{where}: {' '.join(str(error).split())}")
    rank = min(failures)
    cause = failures[rank][0]
    if isinstance(cause, CheckpointError):
        return cause
    text = " ".join(str(cause).split()) or "no message"
    return CheckpointError(
        f"{where}: rank {rank} failed in torch.distributed.checkpoint "
        f"({type(cause).__name__}: {text})"
    )


# ------------------------------------------------------------------------------ checking ahead
def check_pickles(path: str) -> None:
    """Refuse, before anything is loaded, a step directory holding a pickled file that names code:
    every ``.metadata`` through :class:`DCPMetadataUnpickler`, every ``*.pt`` by disassembling its
    pickle (nothing is built). Items inside ``.distcp`` files are checked as they load, under
    :func:`safe_loading`.

    Raises:
        UnsafeCheckpointError: naming the first such file and the global it names.
    """
    import torch

    for parent, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            file = os.path.join(parent, name)
            if name == ".metadata":
                with open(file, "rb") as f:
                    read_dcp_metadata(f, file)
            elif name.endswith(".pt"):
                with torch.serialization.safe_globals(_safe_globals()):
                    try:
                        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
                    except (ValueError, RuntimeError, OSError) as error:
                        raise CheckpointError(
                            f"{file}: not a torch.save zip file ({error}); refusing to unpickle it"
                        ) from None
                if unsafe:
                    raise UnsafeCheckpointError(file, sorted(unsafe)[0])
