"""Exports of a training checkpoint: as a Hugging Face GPT-2 (:func:`export_hf`) or in InRank-native
form (:func:`export_inrank`). The CLIs are ``tools/export_hf.py`` and ``tools/export_inrank.py``;
``inrank_megatron.inference`` runs the results. Reading the checkpoint is
:func:`inrank_megatron.checkpoint.reader.load_checkpoint`; importing a Hugging Face GPT-2 as a
training checkpoint is :func:`inrank_megatron.convert.import_hf`."""

from inrank_megatron.export.hf_gpt2 import UnsupportedModelError, export_hf
from inrank_megatron.export.native import export_inrank, read_inrank_export

__all__ = ["UnsupportedModelError", "export_hf", "export_inrank", "read_inrank_export"]
