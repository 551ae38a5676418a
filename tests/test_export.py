"""Checkpoint tools: export, import, inference, generation.

Pins down, for models trained a few steps at TP=2 with InRank MLPs (``efficient`` through the stage
cut, and ``cumulative``):

- the checkpoint reader returns exactly the tensors megatron's ``GPTModel`` loads from the
  checkpoint, and the Hugging Face GPT-2 export (``tools/export_hf.py``) gives that model's logits
  through ``transformers.GPT2LMHeadModel.from_pretrained`` to 1e-5 (fp32);
- a random local HF GPT-2 imported in cumulative mode (``tools/import_hf.py``: W0 = pretrained,
  B = 0) exports back to the very same weights and logits, and the imported checkpoint loads into
  megatron at TP=2 with the same logits; efficient-mode import truncates by SVD at a rank or at a
  threshold's rank;
- the InRank-native export (``tools/export_inrank.py``) is smaller than the dense export by exactly
  the parameter ratio its shapes imply, and ``inrank_megatron.inference.load`` of it, of the HF
  export and of the training checkpoint gives megatron's logits; the plain-torch model also matches
  megatron on RoPE + SwiGLU + RMSNorm + untied + bias-free models;
- ``tools/generate.py`` samples the same text for the same seed;
- bad input (missing or partial checkpoint, factor shapes contradicting the recorded ranks,
  RoPE/SwiGLU configs for GPT-2, ranks over max_rank, pickled code in checkpoint metadata) fails
  with a clear message and a non-zero exit, writing nothing and leaving the source untouched.

Slow tests share two short training runs (module fixtures, about a minute each).
"""

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from inrank_megatron.config import ConfigError, to_dict
from tests.distributed import REPO, run_distributed, train_env

SP_MODEL = os.path.join(REPO, "data", "wiki_sp8k.model")
TOKENS = torch.randint(0, 8000, (2, 64), generator=torch.Generator().manual_seed(0))


def _tool(name, *args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", name), *map(str, args)],
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _snapshot(path):
    """``{relative path: sha256}`` of every file under ``path``."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            with open(file, "rb") as f:
                out[os.path.relpath(file, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _tensor_bytes(file):
    """Bytes of tensor data in a safetensors file (the file less its 8-byte length and header)."""
    with open(file, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(file) - 8 - header


def _hf_logits(path, tokens):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return model(tokens).logits


# --------------------------------------------------------------------- megatron, the reference
def _megatron_logits(rank, world_size, paths, tokens, tokenizer_model):
    """Load each checkpoint into megatron's GPTModel at TP=world_size the way training resumes it;
    return its logits (vocabulary unpadded) and, at TP=1, its state dict."""
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

    from inrank_megatron import enable_cpu_fallback
    from inrank_megatron.checkpoint.reader import checkpoint_vocab_size, read_checkpoint_config
    from inrank_megatron.growth.controller import GrowthController
    from inrank_megatron.checkpoint import manager as ckpt
    from inrank_megatron.models.gpt import build_model

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(world_size)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    out = []
    for path in paths:
        step_dir, _, cfg = read_checkpoint_config(path)
        vocab = checkpoint_vocab_size(cfg, tokenizer_model)
        model = build_model(cfg, vocab, world_size)
        ckpt.load_growth_state(step_dir, GrowthController(model))
        with torch.no_grad():
            state = dist_checkpointing.load(
                model.sharded_state_dict(), os.path.join(step_dir, "model")
            )
        state.pop("optimizer", None)  # the torch backend's AdamW state, when stored alongside
        model.load_state_dict(state, strict=True)
        model.eval()
        positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
        with torch.no_grad():
            logits = model(tokens, positions, attention_mask=None)  # (b, s, padded / tp)
        if world_size > 1:
            parts = [torch.empty_like(logits) for _ in range(world_size)]
            torch.distributed.all_gather(parts, logits.contiguous())
            logits = torch.cat(parts, dim=-1)
        states = (
            {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
            if world_size == 1
            else None
        )
        out.append((logits[..., :vocab].clone(), states))
    return out


def _megatron_other_architecture(rank, world_size, overrides, tokens):
    """A randomly initialised megatron GPTModel of another architecture: logits and tensors."""
    from megatron.core import parallel_state, tensor_parallel

    from inrank_megatron import enable_cpu_fallback
    from inrank_megatron.config import load_config
    from inrank_megatron.checkpoint.layout import inrank_layer_names
    from inrank_megatron.models.gpt import build_model

    enable_cpu_fallback()
    parallel_state.initialize_model_parallel(1)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    cfg = load_config(None, overrides)
    model = build_model(cfg, 1000, 1).eval()
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, attention_mask=None)[..., :1000]
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    slots = {name: model.get_submodule(name).active_slots for name in inrank_layer_names(cfg)}
    return cfg, logits, state, slots


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs(tp2_run, cumulative_run):
    """The session's two short TP=2 runs (tests/conftest.py): efficient (cut to fixed ranks at step
    8 of 16) and cumulative. Read-only: tests copy what they change."""
    return {"efficient": tp2_run, "cumulative": cumulative_run}


@pytest.fixture(scope="module")
def reference(runs):
    """megatron's logits and tensors for both runs (one process, TP=1)."""
    modes = list(runs)
    results = run_distributed(_megatron_logits, 1, [runs[m] for m in modes], TOKENS, SP_MODEL)[0]
    return dict(zip(modes, results))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A randomly initialised GPT-2 (GPT-2's vocabulary, exact GELU) saved locally."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4, activation_function="gelu"
    )
    path = str(tmp_path_factory.mktemp("hf") / "gpt2-tiny")
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


