"""Planning a run before it is launched (``tools/plan.py`` is the CLI), from the bottom up:

- :mod:`.estimates`: shapes, parameters, model-state memory per strategy, FLOPs (torch-free);
- :mod:`.activations`: one micro-batch's activation memory (the rule "activations fit" reads it);
- :mod:`.plan`: the layout checks, :func:`~.plan.fit` and :func:`~.plan.plan`, above
  :mod:`inrank_megatron.rules`.

Import from the submodules: this package's ``__init__`` imports none of them, so the rules can
read the estimates without importing the plan (which imports the rules).
"""
