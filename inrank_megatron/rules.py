"""Every rule that spans configuration keys, written once, in one list (:data:`RULES`).

    failures = check(cfg, world_size=16)          # every failure of every rule, [] when all pass
    validate(cfg, world_size=16)                  # ConfigError listing them all
    validate(cfg, world_size, scopes=ALL_SCOPES)  # the trainer's pre-flight: this machine too

Who runs them: training (``inrank_megatron.train``: every scope), convert, import and the launch
scripts' pre-flight (``python -m inrank_megatron.launch_env check``) run :func:`validate`; the
planner (``planning.plan.layout_checks``, ``tools/plan.py``) shows each rule as a pass/FAIL row; and
``configs/README.md`` lists each rule's ``doc`` (:func:`render_rules`). A rule therefore cannot
pass in one place and fail in another.

A rule is a function ``(cfg, world_size) -> iterable of Failure`` (a generator yielding one
:class:`Failure` per problem), registered with :func:`rule`. It may also raise ``ConfigError``
(e.g. from :func:`~inrank_megatron.config.data_parallel_size`): that counts as one failure of its
first key. Adding a rule is a few lines::

    @rule("eval cadence", ("train.eval_interval", "train.steps"),
          "`train.eval_interval <= train.steps`")
    def _eval_cadence(cfg, world_size):
        t = cfg.train
        if t.eval_interval > t.steps:
            yield Failure("train.eval_interval", t.eval_interval, f"<= {t.steps}")

Arguments of :func:`rule`: ``world=True`` when the rule needs the world size (it is skipped when
none is given); ``scope`` says what it reads besides the configuration: ``"config"`` (nothing:
the planner and the launch pre-flight run it), ``"machine"`` (this machine's devices) or
``"files"`` (files the run reads: the trainer's pre-flight only); ``summary`` gives the planner's
text for a pass (default ``"ok"``). The ``doc`` is Markdown for the generated README: run
``python tools/config_doc.py > configs/README.md`` after adding one.

Fields one at a time (types, allowed values, ranges) are the schema's job
(:mod:`inrank_megatron.config`); :func:`check` re-checks them first and raises on the first bad one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from inrank_megatron.config import (
    ConfigError,
    Failure,
    TrainConfig,
    check_fields,
    data_parallel_size,
    format_value,
    get_value,
    grad_accumulation_steps,
    inrank_fit_failures,
    inrank_layer_shapes,
)
from inrank_megatron.deepspeed_json import DEEPSPEED_KEY, read_deepspeed_json, zero_stage

SCOPES = ("config", "machine", "files")
ALL_SCOPES = SCOPES

TP = "parallel.tensor_model_parallel_size"
PP = "parallel.pipeline_model_parallel_size"


@dataclass(frozen=True)
class Finding:
    """What a rule computed on the way that its caller needs as well (the checkpoint to resume,
    the split's warnings): a rule yields it next to its failures and :func:`validate` returns it
    by ``name``, so that the work (a pickle scan, an index read) runs once per process."""

    name: str
    value: Any


@dataclass(frozen=True)
class Rule:
    """A named cross-key rule; see the module docstring."""

    name: str
    keys: tuple
    doc: str
    fn: Callable[[TrainConfig, Optional[int]], Iterable[Failure]]
    scope: str = "config"
    world: bool = False
    summary: Optional[Callable[[TrainConfig, Optional[int]], str]] = None

    def run(self, cfg: TrainConfig, world_size: Optional[int]) -> tuple[list, list]:
        """``(failures, findings)`` of this rule. A ConfigError raised inside counts as one
        failure; any other exception (a file the rule reads is corrupt in a way it did not
        foresee) is one too, naming the rule's first key, its value and what the rule expects:
        a rule never crashes the pre-flight."""
        key = self.keys[0] if self.keys else ""
        try:
            items = list(self.fn(cfg, world_size) or ())
        except ConfigError as error:
            return [Failure(key, None, "", str(error))], []
        except Exception as error:  # noqa: BLE001 - turned into this rule's failure, one line
            value = get_value(cfg, key) if key else None
            shown = repr(value) if isinstance(value, str) else format_value(value)
            cause = " ".join(str(error).split()) or "no message"
            expected = self.doc.replace("`", "")
            return [
                Failure(
                    key,
                    value,
                    expected,
                    f"{key}={shown}: the {self.name!r} check failed "
                    f"({type(error).__name__}: {cause}); expected {expected}",
                )
            ], []
        return (
            [i for i in items if isinstance(i, Failure)],
            [i for i in items if isinstance(i, Finding)],
        )

    def failures(self, cfg: TrainConfig, world_size: Optional[int]) -> list[Failure]:
        """Every failure of this rule (an exception raised inside counts as one)."""
        return self.run(cfg, world_size)[0]

    def describe(self, cfg: TrainConfig, world_size: Optional[int]) -> str:
        """The planner's text for a pass (``"not checked: ..."`` where another rule's failure
        leaves nothing to show, e.g. the batch on a world size TP * PP does not divide)."""
        try:
            return self.summary(cfg, world_size) if self.summary else "ok"
        except Exception:  # noqa: BLE001 - the rule itself reports it as a failure
            return "not checked: see the failing rule above"


RULES: list[Rule] = []


def rule(
    name: str,
    keys: Iterable[str],
    doc: str,
    *,
    scope: str = "config",
    world: bool = False,
    summary: Optional[Callable] = None,
):
    """Register the decorated ``(cfg, world_size) -> failures`` function in :data:`RULES`."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")

    def register(fn):
        RULES.append(Rule(name, tuple(keys), doc, fn, scope, world, summary))
        return fn

    return register