# ----------------------------------------------------------------------- (a) export to HF
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["efficient", "cumulative"])
def test_export_hf_matches_megatron(runs, reference, tmp_path, mode):
    from inrank_megatron.checkpoint.reader import load_checkpoint
    from inrank_megatron.export import export_hf

    ckpt = load_checkpoint(runs[mode], tokenizer_model=SP_MODEL)
    logits, state = reference[mode]
    assert ckpt.tensors.keys() == state.keys()
    assert all(torch.equal(ckpt.tensors[k], state[k]) for k in state)
    stages = {layer.stage for layer in ckpt.layers.values()}
    if mode == "efficient":  # went through the cut: fixed ranks, no buffer, factors reallocated
        assert stages == {"fixed"} and ckpt.step == 16
        assert all(l.buffer == 0 and l.allocated_slots == l.rank > 2 for l in ckpt.layers.values())
    else:
        assert stages == {"growing"} and all(k + ".w0" in ckpt.tensors for k in ckpt.layers)

    out = tmp_path / "hf"
    if mode == "efficient":  # through the CLI, given the run's output.dir
        proc = _tool("export_hf.py", runs[mode], out)
        assert proc.returncode == 0, proc.stderr
    else:
        export_hf(ckpt, str(out))
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["activation_function"] == "gelu" and config["vocab_size"] == 8000
    assert (out / "sentencepiece.model").is_file()
    hf = _hf_logits(str(out), TOKENS)
    assert hf.shape == logits.shape == (2, 64, 8000)
    torch.testing.assert_close(hf, logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------- (b) import -> export round trip
@pytest.mark.slow
def test_import_cumulative_round_trip(hf_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import GPT2TokenizerFast

    from inrank_megatron import inference
    from inrank_megatron.data.tokenizers import build_tokenizer
    from inrank_megatron.checkpoint.reader import load_checkpoint
    from inrank_megatron.export import export_hf

    imported = tmp_path / "imported"
    proc = _tool("import_hf.py", hf_model, imported, "--mode", "cumulative", "inrank.buffer=4")
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(str(imported))
    assert ckpt.step == 0 and ckpt.meta.weights_only and ckpt.cfg.data.tokenizer == "gpt2"
    original = load_file(os.path.join(hf_model, "model.safetensors"))
    for name, layer in ckpt.layers.items():  # starts exactly at the pretrained weights
        assert layer.stage == "growing" and layer.active_slots == 2 + 4
        assert not ckpt.tensors[name + ".B"].any()
    torch.testing.assert_close(
        ckpt.tensors["decoder.layers.1.mlp.linear_fc1.w0"],
        original["transformer.h.1.mlp.c_fc.weight"].T,
        rtol=0,
        atol=0,
    )

    out = tmp_path / "hf"
    export_hf(ckpt, str(out))
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    for key in original:
        assert torch.equal(exported[key], original[key]), key
    tokens = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    ref = _hf_logits(hf_model, tokens)
    torch.testing.assert_close(_hf_logits(str(out), tokens), ref, rtol=0, atol=1e-6)
    text = "Checkpoint tools: export, import and  generation (offline)."
    hf_tokenizer = GPT2TokenizerFast.from_pretrained(str(out))
    assert hf_tokenizer.encode(text) == build_tokenizer("gpt2").encode(text)
    assert hf_tokenizer.eos_token_id == build_tokenizer("gpt2").eod == 50256
    with torch.no_grad():
        torch.testing.assert_close(inference.load(str(imported))(tokens), ref, rtol=0, atol=1e-5)
    # The training loop's model loads it at TP=2, as from any checkpoint.
    ((tp2_logits, _),) = run_distributed(_megatron_logits, 2, [str(imported)], tokens, None)[0]
    torch.testing.assert_close(tp2_logits, ref, rtol=0, atol=1e-5)

    # Continued training starts from it (weights only: fresh optimizer) at TP=2, with the
    # config.yaml import wrote (output.dir = the import, output.resume=auto).
    run = imported
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "inrank_megatron.train",
        "--config",
        str(imported / "config.yaml"),
        "output.plot=false",
        "train.steps=2",
        "train.lr_warmup_steps=1",
        "train.eval_interval=2",
        "train.eval_iters=1",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.save_interval=null",
        f"data.prefix={tmp_path}/wiki_gpt2_text_document",
        "data.corpus=wiki",
        "parallel.tensor_model_parallel_size=2",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(run / "summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == 2 and len(summary["train_losses"]) == 2


@pytest.mark.slow
def test_import_efficient_truncated_svd(hf_model, tmp_path):
    from safetensors.torch import load_file

    from inrank_megatron import inference
    from inrank_megatron.core import explained_ratios
    from inrank_megatron.checkpoint.reader import load_checkpoint

    original = load_file(os.path.join(hf_model, "model.safetensors"))
    tokens = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    # Full rank (max_rank raised to min(in, out) = 64): the same function, up to the SVD's error.
    full = tmp_path / "full"
    proc = _tool(
        "import_hf.py",
        hf_model,
        full,
        "--mode",
        "efficient",
        "--rank",
        64,
        "inrank.max_rank=64",
        "inrank.buffer=4",
    )
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(str(full))
    for name, layer in ckpt.layers.items():
        assert (layer.stage, layer.rank, layer.buffer, layer.allocated_slots) == (
            "fixed",
            64,
            0,
            64,
        )
        A, B = ckpt.active_factors(name)  # balanced: A A^T = B^T B = S
        torch.testing.assert_close(A @ A.T, B.T @ B, rtol=0, atol=1e-4)
    W = ckpt.dense_weight("decoder.layers.0.mlp.linear_fc2")
    torch.testing.assert_close(
        W, original["transformer.h.0.mlp.c_proj.weight"].T, rtol=0, atol=1e-5
    )
    with torch.no_grad():
        torch.testing.assert_close(
            inference.load(str(full))(tokens), _hf_logits(hf_model, tokens), rtol=0, atol=1e-4
        )
    # A threshold picks each layer's rank by the explained-ratio rule.
    thr = tmp_path / "threshold"
    proc = _tool(
        "import_hf.py",
        hf_model,
        thr,
        "--mode",
        "efficient",
        "--threshold",
        0.5,
        "inrank.max_rank=64",
        "inrank.buffer=4",
    )
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(str(thr))
    for i in range(2):
        for kind, hf_key in (("fc1", "c_fc"), ("fc2", "c_proj")):
            s = torch.linalg.svdvals(original[f"transformer.h.{i}.mlp.{hf_key}.weight"].double())
            ratios = explained_ratios(s)
            expected = next(k for k in range(1, s.numel() + 1) if ratios[k] > 0.5)
            assert ckpt.layers[f"decoder.layers.{i}.mlp.linear_{kind}"].rank == expected
    # Over max_rank (default min(in, out) // 2 = 32): refused, naming the layer; nothing written.
    over = tmp_path / "over"
    proc = _tool(
        "import_hf.py", hf_model, over, "--mode", "efficient", "--rank", 40, "inrank.buffer=4"
    )
    assert proc.returncode != 0 and "decoder.layers.0.mlp.linear_fc1" in proc.stderr
    assert "max_rank" in proc.stderr and not over.exists()


# ------------------------------------- (b') the HF round trip a user takes: fast, in process
TINY_RUN = [
    "model.num_layers=1",
    "model.hidden_size=16",
    "model.num_attention_heads=2",
    "model.seq_length=8",
    "inrank.mode=cumulative",
    "inrank.stage1_steps=null",
    "inrank.buffer=2",
    f"data.tokenizer_model={SP_MODEL}",
    "parallel.backend=torch",
]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A run directory whose checkpoint has random weights everywhere, vocabulary padding rows and
    non-zero B factors included (what training leaves: the padding rows train through the
    softmax), written by the training checkpoint writer (not by import_hf)."""
    from inrank_megatron.checkpoint import Meta, write_latest
    from inrank_megatron.config import load_config
    from inrank_megatron.checkpoint.writer import (
        single_process_megatron,
        write_training_checkpoint,
    )
    from inrank_megatron.convert.from_hf import inrank_state
    from inrank_megatron.models.gpt import build_model

    cfg = load_config(None, TINY_RUN)
    dense_cfg = load_config(None, [*TINY_RUN, "model.inrank=false"])
    generator = torch.Generator().manual_seed(0)
    with single_process_megatron(0):
        dense = {
            k: 0.5 * torch.randn(v.shape, generator=generator)
            for k, v in build_model(dense_cfg, 8000, 1).named_parameters()
        }
    assert dense["embedding.word_embeddings.weight"].shape[0] == 8064  # 64 padding rows
    tensors, growth = inrank_state(cfg, dense, rank=None, threshold=None, seed=0)
    for key in tensors:
        if key.endswith(".B"):
            tensors[key] = 0.1 * torch.randn(tensors[key].shape, generator=generator)
    run = tmp_path_factory.mktemp("source")
    step = run / "checkpoints" / "step_000007"
    write_training_checkpoint(
        str(step),
        cfg,
        8000,
        tensors,
        growth,
        Meta(
            step=7,
            consumed_samples=0,
            world_size=1,
            tp=1,
            pp=1,
            dp=1,
            backend="torch",
            config=to_dict(cfg),
        ),
    )
    write_latest(str(run / "checkpoints"), str(step))
    return str(run)


def _padded_loss(ckpt, tokens):
    """The training loss of a checkpoint's model: cross-entropy over the padded vocabulary, as
    megatron's vocab-parallel cross-entropy computes it."""
    from inrank_megatron.inference import GPT, GPTConfig

    model = GPT.from_tensors(
        GPTConfig.from_model_section(ckpt.cfg.model, ckpt.padded_vocab_size),
        ckpt.dense_tensors(unpad_vocab=False),
    )
    with torch.no_grad():
        logits = model(tokens[:, :-1]).double()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()


def test_hf_round_trip_is_loss_exact(source_run, tmp_path):
    """Issue 15 item 6: export -> import -> evaluate gives the source run's loss (6.1776 vs 6.1641
    before: the export dropped the vocabulary padding rows and import padded with zeros).
    Also item 8: the exported weights are 0644 like the other files (safetensors wrote 0600)."""
    from inrank_megatron.checkpoint.reader import load_checkpoint
    from inrank_megatron.convert import import_hf
    from inrank_megatron.export import export_hf

    source = load_checkpoint(source_run)
    out = tmp_path / "hf"
    export_hf(source, str(out))
    modes = {name: os.stat(out / name).st_mode & 0o777 for name in os.listdir(out)}
    assert set(modes.values()) == {0o644}, modes
    result = import_hf(
        str(out), str(tmp_path / "ft"), mode="cumulative", overrides=["inrank.buffer=2"]
    )
    imported = load_checkpoint(result["path"])
    assert imported.cfg.data.tokenizer_model == str(tmp_path / "ft" / "sentencepiece.model")
    assert os.path.isfile(imported.cfg.data.tokenizer_model)  # the run keeps its own copy
    tokens = torch.randint(0, 8000, (2, 9), generator=torch.Generator().manual_seed(0))
    expected, got = _padded_loss(source, tokens), _padded_loss(imported, tokens)
    assert abs(got - expected) < 1e-6, (got, expected)
    source_wte = source.tensors["embedding.word_embeddings.weight"]
    assert source_wte[8000:].abs().min() > 0  # the padding really is non-zero
    assert torch.equal(imported.tensors["embedding.word_embeddings.weight"], source_wte)


def test_import_writes_a_run_that_resume_auto_continues(source_run, tmp_path):
    """Issue 15 item 1: the README's ``import_hf.py HF runs/ft/checkpoints/step_000000`` wrote no
    ``latest`` and no config, so ``output.dir=runs/ft output.resume=auto`` silently trained a fresh
    model. Now the run directory has both; its config.yaml continues it, and the settings import
    chose (no --config: a default inrank.buffer too big for the model, cumulative's
    stage1_steps) are in meta.json."""
    from inrank_megatron.config import load_config
    from inrank_megatron.checkpoint.reader import load_checkpoint
    from inrank_megatron.convert import import_hf
    from inrank_megatron.export import export_hf
    from inrank_megatron.checkpoint.resume import resolve_resume

    hf = tmp_path / "hf"
    export_hf(load_checkpoint(source_run), str(hf))
    run = tmp_path / "runs" / "ft"
    result = import_hf(str(hf), str(run / "checkpoints" / "step_000000"), mode="cumulative")
    assert result["path"] == str(run)
    cfg = load_config(str(run / "config.yaml"))
    assert (cfg.output.dir, cfg.output.resume) == (str(run), "auto")
    assert resolve_resume(cfg, 1) == str(run / "checkpoints" / "step_000000")
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=32))
    with pytest.raises(ConfigError, match="model.hidden_size"):  # the run is really found
        resolve_resume(wider, 1)
    with open(run / "checkpoints" / "step_000000" / "meta.json") as f:
        changed = {
            c["key"]: (c["was"], c["value"]) for c in json.load(f)["imported_from"]["changed"]
        }
    assert changed["inrank.stage1_steps"] == (130, None)
    assert changed["inrank.buffer"] == (100, 6)  # fc1 16 -> 64: max_rank 8 = rank 2 + 6
    assert "data.tokenizer" not in changed  # sentencepiece, as the default says
    assert changed["data.tokenizer_model"][1] == str(run / "sentencepiece.model")
    assert cfg.inrank.buffer == 6 and cfg.inrank.stage1_steps is None


def test_import_refuses_what_it_cannot_express(hf_model_fast, tmp_path):
    from inrank_megatron.checkpoint.reader import CheckpointError
    from inrank_megatron.convert import import_hf
    from inrank_megatron.export import UnsupportedModelError

    path, config = hf_model_fast
    out = tmp_path / "out"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(config, activation_function="relu"), f)
    with pytest.raises(UnsupportedModelError, match="activation_function='relu'"):
        import_hf(path, str(out), mode="cumulative")
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save({}, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="pickled or sharded weights are not read"):
        import_hf(path, str(out), mode="cumulative")
    with pytest.raises(ValueError, match="exactly one of --rank R or --threshold T"):
        import_hf(path, str(out), mode="efficient")
    assert not out.exists()


