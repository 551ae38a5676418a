"""Run metrics on disk: CSV files a crash cannot lose and a resume can trim, plus TensorBoard.

Files in ``run_dir``:

    metrics.csv   step,split,loss,ppl,lr,grad_norm,tokens_per_s,stage,loss_scale,
                  tflops_per_device,mfu,elapsed_s,eta_s
                  one row per log_train (split "train") or log_eval ("valid"/"test") call;
                  cells that do not apply to the row are empty
    ranks.csv     step,layer,rank,explained_ratio      one row per layer per log_ranks call
    events.csv    step,kind,detail                     e.g. "cut", "resume"
    tb/           TensorBoard event files (train/loss, valid/ppl, rank/<layer>, ...)

``step`` is the number of completed optimizer steps, as everywhere else in the project. The
training loop owns one writer, on global rank 0 only:

    metrics = MetricsWriter(run_dir, resume_step=loaded_step)   # None for a fresh run
    metrics.log_train(step, loss=loss, lr=lr, grad_norm=gnorm, tokens_per_s=tps, stage=stage,
                      tflops_per_device=tflops, mfu=mfu, elapsed_s=elapsed, eta_s=eta)
    metrics.log_eval(step, split="valid", loss=valid_loss)
    metrics.log_ranks(step, controller.ranks(), ratios)
    metrics.log_event(step, "cut", "stage 2: ranks fixed")
    metrics.close()

Every row is flushed to the OS when written, so a crashed process loses nothing it logged. A run
resumed from the checkpoint of step ``s`` drops the rows with step > s (the rerun writes them
again) and TensorBoard hides its events past s (``SummaryWriter(purge_step=s + 1)``). A file of an
older version (``OLDER_COLUMNS``: fewer columns) is rewritten with today's header and
its rows padded with empty cells.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import tempfile

METRICS_COLUMNS = (
    "step",
    "split",
    "loss",
    "ppl",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "stage",
    "loss_scale",
    "tflops_per_device",
    "mfu",
    "elapsed_s",
    "eta_s",
)
# Headers of earlier versions, each a prefix of today's: their rows read with the new cells empty.
OLDER_COLUMNS = {METRICS_COLUMNS: (METRICS_COLUMNS[:9],)}
RANKS_COLUMNS = ("step", "layer", "rank", "explained_ratio")
EVENTS_COLUMNS = ("step", "kind", "detail")
FILES = {
    "metrics": ("metrics.csv", METRICS_COLUMNS),
    "ranks": ("ranks.csv", RANKS_COLUMNS),
    "events": ("events.csv", EVENTS_COLUMNS),
}
SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")
TENSORBOARD_DIR = "tb"

# Megatron's evaluate_and_print_results reports ppl = exp(min(20, loss)); the same cap here keeps
# a diverged loss from overflowing (exp(710) is inf) while any real LM loss (< ln(vocab)) is exact.
PPL_MAX_LOSS = 20.0

_INT_FIELDS = ("step", "rank")
_FLOAT_FIELDS = (
    "loss",
    "ppl",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "loss_scale",
    "explained_ratio",
    "tflops_per_device",
    "mfu",
    "elapsed_s",
    "eta_s",
)


def perplexity(loss: float) -> float:
    """``exp(loss)``, with the loss capped at :data:`PPL_MAX_LOSS` (nan stays nan)."""
    return math.exp(min(float(loss), PPL_MAX_LOSS))


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0 (completed optimizer steps), got {step!r}")
    return step


def _cell(value) -> str:
    """CSV text of one value: empty for None, shortest round-tripping repr for floats."""
    if value is None:
        return ""
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar (numpy's repr names its type)
        return _cell(value.item())
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _float(value, name: str):
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or None, got {value!r}")
    return float(value)


def _read_rows(path: str, columns: tuple) -> list:
    """The rows of one of our CSV files as lists of strings, ``columns`` wide. A row of the wrong
    width (a write torn by a crash) is skipped; an older version's header
    (:data:`OLDER_COLUMNS`) has its rows padded with empty cells; any other header is an error,
    never overwritten."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        if tuple(header) != columns and tuple(header) not in OLDER_COLUMNS.get(columns, ()):
            raise ValueError(
                f"{path}: header {','.join(header)!r} is not "
                f"{','.join(columns)!r}; not a file written by MetricsWriter"
            )
        pad = [""] * (len(columns) - len(header))
        return [row + pad for row in reader if len(row) == len(header)]


