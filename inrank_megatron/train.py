"""Train a megatron.core GPT with InRank layers from a YAML config.

Single node, CPU default (TP=2 on 2 processes)::

    torchrun --nproc_per_node 2 -m inrank_megatron.train --config configs/tiny-cpu.yaml
    torchrun --nproc_per_node 2 -m inrank_megatron.train --config configs/tiny-cpu.yaml \\
        model.inrank=false output.dir=runs/tiny-cpu-dense        # the dense baseline

Multi-node (see launch/README.md)::

    sbatch -N 2 launch/slurm_torchrun.sbatch configs/gpt2-medium.yaml

Every config key can be overridden as ``section.key=value``; unknown keys are rejected. Bad input
(config, layout, data, resume directory) fails here, before any process group starts.
"""

from __future__ import annotations

import argparse
import os
import sys

from inrank_megatron.config import (
    ConfigError, TrainConfig, diff_incompatible, from_dict, load_config, validate_layout,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m inrank_megatron.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: all defaults)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p.parse_args(argv)


def resolve_resume(cfg: TrainConfig, world_size: int):
    """The checkpoint to resume from (or None), checked against this run's config and layout."""
    from inrank_megatron.training import checkpoint as ckpt

    resume = cfg.output.resume
    if resume == "none":
        return None
    if resume == "auto":
        path = ckpt.latest_checkpoint(os.path.join(cfg.output.dir, "checkpoints"))
        if path is None:
            return None
    else:
        path = resume
        if not os.path.isdir(path):
            raise ConfigError(f"output.resume={resume!r}: no such checkpoint directory")
    try:
        meta = ckpt.read_meta(path)
    except FileNotFoundError as e:
        raise ConfigError(f"output.resume={resume!r}: {e}") from None
    changed = diff_incompatible(from_dict(meta["config"]), cfg)
    if changed:
        raise ConfigError(f"output.resume: checkpoint {path} was trained with a different "
                          f"{', '.join(changed)}; resume with the same values (or start a new "
                          "output.dir)")
    # A weights-only checkpoint (tools/import_hf.py, to-dense) is a megatron dist checkpoint of the
    # model and nothing else: every backend starts from it with a fresh optimizer.
    if meta["backend"] != cfg.parallel.backend and not meta.get("weights_only"):
        raise ConfigError(f"output.resume: checkpoint {path} was written by backend "
                          f"{meta['backend']!r}, this run uses parallel.backend="
                          f"{cfg.parallel.backend!r}; convert it with tools/convert_checkpoint.py "
                          f"{'from' if meta['backend'] == 'deepspeed' else 'to'}-deepspeed")
    return path


def check_supported(cfg: TrainConfig) -> None:
    """What validate_layout accepts but this training loop cannot run (yet)."""
    pp = cfg.parallel.pipeline_model_parallel_size
    if pp > 1 and cfg.parallel.backend != "torch":
        raise ConfigError(f"parallel.pipeline_model_parallel_size={pp} with parallel.backend="
                          f"{cfg.parallel.backend!r}: the pipeline schedule runs with the torch "
                          "backend; expected parallel.backend='torch' or pipeline size 1")
    if pp > 1 and cfg.train.precision == "fp16":
        raise ConfigError(f"parallel.pipeline_model_parallel_size={pp} with train.precision='fp16':"
                          " the loss scaler's skip decision is per stage; expected bf16 or fp32")
    if cfg.parallel.backend == "megatron":
        import torch

        # megatron-core 0.16.1's optimizers allocate with device='cuda' literals and accept only
        # 'torch.cuda.*Tensor' parameters (see training/backends/megatron_backend.py).
        if not torch.cuda.is_available():
            raise ConfigError("parallel.backend='megatron' (megatron's DDP and optimizer) needs "
                              "CUDA: megatron-core's optimizers allocate on 'cuda' and refuse CPU "
                              "tensors; expected parallel.backend='torch' or 'deepspeed' on a "
                              "machine without a GPU")


def main(argv=None) -> int:
    args = parse_args(argv)
    from inrank_megatron.launch_env import init_distributed_env

    env = init_distributed_env()
    try:
        cfg = load_config(args.config, args.overrides)
        validate_layout(cfg, env["world_size"])
        check_supported(cfg)
        if cfg.parallel.backend == "deepspeed":
            from inrank_megatron.training.backends.deepspeed_backend import check_deepspeed_config

            check_deepspeed_config(cfg, env["world_size"])
        from inrank_megatron.training.data import check_data_config

        check_data_config(cfg)
        resume_path = resolve_resume(cfg, env["world_size"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from inrank_megatron.training.loop import train
    from inrank_megatron.training.parallel import shutdown

    try:
        summary = train(cfg, resume_path=resume_path, dist_backend=env["backend"])
    finally:
        shutdown()
    if env["rank"] == 0:
        ppl = summary["valid_ppl"]
        print(f"done: {summary['steps']} steps in {summary['wall_s']:.0f} s, valid loss "
              f"{summary['valid_loss'] if summary['valid_loss'] is None else round(summary['valid_loss'], 4)}"
              f", ppl {ppl if ppl is None else round(ppl, 2)}, ranks {summary['ranks']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
