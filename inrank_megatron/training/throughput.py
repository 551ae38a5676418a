"""Throughput a user can act on: tokens/s, model TFLOP/s per device and MFU at the ranks the model
computes with now, the elapsed time and an ETA (Megatron-LM's ``--log-throughput``).

    meter = Throughput(cfg, vocab_size=tokenizer.vocab_size, world_size=8, peak_tflops=989.0,
                       first_step=0, last_step=22500, window=cfg.train.log_interval)
    flops = meter.flops_per_token(slots)          # slots: {layer name: slots its forward uses}
    meter.step(step, stage, tokens, seconds, flops)     # every step
    tflops, mfu = meter.rates(tokens / seconds, flops)  # this step (metrics.csv)
    meter.interval()                              # the last log interval and the ETA (console)
    meter.summary()                               # the run's rates per stage (summary.json)

FLOPs per token are the planner's (:func:`inrank_megatron.planning.flops_per_token`: the matmuls
of linears, attention and logits, forward and backward) at each InRank layer's active slots: rank +
buffer in stage 1, the rank after the cut. They change at every rank check that grows a rank and
at the cut, so each log line and each stage is reported at its own FLOPs. TFLOP/s per device is
``flops_per_token * tokens_per_s / world_size / 1e12`` (Megatron-LM's ``throughput`` divides by
the world size the same way); MFU is that over the device's peak, ``train.peak_tflops`` or, unset,
:data:`PEAK_TFLOPS` by the CUDA device's name and the training precision; on CPU or an unknown GPU
it is not reported (n/a).
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from inrank_megatron.config import TrainConfig

# Dense (no sparsity) peak TFLOP/s of NVIDIA's data sheets, for 16-bit tensor-core math (bf16 and
# fp16) and for plain fp32 (torch computes fp32 matmuls without TF32 unless told to). Checked in
# order; the first name contained in the device name wins (so "H100 PCIe" before "H100").
PEAK_TFLOPS = (
    # name in torch.cuda.get_device_name(), 16-bit, fp32
    ("GH200", 989.4, 66.9),
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.5, 51.2),
    ("H100 NVL", 835.5, 60.0),
    ("H100", 989.4, 66.9),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),  # fp16 (V100 has no bf16)
)


def default_peak_tflops(device_name: Optional[str], precision: str) -> Optional[float]:
    """The dense peak TFLOP/s of a CUDA device for ``precision`` (:data:`PEAK_TFLOPS`), or None
    (no device, an unknown one, or bf16 on a V100)."""
    if not device_name:
        return None
    for name, half, single in PEAK_TFLOPS:
        if name in device_name:
            if precision == "fp32":
                return single
            return None if (name == "V100" and precision == "bf16") else half
    return None


_KINDS = {"linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1", "linear_fc2": "fc2"}
_NAME = re.compile(r"layers\.(\d+)\..*?(" + "|".join(_KINDS) + r")$")


def layer_slots(num_layers: int, slots: Mapping[str, int]) -> list[dict]:
    """``{layer name: slots}`` (names as :func:`inrank_megatron.growth.controller.
    named_inrank_layers` gives them, numbered by global transformer layer) as the planner's
    ``layer_slots``: one ``{kind: slots}`` per transformer layer.

    Raises:
        ValueError: a name that does not place a layer (``layers.<n>....linear_<kind>``).
    """
    out = [dict() for _ in range(num_layers)]
    for name, k in slots.items():
        m = _NAME.search(name)
        if m is None or int(m.group(1)) >= num_layers:
            raise ValueError(
                f"cannot place InRank layer {name!r} in a model of {num_layers} layers"
            )
        out[int(m.group(1))][_KINDS[m.group(2)]] = int(k)
    return out


def format_duration(seconds: float) -> str:
    """``"1:02:03"`` (hours unbounded), ``"2d 1:02:03"`` past a day."""
    seconds = int(round(max(seconds, 0.0)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


def eta_seconds(step: int, last_step: int, interval_steps: int, interval_seconds: float) -> float:
    """Seconds left: the steps left at the wall time per step of the last interval (evaluations
    and checkpoints in it included), ``(last_step - step) * interval_seconds / interval_steps``."""
    if interval_steps <= 0:
        raise ValueError(f"interval_steps must be positive, got {interval_steps}")
    return (last_step - step) * interval_seconds / interval_steps


@dataclass(frozen=True)
class Interval:
    """The rates over the last log interval (wall time: evaluations and checkpoints included)."""

    steps: int
    seconds: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: Optional[float]
    elapsed_s: float
    eta_s: float


class Throughput:
    """Rates of one training process (rank 0's view); see the module docstring.

    Args:
        cfg: the run's configuration (model shape, InRank layers, precision).
        vocab_size: the tokenizer's vocabulary (padded as the model pads it).
        world_size: devices of the job (the per-device rates divide by it).
        peak_tflops: one device's peak TFLOP/s, None for no MFU.
        first_step: the step this process starts after (the resumed checkpoint's, else 0).
        last_step: the step it stops after.
        window: steps of the interval the console's rates and the ETA average over
            (``train.log_interval``).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        vocab_size: int,
        world_size: int,
        peak_tflops: Optional[float],
        first_step: int,
        last_step: int,
        window: int,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.last_step = last_step
        self.clock = clock
        self.start = clock()
        self._flops: dict = {}
        self._stages: dict = {}  # stage -> [steps, tokens, seconds, flops]
        # (step, time, tokens, flops) after each step of the window, and the mark before it
        self._marks = collections.deque([(first_step, self.start, 0, 0)], maxlen=window + 1)

    def flops_per_token(self, slots: Mapping[str, int]) -> int:
        """Training FLOPs per token with these InRank slots (``{}``: the dense model)."""
        key = tuple(sorted(slots.items()))
        if key not in self._flops:
            from inrank_megatron.planning.estimates import flops_per_token

            inrank = self.cfg.model.inrank and bool(slots)
            per_layer = layer_slots(self.cfg.model.num_layers, slots) if inrank else None
            self._flops[key] = flops_per_token(
                self.cfg, inrank=inrank, vocab_size=self.vocab_size, layer_slots=per_layer
            ).total
        return self._flops[key]

    def rates(self, tokens_per_s: float, flops_per_token: float) -> tuple[float, Optional[float]]:
        """``(TFLOP/s per device, MFU or None)`` of a throughput at ``flops_per_token``."""
        tflops = flops_per_token * tokens_per_s / self.world_size / 1e12
        return tflops, (tflops / self.peak_tflops if self.peak_tflops else None)

    def elapsed(self) -> float:
        """Seconds since this process started training."""
        return self.clock() - self.start

    def step(
        self, step: int, stage: str, tokens: int, seconds: float, flops_per_token: int
    ) -> None:
        """Optimizer step ``step`` is done: it ran in ``stage`` (``growing``, ``fixed`` or
        ``dense``) at ``flops_per_token`` and took ``seconds`` (forward, backward, optimizer and
        growth)."""
        total = self._stages.setdefault(stage, [0, 0, 0.0, 0])
        total[0] += 1
        total[1] += tokens
        total[2] += seconds
        total[3] += tokens * flops_per_token
        self._marks.append((step, self.clock(), tokens, tokens * flops_per_token))

    def interval(self) -> Interval:
        """The rates over the steps of the window (at most ``window``, since the last mark) and
        the ETA at their wall time per step (:func:`eta_seconds`)."""
        (first, since, _, _), (step, now, _, _) = self._marks[0], self._marks[-1]
        seconds = max(now - since, 1e-12)
        tokens = sum(m[2] for m in list(self._marks)[1:])
        flops = sum(m[3] for m in list(self._marks)[1:])
        tokens_per_s = tokens / seconds
        tflops, mfu = self.rates(tokens_per_s, flops / tokens if tokens else 0)
        eta = eta_seconds(step, self.last_step, step - first, now - since) if step > first else 0.0
        return Interval(step - first, now - since, tokens_per_s, tflops, mfu, now - self.start, eta)

    def summary(self) -> dict:
        """Per stage, in the order met: ``{stage: {steps, tokens_per_s, tflops_per_device, mfu}}``
        over the steps of this process (step time: forward, backward, optimizer and growth; no
        evaluation or checkpoint)."""
        out = {}
        for stage, (steps, tokens, seconds, flops) in self._stages.items():
            tokens_per_s = tokens / max(seconds, 1e-12)
            tflops, mfu = self.rates(tokens_per_s, flops / tokens)
            out[stage] = {
                "steps": steps,
                "tokens_per_s": tokens_per_s,
                "tflops_per_device": tflops,
                "mfu": mfu,
            }
        return out
