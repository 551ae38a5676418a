"""Checkpoint tools: read a training checkpoint (:func:`load_checkpoint`), export it as a Hugging
Face GPT-2 (:func:`export_hf`) or in InRank-native form (:func:`export_inrank`), import a Hugging
Face GPT-2 as a training checkpoint (:func:`import_hf`). The CLIs are ``tools/export_hf.py``,
``tools/export_inrank.py``, ``tools/import_hf.py``; ``inrank_megatron.inference`` runs the results."""

from inrank_megatron.export.checkpoint import (
    CheckpointError, InRankLayerState, LoadedCheckpoint, load_checkpoint, resolve_checkpoint,
)
from inrank_megatron.export.from_hf import import_hf
from inrank_megatron.export.hf_gpt2 import UnsupportedModelError, export_hf
from inrank_megatron.export.native import export_inrank, read_inrank_export

__all__ = ["CheckpointError", "InRankLayerState", "LoadedCheckpoint", "UnsupportedModelError",
           "export_hf", "export_inrank", "import_hf", "load_checkpoint", "read_inrank_export",
           "resolve_checkpoint"]
