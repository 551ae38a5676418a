"""What a training run prints, on rank 0 only: a line per ``train.log_interval``, each validation
result, the stage cut, and where the run's files are at the end. Third-party warnings are shown
once per run (rank 0), and the known noise of a CPU or TE/apex-less install is dropped.

    step   10/200 | loss 8.1234 | lr 5.00e-04 | 2731 tokens/s | stage growing | ranks 8-12 (mean 9.8)
    step   50/200 | valid loss 6.9123 | ppl 1004.12
    step   60/200 | cut to stage 2 (fixed): ranks 14-22 (mean 17.5) over 8 layers

The lines use values the loop has already gathered for ``metrics.csv`` (no extra device syncs).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

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
        logging.CRITICAL)
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

    def __init__(self, last_step: int, start_step: int, tokens_per_step: int):
        self.last_step = last_step
        self.tokens_per_step = tokens_per_step
        self._mark = (start_step, time.perf_counter())
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

    def step(self, step: int, *, loss: float, lr: float, stage: str, ranks: dict,
             grad_norm=None) -> None:
        """The log-interval line; tokens/s over the steps since the previous one."""
        first, since = self._mark
        now = time.perf_counter()
        rate = (step - first) * self.tokens_per_step / max(now - since, 1e-9)
        self._mark = (step, now)
        norm = "" if grad_norm is None else f" | grad norm {grad_norm:.3f}"
        self._print(step, f"loss {loss:.4f} | lr {lr:.2e} | {rate:.0f} tokens/s | stage {stage}"
                          f" | ranks {rank_summary(ranks)}{norm}")

    def tick(self, loss: float, stage: str) -> None:
        """Every step: the bar, when there is one."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", stage=stage)

    def valid(self, step: int, loss: float) -> None:
        from inrank_megatron.training.metrics import perplexity

        self._print(step, f"valid loss {loss:.4f} | ppl {perplexity(loss):.2f}")

    def cut(self, step: int, ranks: dict) -> None:
        self._print(step, f"cut to stage 2 (fixed): ranks {rank_summary(ranks)} over "
                          f"{len(ranks)} layers")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def where(summary: dict) -> list:
    """The end-of-run lines: the run directory, its last checkpoint, metrics.csv and the plot."""
    lines = [f"run directory: {summary['run_dir']}"]
    for label, key in (("last checkpoint", "checkpoint"), ("metrics", "metrics_csv"),
                       ("plot", "plot")):
        if summary.get(key):
            lines.append(f"{label}: {summary[key]}")
    return lines
