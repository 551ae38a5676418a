"""Run a trained model in one plain PyTorch process: no megatron, no process group.

    model = inrank_megatron.inference.load("exports/tiny-inrank")   # or an HF export, or a
    logits = model(tokens)                                          # training checkpoint
    out = model.generate(tokens, max_new_tokens=50, temperature=0.8, top_k=40, top_p=0.95, seed=0)
    texts = inrank_megatron.inference.generate_text("exports/tiny-inrank", "The history of")

:class:`GPT` is a small nanoGPT-style transformer with megatron ``GPTModel``'s parameter names
(:mod:`inrank_megatron.checkpoint.layout`), so a checkpoint's tensors load unchanged. An InRank layer
keeps its factors and computes ``(x A^T) B^T (+ x W0^T) + bias`` (spec section 2) over its active
slots; every other linear is dense. Besides our GPT-2-style default it runs what the training
config can build: RoPE, SwiGLU, RMSNorm, untied output layer, no biases.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    """Architecture of :class:`GPT`.

    Attributes:
        vocab_size: rows of the word embedding (= logits per position).
        max_position_embeddings: the learned position table (the context limit), or for RoPE the
            context that generation keeps.
        activation: ``gelu`` (exact, megatron's), ``gelu_tanh`` (GPT-2's ``gelu_new``) or ``swiglu``.
        inrank: ``{layer name: {"slots": k, "w0": bool}}`` of the InRank linears.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    normalization: str = "LayerNorm"
    activation: str = "gelu"
    position_embedding_type: str = "learned_absolute"
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True
    layernorm_epsilon: float = 1e-5
    rotary_base: float = 10000.0  # megatron TransformerConfig.rotary_base
    inrank: dict = field(default_factory=dict)

    @classmethod
    def from_model_section(
        cls, m, vocab_size: int, inrank: Optional[dict] = None, **changes
    ) -> "GPTConfig":
        """From a training config's ``model`` section (:class:`inrank_megatron.config.ModelSection`)."""
        return cls(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads,
            ffn_hidden_size=m.ffn(),
            vocab_size=vocab_size,
            max_position_embeddings=m.max_positions(),
            normalization=m.normalization,
            activation=m.activation,
            position_embedding_type=m.position_embedding_type,
            untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
            add_bias_linear=m.add_bias_linear,
            inrank=dict(inrank or {}),
            **changes,
        )


class FactoredLinear(nn.Module):
    """A trained InRank layer for inference: ``y = (x A^T) B^T (+ x W0^T) + bias`` with ``A``
    ``[k, in]``, ``B`` ``[out, k]`` fixed (no growth, no buffer; the training layer is
    :class:`inrank_megatron.layers.InRankLinear`)."""

    def __init__(self, in_features: int, out_features: int, slots: int, *, w0: bool, bias: bool):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(slots, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, slots))
        self.register_buffer("w0", torch.zeros(out_features, in_features) if w0 else None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        y = (x @ self.A.T) @ self.B.T  # (B, T, k) then (B, T, out)
        if self.w0 is not None:
            y = y + x @ self.w0.T
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.A.shape[1]}, out_features={self.B.shape[0]}, "
            f"slots={self.A.shape[0]}, w0={self.w0 is not None}"
        )


def _linear(config: GPTConfig, name: str, n_in: int, n_out: int) -> nn.Module:
    spec = config.inrank.get(name)
    if spec is None:
        return nn.Linear(n_in, n_out, bias=config.add_bias_linear)
    return FactoredLinear(
        n_in, n_out, int(spec["slots"]), w0=bool(spec.get("w0")), bias=config.add_bias_linear
    )


def _shapes(config: GPTConfig) -> dict:
    """``{kind: (in, out)}`` of a layer's linears (:func:`inrank_megatron.models.shape.linear_shapes`,
    SwiGLU's doubled fc1 included)."""
    from inrank_megatron.models.shape import linear_shapes

    return linear_shapes(config.hidden_size, config.ffn_hidden_size, config.activation)