def applicable(world_size: Optional[int], scopes: Iterable[str] = ("config",)) -> list[Rule]:
    """The rules :func:`check` runs for these arguments, in order."""
    scopes = tuple(scopes)
    return [r for r in RULES if r.scope in scopes and (world_size is not None or not r.world)]


def check(
    cfg: TrainConfig,
    world_size: Optional[int] = None,
    scopes: Iterable[str] = ("config",),
    found: Optional[dict] = None,
) -> list[Failure]:
    """Every failure of every rule in ``scopes`` (rules needing a world size are skipped without
    one). The fields are re-checked first (a config may be built in code).

    Args:
        found: receives the rules' :class:`Finding` values by name (None: dropped).

    Raises:
        ConfigError: a field alone is wrong (the first one).
    """
    check_fields(cfg)
    failures = []
    for r in applicable(world_size, scopes):
        failed, findings = r.run(cfg, world_size)
        failures += failed
        if found is not None:
            found.update((f.name, f.value) for f in findings)
    # Two rules that read the same file (the tokenizer: its own rule and the activation estimate's
    # vocabulary) report its fault once.
    return list({str(f): f for f in failures}.values())


def validate(
    cfg: TrainConfig, world_size: Optional[int] = None, scopes: Iterable[str] = ("config",)
) -> dict:
    """:func:`check`, raising one ``ConfigError`` that lists every failure (``"; "``-joined, one
    line) and carries them as ``error.failures``.

    Returns:
        What the rules found, by name: with the ``files`` scope ``"resume_path"`` (the checkpoint
        to resume, or None: :func:`inrank_megatron.checkpoint.resume.resolve_resume`) and
        ``"split_warnings"`` (:func:`inrank_megatron.data.checks.split_report`).
    """
    found: dict = {}
    failures = check(cfg, world_size, scopes, found)
    if failures:
        error = ConfigError("; ".join(str(f) for f in failures))
        error.failures = failures
        raise error
    return found


