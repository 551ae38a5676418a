"""One PNG per run: per-layer rank trajectories over optimizer steps, and the loss curve.

Reads the CSV files of :mod:`inrank_megatron.training.metrics`; a dense run (no ``ranks.csv``, or
an empty one) gets the loss panel only. CLI: ``tools/plot_run.py``.
"""

from __future__ import annotations

import math
import os
import re

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402

from inrank_megatron.training.metrics import read_metrics  # noqa: E402

_LAYER_NUMBER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# One line style per kind of InRank layer, so that fc1 and fc2 of one layer share a colour but
# stay apart.
_LINESTYLES = ("-", "--", "-.", ":")


def short_layer_name(layer: str) -> str:
    """``decoder.layers.3.mlp.linear_fc1`` -> ``L3.fc1``; a name without a layer number keeps its
    last component (``output_layer`` -> ``output_layer``)."""
    last = layer.rsplit(".", 1)[-1]
    last = last[len("linear_") :] if last.startswith("linear_") else last
    match = _LAYER_NUMBER.search(layer)
    return f"L{match.group(1)}.{last}" if match else last


def _layer_sort_key(layer: str):
    match = _LAYER_NUMBER.search(layer)
    return (int(match.group(1)) if match else math.inf, layer)


def _event_lines(axes, events, label_axis=None) -> None:
    """Dashed line at each cut, dotted grey line at each resume; labelled on ``label_axis``."""
    for event in events:
        if event["kind"] == "cut":
            style = {"color": "crimson", "linestyle": "--", "linewidth": 1.2}
        elif event["kind"] == "resume":
            style = {"color": "0.5", "linestyle": ":", "linewidth": 1.0}
        else:
            continue
        for ax in axes:
            ax.axvline(event["step"], zorder=1, **style)
        if label_axis is not None:
            label_axis.annotate(
                f" {event['kind']} @ {event['step']}",
                xy=(event["step"], 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, -2),
                textcoords="offset points",
                va="top",
                ha="left",
                fontsize=8,
                color=style["color"],
            )


def _plot_ranks(ax, ranks, last_step) -> None:
    by_layer = {}
    for row in ranks:
        by_layer.setdefault(row["layer"], []).append((row["step"], row["rank"]))
    layers = sorted(by_layer, key=_layer_sort_key)
    names = {layer: short_layer_name(layer) for layer in layers}
    kinds = sorted({name.rsplit(".", 1)[-1] for name in names.values()})  # fc1, fc2, qkv, ...
    numbers = sorted({_layer_sort_key(layer)[0] for layer in layers})
    # Distinct colours while they last; a gradient over depth for deep models.
    if len(numbers) <= 10:
        colors = [plt.get_cmap("tab10")(i) for i in range(len(numbers))]
    else:
        gradient = plt.get_cmap("viridis")
        colors = [gradient(0.9 * i / (len(numbers) - 1)) for i in range(len(numbers))]
    for layer in layers:
        points = sorted(by_layer[layer])
        steps = [s for s, _ in points]
        values = [r for _, r in points]
        if last_step is not None and last_step > steps[-1]:
            # The rank holds until the next check: draw it to the last step trained.
            steps.append(last_step)
            values.append(values[-1])
        kind = kinds.index(names[layer].rsplit(".", 1)[-1])
        ax.plot(
            steps,
            values,
            drawstyle="steps-post",
            linewidth=1.4,
            label=names[layer],
            color=colors[numbers.index(_layer_sort_key(layer)[0])],
            linestyle=_LINESTYLES[kind % len(_LINESTYLES)],
        )
    ax.set_ylabel("rank")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"per-layer rank ({len(layers)} InRank layers)", fontsize=10)
    ncol = max(1, math.ceil(len(layers) / 16))
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        ncol=ncol,
        frameon=False,
        handlelength=2.5,
    )


def _plot_loss(ax, metrics) -> None:
    train = [r for r in metrics if r["split"] == "train" and r["loss"] is not None]
    if train:
        ax.plot(
            [r["step"] for r in train],
            [r["loss"] for r in train],
            color="tab:blue",
            linewidth=1.0,
            label="train loss",
        )
    title = "loss"
    for split, marker, color in (("valid", "o", "tab:orange"), ("test", "s", "tab:green")):
        rows = [r for r in metrics if r["split"] == split]
        if not rows:
            continue
        ax.plot(
            [r["step"] for r in rows],
            [r["loss"] for r in rows],
            linestyle="none",
            marker=marker,
            markersize=5,
            color=color,
            label=f"{split} loss",
            zorder=3,
        )
        last = rows[-1]
        title += f"; last {split}: loss {last['loss']:.3f}, ppl {last['ppl']:.4g} @ {last['step']}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    if train or any(r["split"] != "train" for r in metrics):
        ax.legend(loc="upper right", fontsize=8)
        # ppl = exp(loss) is monotonic: a second scale on the same axis, log-spaced so that its
        # ticks line up evenly with the loss ticks.
        ppl_axis = ax.secondary_yaxis(
            "right",
            functions=(
                lambda x: np.exp(np.clip(x, -50.0, 700.0)),
                lambda p: np.log(np.clip(p, 1e-300, None)),
            ),
        )
        ppl_axis.set_yscale("log")
        ppl_axis.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ppl_axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda p, _: f"{p:g}"))
        ppl_axis.yaxis.set_minor_formatter(ticker.NullFormatter())
        ppl_axis.set_ylabel("ppl = exp(loss)")
    else:
        ax.text(0.5, 0.5, "no metrics logged", transform=ax.transAxes, ha="center", va="center")


def plot_run(run_dir: str, out_png: str | None = None) -> str:
    """Plot a run's ranks and loss to a PNG.

    Args:
        run_dir: directory written by :class:`~inrank_megatron.training.metrics.MetricsWriter`.
        out_png: output path; default ``run_dir/ranks.png``.

    Returns:
        The path of the PNG written.
    """
    run_dir = str(run_dir)
    if not os.path.isdir(run_dir):
        raise ValueError(f"run_dir {run_dir!r} is not a directory")
    out_png = str(out_png) if out_png is not None else os.path.join(run_dir, "ranks.png")
    data = read_metrics(run_dir)
    metrics, ranks, events = data["metrics"], data["ranks"], data["events"]
    steps = [r["step"] for r in metrics] + [r["step"] for r in ranks]
    last_step = max(steps) if steps else None
    name = os.path.basename(os.path.normpath(run_dir))
    if ranks:
        fig, (rank_ax, loss_ax) = plt.subplots(
            2, 1, figsize=(12, 8), sharex=True, height_ratios=(3, 2), layout="constrained"
        )
        _plot_ranks(rank_ax, ranks, last_step)
        _event_lines((rank_ax, loss_ax), events, label_axis=rank_ax)
        fig.suptitle(f"{name}: InRank ranks and loss")
    else:
        fig, loss_ax = plt.subplots(1, 1, figsize=(12, 4.5), layout="constrained")
        _event_lines((loss_ax,), events, label_axis=loss_ax)
        fig.suptitle(f"{name}: dense model: no ranks")
    _plot_loss(loss_ax, metrics)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