def _norm(config: GPTConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with megatron's fused ``linear_qkv``: rows interleaved per head,
    ``[h0: q, k, v | h1: q, k, v | ...]`` (``SelfAttention.get_query_key_value_tensors``)."""

    def __init__(self, config: GPTConfig, prefix: str):
        super().__init__()
        self.heads = config.num_attention_heads
        shapes = _shapes(config)
        self.linear_qkv = _linear(config, prefix + "linear_qkv", *shapes["qkv"])
        self.linear_proj = _linear(config, prefix + "linear_proj", *shapes["proj"])

    def forward(self, x, rope=None):
        B, T, C = x.shape
        hd = C // self.heads
        qkv = self.linear_qkv(x).view(B, T, self.heads, 3 * hd)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(hd, dim=-1))  # (B, nh, T, hd) each
        if rope is not None:  # megatron's non-interleaved RoPE: t cos + rotate_half(t) sin
            cos, sin = rope
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.linear_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, prefix: str):
        super().__init__()
        self.activation = config.activation
        shapes = _shapes(config)
        self.linear_fc1 = _linear(config, prefix + "linear_fc1", *shapes["fc1"])
        self.linear_fc2 = _linear(config, prefix + "linear_fc2", *shapes["fc2"])

    def forward(self, x):
        x = self.linear_fc1(x)
        if self.activation == "swiglu":  # megatron MLP.glu: chunk into [gate, up]
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        elif self.activation == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        else:
            x = F.gelu(x)
        return self.linear_fc2(x)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, i: int):
        super().__init__()
        prefix = f"decoder.layers.{i}."
        self.input_layernorm = _norm(config)
        self.self_attention = Attention(config, prefix + "self_attention.")
        self.pre_mlp_layernorm = _norm(config)
        self.mlp = MLP(config, prefix + "mlp.")

    def forward(self, x, rope=None):
        x = x + self.self_attention(self.input_layernorm(x), rope)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(
                config.max_position_embeddings, config.hidden_size
            )
        else:
            self.position_embeddings = None

    def forward(self, tokens):
        x = self.word_embeddings(tokens)  # (B, T, C)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(tokens.shape[1], device=tokens.device))
        return x


class Decoder(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_layernorm = _norm(config)


class GPT(nn.Module):
    """The model; ``forward(tokens)`` -> logits ``(B, T, vocab_size)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.position_embedding_type not in ("learned_absolute", "rope"):
            raise ValueError(f"unknown position_embedding_type {config.position_embedding_type!r}")
        if config.activation not in ("gelu", "gelu_tanh", "swiglu"):
            raise ValueError(f"unknown activation {config.activation!r}")
        self.config = config
        self.embedding = Embedding(config)
        self.decoder = Decoder(config)
        self.output_layer = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if config.untie_embeddings_and_output_weights
            else None
        )
        self.tokenizer_info: dict = {}  # how to build the tokenizer (set by load())

    @classmethod
    def from_tensors(cls, config: GPTConfig, tensors: dict) -> "GPT":
        """A model holding ``tensors`` (names as its state dict; all must be present)."""
        model = cls(config)
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"tensors do not fit the model: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}, wrong shape {wrong[:4]}"
            )
        model.load_state_dict({k: tensors[k].float() for k in own}, strict=True)
        return model.eval()

    def _rope(self, T: int, device):
        hd = self.config.hidden_size // self.config.num_attention_heads
        inv_freq = 1.0 / (
            self.config.rotary_base
            ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
        )
        freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd), megatron RotaryEmbedding.get_emb
        return emb.cos(), emb.sin()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Args: tokens ``(B, T)`` int64. Returns: logits ``(B, T, vocab_size)``."""
        if (
            self.embedding.position_embeddings is not None
            and tokens.shape[1] > self.config.max_position_embeddings
        ):
            raise ValueError(
                f"{tokens.shape[1]} tokens exceed the "
                f"{self.config.max_position_embeddings} learned positions"
            )
        rope = (
            self._rope(tokens.shape[1], tokens.device)
            if self.config.position_embedding_type == "rope"
            else None
        )
        x = self.embedding(tokens)
        for block in self.decoder.layers:
            x = block(x, rope)
        x = self.decoder.final_layernorm(x)
        head = (
            self.output_layer.weight
            if self.output_layer is not None
            else self.embedding.word_embeddings.weight
        )
        return x @ head.T  # (B, T, V)

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations (nanoGPT's loop: the whole context each step).

        Args:
            tokens: ``(B, T)`` prompt ids.
            max_new_tokens: tokens to append.
            temperature: logits divisor; 0 means greedy (argmax).
            top_k: keep only the ``top_k`` most likely tokens.
            top_p: nucleus sampling: the smallest set of tokens whose probability reaches ``top_p``.
            seed: seed of a private generator (same seed, same sample); None uses torch's global one.

        Returns:
            ``(B, T + max_new_tokens)`` ids.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        generator = (
            torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
        )
        context = self.config.max_position_embeddings
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -context:])[:, -1, :]  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                if top_p is not None and top_p < 1:
                    sorted_logits, order = torch.sort(logits, descending=True)
                    probs = sorted_logits.softmax(dim=-1)
                    # drop a token when the ones before it already reach top_p (the first stays)
                    drop = probs.cumsum(dim=-1) - probs >= top_p
                    logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
                nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens


# ------------------------------------------------------------------------------------- loading
def _inrank_specs(active_slots: dict, cumulative: bool) -> dict:
    return {name: {"slots": int(k), "w0": cumulative} for name, k in active_slots.items()}


def load(path: str, *, tokenizer_model: Optional[str] = None) -> GPT:
    """A :class:`GPT` in eval mode from an InRank-native export, a Hugging Face GPT-2 directory or
    a training checkpoint (a step directory, ``checkpoints/`` or a run's ``output.dir``).

    Args:
        path: where the model is.
        tokenizer_model: SentencePiece model of a training checkpoint whose recorded relative path
            does not resolve from the current directory.

    Returns:
        The model; ``model.tokenizer_info`` says how :func:`load_tokenizer` builds its tokenizer.
    """
    from inrank_megatron.checkpoint.reader import load_checkpoint
    from inrank_megatron.export.files import SENTENCEPIECE_FILE, SOURCE_FILE
    from inrank_megatron.data.tokenizers import GPT2_VOCAB_SIZE
    from inrank_megatron.export.hf_gpt2 import (
        HF_CONFIG,
        from_hf_state_dict,
        hf_activation_is_exact,
        model_section_from_hf,
        read_hf_dir,
    )
    from inrank_megatron.export.native import is_inrank_export, read_inrank_export

    if os.path.isdir(path) and is_inrank_export(path):
        meta, tensors = read_inrank_export(path)
        cfg = meta["_config"]
        config = GPTConfig.from_model_section(
            cfg.model,
            meta["vocab_size"],
            _inrank_specs(
                {n: l["active_slots"] for n, l in meta["layers"].items()},
                meta.get("mode") == "cumulative",
            ),
        )
        model = GPT.from_tensors(config, tensors)
        model.tokenizer_info = _relative_tokenizer(meta.get("tokenizer"), path)
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, HF_CONFIG)):
        hf_config, hf = read_hf_dir(path)
        from inrank_megatron.config import ModelSection

        section = ModelSection(**model_section_from_hf(hf_config))
        changes = {} if hf_activation_is_exact(hf_config) else {"activation": "gelu_tanh"}
        config = GPTConfig.from_model_section(section, hf_config["vocab_size"], **changes)
        model = GPT.from_tensors(config, from_hf_state_dict(hf, hf_config))
        info = {}
        source = os.path.join(path, SOURCE_FILE)
        if os.path.isfile(source):
            with open(source) as f:
                info = _relative_tokenizer(json.load(f).get("tokenizer"), path)
        elif os.path.isfile(os.path.join(path, "vocab.json")):
            info = {"kind": "hf", "path": path}
        elif os.path.isfile(os.path.join(path, SENTENCEPIECE_FILE)):
            info = {"kind": "sentencepiece", "model": os.path.join(path, SENTENCEPIECE_FILE)}
        elif hf_config["vocab_size"] == GPT2_VOCAB_SIZE:
            info = {"kind": "gpt2"}
        model.tokenizer_info = info
    else:
        ckpt = load_checkpoint(path, tokenizer_model=tokenizer_model)
        from inrank_megatron.export.native import native_tensors

        config = GPTConfig.from_model_section(
            ckpt.cfg.model,
            ckpt.vocab_size,
            _inrank_specs(
                {n: l.active_slots for n, l in ckpt.layers.items()}, ckpt.mode == "cumulative"
            ),
        )
        model = GPT.from_tensors(config, native_tensors(ckpt))
        d = ckpt.cfg.data
        model.tokenizer_info = {"kind": d.tokenizer, "model": tokenizer_model or d.tokenizer_model}
    return model


def _relative_tokenizer(info: Optional[dict], base: str) -> dict:
    info = dict(info or {})
    if info.get("kind") == "sentencepiece" and info.get("model"):
        info["model"] = os.path.join(base, info["model"])
    return info


class _HFTokenizer:
    """A Hugging Face tokenizer directory behind our ``encode`` / ``decode`` / ``eod``."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        self.eod = self._tok.eos_token_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list:
        return self._tok.encode(text)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(model: GPT, *, tokenizer_model: Optional[str] = None):
    """The tokenizer of a model from :func:`load` (``encode``, ``decode``, ``eod``).

    Args:
        model: a loaded model.
        tokenizer_model: a SentencePiece model file to use instead of the recorded one.
    """
    from inrank_megatron.data.tokenizers import build_tokenizer

    if tokenizer_model:
        return build_tokenizer("sentencepiece", tokenizer_model)
    info = model.tokenizer_info or {}
    kind = info.get("kind")
    if kind == "gpt2":
        return build_tokenizer("gpt2")
    if kind == "sentencepiece":
        return build_tokenizer("sentencepiece", info.get("model"))
    if kind == "hf":
        return _HFTokenizer(info["path"])
    raise ValueError(
        "no tokenizer is recorded for this model; pass a SentencePiece model (--tokenizer-model)"
    )


def generate_text(
    checkpoint: str,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: Optional[int] = 40,
    top_p: Optional[float] = 0.95,
    seed: int = 0,
    num_samples: int = 1,
    tokenizer_model: Optional[str] = None,
) -> list:
    """Samples from the model at ``checkpoint`` (anything :func:`load` reads), with its tokenizer.

    Args:
        checkpoint: export directory or training checkpoint.
        prompt: text to continue (an empty prompt starts from the end-of-document id).
        max_new_tokens, temperature, top_k, top_p: as :meth:`GPT.generate` (``top_k=0`` and
            ``top_p=1`` disable those filters).
        seed: seed of the first sample; sample ``i`` uses ``seed + i``.
        num_samples: independent samples.
        tokenizer_model: SentencePiece model to use instead of the recorded one.

    Returns:
        The decoded texts, prompt and continuation each.
    """
    model = load(checkpoint, tokenizer_model=tokenizer_model)
    tokenizer = load_tokenizer(model, tokenizer_model=tokenizer_model)
    ids = tokenizer.encode(prompt) or [tokenizer.eod]
    tokens = torch.tensor([ids], dtype=torch.long)
    texts = []
    for i in range(num_samples):
        out = model.generate(
            tokens,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k or None,
            top_p=top_p if top_p and top_p < 1 else None,
            seed=seed + i,
        )
        texts.append(tokenizer.decode(out[0].tolist()))  # whole, so pieces join as they should
    return texts
