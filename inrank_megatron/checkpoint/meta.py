"""File names, ``meta.json`` (:class:`Meta`), ``inrank_growth.json`` and ``latest``: the only code
that reads or writes them. Torch-free, so tools and pre-flight checks can inspect a checkpoint
without importing torch.

    meta = read_meta(step_dir)                  # Meta; CheckpointError naming the file if bad
    write_meta(tmp_dir, meta)                   # validated, atomic
    path = read_latest("runs/x/checkpoints")    # the step directory `latest` names, or None
    newest = complete_step_dirs("runs/x/checkpoints")[-1]   # verified against meta.files
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from typing import Optional

META_FILE = "meta.json"
GROWTH_FILE = "inrank_growth.json"
LATEST = "latest"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint (its tag) inside a step directory
DEEPSPEED_META_FILE = "inrank_deepspeed.json"  # ZeRO stage, TP/DP, parameter shapes
BACKENDS = ("torch", "megatron", "deepspeed")
_STEP_NAME = re.compile(r"step_(\d{6,})")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, inconsistent or not loadable; the message names
    the file (and the layer, for factor shapes)."""


class DiskSpaceError(CheckpointError):
    """Too little free space for a checkpoint: found before writing it, or the write itself ran
    out of space (ENOSPC). The message names the directory, the bytes needed and those free."""


def free_bytes(path: str) -> int:
    """Bytes free to this user on the filesystem of ``path`` (its nearest existing parent when
    ``path`` does not exist yet)."""
    import shutil

    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def check_free_space(directory: str, need: int, source: str) -> None:
    """DiskSpaceError unless the filesystem of ``directory`` has ``need`` bytes free (``source``:
    where the number comes from, for the message)."""
    free = free_bytes(directory)
    if free < need:
        raise DiskSpaceError(
            f"no room for a checkpoint in {directory}: it needs {need:,} bytes "
            f"({source}), {free:,} are free there"
        )


def saved_bytes(path: str) -> Optional[int]:
    """Bytes of step directory ``path`` as its save recorded them (:attr:`Meta.files` plus
    ``meta.json``); None when it does not record them."""
    meta = read_meta(path)
    if meta.files is None:
        return None
    return sum(meta.files.values()) + os.path.getsize(os.path.join(path, META_FILE))


def step_dir(root: str, step: int) -> str:
    """``root/step_000100``: where step ``step``'s checkpoint lives under ``checkpoints/``."""
    return os.path.join(root, f"step_{step:06d}")


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON through a temporary name of our own and an atomic rename (a crash
    leaves the old file or the new one, never half of one)."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(file: str, what: str):
    if not os.path.isfile(file):
        raise CheckpointError(
            f"{file} missing: {os.path.dirname(file)} is not a complete "
            f"checkpoint ({what}; an interrupted save, or not a checkpoint)"
        )
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file}: unreadable {what}: {error}") from None


# ------------------------------------------------------------------------------------ meta.json
@dataclasses.dataclass(frozen=True)
class Meta:
    """``meta.json``: what a step directory holds and how it was written.

    Attributes:
        step: optimizer steps completed.
        consumed_samples: training samples consumed (``step * train.global_batch_size``).
        world_size, tp, pp, dp: the layout that wrote it (per-rank RNG files follow ``world_size``).
        backend: ``torch``, ``megatron`` or ``deepspeed`` (who wrote the model/optimizer files).
        config: the run's full configuration (``config.to_dict`` form).
        weights_only: only the model (``model/``), no optimizer or RNG state (import, to-dense):
            every backend starts from it with a fresh optimizer.
        files: ``{relative path: bytes}`` of every other file of the step directory at save time;
            :func:`is_complete` verifies them. None for checkpoints written before it existed.
        resharded_from, merged_from, converted_from: the source step directory of a conversion.
        imported_from: what ``tools/import_hf.py`` read.
    """

    step: int
    consumed_samples: int
    world_size: int
    tp: int
    pp: int
    dp: int
    backend: str
    config: dict
    weights_only: bool = False
    files: Optional[dict] = None
    resharded_from: Optional[str] = None
    merged_from: Optional[str] = None
    converted_from: Optional[str] = None
    imported_from: Optional[dict] = None

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "meta") -> None:
        """ValueError naming ``where`` and the key unless every field has its type and range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = {
                "int": int,
                "str": str,
                "dict": dict,
                "bool": bool,
                "Optional[dict]": dict,
                "Optional[str]": str,
            }[str(f.type)]
            optional = str(f.type).startswith("Optional")
            if value is None and optional:
                continue
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CheckpointError(f"{where}: {f.name}={value!r}; expected {f.type}")
        for name in ("world_size", "tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"{where}: {name}={getattr(self, name)}; expected >= 1")
        if self.step < 0 or self.consumed_samples < 0:
            raise CheckpointError(
                f"{where}: step={self.step}, consumed_samples="
                f"{self.consumed_samples}; expected >= 0"
            )
        if self.backend not in BACKENDS:
            raise CheckpointError(f"{where}: backend={self.backend!r}; expected one of {BACKENDS}")
        if self.tp * self.pp * self.dp != self.world_size:
            raise CheckpointError(
                f"{where}: tp={self.tp} x pp={self.pp} x dp={self.dp} != "
                f"world_size={self.world_size}"
            )

    def replace(self, **changes) -> "Meta":
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        """The ``meta.json`` object (optional fields left out when unset)."""
        return {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if v is not None and not (k == "weights_only" and not v)
        }

    @classmethod
    def from_json(cls, data, where: str = "meta") -> "Meta":
        """Parse a ``meta.json`` object; CheckpointError naming ``where`` and the unknown or
        missing keys."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        missing = sorted(
            n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
        )
        if unknown or missing:
            what = ", ".join(
                f"{kind} keys {keys}"
                for kind, keys in (("unknown", unknown), ("missing", missing))
                if keys
            )
            raise CheckpointError(f"{where}: {what}; expected the keys {sorted(fields)}")
        try:
            return cls(**data)
        except CheckpointError as error:
            raise CheckpointError(str(error).replace("meta:", f"{where}:", 1)) from None