def render_rules() -> str:
    """The Markdown list of :data:`RULES` for ``configs/README.md``."""
    lines = []
    for r in RULES:
        keys = ", ".join(f"`{k}`" for k in r.keys)
        where = {
            "config": "",
            "machine": " *(trainer only: this machine)*",
            "files": " *(trainer only: files on disk)*",
        }[r.scope]
        lines.append(f"- **{r.name}** ({keys}){where}: {r.doc}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ the rules
def _multiple(key: str, value: int, divisor_key: str, divisor: int, why: str = ""):
    if value % divisor:
        yield Failure(
            key,
            value,
            f"a multiple of {divisor}",
            f"{key}={value} is not divisible by {divisor_key}={divisor}{why}; expected "
            f"a multiple of {divisor}",
        )


def _quotient(value: int, divisor: int) -> str:
    return f"{value} / {divisor} = {value // divisor}"


def _tp(cfg) -> int:
    return cfg.parallel.tensor_model_parallel_size


def _pp(cfg) -> int:
    return cfg.parallel.pipeline_model_parallel_size


@rule(
    "world size",
    (TP, PP),
    "TP * PP divides the world size (DP takes the rest).",
    world=True,
    summary=lambda cfg, w: f"DP = {w} / ({_tp(cfg)} x {_pp(cfg)}) = {data_parallel_size(cfg, w)}",
)
def _world(cfg, world_size):
    data_parallel_size(cfg, world_size)
    return ()


@rule(
    "heads divide hidden",
    ("model.hidden_size", "model.num_attention_heads"),
    "the attention heads divide `model.hidden_size`.",
    summary=lambda cfg, w: (
        "head dim " + _quotient(cfg.model.hidden_size, cfg.model.num_attention_heads)
    ),
)
def _heads(cfg, world_size):
    m = cfg.model
    yield from _multiple(
        "model.hidden_size", m.hidden_size, "model.num_attention_heads", m.num_attention_heads
    )


@rule(
    "TP divides heads",
    (TP, "model.num_attention_heads"),
    "TP divides the attention heads.",
    summary=lambda cfg, w: (
        "heads per TP rank " + _quotient(cfg.model.num_attention_heads, _tp(cfg))
    ),
)
def _tp_heads(cfg, world_size):
    yield from _multiple("model.num_attention_heads", cfg.model.num_attention_heads, TP, _tp(cfg))


@rule(
    "TP divides hidden",
    (TP, "model.hidden_size"),
    "TP divides `model.hidden_size`.",
    summary=lambda cfg, w: _quotient(cfg.model.hidden_size, _tp(cfg)),
)
def _tp_hidden(cfg, world_size):
    yield from _multiple("model.hidden_size", cfg.model.hidden_size, TP, _tp(cfg))


@rule(
    "TP divides ffn",
    (TP, "model.ffn_hidden_size"),
    "TP divides the MLP width (`model.ffn_hidden_size`, null = 4 * hidden).",
    summary=lambda cfg, w: _quotient(cfg.model.ffn(), _tp(cfg)),
)
def _tp_ffn(cfg, world_size):
    yield from _multiple("model.ffn_hidden_size (resolved)", cfg.model.ffn(), TP, _tp(cfg))


@rule(
    "TP divides vocab padding",
    (TP, "model.make_vocab_size_divisible_by"),
    "TP divides `model.make_vocab_size_divisible_by` (the padded vocabulary is split over TP).",
    summary=lambda cfg, w: _quotient(cfg.model.make_vocab_size_divisible_by, _tp(cfg)),
)
def _tp_vocab(cfg, world_size):
    yield from _multiple(
        "model.make_vocab_size_divisible_by",
        cfg.model.make_vocab_size_divisible_by,
        TP,
        _tp(cfg),
        " (the padded vocabulary is split over TP)",
    )


@rule(
    "PP divides layers",
    (PP, "model.num_layers"),
    "PP divides `model.num_layers`.",
    summary=lambda cfg, w: "layers per stage " + _quotient(cfg.model.num_layers, _pp(cfg)),
)
def _pp_layers(cfg, world_size):
    yield from _multiple("model.num_layers", cfg.model.num_layers, PP, _pp(cfg))


def _sp_summary(cfg, world_size):
    if not cfg.parallel.sequence_parallel:
        return "off"
    return f"on, seq {_quotient(cfg.model.seq_length, _tp(cfg))} per TP rank"


@rule(
    "sequence parallel",
    ("parallel.sequence_parallel", TP, "model.seq_length"),
    "sequence parallelism needs TP > 1 and TP dividing `model.seq_length`.",
    summary=_sp_summary,
)
def _sequence_parallel(cfg, world_size):
    if not cfg.parallel.sequence_parallel:
        return
    if _tp(cfg) == 1:
        yield Failure(
            "parallel.sequence_parallel",
            True,
            f"{TP} > 1",
            "parallel.sequence_parallel=true needs tensor parallelism; expected "
            f"{TP} > 1 (or parallel.sequence_parallel=false)",
        )
        return
    yield from _multiple(
        "model.seq_length",
        cfg.model.seq_length,
        TP,
        _tp(cfg),
        " (sequence parallelism splits the sequence over TP ranks)",
    )


def _batch_summary(cfg, world_size):
    t = cfg.train
    return (
        f"{t.micro_batch_size} x DP {data_parallel_size(cfg, world_size)} x "
        f"{grad_accumulation_steps(cfg, world_size)} accumulation steps = "
        f"{t.global_batch_size}"
    )


@rule(
    "batch",
    ("train.global_batch_size", "train.micro_batch_size"),
    "`train.micro_batch_size` * DP divides `train.global_batch_size`.",
    world=True,
    summary=_batch_summary,
)
def _batch(cfg, world_size):
    try:
        data_parallel_size(cfg, world_size)
    except ConfigError:
        return  # the world-size rule reports it
    grad_accumulation_steps(cfg, world_size)


def _backend_summary(cfg, world_size):
    p = cfg.parallel
    if p.backend == "deepspeed":
        return f"deepspeed {p.deepspeed_config}, ZeRO stage {zero_stage(cfg)}"
    if p.backend == "megatron":
        return (
            "megatron: distributed optimizer (ZeRO-1)"
            if (p.zero_stage or 0) >= 1
            else "megatron: DDP + optimizer, not sharded"
        )
    return "torch: DDP + AdamW"


@rule(
    "backend",
    ("parallel.backend", DEEPSPEED_KEY, "parallel.zero_stage"),
    "`parallel.deepspeed_config` names a readable DeepSpeed JSON iff the backend is deepspeed; "
    "`parallel.zero_stage` is any stage with deepspeed (null: the JSON's), 0, 1 or null with "
    "megatron (1: megatron's distributed optimizer, which is ZeRO-1) and null with torch.",
    summary=_backend_summary,
)
def _backend(cfg, world_size):
    p = cfg.parallel
    if p.backend == "deepspeed":
        read_deepspeed_json(p.deepspeed_config)
        return
    if p.deepspeed_config is not None:
        yield Failure(
            DEEPSPEED_KEY,
            p.deepspeed_config,
            "null",
            f"{DEEPSPEED_KEY}={p.deepspeed_config!r} is only read by "
            f"parallel.backend=deepspeed (backend is {p.backend}); expected null",
        )
    allowed = (None, 0, 1) if p.backend == "megatron" else (None,)
    if p.zero_stage not in allowed:
        text = " or ".join("null" if a is None else str(a) for a in allowed)
        why = " (1 = megatron's distributed optimizer)" if p.backend == "megatron" else ""
        yield Failure(
            "parallel.zero_stage",
            p.zero_stage,
            text,
            f"parallel.zero_stage={p.zero_stage!r} with parallel.backend={p.backend}; "
            f"expected {text}{why}",
        )


@rule(
    "pipeline",
    (PP, "parallel.backend", "train.precision"),
    "PP > 1 runs with the torch backend only (its pipeline schedule), in bf16 or fp32 (the fp16 "
    "loss scaler's skip decision is per stage).",
    summary=lambda cfg, w: "no pipeline" if _pp(cfg) == 1 else f"{_pp(cfg)} stages, torch",
)
def _pipeline(cfg, world_size):
    pp, p = _pp(cfg), cfg.parallel
    if pp == 1:
        return
    if p.backend != "torch":
        yield Failure(
            PP,
            pp,
            "1",
            f"{PP}={pp} is not supported with parallel.backend={p.backend!r}: the "
            "pipeline schedule runs with the torch backend; expected 1 (or "
            "parallel.backend='torch')",
        )
    if cfg.train.precision == "fp16":
        yield Failure(
            PP,
            pp,
            "bf16 or fp32",
            f"{PP}={pp} with train.precision='fp16': the loss scaler's skip decision "
            "is per stage; expected bf16 or fp32",
        )


@rule(
    "positions",
    ("model.position_embedding_type", "model.max_position_embeddings", "model.seq_length"),
    "learned positions cover `model.seq_length`; rope needs an even head dimension.",
)
def _positions(cfg, world_size):
    m = cfg.model
    head_dim = m.hidden_size // m.num_attention_heads
    if m.position_embedding_type == "rope" and head_dim % 2:
        yield Failure(
            "model.position_embedding_type",
            "rope",
            "an even head dimension",
            "model.position_embedding_type=rope needs an even head dimension, got "
            f"model.hidden_size / model.num_attention_heads = {head_dim}; expected an "
            "even value",
        )
    if m.position_embedding_type == "learned_absolute" and m.max_positions() < m.seq_length:
        yield Failure(
            "model.max_position_embeddings",
            m.max_position_embeddings,
            f">= {m.seq_length} or null",
            f"model.max_position_embeddings={m.max_position_embeddings} is below "
            f"model.seq_length={m.seq_length}; expected >= {m.seq_length} or null",
        )


def _recompute_summary(cfg, world_size):
    m = cfg.model
    if m.recompute == "none":
        return f"none, attention {m.attention}"
    if m.recompute == "selective":
        return "selective: core attention"
    n = m.recompute_num_layers
    return "full: " + ("every layer" if n is None else f"the first {n} layers of each stage")


@rule(
    "recompute",
    ("model.recompute", "model.attention", "model.recompute_num_layers", PP),
    "`model.recompute=selective` needs `model.attention=local` (SDPA keeps no attention "
    "probabilities to drop); `model.recompute_num_layers` only with `model.recompute=full`, "
    "at most the layers of a pipeline stage.",
    summary=_recompute_summary,
)
def _recompute(cfg, world_size):
    # Selective recompute re-runs core attention so as not to keep its [b, heads, s, s]
    # probabilities; SDPA does not keep them, so the pair would only add compute (megatron warns
    # about it for fused attention).
    m = cfg.model
    if m.recompute == "selective" and m.attention != "local":
        yield Failure(
            "model.recompute",
            "selective",
            "none or full with SDPA",
            f"model.recompute=selective recomputes core attention, which "
            f"model.attention={m.attention} does not keep; expected "
            "model.attention=local, or model.recompute=none or full",
        )
    if m.recompute_num_layers is None:
        return
    if m.recompute != "full":
        yield Failure(
            "model.recompute_num_layers",
            m.recompute_num_layers,
            "null",
            f"model.recompute_num_layers={m.recompute_num_layers} is only read with "
            f"model.recompute=full (got {m.recompute}); expected null",
        )
    elif m.num_layers % _pp(cfg) == 0 and m.recompute_num_layers > m.num_layers // _pp(cfg):
        per_stage = m.num_layers // _pp(cfg)
        yield Failure(
            "model.recompute_num_layers",
            m.recompute_num_layers,
            f"<= {per_stage}",
            f"model.recompute_num_layers={m.recompute_num_layers} exceeds the "
            f"{per_stage} transformer layers per pipeline stage (model.num_layers / "
            f"{PP}); expected <= {per_stage} or null",
        )


@rule(
    "InRank layers",
    ("inrank.layers", "model.activation", "inrank.mode", "inrank.stage1_steps"),
    "with `model.inrank=true`: no InRank fc1 with swiglu (gated fc1); `inrank.stage1_steps` "
    "null in cumulative mode.",
    summary=lambda cfg, w: (
        "dense (model.inrank=false): not checked"
        if not cfg.model.inrank
        else ", ".join(cfg.inrank.layers)
    ),
)
def _inrank_layers(cfg, world_size):
    ir = cfg.inrank
    if not cfg.model.inrank:
        return
    if cfg.model.activation == "swiglu" and "fc1" in ir.layers:
        yield Failure(
            "inrank.layers",
            ir.layers,
            "without fc1",
            "inrank.layers contains fc1 but model.activation=swiglu (gated fc1), which "
            "InRank layers do not support; expected inrank.layers without fc1 (or "
            "model.activation=gelu)",
        )
    if ir.mode == "cumulative" and ir.stage1_steps is not None:
        yield Failure(
            "inrank.stage1_steps",
            ir.stage1_steps,
            "null",
            f"inrank.stage1_steps={ir.stage1_steps} with inrank.mode=cumulative (the "
            "cut is an efficient-mode stage); expected null",
        )


@rule(
    "InRank signal and start",
    ("inrank.signal", "inrank.start", "inrank.mode", "inrank.stage1_steps"),
    "with `model.inrank=true`: `inrank.signal=update` and `inrank.start` other than low_rank "
    "need efficient mode (in cumulative mode `B A` is already the update, grown from zero); "
    "`inrank.start=full_rank|dense` needs `inrank.stage1_steps` (its cut is where the rank is "
    "chosen).",
    summary=lambda cfg, w: (
        f"signal {cfg.inrank.signal}, start {cfg.inrank.start}"
        if cfg.model.inrank
        else "dense (model.inrank=false): not checked"
    ),
)
def _inrank_signal_start(cfg, world_size):
    ir = cfg.inrank
    if not cfg.model.inrank:
        return
    for key, value, spec in (
        ("inrank.signal", ir.signal, "product"),
        ("inrank.start", ir.start, "low_rank"),
    ):
        if value != spec and ir.mode != "efficient":
            yield Failure(
                key,
                value,
                f"{spec} with inrank.mode={ir.mode}",
                f"{key}={value} with inrank.mode={ir.mode}: it is an efficient-mode "
                f"setting (cumulative mode's B A is already the update, grown from "
                f"zero); expected inrank.mode=efficient or {key}={spec}",
            )
    if ir.start != "low_rank" and ir.stage1_steps is None:
        yield Failure(
            "inrank.stage1_steps",
            ir.stage1_steps,
            f"a step count with inrank.start={ir.start}",
            f"inrank.stage1_steps=null with inrank.start={ir.start}: this start chooses "
            "each layer's rank at the cut, so it needs one; expected e.g. "
            "inrank.stage1_steps=100",
        )


@rule(
    "InRank factor init",
    ("inrank.init", "inrank.mode"),
    "with `model.inrank=true`: `inrank.init=spectral` needs `inrank.mode=efficient` (in "
    "cumulative mode `B A` starts at zero and the layer at its frozen `W0`: there is no product "
    "to initialise).",
    summary=lambda cfg, w: (
        "dense (model.inrank=false): not checked"
        if not cfg.model.inrank
        else f"{cfg.inrank.init}, {cfg.inrank.mode} mode"
    ),
)
def _inrank_init(cfg, world_size):
    ir = cfg.inrank
    if cfg.model.inrank and ir.init == "spectral" and ir.mode != "efficient":
        yield Failure(
            "inrank.init",
            ir.init,
            "kaiming with inrank.mode=cumulative",
            f"inrank.init=spectral with inrank.mode={ir.mode}: B A starts at zero in "
            "cumulative mode (W = W0 + B A), so there is no product to initialise; "
            "expected inrank.mode=efficient or inrank.init=kaiming",
        )


def _fit_summary(cfg, world_size):
    if not cfg.model.inrank:
        return "dense (model.inrank=false): not checked"
    ir = cfg.inrank
    fits = [
        f"{k} max_rank {ir.layer_max_rank(i, o)}" for k, (i, o) in inrank_layer_shapes(cfg).items()
    ]
    return f"rank + buffer = {ir.rank + ir.buffer} <= " + ", ".join(fits)


@rule(
    "InRank rank fits",
    ("inrank.rank", "inrank.buffer", "inrank.max_rank"),
    "with `model.inrank=true`, for every InRank layer (fc1: hidden -> ffn, fc2: ffn -> hidden, "
    "qkv: hidden -> 3 hidden, proj: hidden -> hidden), with `max_rank` = `inrank.max_rank` or "
    "`min(in, out) // 2`: `max_rank <= min(in, out)`, `inrank.buffer < max_rank` and "
    "`inrank.rank + inrank.buffer <= max_rank` (spec section 2).",
    summary=_fit_summary,
)
def _inrank_fit(cfg, world_size):
    if cfg.model.inrank:
        yield from inrank_fit_failures(cfg)


@rule(
    "fixed ranks",
    ("inrank.fixed_ranks", "inrank.mode"),
    "with `model.inrank=true` and `inrank.fixed_ranks` set: efficient mode; an integer rank "
    "within `min(in, out)` of every InRank layer, or a fraction in (0, 1]. A run directory's "
    "ranks are read, and its layers' names and shapes checked, by the trainer before a fresh "
    "run starts (`inrank_megatron.training.fixed_ranks`).",
    summary=lambda cfg, w: (
        "growing (inrank.fixed_ranks=null)"
        if cfg.inrank.fixed_ranks is None or not cfg.model.inrank
        else f"fixed at {cfg.inrank.fixed_ranks}"
    ),
)
def _fixed_ranks(cfg, world_size):
    value, key = cfg.inrank.fixed_ranks, "inrank.fixed_ranks"
    if value is None or not cfg.model.inrank:
        return
    shown = f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
    if cfg.inrank.mode != "efficient":
        yield Failure(
            key,
            value,
            "null with inrank.mode=cumulative",
            f"{shown} with inrank.mode={cfg.inrank.mode}: the fixed-rank baseline is "
            "an efficient-mode run (W = B A); expected inrank.mode=efficient or "
            f"{key}=null",
        )
    if isinstance(value, float) and value > 1:
        yield Failure(
            key,
            value,
            "a fraction in (0, 1]",
            f"{shown}: a float is a fraction of each layer's full rank and must be in "
            "(0, 1]; expected e.g. 0.33, or an integer for a rank",
        )
    if isinstance(value, int):
        for kind, (n_in, n_out) in inrank_layer_shapes(cfg).items():
            n = min(n_in, n_out)
            if value > n:
                yield Failure(
                    key,
                    value,
                    f"1..{n}",
                    f"{shown} exceeds the full rank min(in, out)={n} of layer {kind} "
                    f"({n_in} -> {n_out}); expected 1..{n}",
                )
                break
    if isinstance(value, str) and not value.strip():
        yield Failure(key, value, "a rank, a fraction or a run directory")


@rule(
    "async save",
    ("train.async_save", "parallel.backend"),
    "`train.async_save` runs with `parallel.backend=torch` (megatron dist_checkpointing's async "
    "save; DeepSpeed writes its own files, and the megatron backend's async path is untested).",
)
def _async_save(cfg, world_size):
    if cfg.train.async_save and cfg.parallel.backend != "torch":
        yield Failure(
            "train.async_save",
            True,
            "false with this backend",
            f"train.async_save=true needs parallel.backend=torch (this run: "
            f"parallel.backend={cfg.parallel.backend}); expected "
            "train.async_save=false",
        )


@rule(
    "LR schedule",
    ("train.min_lr", "train.lr", "train.lr_warmup_steps", "train.lr_decay_steps"),
    "`train.min_lr <= train.lr`; the warm-up is shorter than the decay (unless constant).",
)
def _schedule(cfg, world_size):
    t = cfg.train
    if t.min_lr > t.lr:
        yield Failure(
            "train.min_lr",
            t.min_lr,
            f"<= {t.lr}",
            f"train.min_lr={t.min_lr} is above train.lr={t.lr}; expected <= {t.lr}",
        )
    if t.lr_decay_style != "constant" and t.lr_warmup_steps >= t.decay_steps():
        yield Failure(
            "train.lr_warmup_steps",
            t.lr_warmup_steps,
            f"< {t.decay_steps()}",
            f"train.lr_warmup_steps={t.lr_warmup_steps} is not below the decay length "
            f"(train.lr_decay_steps, null = train.steps) = {t.decay_steps()}; expected "
            f"< {t.decay_steps()}",
        )


_SPLIT = re.compile(r"^\s*\d+(?:\.\d*)?(?:\s*[,/]\s*\d+(?:\.\d*)?){0,2}\s*$")


@rule(
    "data",
    ("data.tokenizer_model", "data.prefix", "data.corpus", "data.split"),
    "sentencepiece has a `data.tokenizer_model` (and only sentencepiece); there is data (`data.prefix` or "
    "`data.corpus=wiki`); `data.split` reads as `train,valid,test` weights with train > 0.",
)
def _data(cfg, world_size):
    d = cfg.data
    if d.tokenizer == "sentencepiece" and d.tokenizer_model is None:
        yield Failure(
            "data.tokenizer_model",
            None,
            "the path of a SentencePiece .model",
            "data.tokenizer_model is required when data.tokenizer=sentencepiece; "
            "expected the path of a SentencePiece .model",
        )
    if d.prefix is None and d.corpus == "none":
        yield Failure(
            "data.prefix",
            None,
            "a dataset prefix (or data.corpus=wiki)",
            "data.prefix is null and data.corpus=none: nothing to train on; expected a "
            "dataset prefix (or data.corpus=wiki)",
        )
    if d.tokenizer != "sentencepiece" and d.tokenizer_model is not None:
        yield Failure(
            "data.tokenizer_model",
            d.tokenizer_model,
            "null",
            f"data.tokenizer_model={d.tokenizer_model!r} is only read by "
            f"data.tokenizer=sentencepiece (tokenizer is {d.tokenizer}); expected null",
        )
    weights = [float(w) for w in re.split(r"[,/]", d.split)] if _SPLIT.match(d.split) else []
    if not weights or weights[0] <= 0:
        yield Failure(
            "data.split",
            d.split,
            "train,valid,test weights with train > 0",
            f"data.split={d.split!r}; expected up to three non-negative weights "
            "train,valid,test with train > 0, e.g. 969,30,1",
        )


@rule(
    "megatron needs CUDA",
    ("parallel.backend",),
    "`parallel.backend=megatron` needs CUDA (megatron-core's optimizers allocate on 'cuda').",
    scope="machine",
)
def _megatron_cuda(cfg, world_size):
    if cfg.parallel.backend != "megatron":
        return
    import torch

    # megatron-core 0.16.1's optimizers allocate with device='cuda' literals and accept only
    # 'torch.cuda.*Tensor' parameters (see training/backends/megatron_backend.py).
    if not torch.cuda.is_available():
        yield Failure(
            "parallel.backend",
            "megatron",
            "torch or deepspeed without a GPU",
            "parallel.backend='megatron' (megatron's DDP and optimizer) needs CUDA: "
            "megatron-core's optimizers allocate on 'cuda' and refuse CPU tensors; "
            "expected parallel.backend='torch' or 'deepspeed' on a machine without a GPU",
        )


@rule(
    "DeepSpeed JSON accepted",
    (DEEPSPEED_KEY,),
    "the DeepSpeed JSON agrees with the YAML and is one DeepSpeed and this backend accept "
    "(docs/deepspeed.md).",
    scope="files",
)
def _deepspeed_json(cfg, world_size):
    if cfg.parallel.backend != "deepspeed":
        return ()
    from inrank_megatron.deepspeed_json import check_deepspeed_config

    check_deepspeed_config(cfg, world_size)
    return ()


@rule(
    "data files",
    ("data.prefix", "data.valid_prefix", "data.corpus"),
    "`data.prefix` is set, and its .bin/.idx exist or `data.corpus=wiki` can build them (a "
    "single prefix only: every dataset of a blend and of `data.valid_prefix` must exist); "
    "each is a Megatron index (header, version, dtype) and a .bin of exactly the tokens the "
    "index describes. A failure names the key (`data.prefix[1]` in a blend) and the file.",
    scope="files",
)
def _data_files(cfg, world_size):
    from inrank_megatron.data.checks import check_data_config

    check_data_config(cfg)
    return ()


@rule(
    "data split",
    ("data.split", "data.prefix", "data.valid_prefix"),
    "`data.split` gives the train and valid splits at least one document of every existing "
    "dataset of `data.prefix` (fewer than 3 documents in train or valid is a warning); with "
    "`data.valid_prefix`, whose datasets are read whole, each dataset has a document.",
    scope="files",
)
def _data_split(cfg, world_size):
    from inrank_megatron.data.checks import split_report

    errors, warnings = split_report(cfg)
    for error in errors:
        yield Failure("data.split", cfg.data.split, "a split giving valid documents", error)
    yield Finding("split_warnings", warnings)


@rule(
    "tokenizer file",
    ("data.tokenizer_model",),
    "the SentencePiece model exists and loads (unless the data is missing and `data.corpus` "
    "lets prepare train it).",
    scope="files",
)
def _tokenizer_file(cfg, world_size):
    d = cfg.data
    if d.tokenizer != "sentencepiece" or d.tokenizer_model is None:
        return
    from inrank_megatron.data.checks import datasets_of

    data_exists = d.prefix is not None and all(
        os.path.isfile(prefix + suffix)
        for _, prefix, _ in datasets_of(cfg)
        for suffix in (".bin", ".idx")
    )
    if os.path.isdir(d.tokenizer_model) or (
        not os.path.isfile(d.tokenizer_model) and (d.corpus == "none" or data_exists)
    ):
        yield Failure(
            "data.tokenizer_model",
            d.tokenizer_model,
            "a SentencePiece .model file",
            f"data.tokenizer_model={d.tokenizer_model!r}: no such file; expected the "
            "SentencePiece .model the data was tokenized with (tools/train_tokenizer.py "
            "makes one)",
        )
    elif os.path.isfile(d.tokenizer_model):
        from inrank_megatron.planning.estimates import tokenizer_vocab_size

        tokenizer_vocab_size(cfg)  # ConfigError naming the key when it is not a readable model


@rule(
    "output dir kind",
    ("output.dir",),
    "`output.dir` is a directory or does not exist yet (nor is its checkpoints/ a file).",
    scope="files",
)
def _output_dir(cfg, world_size):
    out = cfg.output.dir
    for path in (out, os.path.join(out, "checkpoints")):
        if os.path.exists(path) and not os.path.isdir(path):
            yield Failure(
                "output.dir",
                out,
                "a directory",
                f"output.dir={out!r}: {path} is a file, not a directory; expected a "
                "run directory (or a path that does not exist yet)",
            )
            return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        yield Failure(
            "output.dir",
            out,
            "a writable location",
            f"output.dir={out!r}: cannot create it under {parent} (not a writable directory)",
        )


@rule(
    "output directory",
    ("output.dir", "output.resume"),
    "a fresh run (`output.resume=none`) writes into a new or empty `output.dir`, and "
    "`output.resume=auto` finds a checkpoint there or an empty directory: nothing a run did not "
    "write is overwritten.",
    scope="files",
)
def _output_dir_state(cfg, world_size):
    from inrank_megatron.checkpoint import CHECKPOINTS_DIR
    from inrank_megatron.run_dir import check_not_locked, entries

    o = cfg.output
    try:
        check_not_locked(o.dir)  # a running run's directory: say so, not that it is non-empty
    except ConfigError as error:
        yield Failure("output.dir", o.dir, "a directory no other run is using", str(error))
        return
    found = entries(o.dir)
    if not found or o.resume not in ("none", "auto") or not os.path.isdir(o.dir):  # kind: above
        return
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    if o.resume == "none":
        yield Failure(
            "output.dir",
            o.dir,
            "a new or empty directory",
            f"output.dir={o.dir!r} is not empty ({shown}): a fresh run would overwrite "
            "it; resume it with output.resume=auto, or choose another directory",
        )
    elif not [n for n in entries(os.path.join(o.dir, CHECKPOINTS_DIR)) if n.startswith("step_")]:
        yield Failure(
            "output.dir",
            o.dir,
            "a checkpoint to resume, or an empty directory",
            f"output.resume=auto: output.dir={o.dir!r} holds no checkpoint to resume "
            f"but is not empty ({shown}); choose another directory",
        )


@rule(
    "resume",
    ("output.resume", "output.dir"),
    "the checkpoint `output.resume` names (auto: `output.dir`'s latest) is complete, its files "
    "are whole, and it was trained with the same `model.*`, `inrank.*` (but "
    "`inrank.resize_policy`) and tokenizer; the message gives the values it needs.",
    scope="files",
)
def _resume(cfg, world_size):
    from inrank_megatron.checkpoint.resume import resolve_resume

    yield Finding("resume_path", resolve_resume(cfg, world_size))


@rule(
    "disk space",
    ("output.dir",),
    "the filesystem of `output.dir` has room for one more checkpoint: the size of its newest "
    "checkpoint, else `tools/plan.py`'s estimate of one (the trainer checks again before every "
    "save).",
    scope="files",
)
def _disk_space(cfg, world_size):
    from inrank_megatron.checkpoint import (
        CHECKPOINTS_DIR,
        DiskSpaceError,
        check_free_space,
        complete_step_dirs,
        saved_bytes,
    )
    from inrank_megatron.planning.estimates import checkpoint_bytes

    out = cfg.output.dir
    if os.path.exists(out) and not os.path.isdir(out):
        return  # the output dir kind rule reports it
    done = complete_step_dirs(os.path.join(out, CHECKPOINTS_DIR))
    need = saved_bytes(done[-1]) if done else None
    source = f"the size of {done[-1]}" if need else "tools/plan.py's estimate"
    try:
        check_free_space(out, need or checkpoint_bytes(cfg), source)
    except DiskSpaceError as error:
        yield Failure(
            "output.dir",
            out,
            "room for a checkpoint",
            f"output.dir={out!r}: {error}; free space or choose another output.dir",
        )


# Bytes per training sample of megatron's GPTDataset index: the shuffle index (int64) and the
# sample index (two int32 per sample), ignoring the per-epoch document index.
_INDEX_BYTES_PER_SAMPLE = 16


def _memory_bytes() -> tuple:
    """(bytes, what) of the memory one rank may use: its GPU's, or this host's RAM shared by the
    node's processes."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


@rule(
    "dataset index fits",
    ("train.steps", "train.global_batch_size"),
    "`train.steps * train.global_batch_size` samples: megatron's dataset index (16 bytes per "
    "sample) fits in this host's memory.",
    scope="machine",
)
def _index_fits(cfg, world_size):
    t = cfg.train
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = t.steps * t.global_batch_size * _INDEX_BYTES_PER_SAMPLE
    if need > ram:
        most = ram // (_INDEX_BYTES_PER_SAMPLE * t.global_batch_size)
        yield Failure(
            "train.steps",
            t.steps,
            f"<= {most:,}",
            f"train.steps={t.steps:,} x train.global_batch_size={t.global_batch_size} "
            f"samples: megatron's dataset index alone needs {_gib(need)} "
            f"({_INDEX_BYTES_PER_SAMPLE} bytes per sample), this host has {_gib(ram)}; "
            f"expected train.steps <= {most:,}",
        )


@rule(
    "activations fit",
    ("model.seq_length", "train.micro_batch_size"),
    "one micro-batch's activations (`tools/plan.py`'s estimate) fit in a GPU's memory, or on "
    "CPU in the host's memory shared by the node's processes.",
    scope="machine",
    world=True,
)
def _activations_fit(cfg, world_size):
    from inrank_megatron.planning.activations import activation_memory

    have, what = _memory_bytes()
    if what == "host memory":
        have //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    need = activation_memory(cfg).total
    if need > have:
        s = cfg.model.seq_length
        fit = s
        while fit > 1 and activation_memory(_with_seq(cfg, fit)).total > have:
            fit //= 2
        yield Failure(
            "model.seq_length",
            s,
            f"<= {fit}",
            f"model.seq_length={s:,} with train.micro_batch_size="
            f"{cfg.train.micro_batch_size}: one micro-batch's activations need "
            f"{_gib(need)}, a rank has {_gib(have)} of {what}; expected "
            f"model.seq_length <= {fit:,} (or a smaller micro batch, recompute, more TP)",
        )


def _with_seq(cfg, seq_length: int):
    from dataclasses import replace

    return replace(cfg, model=replace(cfg.model, seq_length=seq_length))
