"""A local Hugging Face GPT-2 directory -> a training checkpoint of ours (no download, ever).

Two starts for continued InRank training (spec section 2):

- ``cumulative``: ``W0`` = the pretrained weight, ``B = 0`` and ``A`` drawn as at init, so the model
  starts exactly at the pretrained function and learns a low-rank update whose rank grows
  (``inrank.rank`` / ``inrank.buffer`` slots, stage ``growing``);
- ``efficient``: ``W = B A`` from the truncated SVD of the pretrained weight, balanced
  (``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T``, :func:`inrank_megatron.core.truncate`), at a given
  rank or at the smallest rank whose explained ratio (:func:`inrank_megatron.core.explained_ratios`,
  the rule ``inrank.rule``) exceeds a threshold; the layers start in stage ``fixed`` (as after the
  cut), so training continues at that rank.

The checkpoint is what the training loop writes (``model/`` megatron dist checkpoint, reshardable to
any TP size; ``inrank_growth.json``; ``meta.json`` at step 0 with the resolved config), without
optimizer or RNG state: ``meta.json`` says ``"weights_only": true``. The loop loads such a
checkpoint's model and growth state exactly as it resumes one; its optimizer starts fresh.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from inrank_megatron.checkpoint import Meta
from inrank_megatron.config import (
    ConfigError,
    TrainConfig,
    from_dict,
    parse_override,
    parse_yaml,
    to_dict,
)
from inrank_megatron import rules
from inrank_megatron.data.tokenizers import GPT2_VOCAB_SIZE
from inrank_megatron.export.hf_gpt2 import (
    from_hf_state_dict,
    hf_activation_is_exact,
    model_section_from_hf,
    read_hf_dir,
)
from inrank_megatron.checkpoint.layout import inrank_layer_names, layer_kind, linear_shape


# ------------------------------------------------------------------------------ configuration
def _change(changes: list, key: str, value, was, why: str) -> None:
    changes.append({"key": key, "value": value, "was": was, "why": why})


def fitting_buffer(cfg: TrainConfig) -> int:
    """The largest ``inrank.buffer`` that fits every InRank layer of ``cfg`` at ``inrank.rank``
    (``buffer < max_rank`` and ``rank + buffer <= max_rank``, the rules of ``rules.validate``)."""
    from inrank_megatron.config import inrank_layer_shapes

    ir = cfg.inrank
    fits = [
        min(ir.layer_max_rank(n_in, n_out) - ir.rank, ir.layer_max_rank(n_in, n_out) - 1)
        for n_in, n_out in inrank_layer_shapes(cfg).values()
    ]
    return min(fits) if fits else ir.buffer


def import_config(
    hf_config: dict,
    mode: str,
    config_path: Optional[str] = None,
    overrides=(),
    *,
    found: Optional[dict] = None,
) -> tuple[TrainConfig, list]:
    """The training configuration of an imported model, and every setting import chose.

    Sources, weakest first: the defaults, the YAML file, what the export directory holds
    (``found``: its tokenizer, its vocabulary padding), the ``section.key=value`` overrides.
    Fixed on top: the architecture (``model.*``) from the HF config, ``model.inrank=true``,
    ``inrank.mode=mode`` (and ``inrank.stage1_steps=null`` in cumulative mode); an override that
    contradicts them is an error. ``model.seq_length`` defaults to the model's positions, and an
    ``inrank.buffer`` nobody set shrinks to the largest that fits the model's layers.

    Args:
        found: ``{"section.key": (value, why)}`` read from the export directory.

    Returns:
        ``(cfg, changes)``; ``changes`` lists ``{"key", "value", "was", "why"}`` for every setting
        that differs from what the defaults and the file said (architecture keys only where the
        file set them).

    Raises:
        ConfigError: an override that contradicts the HF architecture or the mode; a model with
            another vocabulary than GPT-2's and no tokenizer found or named; any training-config
            error.
    """
    data: dict = {}
    if config_path:
        try:
            with open(config_path, encoding="utf-8") as f:
                loaded = parse_yaml(f.read()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {config_path}") from None
        from_dict(loaded, origin=f" in {config_path}")
        data = {str(s): dict(v or {}) for s, v in loaded.items()}
    defaults = to_dict(TrainConfig())

    def was(section, key):
        return data.get(section, {}).get(key, defaults[section][key])

    changes: list = []
    given: dict = {}
    for text in overrides:
        section, key, value = parse_override(text)
        given[(section, key)] = value
    for dotted, (value, why) in (found or {}).items():
        section, key = dotted.split(".")
        if (section, key) not in given:
            if was(section, key) != value:
                _change(changes, dotted, value, was(section, key), why)
            data.setdefault(section, {})[key] = value
    for (section, key), value in given.items():
        data.setdefault(section, {})[key] = value
    architecture = model_section_from_hf(hf_config)
    forced = {
        ("model", key): (value, "the architecture comes from the Hugging Face config.json")
        for key, value in architecture.items()
    }
    forced[("model", "inrank")] = (True, "an import makes InRank layers")
    forced[("inrank", "mode")] = (mode, f"import_hf --mode {mode}")
    if mode == "cumulative":
        forced[("inrank", "stage1_steps")] = (
            None,
            "cumulative mode never cuts (--mode cumulative)",
        )
    for (section, key), (value, why) in forced.items():
        if (section, key) in given and given[(section, key)] != value:
            raise ConfigError(
                f"{section}.{key}={given[(section, key)]!r}: {why} ({section}.{key}={value!r})"
            )
        if (
            was(section, key) != value
            and (section, key) not in given
            and (key not in architecture or key in data.get(section, {}))
        ):
            _change(changes, f"{section}.{key}", value, was(section, key), why)
        data.setdefault(section, {})[key] = value
    if "seq_length" not in data["model"]:
        data["model"]["seq_length"] = hf_config["n_positions"]
        if defaults["model"]["seq_length"] != hf_config["n_positions"]:
            _change(
                changes,
                "model.seq_length",
                hf_config["n_positions"],
                defaults["model"]["seq_length"],
                "the model's positions (n_positions)",
            )
    d = data.setdefault("data", {})
    if "tokenizer" not in d:
        if hf_config["vocab_size"] != GPT2_VOCAB_SIZE:
            raise ConfigError(
                f"the Hugging Face model has a vocabulary of "
                f"{hf_config['vocab_size']}, not GPT-2's {GPT2_VOCAB_SIZE}, and its "
                "directory holds no tokenizer (sentencepiece.model, or GPT-2's "
                "vocab.json + merges.txt): name it (data.tokenizer=sentencepiece "
                "data.tokenizer_model=...)"
            )
        d["tokenizer"] = "gpt2"
        _change(
            changes,
            "data.tokenizer",
            "gpt2",
            defaults["data"]["tokenizer"],
            f"no tokenizer files in the export; {GPT2_VOCAB_SIZE} ids are GPT-2's BPE",
        )
    if (
        d["tokenizer"] != "sentencepiece"
        and d.get("tokenizer_model") is not None
        and ("data", "tokenizer_model") not in given
    ):
        _change(
            changes,
            "data.tokenizer_model",
            None,
            d["tokenizer_model"],
            f"only read by data.tokenizer=sentencepiece (tokenizer is {d['tokenizer']})",
        )
        d["tokenizer_model"] = None
    cfg = from_dict(data)
    if cfg.model.inrank and "buffer" not in data.get("inrank", {}):
        buffer = fitting_buffer(cfg)
        if 0 <= buffer < cfg.inrank.buffer:
            data.setdefault("inrank", {})["buffer"] = buffer
            _change(
                changes,
                "inrank.buffer",
                buffer,
                cfg.inrank.buffer,
                f"the default does not fit this model's InRank layers at inrank.rank="
                f"{cfg.inrank.rank} (inrank.rank + inrank.buffer <= max_rank); the "
                "largest that does",
            )
            cfg = from_dict(data)
    p = cfg.parallel
    rules.validate(cfg, p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    return cfg, changes


# ------------------------------------------------------------------------------------ factors
def select_import_rank(
    W: torch.Tensor, *, rank: Optional[int], threshold: Optional[float], rule: str = "variance"
) -> int:
    """``rank`` itself, or the smallest ``k >= 1`` whose explained ratio of ``W``'s singular values
    exceeds ``threshold`` (all of them when none does)."""
    from inrank_megatron.core import explained_ratios

    if rank is not None:
        return int(rank)
    s = torch.linalg.svdvals(W.double())
    ratios = explained_ratios(s, rule)
    passing = (ratios[1:] > threshold).nonzero()
    return int(passing[0]) + 1 if passing.numel() else s.numel()


def inrank_state(
    cfg: TrainConfig, dense: dict, *, rank: Optional[int], threshold: Optional[float], seed: int
) -> tuple[dict, dict]:
    """``(tensors, growth)``: our TP=1 tensors with the InRank layers factorised, and the
    ``inrank_growth.json`` entries."""
    from inrank_megatron.core import GrowthState, init_factors, svd_factors

    ir = cfg.inrank
    tensors = dict(dense)
    growth = {}
    generator = torch.Generator().manual_seed(seed)
    for name in inrank_layer_names(cfg):
        n_in, n_out = linear_shape(cfg, layer_kind(name))
        W = tensors.pop(name + ".weight")
        max_rank = ir.layer_max_rank(n_in, n_out)
        extend_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if ir.mode == "cumulative":
            slots = ir.rank + ir.buffer
            init = init_factors(
                "cumulative", n_in, n_out, slots, init_scale=ir.init_scale, generator=generator
            )
            tensors.update({name + ".A": init.A, name + ".B": init.B, name + ".w0": W})
            state = GrowthState(
                rank=ir.rank,
                buffer=ir.buffer,
                max_rank=max_rank,
                threshold=ir.threshold,
                warmup=ir.warmup,
                gap=ir.gap,
                rule=ir.rule,
                layer=name,
            )
        else:
            r = select_import_rank(W, rank=rank, threshold=threshold, rule=ir.rule)
            if not 1 <= r <= max_rank:
                raise ConfigError(
                    f"layer {name} ({n_in} -> {n_out}): rank {r} is outside 1..max_rank="
                    f"{max_rank}; raise inrank.max_rank (at most min(in, out) = "
                    f"{min(n_in, n_out)}) or choose a lower --rank / --threshold"
                )
            slots = r
            A, B = svd_factors(W.double(), r, layer=name)
            tensors[name + ".A"], tensors[name + ".B"] = A.float(), B.float()
            state = GrowthState(
                rank=r,
                buffer=0,
                max_rank=max_rank,
                threshold=ir.threshold,
                warmup=ir.warmup,
                gap=ir.gap,
                stage="fixed",
                step=0,
                rule=ir.rule,
                layer=name,
            )
        growth[name] = {
            "growth": state.state_dict(),
            "allocated_slots": slots,
            "extend_seed": extend_seed,
        }
    return tensors, growth


# ---------------------------------------------------------------------- the export directory
def _is_gpt2_bpe(hf_dir: str) -> bool:
    """Whether ``vocab.json`` + ``merges.txt`` are GPT-2's BPE (the one our ``gpt2`` tokenizer is)."""
    from inrank_megatron.export.hf_gpt2 import gpt2_tokenizer_files

    encoder, bpe = gpt2_tokenizer_files()
    with (
        open(os.path.join(hf_dir, "vocab.json"), encoding="utf-8") as f,
        open(encoder, encoding="utf-8") as g,
    ):
        if json.load(f) != json.load(g):
            return False

    def merges(path):
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]

    return merges(os.path.join(hf_dir, "merges.txt")) == merges(bpe)


