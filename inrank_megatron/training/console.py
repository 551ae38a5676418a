"""What a training run prints, on rank 0 only: a line per ``train.log_interval``, each validation
result, the stage cut, and where the run's files are at the end. Third-party warnings are shown
once per run (rank 0), and the known noise of a CPU or TE/apex-less install is dropped.

    step   10/200 | loss 8.1234 | lr 5.00e-04 | 2731 tokens/s | 0.0123 TFLOP/s/device | MFU n/a |
        stage growing | ranks 8-12 (mean 9.8) | grad norm 1.234 | elapsed 0:00:15 | ETA 0:04:45
    step   50/200 | valid loss 6.9123 | ppl 1004.12
    step   60/200 | cut to stage 2 (fixed): ranks 14-22 (mean 17.5) over 8 layers

(a step line is one line). Tokens/s, TFLOP/s per device and MFU are over the last log interval's
wall time, at the FLOPs per token of the ranks each step computed with
(:mod:`inrank_megatron.training.throughput`); the ETA is the steps left at that interval's time per
step. Before the first step: the data (samples and epochs of each dataset) and where the MFU's
peak comes from; at the end: the rates of each stage (InRank's stage 1 and after the cut).

The lines use values the loop has already gathered for ``metrics.csv`` (no extra device syncs).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from inrank_megatron.training.throughput import format_duration

# Warnings every run on this stack prints and that ask nothing of the user: megatron-core falling
# back from Transformer Engine / apex (the documented CPU and apex-less path), its own
# deprecations, and torch's deprecation of a collective megatron calls.
KNOWN_NOISE = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"When using async grad allreduce it is recommended",
    r"MLP requires ffn_hidden_size",
    r"[\s\S]*megatron\.core\.transformer\.custom_layers\.transformer_engine",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\._all_gather_base` is a private function",
    r"`torch\.distributed\._reduce_scatter_base` is a private function",
    # megatron-core 0.16.1's dist_checkpointing on torch 2.13 (its load path, ShardedTensor).
    r"`load_state_dict` is deprecated and will be removed",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    # torch 2.13 renames DDP's broadcast_buffers (the torch backend passes False: buffers are not
    # synchronised, which the new name's inverted default would change).
    r"`broadcast_buffers` is deprecated",
)


def quiet_third_party(rank: int, *, cpu: bool = False) -> None:
    """Warning filters for a training process: the known noise dropped everywhere; any other
    warning shown once per run (on rank 0; the other ranks would repeat it). ``cpu``: no GPU, so
    DeepSpeed, when something imports it, is told its accelerator instead of logging that it
    guessed it (``DS_ACCELERATOR=cpu``, unless set)."""
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # megatron's checkpoint writer logs a failed write (a full disk: "unexpected pos 704 vs 598")
    # before raising it to the save, which says what it was in one line (training/checkpoint.py).
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(
        logging.CRITICAL
    )
    if rank != 0:
        warnings.simplefilter("ignore")
        return
    # Python's defaults stay (DeprecationWarning outside __main__ hidden); the rest once per
    # message rather than once per call site.
    for category in (UserWarning, FutureWarning, RuntimeWarning):
        warnings.filterwarnings("once", category=category)
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def rank_summary(ranks: dict) -> str:
    """``"8-12 (mean 9.8)"`` of per-layer ranks (``"-"`` for a dense model)."""
    if not ranks:
        return "-"
    values = list(ranks.values())
    low, high = min(values), max(values)
    span = str(low) if low == high else f"{low}-{high}"
    return f"{span} (mean {sum(values) / len(values):.1f})"


class Console:
    """The run's lines on rank 0; a tqdm bar only when stderr is a terminal (a log file gets the
    lines alone)."""

    def __init__(self, last_step: int, start_step: int):
        self.last_step = last_step
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=last_step, initial=start_step, desc="train", dynamic_ncols=True)

    def _print(self, step: int, text: str) -> None:
        line = f"step {step:>{len(str(self.last_step))}}/{self.last_step} | {text}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def start(self, data_lines: list, peak_tflops, source: str) -> None:
        """Before the first step: the data report and the MFU's peak (``source``: where it comes
        from, or why there is none)."""
        for line in data_lines:
            self._note(line)
        self._note(
            f"MFU against a peak of {peak_tflops:g} TFLOP/s per device ({source})"
            if peak_tflops
            else f"MFU n/a ({source}; set train.peak_tflops to compare with a peak)"
        )

    def step(
        self, step: int, *, loss: float, lr: float, stage: str, ranks: dict, rates, grad_norm=None
    ) -> None:
        """The log-interval line; ``rates`` (a :class:`~inrank_megatron.training.throughput.
        Interval`) over the steps since the previous one."""
        norm = "" if grad_norm is None else f" | grad norm {grad_norm:.3f}"
        speed = _rates(rates.tokens_per_s, rates.tflops_per_device, rates.mfu)
        self._print(
            step,
            f"loss {loss:.4f} | lr {lr:.2e} | {speed} | stage {stage} | ranks "
            f"{rank_summary(ranks)}{norm} | elapsed "
            f"{format_duration(rates.elapsed_s)} | ETA {format_duration(rates.eta_s)}",
        )

    def throughput(self, summary: dict) -> None:
        """At the end: each stage's rates over its steps (step time only)."""
        for stage, r in summary.items():
            self._note(
                f"throughput, stage {stage} ({r['steps']} steps): "
                f"{_rates(r['tokens_per_s'], r['tflops_per_device'], r['mfu'])}"
            )

    def tick(self, loss: float, stage: str) -> None:
        """Every step: the bar, when there is one."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", stage=stage)

    def valid(self, step: int, loss: float) -> None:
        from inrank_megatron.training.metrics import perplexity

        self._print(step, f"valid loss {loss:.4f} | ppl {perplexity(loss):.2f}")

    def cut(self, step: int, ranks: dict) -> None:
        self._print(
            step, f"cut to stage 2 (fixed): ranks {rank_summary(ranks)} over {len(ranks)} layers"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rates(tokens_per_s: float, tflops_per_device: float, mfu) -> str:
    """``"2731 tokens/s | 0.0123 TFLOP/s/device | MFU 41.2%"`` (MFU n/a without a peak)."""
    shown = "n/a" if mfu is None else f"{mfu:.1%}"
    return f"{tokens_per_s:.0f} tokens/s | {tflops_per_device:.3g} TFLOP/s/device | MFU {shown}"


def where(summary: dict) -> list:
    """The end-of-run lines: the run directory, its last checkpoint, metrics.csv and the plot."""
    lines = [f"run directory: {summary['run_dir']}"]
    for label, key in (
        ("last checkpoint", "checkpoint"),
        ("metrics", "metrics_csv"),
        ("plot", "plot"),
    ):
        if summary.get(key):
            lines.append(f"{label}: {summary[key]}")
    return lines
