"""Training backends behind one interface (:class:`Backend`): build, step, resize, save, load."""

from inrank_megatron.training.backends.base import Backend


def build_backend(cfg, model, groups) -> Backend:
    """The backend named by ``parallel.backend``."""
    name = cfg.parallel.backend
    if name == "torch":
        from inrank_megatron.training.backends.torch_ddp import TorchBackend

        return TorchBackend(cfg, model, groups)
    if name == "deepspeed":
        from inrank_megatron.training.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(cfg, model, groups)
    if name == "megatron":  # GPU only; the rules refuse it without CUDA
        from inrank_megatron.training.backends.megatron_backend import MegatronBackend

        return MegatronBackend(cfg, model, groups)
    raise ValueError(
        f"parallel.backend={name!r} is not available in this build of the training "
        "loop; expected 'torch', 'megatron' or 'deepspeed'"
    )


__all__ = ["Backend", "build_backend"]