@pytest.fixture
def hf_model_fast(tmp_path):
    """An HF GPT-2 directory (config + weights) to break; only its config is read by refusals."""
    from safetensors.torch import save_file

    path = str(tmp_path / "hf")
    os.makedirs(path)
    config = {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 16,
        "n_embd": 8,
        "n_layer": 1,
        "n_head": 2,
        "activation_function": "gelu",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(
        {"transformer.wte.weight": torch.zeros(4, 8)}, os.path.join(path, "model.safetensors")
    )
    return path, config


# ------------------------------------------------------------- (c) InRank-native export
@pytest.mark.slow
def test_native_export_is_smaller_by_the_parameter_ratio(runs, reference, tmp_path):
    from inrank_megatron import inference
    from inrank_megatron.checkpoint.reader import load_checkpoint
    from inrank_megatron.export import export_hf

    ckpt = load_checkpoint(runs["efficient"], tokenizer_model=SP_MODEL)
    native, dense = tmp_path / "native", tmp_path / "dense"
    proc = _tool("export_inrank.py", runs["efficient"], native)
    assert proc.returncode == 0, proc.stderr
    export_hf(ckpt, str(dense))

    m = ckpt.cfg.model
    h, f, L, V, P = m.hidden_size, m.ffn(), m.num_layers, ckpt.vocab_size, m.max_positions()
    per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    dense_params = V * h + P * h + L * per_layer + 2 * h
    native_params = dense_params + sum(
        l.rank * (l.in_features + l.out_features) - l.in_features * l.out_features
        for l in ckpt.layers.values()
    )
    dense_bytes = _tensor_bytes(dense / "model.safetensors")
    native_bytes = _tensor_bytes(native / "model.safetensors")
    assert (dense_bytes, native_bytes) == (4 * dense_params, 4 * native_params)  # fp32
    assert native_bytes / dense_bytes == native_params / dense_params < 0.9
    with open(native / "inrank.json") as fh:
        meta = json.load(fh)
    assert {n: l["rank"] for n, l in meta["layers"].items()} == {
        n: l.rank for n, l in ckpt.layers.items()
    }

    logits = reference["efficient"][0]
    with torch.no_grad():
        for path in (native, dense, runs["efficient"]):
            model = inference.load(str(path), tokenizer_model=SP_MODEL)
            torch.testing.assert_close(model(TOKENS), logits, rtol=0, atol=1e-5)
        fc1 = inference.load(str(native)).decoder.layers[0].mlp.linear_fc1
        assert isinstance(fc1, inference.FactoredLinear)  # the factors, not a dense weight
    cumulative = tmp_path / "native-cumulative"
    proc = _tool("export_inrank.py", runs["cumulative"], cumulative)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        torch.testing.assert_close(
            inference.load(str(cumulative))(TOKENS), reference["cumulative"][0], rtol=0, atol=1e-5
        )


@pytest.mark.slow
def test_inference_matches_megatron_on_other_architectures():
    from inrank_megatron import inference

    tokens = TOKENS[:, :32] % 1000
    overrides = [
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "model.seq_length=32",
        "model.position_embedding_type=rope",
        "model.activation=swiglu",
        "model.normalization=RMSNorm",
        "model.untie_embeddings_and_output_weights=true",
        "model.add_bias_linear=false",
        "inrank.layers=[fc2,qkv]",
        "inrank.buffer=4",
    ]
    cfg, logits, state, slots = run_distributed(_megatron_other_architecture, 1, overrides, tokens)[
        0
    ]
    tensors = {}
    for key, value in state.items():
        layer, _, role = key.rpartition(".")
        if role in ("A", "B") and layer in slots:
            value = value[: slots[layer]] if role == "A" else value[:, : slots[layer]]
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            value = value[:1000]
        tensors[key] = value
    config = inference.GPTConfig.from_model_section(
        cfg.model, 1000, {name: {"slots": k, "w0": False} for name, k in slots.items()}
    )
    model = inference.GPT.from_tensors(config, tensors)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- (d) generation
@pytest.mark.slow
def test_generate_is_deterministic_for_a_seed(runs, tmp_path):
    from inrank_megatron import inference

    native = tmp_path / "native"
    assert _tool("export_inrank.py", runs["efficient"], native).returncode == 0
    args = [
        "--checkpoint",
        native,
        "--prompt",
        "The history of",
        "--max-new-tokens",
        20,
        "--seed",
        3,
    ]
    first, second = _tool("generate.py", *args), _tool("generate.py", *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("The history of")
    assert len(first.stdout) > len("The history of") + 10

    model = inference.load(str(native))
    prompt = torch.tensor([[5, 17, 300]])
    sample = [
        model.generate(prompt, 12, temperature=1.0, top_k=50, top_p=0.9, seed=s) for s in (0, 0, 1)
    ]
    assert torch.equal(sample[0], sample[1]) and not torch.equal(sample[0], sample[2])
    greedy, ids = model.generate(prompt, 5, temperature=0), prompt
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, ids)


# -------------------------------------------------------------------------- (e) bad input
def test_missing_checkpoint_is_refused(tmp_path):
    out = tmp_path / "out"
    for tool in ("export_hf.py", "export_inrank.py"):
        proc = _tool(tool, tmp_path / "nowhere", out)
        assert proc.returncode != 0 and "no such checkpoint" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not out.exists()
    proc = _tool("generate.py", "--checkpoint", tmp_path / "nowhere", "--prompt", "x")
    assert proc.returncode != 0 and "no such checkpoint" in proc.stderr


@pytest.mark.slow
def test_partial_checkpoint_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["efficient"], run)
    os.remove(run / "checkpoints" / "step_000016" / "meta.json")  # a crash mid-save
    before = _snapshot(run)
    for target in (run, run / "checkpoints" / "step_000016"):
        for tool in ("export_hf.py", "export_inrank.py"):
            out = tmp_path / "out"
            proc = _tool(tool, target, out)
            assert proc.returncode != 0, proc.stdout
            assert "not a complete checkpoint: meta.json is missing" in proc.stderr, proc.stderr
            assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert _snapshot(run) == before


