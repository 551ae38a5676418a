#!/usr/bin/env python
"""The ranks InRank's rule reaches on the untrained model of a config (no training, seconds).

In efficient mode the rule first sees the spectrum of the random initial factors; applied to that
alone it grows the rank to a fixed point set by the layer shape, inrank.buffer, inrank.threshold
and the cap (docs/results.md). This prints, per InRank layer kind, the trajectory of the checks and
that fixed point; runs whose learned ranks sit at it got their ranks from the initialisation.

    python tools/init_ranks.py --config configs/tiny-cpu.yaml
    python tools/init_ranks.py --config configs/gpt2-medium.yaml inrank.buffer=50
"""

from __future__ import annotations

import argparse
import sys

from inrank_megatron.config import ConfigError, inrank_layer_shapes, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="init_ranks.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the factor draw")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as error:
        print(f"init_ranks.py: {error}", file=sys.stderr)
        return 2
    ir = cfg.inrank
    if not cfg.model.inrank or ir.mode != "efficient":
        print(
            "init_ranks.py: needs model.inrank=true and inrank.mode=efficient (the rule sees "
            "the initial factors only in efficient mode)",
            file=sys.stderr,
        )
        return 2
    from inrank_megatron.core.init_ranks import init_cut_rank, init_rank_trajectory

    print(
        f"rule={ir.rule} threshold={ir.threshold} rank={ir.rank} buffer={ir.buffer} "
        f"init_scale={ir.init_scale} init={ir.init} signal={ir.signal} start={ir.start}"
    )
    for kind, (fan_in, fan_out) in inrank_layer_shapes(cfg).items():
        max_rank = ir.layer_max_rank(fan_in, fan_out)
        full = min(fan_in, fan_out)
        if ir.start != "low_rank":
            rank = init_cut_rank(
                fan_in,
                fan_out,
                start=ir.start,
                signal=ir.signal,
                max_rank=max_rank,
                threshold=ir.threshold,
                rule=ir.rule,
                init_scale=ir.init_scale,
                init=ir.init,
                seed=args.seed,
            )
            said = (
                "none: the update is zero at init, the cut's rank comes from training "
                f"(at most max_rank {max_rank})"
                if rank is None
                else f"the cut picks {rank} ({rank / full:.1%} of full rank {full}) on the init"
            )
            print(f"{kind:5s} {fan_in} -> {fan_out}  start {ir.start}, signal {ir.signal}: {said}")
            continue
        trajectory = init_rank_trajectory(
            fan_in,
            fan_out,
            rank=ir.rank,
            buffer=ir.buffer,
            max_rank=max_rank,
            threshold=ir.threshold,
            rule=ir.rule,
            init_scale=ir.init_scale,
            seed=args.seed,
            init=ir.init,
        )
        print(
            f"{kind:5s} {fan_in} -> {fan_out}  max_rank {max_rank}  fixed point "
            f"{trajectory[-1]} ({trajectory[-1] / full:.1%} of full rank {full}) after "
            f"{len(trajectory) - 1} checks: {' '.join(map(str, trajectory))}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
