"""The DeepSpeed JSON (``parallel.deepspeed_config``): read, checked against the YAML, merged with it.

    ds = read_deepspeed_json(path)             # the one reader; ConfigError naming the key
    check_deepspeed_config(cfg, world_size)     # what DeepSpeed or this backend would refuse
    ds = deepspeed_config(cfg, world_size)      # the JSON the engine gets (batch, clip, precision)

The JSON holds ZeRO settings only; batch sizes, ``gradient_clipping`` and bf16/fp16 are written
into it from the YAML, and a JSON that sets them otherwise is refused. No torch at import: the
launch pre-flight and the rules (:mod:`inrank_megatron.rules`) read it; DeepSpeed's own config
classes are imported only to check ``zero_optimization``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Optional

from inrank_megatron.config import ConfigError, TrainConfig, data_parallel_size

DEEPSPEED_KEY = "parallel.deepspeed_config"


def read_deepspeed_json(path: Optional[str], key: str = DEEPSPEED_KEY) -> dict:
    """The DeepSpeed JSON at ``path`` (the one reader of it).

    Raises:
        ConfigError: naming ``key``: no path, no file, not JSON, not an object.
    """
    if path is None:
        raise ConfigError(
            f"{key} is required when parallel.backend=deepspeed; expected the path "
            "of a DeepSpeed JSON, e.g. configs/deepspeed/zero2.json"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r}: file not found; expected the path of a DeepSpeed JSON")
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{key}={path!r} is not readable JSON ({error}); expected a DeepSpeed JSON object"
        ) from None
    if not isinstance(ds, dict):
        raise ConfigError(
            f"{key}={path!r} holds a {type(ds).__name__}; expected a DeepSpeed JSON object"
        )
    return ds


def zero_stage(cfg: TrainConfig, ds: Optional[dict] = None) -> int:
    """The ZeRO stage a deepspeed run uses: ``parallel.zero_stage``, else the JSON's
    ``zero_optimization.stage`` (default 0)."""
    if cfg.parallel.zero_stage is not None:
        return cfg.parallel.zero_stage
    ds = read_deepspeed_json(cfg.parallel.deepspeed_config) if ds is None else ds
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


# JSON keys the YAML owns: (DeepSpeed key, YAML key).
_FROM_YAML = (
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    (
        "gradient_accumulation_steps",
        "train.global_batch_size / (train.micro_batch_size * data-parallel size)",
    ),
    ("train_batch_size", "train.global_batch_size"),
    ("gradient_clipping", "train.clip_grad"),
)


def _world_size(world_size: Optional[int]) -> Optional[int]:
    if world_size is not None:
        return world_size
    env = os.environ.get("WORLD_SIZE", "")
    return int(env) if env.isdigit() and int(env) > 0 else None


def _yaml_values(cfg: TrainConfig, world_size: Optional[int]) -> dict:
    t = cfg.train
    values = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": float(t.clip_grad),
    }
    if world_size is not None:
        dp = data_parallel_size(cfg, world_size)
        values["gradient_accumulation_steps"] = t.global_batch_size // (t.micro_batch_size * dp)
    return values


def check_deepspeed_config(cfg: TrainConfig, world_size: Optional[int] = None) -> None:
    """Refuse, before training starts, a DeepSpeed JSON that DeepSpeed would reject, that
    contradicts the YAML, or that asks for what this backend does not support.

    Args:
        cfg: the run's configuration (a no-op unless ``parallel.backend=deepspeed``).
        world_size: processes of the run; default ``$WORLD_SIZE`` (without it the
            ``gradient_accumulation_steps`` comparison is skipped).

    Raises:
        ConfigError: naming the JSON key and the YAML key it conflicts with.
    """
    p, t = cfg.parallel, cfg.train
    if p.backend != "deepspeed":
        return
    ds = read_deepspeed_json(cfg.parallel.deepspeed_config)
    path = p.deepspeed_config
    where = f"{DEEPSPEED_KEY}={path!r}"
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{where} has a {key!r} section, which this backend does not use "
                "(it builds torch AdamW and megatron's LR schedule from train.*); "
                "remove it"
            )
    if ds.get("zero_allow_untested_optimizer", True) is not True:
        raise ConfigError(
            f"{where} sets zero_allow_untested_optimizer="
            f"{ds['zero_allow_untested_optimizer']!r}; the backend runs ZeRO with "
            "torch AdamW, which needs true (or leave the key out)"
        )
    for ds_key, value in _yaml_values(cfg, _world_size(world_size)).items():
        if ds_key in ds and ds[ds_key] != value:
            yaml_key = dict(_FROM_YAML)[ds_key]
            raise ConfigError(
                f"{where} sets {ds_key}={ds[ds_key]!r} but {yaml_key} gives "
                f"{value!r}; remove {ds_key} from the JSON (the backend writes it "
                "from the YAML) or make them agree"
            )
    for name, precision in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
        if name not in ds:
            continue
        section = ds[name]
        enabled = section.get("enabled", False) if isinstance(section, dict) else section
        if not isinstance(enabled, bool):
            raise ConfigError(
                f"{where}: {name}.enabled={enabled!r}; expected true or false "
                "(or leave the section out: train.precision decides)"
            )
        if enabled != (t.precision == precision):
            raise ConfigError(
                f"{where} sets {name}.enabled={str(enabled).lower()} but "
                f"train.precision={t.precision!r}; remove the {name} section (the "
                "backend writes it from train.precision) or make them agree"
            )
    if t.precision == "fp16" and not _cuda_available() and not _cpu_fp16_supported():
        raise ConfigError(
            "train.precision='fp16' with parallel.backend=deepspeed: DeepSpeed's CPU "
            "accelerator has no fp16 support on this machine (no mkldnn fp16); "
            "expected fp32 or bf16"
        )
    stage = zero_stage(cfg, ds)
    if stage == 0 and t.precision != "fp32":
        raise ConfigError(
            f"train.precision={t.precision!r} with ZeRO stage 0 ({where}, "
            "parallel.zero_stage): DeepSpeed then wraps AdamW in its "
            "FP16_UnfusedOptimizer, whose fp32 masters resizes cannot move; expected "
            "train.precision=fp32 or zero_optimization.stage >= 1"
        )
    for key in ("tensor_parallel", "sequence_parallel_size", "data_parallel_size", "pipeline"):
        if key in ds:
            raise ConfigError(
                f"{where} sets {key!r}: model parallelism comes from megatron "
                "(parallel.tensor_model_parallel_size) and data parallelism takes "
                "the remaining ranks; remove it"
            )
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object, got {zero!r}")
    zero = dict(zero)
    if p.zero_stage is not None:
        zero["stage"] = p.zero_stage
    from pydantic import ValidationError

    from deepspeed.runtime import config as ds_config_module
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        ds_config_module._reject_removed_config_keys(ds)  # e.g. MiCS, elasticity
    except ds_config_module.DeepSpeedConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    try:
        zc = DeepSpeedZeroConfig(**zero)
    except ValidationError as error:
        first = error.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ConfigError(
            f"{where}: zero_optimization.{loc}: {first['msg']} (got "
            f"{first.get('input')!r}); DeepSpeed would refuse it"
        ) from None
    for name in ("offload_param", "offload_optimizer"):
        offload = getattr(zc, name)
        if offload is not None and str(getattr(offload.device, "value", offload.device)) != "none":
            raise ConfigError(
                f"{where}: zero_optimization.{name} is not supported by this "
                "backend (its optimizer is torch AdamW, whose state moves by name at "
                "resizes; offloading needs DeepSpeed's CPU Adam); remove it"
            )
    if zc.zero_hpz_partition_size > 1:
        raise ConfigError(
            f"{where}: zero_optimization.zero_hpz_partition_size="
            f"{zc.zero_hpz_partition_size} (ZeRO++ hpZ) partitions parameters over "
            "groups other than data parallelism, which resizes do not handle; "
            "remove it"
        )
    if zc.zero_quantized_weights or zc.zero_quantized_gradients:
        raise ConfigError(
            f"{where}: zero_optimization.zero_quantized_weights / "
            "zero_quantized_gradients (ZeRO++) need CUDA kernels and break exact "
            "state moves at resizes; remove them"
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cpu_fp16_supported() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:  # noqa: BLE001 - older torch builds lack the op
        return False


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The JSON merged with the YAML: batch sizes, clipping, precision, ZeRO stage."""
    check_deepspeed_config(cfg, world_size)
    ds = copy.deepcopy(read_deepspeed_json(cfg.parallel.deepspeed_config))
    ds.update(_yaml_values(cfg, world_size))
    ds["zero_optimization"] = dict(ds.get("zero_optimization") or {})
    ds["zero_optimization"]["stage"] = zero_stage(cfg, ds)
    ds.pop("bfloat16", None)
    ds["bf16"] = dict(ds.get("bf16") or {}, enabled=cfg.train.precision == "bf16")
    ds["fp16"] = dict(ds.get("fp16") or {}, enabled=cfg.train.precision == "fp16")
    if cfg.train.precision == "fp16":
        ds["fp16"].setdefault(
            "initial_scale_power", int(round(math.log2(cfg.train.initial_loss_scale)))
        )
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 2**62)  # the training loop logs
    return ds