@pytest.mark.slow
def test_factor_shapes_contradicting_the_ranks_are_refused(runs, tmp_path):
    from inrank_megatron.checkpoint.reader import CheckpointError, load_checkpoint

    step = tmp_path / "step"
    shutil.copytree(os.path.join(runs["efficient"], "checkpoints", "step_000016"), step)
    with open(step / "inrank_growth.json") as f:
        growth = json.load(f)
    layer = growth["decoder.layers.1.mlp.linear_fc2"]
    layer["allocated_slots"] += 1
    layer["growth"]["rank"] += 1
    with open(step / "inrank_growth.json", "w") as f:
        json.dump(growth, f)
    before = _snapshot(step)
    with pytest.raises(
        CheckpointError,
        match=r"layer decoder\.layers\.1\.mlp\.linear_fc2: "
        r"factor shapes A \(\d+, 512\), B \(128, \d+\) contradict",
    ):
        load_checkpoint(str(step), tokenizer_model=SP_MODEL)
    out = tmp_path / "out"
    proc = _tool("export_inrank.py", step, out)
    assert proc.returncode != 0 and "decoder.layers.1.mlp.linear_fc2" in proc.stderr
    assert not out.exists() and _snapshot(step) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, feature",
    [
        ({"position_embedding_type": "rope"}, "RoPE"),
        ({"activation": "swiglu"}, "SwiGLU"),
    ],
)
def test_gpt2_export_refuses_inexpressible_configs(runs, tmp_path, change, feature):
    step = tmp_path / "step"
    shutil.copytree(os.path.join(runs["efficient"], "checkpoints", "step_000016"), step)
    with open(step / "meta.json") as f:
        meta = json.load(f)
    meta["config"]["model"].update(change)
    with open(step / "meta.json", "w") as f:
        json.dump(meta, f)
    before = _snapshot(step)
    out = tmp_path / "out"
    proc = _tool("export_hf.py", step, out)
    assert proc.returncode != 0 and feature in proc.stderr, proc.stderr
    assert "cannot export to Hugging Face GPT-2" in proc.stderr
    assert not out.exists() and _snapshot(step) == before


