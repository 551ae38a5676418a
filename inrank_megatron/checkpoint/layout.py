"""Where every tensor of our GPT lives: megatron.core ``GPTModel`` parameter names (single process,
TP = 1), their shapes for a configuration, and megatron's dist-checkpoint keys mapped back to them.

These names are the common currency of the export package: a training checkpoint is read into them,
the InRank-native export and :mod:`inrank_megatron.inference` use them unchanged, and the Hugging
Face converters translate them to and from GPT-2's. For a 2-layer model with InRank MLPs::

    embedding.word_embeddings.weight                   [padded_vocab, h]
    embedding.position_embeddings.weight               [max_positions, h]   (learned_absolute)
    decoder.layers.0.input_layernorm.{weight,bias}     [h]
    decoder.layers.0.self_attention.linear_qkv.{weight,bias}   [3h, h] (interleaved per head group)
    decoder.layers.0.self_attention.linear_proj.{weight,bias}  [h, h]
    decoder.layers.0.pre_mlp_layernorm.{weight,bias}   [h]
    decoder.layers.0.mlp.linear_fc1.{A,B,bias}         A [slots, h], B [ffn, slots]  (+ w0 [ffn, h])
    decoder.layers.0.mlp.linear_fc2.{A,B,bias}         A [slots, ffn], B [h, slots]  (+ w0 [h, ffn])
    ...
    decoder.final_layernorm.{weight,bias}              [h]
    output_layer.weight                                [padded_vocab, h]    (untied only)
"""

from __future__ import annotations

import re

from inrank_megatron.config import TrainConfig
from inrank_megatron.models.shape import linear_shapes

# Module path of each InRank-able linear inside a transformer layer (megatron's local spec).
LINEAR_PATHS = {
    "qkv": "self_attention.linear_qkv",
    "proj": "self_attention.linear_proj",
    "fc1": "mlp.linear_fc1",
    "fc2": "mlp.linear_fc2",
}

# megatron's local layer spec checkpoints the norms under the linear that follows them
# (``get_gpt_layer_local_spec``: ``sharded_state_dict_keys_map``); this is its inverse.
_DIST_KEY_UNMAP = (
    ("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
    ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."),
)

# InRank factors are checkpointed one key per layer (their shapes differ after the cut):
# ``decoder.layers.<path>.layer<i>.<A|B>`` (see InRank TP layers' ``sharded_state_dict``).
_PER_LAYER_FACTOR = re.compile(
    r"^decoder\.layers\.(?P<path>.+)\.layer(?P<layer>\d+)\.(?P<role>A|B)$"
)


def linear_shape(cfg: TrainConfig, kind: str) -> tuple[int, int]:
    """Full ``(in, out)`` of a transformer-layer linear (``qkv``, ``proj``, ``fc1``, ``fc2``)."""
    m = cfg.model
    return linear_shapes(m.hidden_size, m.ffn(), m.activation)[kind]


def layer_kind(name: str) -> str:
    """``"fc1"`` for ``decoder.layers.3.mlp.linear_fc1`` (any InRank layer name)."""
    for kind, path in LINEAR_PATHS.items():
        if name.endswith("." + path):
            return kind
    raise ValueError(
        f"{name} is not a transformer-layer linear ({', '.join(LINEAR_PATHS.values())})"
    )


def inrank_layer_names(cfg: TrainConfig) -> list[str]:
    """Names of the InRank layers a configuration builds (``[]`` for the dense baseline)."""
    if not cfg.model.inrank:
        return []
    return [
        f"decoder.layers.{i}.{LINEAR_PATHS[kind]}"
        for i in range(cfg.model.num_layers)
        for kind in LINEAR_PATHS
        if kind in cfg.inrank.layers
    ]


def expected_shapes(
    cfg: TrainConfig, vocab_rows: int, slots: dict[str, int], *, cumulative: bool
) -> dict[str, tuple]:
    """``{name: shape}`` of every tensor of the model (parameters and the ``w0`` buffers).

    Args:
        cfg: the model's configuration.
        vocab_rows: rows of the word embedding (and untied output layer): the padded vocabulary in
            a training checkpoint, the tokenizer's in an export.
        slots: ``{InRank layer name: factor slots}`` (allocated in a checkpoint, active in an export).
        cumulative: InRank layers hold ``w0``.
    """
    m = cfg.model
    h = m.hidden_size
    bias = m.add_bias_linear
    norm = ("weight", "bias") if m.normalization == "LayerNorm" else ("weight",)
    shapes = {"embedding.word_embeddings.weight": (vocab_rows, h)}
    if m.position_embedding_type == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (m.max_positions(), h)
    for i in range(m.num_layers):
        prefix = f"decoder.layers.{i}."
        for ln in ("input_layernorm", "pre_mlp_layernorm"):
            for p in norm:
                shapes[f"{prefix}{ln}.{p}"] = (h,)
        for kind, path in LINEAR_PATHS.items():
            n_in, n_out = linear_shape(cfg, kind)
            name = prefix + path
            if name in slots:
                k = slots[name]
                shapes[name + ".A"] = (k, n_in)
                shapes[name + ".B"] = (n_out, k)
                if cumulative:
                    shapes[name + ".w0"] = (n_out, n_in)
            else:
                shapes[name + ".weight"] = (n_out, n_in)
            if bias:
                shapes[name + ".bias"] = (n_out,)
    for p in norm:
        shapes[f"decoder.final_layernorm.{p}"] = (h,)
    if m.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (vocab_rows, h)
    return shapes


def unmap_dist_key(key: str, tensor) -> dict:
    """Parameter names and tensors for one megatron dist-checkpoint entry.

    Transformer-layer tensors are stacked along a leading layer axis under one key
    (``decoder.layers.mlp.linear_fc1.bias`` is ``[num_layers, ffn]``), except InRank factors,
    which have one key per layer; everything else keeps its name.
    """
    factor = _PER_LAYER_FACTOR.match(key)
    if factor:
        return {f"decoder.layers.{factor['layer']}.{factor['path']}.{factor['role']}": tensor}
    if not key.startswith("decoder.layers."):
        return {key: tensor}
    rest = key[len("decoder.layers.") :]
    for dist, ours in _DIST_KEY_UNMAP:
        if rest.startswith(dist):
            rest = ours + rest[len(dist) :]
            break
    return {f"decoder.layers.{i}.{rest}": tensor[i] for i in range(tensor.shape[0])}
