"""Compare finished (or running) training runs from what their run directories hold.

A question like "does InRank reach dense quality at fewer parameters?" is a few runs side by side:
the validation loss at the end and at steps every run evaluated, the parameter count, the ranks,
and the cost. Every number here is read from the files the training loop writes
(:mod:`inrank_megatron.training.metrics`): ``metrics.csv`` (valid loss per evaluation, per-step
throughput), ``ranks.csv`` (per-layer ranks), ``summary.json`` (parameters after the cut, final
ranks, wall time) and ``config.yaml`` (tokens per step, and what differs between runs).

    table = compare_runs(["runs/dense", "runs/inrank", "runs/fixed"])
    print(format_table(table, markdown=True))
    plot_valid_loss(table, "compare.png")

CLI: ``tools/compare_runs.py``. :func:`bf16_loss_problems` says whether a bf16 run's losses are those
of its fp32 twin under autocast (``tools/gpu_check.sh``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from inrank_megatron.training.metrics import perplexity, read_metrics

CONFIG = "config.yaml"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
# Keys that differ between any two runs and say nothing about them.
IGNORED_KEYS = ("output.dir",)


class RunDirError(ValueError):
    """A run directory that is missing or does not hold what the training loop writes; the
    message names it."""


@dataclass
class Run:
    """One run directory, as the comparison reads it.

    Attributes:
        name: the directory as given.
        config: ``{"section.key": value}`` of its ``config.yaml``.
        valid: ``{step: valid loss}`` of every evaluation in ``metrics.csv``.
        steps: optimizer steps completed (summary, else the last logged step).
        tokens: tokens seen: ``steps * train.global_batch_size * model.seq_length``.
        parameters: trainable parameters at the end (after the cut), from ``summary.json``.
        ranks: ``{layer: final rank}`` (``summary.json``, else the last rows of ``ranks.csv``);
            empty for a dense run.
        wall_s: wall time of the run's last (or only) launch, from ``summary.json``.
        tokens_per_s: median per-step training throughput logged in ``metrics.csv`` (excludes
            evaluation, checkpoints and start-up; covers every launch of a resumed run).
    """

    name: str
    config: dict
    valid: dict
    steps: int
    tokens: Optional[int]
    parameters: Optional[int]
    ranks: dict
    wall_s: Optional[float]
    tokens_per_s: Optional[float]

    @property
    def end_step(self) -> Optional[int]:
        return max(self.valid) if self.valid else None

    @property
    def end_loss(self) -> Optional[float]:
        return self.valid[self.end_step] if self.valid else None

    def rank_stats(self) -> tuple:
        """``(mean, min, max)`` of the final ranks, or ``(None, None, None)`` for a dense run."""
        if not self.ranks:
            return None, None, None
        values = list(self.ranks.values())
        return sum(values) / len(values), min(values), max(values)


@dataclass
class Comparison:
    """Runs side by side: :attr:`runs`, :attr:`matched_steps` (every run evaluated at them) and
    :attr:`differences` (``{config key: [value per run]}`` for keys whose values differ)."""

    runs: list
    matched_steps: list = field(default_factory=list)
    differences: dict = field(default_factory=dict)

    def rows(self) -> tuple[list, list]:
        """``(header, rows)`` of the main table: one row per run, raw values (None: not known)."""
        last = self.matched_steps[-1] if self.matched_steps else None
        at = "matched" if last is None else last
        header = [
            "run",
            "end step",
            "valid loss",
            "valid ppl",
            f"loss @{at}",
            f"ppl @{at}",
            "parameters",
            "rank mean",
            "rank min",
            "rank max",
            "tokens",
            "wall s",
            "tokens/s",
        ]
        rows = []
        for run in self.runs:
            mean, low, high = run.rank_stats()
            loss = run.valid.get(last) if last is not None else None
            rows.append(
                [
                    run.name,
                    run.end_step,
                    run.end_loss,
                    _ppl(run.end_loss),
                    loss,
                    _ppl(loss),
                    run.parameters,
                    mean,
                    low,
                    high,
                    run.tokens,
                    run.wall_s,
                    run.tokens_per_s,
                ]
            )
        return header, rows


# How each column of the main table is written (str.format specs; None is "—").
_FORMATS = (
    "{}",
    "{:,}",
    "{:.4f}",
    "{:,.2f}",
    "{:.4f}",
    "{:,.2f}",
    "{:,}",
    "{:.1f}",
    "{}",
    "{}",
    "{:,}",
    "{:,.1f}",
    "{:,.0f}",
)


def _ppl(loss: Optional[float]) -> Optional[float]:
    return None if loss is None else perplexity(loss)


def _flatten(config: dict) -> dict:
    return {
        f"{section}.{key}": value
        for section, values in (config or {}).items()
        for key, value in (values or {}).items()
    }


def read_run(run_dir: str) -> Run:
    """One run directory.

    Raises:
        RunDirError: naming ``run_dir``: not a directory, no ``config.yaml`` or ``metrics.csv``,
            or a file that does not read.
    """
    import yaml

    from inrank_megatron.config import ConfigError, load_config, to_dict

    if not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir}: no such run directory")
    for name in (CONFIG, METRICS):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise RunDirError(f"{run_dir}: not a run directory ({name} missing)")
    try:
        # Through the schema, so that a key an older run did not write compares as its default.
        config = _flatten(to_dict(load_config(os.path.join(run_dir, CONFIG))))
    except ConfigError:
        try:  # a config of another version: as written
            with open(os.path.join(run_dir, CONFIG)) as f:
                config = _flatten(yaml.safe_load(f))
        except (OSError, yaml.YAMLError, AttributeError, TypeError) as error:
            raise RunDirError(
                f"{run_dir}: {CONFIG} is not a run's configuration: {str(error).splitlines()[0]}"
            ) from None
    try:
        logs = read_metrics(run_dir)
        summary = {}
        if os.path.isfile(os.path.join(run_dir, SUMMARY)):
            with open(os.path.join(run_dir, SUMMARY)) as f:
                summary = json.load(f)
            if not isinstance(summary, dict):
                raise ValueError(f"{SUMMARY} holds a {type(summary).__name__}, not an object")
    except (OSError, ValueError) as error:
        raise RunDirError(f"{run_dir}: {error}") from None
    metrics = logs["metrics"]
    valid = {
        r["step"]: r["loss"] for r in metrics if r["split"] == "valid" and r["loss"] is not None
    }
    steps = summary.get("steps") or max((r["step"] for r in metrics), default=0)
    ranks = summary.get("ranks")
    if ranks is None:  # a run without a summary (still running, or crashed): the last rows
        ranks = {}
        for row in logs["ranks"]:
            ranks[row["layer"]] = row["rank"]
    throughput = [
        r["tokens_per_s"]
        for r in metrics
        if r["split"] == "train" and r["tokens_per_s"] is not None
    ]
    per_step = [config.get("train.global_batch_size"), config.get("model.seq_length")]
    tokens = (
        steps * per_step[0] * per_step[1] if all(isinstance(v, int) for v in per_step) else None
    )
    parameters = (summary.get("parameters") or {}).get("total")
    return Run(
        name=run_dir,
        config=config,
        valid=valid,
        steps=int(steps),
        tokens=tokens,
        parameters=parameters,
        ranks=dict(ranks),
        wall_s=summary.get("wall_s"),
        tokens_per_s=statistics.median(throughput) if throughput else None,
    )


def compare_runs(run_dirs: list) -> Comparison:
    """Read the runs and line them up: matched evaluation steps and differing config keys.

    Raises:
        RunDirError: the first run directory that does not read (named).
    """
    if not run_dirs:
        raise RunDirError("no run directories given")
    runs = [read_run(path) for path in run_dirs]
    matched = sorted(set.intersection(*(set(run.valid) for run in runs)))
    keys = sorted(set().union(*(run.config for run in runs)) - set(IGNORED_KEYS))
    missing = object()
    differences = {}
    for key in keys:
        values = [run.config.get(key, missing) for run in runs]
        if any(v != values[0] for v in values[1:]):
            differences[key] = ["(absent)" if v is missing else v for v in values]
    return Comparison(runs=runs, matched_steps=matched, differences=differences)


# ------------------------------------------------------------------------------------ text
def _cell(value, spec: Optional[str] = None) -> str:
    """A value as the tables write it: ``spec`` if given, losses to 4 decimals, ints with
    thousands separators, config values as YAML writes them, None as an em dash."""
    from inrank_megatron.config import format_value

    if value is None:
        return "—"
    if spec is not None:
        return spec.format(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return format_value(value)


def _table(header: list, cells: list, markdown: bool) -> str:
    """Rows of text cells as Markdown (``|`` escaped), or aligned: names left, values right."""
    if markdown:

        def line(row):
            return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

        return "\n".join(
            [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, cells)]
        )
    widths = [max(len(x) for x in column) for column in zip(header, *cells)]

    def line(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


def format_table(comparison: Comparison, *, markdown: bool = False) -> str:
    """The comparison as text (aligned columns) or Markdown: the table of runs, the valid loss
    at every matched step, and the config keys that differ (with each run's value)."""
    from inrank_megatron.config import format_value

    header, rows = comparison.rows()
    rows = [[_cell(v, spec) for v, spec in zip(row, _FORMATS)] for row in rows]
    parts = [_table(header, rows, markdown)]
    names = [run.name for run in comparison.runs]
    if comparison.matched_steps:
        title = "Valid loss at the steps every run evaluated"
        steps = [
            [str(step), *(_cell(run.valid[step]) for run in comparison.runs)]
            for step in comparison.matched_steps
        ]
        parts.append(
            (f"**{title}**" if markdown else title + ":")
            + "\n\n"
            + _table(["step", *names], steps, markdown)
        )
    else:
        parts.append("No step at which every run evaluated.")
    if comparison.differences:
        title = "Config keys that differ"
        parts.append(
            (f"**{title}**" if markdown else title + ":")
            + "\n\n"
            + _table(
                ["key", *names],
                [
                    [key, *map(format_value, values)]
                    for key, values in comparison.differences.items()
                ],
                markdown,
            )
        )
    else:
        parts.append("The runs' configs do not differ (output.dir aside).")
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ plot
def plot_valid_loss(comparison: Comparison, out_png: str) -> str:
    """One PNG overlaying every run's valid-loss curve, over optimizer steps (over tokens when
    the runs' tokens per step differ). Written to a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_step = {
        run.tokens // run.steps if run.tokens and run.steps else None for run in comparison.runs
    }
    by_tokens = len(per_step) > 1 and None not in per_step
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for run in comparison.runs:
        steps = sorted(run.valid)
        scale = run.tokens // run.steps if by_tokens else 1
        ax.plot(
            [s * scale for s in steps],
            [run.valid[s] for s in steps],
            marker="o",
            markersize=3,
            label=run.name,
        )
    ax.set_xlabel("tokens" if by_tokens else "optimizer step")
    ax.set_ylabel("valid loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out_dir = os.path.dirname(os.path.abspath(out_png))
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".compare.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_png


# ---- bf16 against fp32 (tools/gpu_check.sh) -------------------------------------------------------
# bf16 keeps 8 significant bits: a value rounded to bf16 is off by up to 2**-9 of itself.
# Step 1 trains the same weights on the same batch in both runs, so its losses differ only by the
# forward's bf16 arithmetic, far below that: 5e-7 relative in gpu_check.sh's CPU dry run, 1e-5 on
# random tokens (tests/test_training_unit.py); a loss reduced in bf16 (a missing ``.float()``) is
# off by up to 2**-9 (9e-4 there). Not yet measured on a GPU.
BF16_FIRST_STEP_RTOL = 2.0**-12
# Every step: the runs drift apart through the updates; 2e-5 after 10 steps of the CPU dry run.
BF16_RTOL = 2.0**-8


def bf16_loss_problems(fp32: list, bf16: list) -> list:
    """What contradicts ``bf16`` being the per-step losses of the ``fp32`` run's job under bf16
    autocast over fp32 master weights (same seed, data and schedule); empty when nothing does.

    Args:
        fp32: per-step training losses of the fp32 run.
        bf16: the same steps' losses of the bf16 run.

    Returns:
        One line per problem: a length mismatch, a non-finite loss, a first-step loss equal to
        fp32's (autocast did not run: nothing computed in bf16) or further from it than
        :data:`BF16_FIRST_STEP_RTOL` (something rounded the loss itself, or the weights, to
        bf16), a step further than :data:`BF16_RTOL`.
    """
    if not fp32 or len(bf16) != len(fp32):
        return [f"bf16: {len(bf16)} losses for fp32's {len(fp32)}"]
    if not all(math.isfinite(v) for v in bf16):
        return ["bf16: non-finite loss"]
    rel = [abs(a - b) / abs(b) for a, b in zip(bf16, fp32)]
    problems = []
    if rel[0] == 0:
        problems.append("bf16: step 1's loss equals fp32's bit for bit: no bf16 autocast ran")
    elif rel[0] > BF16_FIRST_STEP_RTOL:
        problems.append(
            f"bf16: step 1's loss is {rel[0]:.2e} from fp32's (same weights and "
            f"batch; limit {BF16_FIRST_STEP_RTOL:.2e}): a cast beyond autocast's"
        )
    worst = max(range(len(rel)), key=rel.__getitem__)
    if rel[worst] > BF16_RTOL:
        problems.append(
            f"bf16: step {worst + 1}'s loss is {rel[worst]:.2e} from fp32's (limit {BF16_RTOL:.2e})"
        )
    return problems