def read_meta(path: str) -> Meta:
    """``meta.json`` of step directory ``path``; CheckpointError naming the file otherwise."""
    file = os.path.join(path, META_FILE)
    data = _read_json(file, "checkpoint metadata")
    meta = Meta.from_json(data, where=file)
    return meta


def write_meta(path: str, meta: Meta) -> None:
    """Write ``meta`` as ``path/meta.json`` (atomically; the last file of a save)."""
    meta.validate()
    write_json(os.path.join(path, META_FILE), meta.to_json())


# --------------------------------------------------------------------------------- growth file
def read_growth(path: str) -> dict:
    """``inrank_growth.json`` of step directory ``path``: ``{layer: {"growth": ...,
    "allocated_slots": ...}}`` (empty for a dense model)."""
    data = _read_json(os.path.join(path, GROWTH_FILE), "InRank growth state")
    if not isinstance(data, dict):
        raise CheckpointError(f"{os.path.join(path, GROWTH_FILE)}: expected a JSON object")
    return data


def write_growth(path: str, growth: dict) -> None:
    write_json(os.path.join(path, GROWTH_FILE), growth)


# ------------------------------------------------------------------------ inrank_deepspeed.json
def read_deepspeed_meta(path: str) -> dict:
    """``inrank_deepspeed.json`` of a DeepSpeed step directory: ``{"zero_stage", "tp", "dp",
    "precision", "params": {name: {"shape", "tensor_model_parallel", "partition_dim"}}}``."""
    data = _read_json(os.path.join(path, DEEPSPEED_META_FILE), "DeepSpeed layout record")
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise CheckpointError(
            f"{os.path.join(path, DEEPSPEED_META_FILE)}: expected an object with 'params'"
        )
    return data


def write_deepspeed_meta(path: str, meta: dict) -> None:
    write_json(os.path.join(path, DEEPSPEED_META_FILE), meta)


# --------------------------------------------------------------------------------------- latest
def read_latest(root: str) -> Optional[str]:
    """The step directory ``root/latest`` names (``root`` is a run's ``checkpoints/``), or None
    without a ``latest``. Only a step directory of ``root`` itself may be named: an absolute path,
    ``..`` or anything but ``step_NNNNNN`` is refused (CheckpointError), so editing ``latest``
    cannot point a resume at another checkpoint on the machine."""
    file = os.path.join(root, LATEST)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        name = f.read(256).strip()
    if not _STEP_NAME.fullmatch(name):
        raise CheckpointError(
            f"{file} holds {name!r}; expected the name of a step directory of "
            f"{root} (step_NNNNNN), not a path"
        )
    return os.path.join(root, name)