def read_export_dir(hf_dir: str) -> tuple[dict, Optional[torch.Tensor]]:
    """What an export directory holds beyond config.json and the weights.

    Returns:
        ``(found, padding)``: ``found`` maps ``"section.key"`` to ``(value, why)`` for the
        tokenizer (its SentencePiece model, or GPT-2's BPE files) and the vocabulary padding
        (``model.make_vocab_size_divisible_by`` of the exporting run); ``padding`` is the word
        embedding's rows past the vocabulary that ``tools/export_hf.py`` kept, or None.

    Raises:
        ConfigError: ``vocab.json`` / ``merges.txt`` that are not GPT-2's BPE.
    """
    from inrank_megatron.export.files import SENTENCEPIECE_FILE, SOURCE_FILE
    from inrank_megatron.export.hf_gpt2 import VOCAB_PADDING_FILE, WTE

    found: dict = {}
    source: dict = {}
    if os.path.isfile(os.path.join(hf_dir, SOURCE_FILE)):
        with open(os.path.join(hf_dir, SOURCE_FILE)) as f:
            source = json.load(f)
    sp_model = os.path.join(hf_dir, SENTENCEPIECE_FILE)
    bpe = [os.path.isfile(os.path.join(hf_dir, n)) for n in ("vocab.json", "merges.txt")]
    if os.path.isfile(sp_model):
        found["data.tokenizer"] = ("sentencepiece", f"the export's {SENTENCEPIECE_FILE}")
        found["data.tokenizer_model"] = (
            sp_model,
            f"the export's {SENTENCEPIECE_FILE} (copied into the run directory)",
        )
    elif all(bpe):
        if not _is_gpt2_bpe(hf_dir):
            raise ConfigError(
                f"{hf_dir}: vocab.json + merges.txt are not GPT-2's BPE, the only "
                "BPE data.tokenizer=gpt2 reads; expected GPT-2's tokenizer files or "
                "a sentencepiece.model"
            )
        found["data.tokenizer"] = ("gpt2", "the export's vocab.json + merges.txt are GPT-2's BPE")
        found["data.tokenizer_model"] = (None, "GPT-2's BPE takes no model file")
    padding = None
    record = source.get("vocab_padding") or {}
    if record.get("make_vocab_size_divisible_by"):
        found["model.make_vocab_size_divisible_by"] = (
            record["make_vocab_size_divisible_by"],
            f"the exporting run's vocabulary padding ({SOURCE_FILE})",
        )
    if record.get("file") and os.path.isfile(os.path.join(hf_dir, record["file"])):
        from safetensors.torch import load_file

        padding = load_file(os.path.join(hf_dir, record["file"]))[WTE].float()
    elif os.path.isfile(os.path.join(hf_dir, VOCAB_PADDING_FILE)):
        raise ConfigError(f"{hf_dir}: {VOCAB_PADDING_FILE} without its record in {SOURCE_FILE}")
    return found, padding


