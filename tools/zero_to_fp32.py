#!/usr/bin/env python
"""Consolidate a DeepSpeed training checkpoint of this project (any ZeRO stage, any TP size) into
one fp32 state dict of the full model, keyed by the model's parameter names, plus the InRank growth
state (each layer's rank, stage and allocation, which the factor shapes follow).

    python tools/zero_to_fp32.py runs/x/checkpoints/step_000200 runs/x/model_fp32.safetensors
    python tools/zero_to_fp32.py runs/x/checkpoints/step_000200 runs/x/model_fp32.pt

``.pt``: ``torch.save({"state_dict", "inrank_growth", "meta"})``. ``.safetensors``: the state dict,
with the growth state and the checkpoint's layout as JSON strings in the metadata
(``inrank_growth``, ``inrank_deepspeed``). The masters come from DeepSpeed's own
``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (ZeRO 1-3; stage 0 in
fp32 saves the module itself), one tensor-parallel rank at a time; TP shards are joined along each
parameter's ``partition_dim``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "checkpoint",
        help="a training checkpoint directory (.../checkpoints/step_N) "
        "written with parallel.backend=deepspeed",
    )
    p.add_argument("output", help="OUT.pt or OUT.safetensors")
    args = p.parse_args(argv)
    from inrank_megatron.checkpoint.deepspeed import save_consolidated

    try:
        result = save_consolidated(args.checkpoint, args.output)
    except (OSError, ValueError) as error:  # CheckpointError (unsafe file), exists, missing
        print(f"error: {error}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in result["state_dict"].values())
    print(
        f"wrote {args.output}: {len(result['state_dict'])} tensors, {n / 1e6:.2f}M parameters, "
        f"ZeRO stage {result['meta']['zero_stage']}, TP {result['meta']['tp']}, "
        f"{len(result['inrank_growth'])} InRank layers"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