def write_latest(root: str, step_path: str) -> None:
    """Point ``root/latest`` at ``step_path``, a step directory of ``root``."""
    name = os.path.basename(os.path.normpath(step_path))
    if not _STEP_NAME.fullmatch(name) or os.path.dirname(
        os.path.abspath(step_path)
    ) != os.path.abspath(root):
        raise CheckpointError(f"{step_path}: latest may only name a step directory of {root}")
    tmp = os.path.join(root, f".{LATEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))


# ------------------------------------------------------------------------------- completeness
def record_files(path: str) -> dict:
    """``{relative path: bytes}`` of every file under step directory ``path`` but ``meta.json``
    (written into :attr:`Meta.files` just before it)."""
    out = {}
    for parent, _, names in os.walk(path):
        for name in names:
            full = os.path.join(parent, name)
            rel = os.path.relpath(full, path)
            if rel != META_FILE:
                out[rel] = os.path.getsize(full)
    return dict(sorted(out.items()))


def is_complete(path: str) -> Optional[str]:
    """None when step directory ``path`` is a complete checkpoint, else why not. Complete: a
    valid ``meta.json`` and growth file and every file :attr:`Meta.files` records, at its size
    (older checkpoints without the record: the backend's files present)."""
    try:
        meta = read_meta(path)
        read_growth(path)
    except CheckpointError as error:
        return str(error)
    if meta.files is not None:
        for rel, size in meta.files.items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                return f"{full} missing"
            if os.path.getsize(full) != size:
                return f"{full} has {os.path.getsize(full)} bytes, the save wrote {size}"
        return None
    needed = (
        [os.path.join(MODEL_DIR, ".metadata")]
        if meta.backend != "deepspeed"
        else [DEEPSPEED_DIR, DEEPSPEED_META_FILE]
    )
    for rel in needed:
        if not os.path.exists(os.path.join(path, rel)):
            return f"{os.path.join(path, rel)} missing"
    return None


def complete_step_dirs(root: str) -> list:
    """Every complete step directory of ``root`` (a ``checkpoints/``), oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted((int(m.group(1)), n) for n in os.listdir(root) if (m := _STEP_NAME.fullmatch(n)))
    return [os.path.join(root, n) for _, n in names if is_complete(os.path.join(root, n)) is None]


# ------------------------------------------------------------------------------ writing safely
def check_destination(src: str, dst: str) -> str:
    """``dst`` as an absolute path for a tool writing a copy of ``src``; CheckpointError when it
    exists (never overwritten) or lies inside ``src`` (a copy into its own source recurses)."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst} exists; refusing to overwrite it (choose a new directory)")
    if real_dst == real_src or real_dst.startswith(real_src.rstrip(os.sep) + os.sep):
        raise CheckpointError(f"{dst} is inside the source {src}; choose a destination outside it")
    return os.path.abspath(dst)


def new_work_dir(dst: str) -> str:
    """A new, empty directory next to ``dst`` to fill before renaming it to ``dst``: a fresh name
    (``.<name>.<pid>.<random>.tmp``) created here, so a user's ``dst.tmp`` is never touched."""
    import tempfile

    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(
        prefix=f".{os.path.basename(os.path.abspath(dst))}.{os.getpid()}.",
        suffix=".tmp",
        dir=parent,
    )


# ------------------------------------------------------------------------------------ locating
@contextlib.contextmanager
def atomic_output_dir(out_dir: str, source: str | None = None):
    """Yield a new temporary sibling of ``out_dir`` to fill; rename it to ``out_dir`` on success,
    delete it on failure. ``out_dir`` must not exist (exports never overwrite) nor lie inside
    ``source`` (the checkpoint read: tools never write into their input)."""
    if source is not None:
        check_destination(source, out_dir)
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir):
        raise FileExistsError(
            f"{out_dir} already exists; refusing to overwrite it (remove it or "
            "choose another output directory)"
        )
    tmp = new_work_dir(out_dir)
    try:
        yield tmp
        _umask_modes(tmp)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask_modes(path: str) -> None:
    """Give every file under ``path`` the mode a plain ``open()`` would (0644 under umask 022):
    some writers (safetensors' ``save_file``) create theirs 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(path):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def resolve_checkpoint(path: str) -> str:
    """The step directory that ``path`` names: a step directory itself, a ``checkpoints/``
    directory (its ``latest``) or a run's ``output.dir`` (its ``checkpoints/latest``).

    Raises:
        CheckpointError: nothing there, no ``latest``, or a step directory without ``meta.json``
            (an interrupted save).
    """
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path}: no such checkpoint (expected a checkpoint step directory, "
            "a checkpoints/ directory or a run's output.dir)"
        )
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: not a directory; expected a checkpoint step directory, a "
            "checkpoints/ directory or a run's output.dir"
        )
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    latest = read_latest(path)
    if latest is not None:
        if not os.path.isdir(latest):
            raise CheckpointError(
                f"{path}/{LATEST} names {os.path.basename(latest)!r}, which does not exist"
            )
        if not os.path.isfile(os.path.join(latest, META_FILE)):
            raise CheckpointError(_partial(latest))
        return latest
    if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
        return resolve_checkpoint(os.path.join(path, CHECKPOINTS_DIR))
    if os.path.exists(os.path.join(path, GROWTH_FILE)) or os.path.isdir(
        os.path.join(path, MODEL_DIR)
    ):
        raise CheckpointError(_partial(path))
    steps = sorted(d for d in os.listdir(path) if d.startswith("step_"))
    if steps:
        raise CheckpointError(
            f"{path}: holds {', '.join(steps)} but no '{LATEST}' file; pass a step directory"
        )
    raise CheckpointError(
        f"{path}: not a training checkpoint (no {META_FILE}, no '{LATEST}' "
        "file, no checkpoints/ directory)"
    )


def _partial(step: str) -> str:
    return (
        f"{step} is not a complete checkpoint: {META_FILE} is missing (a save interrupted "
        "before it finished, or not a checkpoint directory)"
    )
