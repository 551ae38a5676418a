"""Checkpoints, owned in one place: the format, its safe loading, resume, save and load, tensor
names, reading and writing outside training, DeepSpeed consolidation (torchtitan's
``CheckpointManager`` is the model). Importing this package needs no torch.

A run's ``output.dir`` holds::

    checkpoints/step_000100/meta.json           Meta: step, layout, backend, config (written last)
    checkpoints/step_000100/inrank_growth.json  every InRank layer's growth state and allocation
    checkpoints/step_000100/model/              torch/megatron backends: megatron dist checkpoint
                                                (model and, for torch, AdamW moments under
                                                "optimizer."); train.pt: scheduler, Adam steps
    checkpoints/step_000100/deepspeed/          deepspeed backend: DeepSpeed's own files, with
    checkpoints/step_000100/inrank_deepspeed.json   parameter shapes and TP layout
    checkpoints/step_000100/rng_00000.pt        RNG state per rank
    checkpoints/latest                          "step_000100": the name of a step directory here

- :mod:`.meta` (torch-free): the names above, :class:`Meta` (read, write, validate),
  the growth file, ``latest``, locating a checkpoint and finding the newest complete one.
- :mod:`.safe_load` (imports torch when called): every pickled file the project or its
  dependencies read for it goes through a loader that refuses code (:func:`safe_loading`).
- :mod:`.resume`: which checkpoint ``output.resume`` names, checked before anything loads.
- :mod:`.manager`: the training loop's save (atomic, ``latest`` moved last) and resume loads.
- :mod:`.layout`: the model's tensor names and shapes for a configuration.
- :mod:`.reader`: a checkpoint's tensors, growth state and config at TP = 1 (exports, tools).
- :mod:`.writer`: a training checkpoint written from tensors (import, layout conversion).
- :mod:`.deepspeed`: DeepSpeed checkpoints' checks and their consolidation to one state dict.

The names of :mod:`.meta` and :mod:`.safe_load` are importable from this package; the other
modules are imported by name (they import torch, megatron or the config).

Other modules never open ``meta.json``, ``inrank_growth.json`` or ``latest`` themselves.
"""

from inrank_megatron.checkpoint.meta import (  # noqa: F401
    CHECKPOINTS_DIR,
    DEEPSPEED_DIR,
    DEEPSPEED_META_FILE,
    GROWTH_FILE,
    LATEST,
    META_FILE,
    MODEL_DIR,
    CheckpointError,
    DiskSpaceError,
    Meta,
    check_destination,
    check_free_space,
    complete_step_dirs,
    free_bytes,
    is_complete,
    new_work_dir,
    read_deepspeed_meta,
    read_growth,
    read_latest,
    read_meta,
    record_files,
    resolve_checkpoint,
    saved_bytes,
    step_dir,
    write_deepspeed_meta,
    write_growth,
    write_json,
    write_latest,
    write_meta,
)
from inrank_megatron.checkpoint.safe_load import (  # noqa: F401
    UnsafeCheckpointError,
    check_pickles,
    read_dcp_metadata,
    safe_loading,
    safe_torch_load,
)