def run_directory(out: str) -> str:
    """The run directory ``import_hf`` writes for ``out``: ``out`` itself, or for a checkpoint
    step path ``RUN/checkpoints/step_000000`` (the older spelling), ``RUN``."""
    import re

    head, name = os.path.split(os.path.normpath(out))
    if re.fullmatch(r"step_\d+", name) and os.path.basename(head) == "checkpoints":
        if name != "step_000000":
            raise ConfigError(
                f"{out}: an import is step 0 of its run; expected RUN_DIR or "
                "RUN_DIR/checkpoints/step_000000"
            )
        return os.path.dirname(head) or "."
    return out


def import_hf(
    hf_dir: str,
    out_dir: str,
    *,
    mode: str,
    rank: Optional[int] = None,
    threshold: Optional[float] = None,
    config_path: Optional[str] = None,
    overrides=(),
) -> dict:
    """Convert a local Hugging Face GPT-2 directory into a run directory that training continues.

    The run directory holds ``checkpoints/step_000000`` (weights only), ``checkpoints/latest``,
    ``config.yaml`` (``output.dir`` = the run directory, ``output.resume=auto``) and the
    export's SentencePiece model if it had one, so that
    ``launch/torchrun.sh RUN_DIR/config.yaml`` continues from the imported weights.

    Args:
        hf_dir: ``save_pretrained`` output (``config.json`` + ``model.safetensors``), or an export
            of ours (its tokenizer files and vocabulary padding are read too).
        out_dir: the run directory to create (must not exist, or be empty); the older
            ``RUN/checkpoints/step_000000`` names the run ``RUN``.
        mode: ``cumulative`` or ``efficient``.
        rank: efficient mode: the rank of every InRank layer.
        threshold: efficient mode: per layer, the smallest rank whose explained ratio exceeds it.
        config_path: a training YAML (optimizer, schedule, data, InRank settings) to start from.
        overrides: ``section.key=value`` overrides.

    Returns:
        ``{"path", "checkpoint", "config", "ranks", "changes", "notes"}``.

    Raises:
        ConfigError / CheckpointError / UnsupportedModelError: bad arguments, an unreadable or
            inexpressible HF model; nothing is written.
    """
    import shutil

    from inrank_megatron.config import save_config
    from inrank_megatron.export.files import SENTENCEPIECE_FILE

    if mode not in ("cumulative", "efficient"):
        raise ConfigError(f"--mode must be cumulative or efficient, got {mode!r}")
    if mode == "efficient" and (rank is None) == (threshold is None):
        raise ConfigError("efficient mode needs exactly one of --rank R or --threshold T")
    if mode == "cumulative" and (rank is not None or threshold is not None):
        raise ConfigError(
            "--rank/--threshold choose the SVD truncation of efficient mode; "
            "cumulative mode starts at inrank.rank with inrank.buffer slots "
            "(set them as overrides)"
        )
    if threshold is not None and not 0 < threshold < 1:
        raise ConfigError(f"--threshold must be in (0, 1), got {threshold}")
    run_dir = run_directory(out_dir)
    if os.path.exists(run_dir) and not (os.path.isdir(run_dir) and not os.listdir(run_dir)):
        raise FileExistsError(
            f"{run_dir} already exists and is not an empty directory; refusing "
            "to overwrite it (an import writes a new run directory)"
        )
    hf_config, hf = read_hf_dir(hf_dir)
    dense = from_hf_state_dict(hf, hf_config)
    found, padding = read_export_dir(hf_dir)
    run_overrides = [f"output.dir={run_dir}", "output.resume=auto"]
    cfg, changes = import_config(
        hf_config, mode, config_path, [*overrides, *run_overrides], found=found
    )

    from inrank_megatron.data.tokenizers import build_tokenizer
    from inrank_megatron.models.gpt import padded_vocab_size

    d = cfg.data
    try:
        tokenizer = build_tokenizer(
            d.tokenizer, d.tokenizer_model if d.tokenizer == "sentencepiece" else None
        )
    except ValueError as error:
        raise ConfigError(f"data.tokenizer: {error}") from None
    vocab = hf_config["vocab_size"]
    if tokenizer.vocab_size != vocab:
        raise ConfigError(
            f"data.tokenizer={d.tokenizer} has {tokenizer.vocab_size} ids, the "
            f"Hugging Face model {vocab}; expected the model's own tokenizer"
        )
    own_sp_model = d.tokenizer == "sentencepiece" and os.path.abspath(
        d.tokenizer_model
    ) == os.path.abspath(os.path.join(hf_dir, SENTENCEPIECE_FILE))
    if own_sp_model:  # the run keeps its own copy: the export may go away
        cfg.data.tokenizer_model = os.path.join(run_dir, SENTENCEPIECE_FILE)
        for change in changes:
            if change["key"] == "data.tokenizer_model":
                change["value"] = cfg.data.tokenizer_model
    padded = padded_vocab_size(
        vocab, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size
    )
    notes = []
    wte = dense["embedding.word_embeddings.weight"]
    rows = padding[: padded - vocab] if padding is not None else wte.new_zeros(0, wte.shape[1])
    if padding is not None and padding.shape[0] != padded - vocab:
        notes.append(
            f"the export kept {padding.shape[0]} vocabulary padding rows, this run pads "
            f"with {padded - vocab}: losses differ from the exporting run's"
        )
    # Rows the export did not keep (an HF model of someone else's): zero, as never-seen ids.
    dense["embedding.word_embeddings.weight"] = torch.cat(
        [wte, rows, wte.new_zeros(padded - vocab - rows.shape[0], wte.shape[1])]
    )
    tensors, growth = inrank_state(cfg, dense, rank=rank, threshold=threshold, seed=cfg.train.seed)
    if not hf_activation_is_exact(hf_config):
        notes.append(
            f"the Hugging Face model uses activation_function="
            f"{hf_config.get('activation_function', 'gelu_new')!r} (tanh GELU); ours "
            "trains with exact GELU, so its outputs differ slightly (< 1e-3 per "
            "activation) until training adapts"
        )
    p = cfg.parallel
    meta = Meta(
        step=0,
        consumed_samples=0,
        world_size=p.tensor_model_parallel_size * p.pipeline_model_parallel_size,
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        dp=1,
        backend=p.backend,
        weights_only=True,
        config=to_dict(cfg),
        imported_from={
            "hf_dir": os.path.abspath(hf_dir),
            "mode": mode,
            "rank": rank,
            "threshold": threshold,
            "changed": changes,
            "notes": notes,
        },
    )
    from inrank_megatron.checkpoint import CHECKPOINTS_DIR, step_dir, write_latest
    from inrank_megatron.checkpoint.meta import atomic_output_dir
    from inrank_megatron.checkpoint.writer import write_training_checkpoint

    if os.path.isdir(run_dir):
        os.rmdir(run_dir)  # empty (checked above): the import puts the whole run there at once
    with atomic_output_dir(run_dir) as tmp:
        step = step_dir(os.path.join(tmp, CHECKPOINTS_DIR), 0)
        write_training_checkpoint(step, cfg, vocab, tensors, growth, meta)
        write_latest(os.path.join(tmp, CHECKPOINTS_DIR), step)
        if own_sp_model:
            shutil.copyfile(
                os.path.join(hf_dir, SENTENCEPIECE_FILE), os.path.join(tmp, SENTENCEPIECE_FILE)
            )
        save_config(cfg, os.path.join(tmp, "config.yaml"))
    return {
        "path": run_dir,
        "checkpoint": step_dir(os.path.join(run_dir, CHECKPOINTS_DIR), 0),
        "config": os.path.join(run_dir, "config.yaml"),
        "ranks": {n: g["growth"]["rank"] for n, g in growth.items()},
        "changes": changes,
        "notes": notes,
    }
