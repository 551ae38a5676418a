"""Checkpoint conversions (``tools/convert_checkpoint.py`` is the CLI).

- :mod:`~inrank_megatron.convert.layout`: ``reshard`` (another TP layout) and ``to_dense`` (merge
  the factors: a checkpoint of the dense twin); single process, no tensors change.
- :mod:`~inrank_megatron.convert.backends`: ``convert_backend`` (DeepSpeed <-> torch, optimizer
  state included); a job on the DeepSpeed side's processes.
- :mod:`~inrank_megatron.convert.from_hf`: ``import_hf`` (a local Hugging Face GPT-2 -> a training
  checkpoint; ``tools/import_hf.py`` is its CLI).
"""

from inrank_megatron.convert.backends import convert_backend, plan_conversion
from inrank_megatron.convert.from_hf import import_hf
from inrank_megatron.convert.layout import reshard, to_dense

__all__ = ["convert_backend", "import_hf", "plan_conversion", "reshard", "to_dense"]
