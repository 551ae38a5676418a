"""megatron.core's GPT with InRank layers: :mod:`.shape` (the architecture as numbers, torch-free),
:mod:`.gpt_spec` (ModuleSpecs), :mod:`.gpt` (``build_gpt``, ``build_model`` from a training config),
:mod:`.attention` and :mod:`.recompute`. Import from the submodules: this ``__init__`` imports none,
so the config checks read :mod:`.shape` without importing torch."""