def test_gpt2_incompatibilities_name_each_feature():
    from inrank_megatron.config import load_config
    from inrank_megatron.export.hf_gpt2 import gpt2_incompatibilities

    assert gpt2_incompatibilities(load_config(None)) == []
    problems = gpt2_incompatibilities(
        load_config(
            None,
            [
                "model.position_embedding_type=rope",
                "model.activation=swiglu",
                "model.normalization=RMSNorm",
                "model.untie_embeddings_and_output_weights=true",
                "model.add_bias_linear=false",
            ],
        )
    )
    text = " ".join(problems)
    assert len(problems) == 5
    for feature in ("RoPE", "SwiGLU", "RMSNorm", "untied output layer", "no biases"):
        assert feature in text


def test_pickled_code_in_checkpoint_metadata_is_refused(tmp_path):
    from inrank_megatron.checkpoint.reader import CheckpointError, read_dist_tensors

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with open(model_dir / ".metadata", "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(CheckpointError, match="refusing to load posix.system"):
        read_dist_tensors(str(model_dir))
    assert not marker.exists()


def test_qkv_layout_conversion():
    from inrank_megatron.export.hf_gpt2 import qkv_from_hf, qkv_to_hf

    heads, hd, h = 4, 3, 12
    # megatron rows per head: [q_h, k_h, v_h]; label each row (part, head, dim).
    rows = torch.tensor(
        [[part, head, d] for head in range(heads) for part in range(3) for d in range(hd)],
        dtype=torch.float32,
    )
    hf = qkv_to_hf(rows, heads)
    expected = torch.tensor(
        [[part, head, d] for part in range(3) for head in range(heads) for d in range(hd)],
        dtype=torch.float32,
    )
    assert torch.equal(hf, expected)
    weight = torch.randn(3 * h, h)
    assert torch.equal(qkv_from_hf(qkv_to_hf(weight, heads), heads), weight)