def _trim(path: str, columns: tuple, resume_step: int) -> None:
    """Rewrite ``path`` keeping the rows with step <= resume_step. Written to a temporary file and
    swapped in with os.replace, so a crash leaves either the old file or the trimmed one."""
    kept = []
    for row in _read_rows(path, columns):
        try:
            step = int(row[0])
        except ValueError:
            continue
        if step <= resume_step:
            kept.append(row)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _CsvLog:
    """One append-only CSV file, flushed after every row."""

    def __init__(self, path: str, columns: tuple, resume_step):
        self.columns = columns
        if resume_step is not None and os.path.exists(path):
            _trim(path, columns, resume_step)
            self.file = open(path, "a", newline="")
            self.writer = csv.writer(self.file)
        else:
            self.file = open(path, "w", newline="")
            self.writer = csv.writer(self.file)
            self.write(columns)

    def write(self, row) -> None:
        self.writer.writerow([_cell(v) for v in row])
        self.file.flush()

    def write_many(self, rows) -> None:
        self.writer.writerows([[_cell(v) for v in row] for row in rows])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class MetricsWriter:
    """Writes a run's metrics to CSV files and TensorBoard. Global rank 0 only.

    Args:
        run_dir: directory of the run; created if missing.
        tensorboard: also write TensorBoard scalars to ``run_dir/tb``.
        csv: write ``metrics.csv``, ``ranks.csv`` and ``events.csv``.
        resume_step: the step of the checkpoint this run resumed from. Rows with a larger step are
            dropped from existing CSV files, which are then appended to, and TensorBoard hides its
            events past it. ``None``: a fresh run; existing CSV and TensorBoard event files in
            ``run_dir`` are replaced.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        tensorboard: bool = True,
        csv: bool = True,
        resume_step: int | None = None,
    ):
        if resume_step is not None:
            _check_step(resume_step)
        self.run_dir = str(run_dir)
        self.resume_step = resume_step
        os.makedirs(self.run_dir, exist_ok=True)
        self._csv = {}
        if csv:
            for key, (name, columns) in FILES.items():
                self._csv[key] = _CsvLog(os.path.join(self.run_dir, name), columns, resume_step)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = os.path.join(self.run_dir, TENSORBOARD_DIR)
            if resume_step is None:
                for old in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
                    os.remove(old)
            # purge_step: TensorBoard drops earlier events with step >= purge_step when it reads
            # this file's SessionLog.START (torch.utils.tensorboard.SummaryWriter docstring).
            self._tb = SummaryWriter(
                tb_dir, purge_step=None if resume_step is None else resume_step + 1
            )
        self.closed = False

    def _scalars(self, step: int, values: dict) -> None:
        if self._tb is None:
            return
        for tag, value in values.items():
            if value is not None:
                self._tb.add_scalar(tag, value, step)
        self._tb.flush()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"MetricsWriter for {self.run_dir} is closed")

    def log_train(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float | None,
        tokens_per_s: float | None,
        stage,
        loss_scale: float | None = None,
        tflops_per_device: float | None = None,
        mfu: float | None = None,
        elapsed_s: float | None = None,
        eta_s: float | None = None,
    ) -> None:
        """One training row (split ``train``); ppl is left empty, as in Megatron's training log.

        Args:
            step: completed optimizer steps.
            loss: mean LM loss of the step (nats per token).
            lr: learning rate used by the step.
            grad_norm: gradient norm before clipping; None (e.g. a skipped fp16 step) leaves the
                cell empty.
            tokens_per_s: training throughput; None leaves the cell empty.
            stage: InRank stage of the step (e.g. ``"growing"``/``"fixed"``, ``1``/``2``, or
                ``"dense"``); written as text.
            loss_scale: fp16 loss scale; None for bf16/fp32.
            tflops_per_device: model TFLOP/s per device of this step: FLOPs per token at the
                ranks the step computed with (before its own rank check or cut) x tokens_per_s /
                devices (:mod:`inrank_megatron.training.throughput`).
            mfu: ``tflops_per_device`` / the device's peak; None without a peak (CPU).
            elapsed_s: seconds since this process started training.
            eta_s: seconds to the last step at the last log interval's time per step.
        """
        self._check_open()
        step = _check_step(step)
        values = {
            "loss": _float(loss, "loss"),
            "lr": _float(lr, "lr"),
            "grad_norm": _float(grad_norm, "grad_norm"),
            "tokens_per_s": _float(tokens_per_s, "tokens_per_s"),
            "loss_scale": _float(loss_scale, "loss_scale"),
            "tflops_per_device": _float(tflops_per_device, "tflops_per_device"),
            "mfu": _float(mfu, "mfu"),
            "elapsed_s": _float(elapsed_s, "elapsed_s"),
            "eta_s": _float(eta_s, "eta_s"),
        }
        if "metrics" in self._csv:
            self._csv["metrics"].write(
                [
                    step,
                    "train",
                    values["loss"],
                    None,
                    values["lr"],
                    values["grad_norm"],
                    values["tokens_per_s"],
                    stage,
                    values["loss_scale"],
                    values["tflops_per_device"],
                    values["mfu"],
                    values["elapsed_s"],
                    values["eta_s"],
                ]
            )
        self._scalars(step, {f"train/{k}": v for k, v in values.items()})

    def log_eval(self, step: int, *, split: str, loss: float) -> float:
        """One evaluation row; ppl = exp(loss), capped (see :func:`perplexity`).

        Args:
            step: completed optimizer steps when the evaluation ran.
            split: ``"valid"`` or ``"test"``.
            loss: mean LM loss over the evaluation batches.

        Returns:
            The perplexity written.
        """
        self._check_open()
        step = _check_step(step)
        if split not in EVAL_SPLITS:
            raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
        loss = _float(loss, "loss")
        if loss is None:
            raise ValueError("loss must be a number, got None")
        ppl = perplexity(loss)
        if "metrics" in self._csv:
            self._csv["metrics"].write(
                [step, split, loss, ppl] + [None] * (len(METRICS_COLUMNS) - 4)
            )
        self._scalars(step, {f"{split}/loss": loss, f"{split}/ppl": ppl})
        return ppl

    def log_ranks(self, step: int, ranks: dict, ratios: dict | None = None) -> None:
        """Every InRank layer's rank, one row per layer.

        Args:
            step: completed optimizer steps.
            ranks: ``{layer name: rank}``, e.g. ``{"decoder.layers.3.mlp.linear_fc1": 12}``
                (:meth:`GrowthController.ranks`).
            ratios: ``{layer name: explained ratio g(s, rank)}`` for the layers checked at this
                step; a layer missing from it (or ``ratios=None``) gets an empty cell.
        """
        self._check_open()
        step = _check_step(step)
        ratios = ratios or {}
        unknown = sorted(set(ratios) - set(ranks))
        if unknown:
            raise ValueError(f"ratios names layers without a rank: {unknown}")
        rows, scalars = [], {}
        for layer, rank in ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise ValueError(f"rank of layer {layer} must be an int >= 0, got {rank!r}")
            ratio = _float(ratios.get(layer), f"explained ratio of layer {layer}")
            rows.append([step, layer, rank, ratio])
            scalars[f"rank/{layer}"] = rank
            scalars[f"explained_ratio/{layer}"] = ratio
        if "ranks" in self._csv:
            self._csv["ranks"].write_many(rows)
        self._scalars(step, scalars)

    def log_event(self, step: int, kind: str, detail: str = "") -> None:
        """A one-off event: ``kind`` is a short word (``"cut"``, ``"resume"``), ``detail`` free
        text (commas and newlines are quoted by the CSV writer). CSV only."""
        self._check_open()
        step = _check_step(step)
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string, got {kind!r}")
        if "events" in self._csv:
            self._csv["events"].write([step, kind, str(detail)])

    def close(self) -> None:
        """Close every file; calling it again does nothing."""
        if self.closed:
            return
        for log in self._csv.values():
            log.close()
        if self._tb is not None:
            self._tb.close()
        self.closed = True

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse(row: dict) -> dict:
    out = {}
    for key, text in row.items():
        if text == "":
            out[key] = None
        elif key in _INT_FIELDS:
            out[key] = int(text)
        elif key in _FLOAT_FIELDS:
            out[key] = float(text)
        elif key == "stage":
            out[key] = int(text) if text.lstrip("-").isdigit() else text
        else:
            out[key] = text
    return out


def read_metrics(run_dir: str) -> dict:
    """The CSV files of a run, parsed.

    Returns:
        ``{"metrics": [...], "ranks": [...], "events": [...]}``, each a list of dicts keyed by the
        file's columns in file order: ``step``/``rank`` as int, losses, ppl, lr and other numbers as
        float, ``stage`` as int when it is one (else text), empty cells as None. A missing file
        gives an empty list.
    """
    out = {}
    for key, (name, columns) in FILES.items():
        path = os.path.join(str(run_dir), name)
        rows = _read_rows(path, columns) if os.path.exists(path) else []
        out[key] = [_parse(dict(zip(columns, row))) for row in rows]
    return out
