"""The check that a trained run's exports are the run: its latest checkpoint, run in plain torch
at the padded vocabulary training used, gives the validation loss the run logged, and the native
and Hugging Face exports give that checkpoint's logits (without the vocabulary padding)."""

import json
import os

import pytest
import torch


def _loss(logits, batch):
    per_token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch["labels"], reduction="none"
    )
    mask = batch["loss_mask"].float()
    return float((per_token * mask).sum() / mask.sum())


def exports_give_the_runs_validation_loss(run: str, tmp_path):
    """Assert it for ``run`` (an output.dir whose latest checkpoint is its last step); return the
    checkpoint read."""
    from inrank_megatron import inference
    from inrank_megatron.checkpoint.reader import load_checkpoint
    from inrank_megatron.config import data_parallel_size
    from inrank_megatron.data.tokenizers import build_tokenizer
    from inrank_megatron.export import export_hf, export_inrank
    from inrank_megatron.training.data import build_datasets, eval_microbatches

    ckpt = load_checkpoint(run)
    cfg = ckpt.cfg
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    dp = data_parallel_size(cfg, summary["world_size"])
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_model)
    valid_set = build_datasets(cfg, tokenizer, dp).valid
    # Every data-parallel rank's batches: the run's loss is their mean (equal counts per rank).
    batches = [b for rank in range(dp) for b in eval_microbatches(valid_set, cfg, dp, rank)]

    specs = inference._inrank_specs({n: l.active_slots for n, l in ckpt.layers.items()}, False)
    padded = inference.GPT.from_tensors(
        inference.GPTConfig.from_model_section(cfg.model, ckpt.padded_vocab_size, specs),
        ckpt.tensors,
    )
    with torch.no_grad():
        reference = [padded(b["tokens"]) for b in batches]
    valid = sum(_loss(r, b) for r, b in zip(reference, batches)) / len(batches)
    assert valid == pytest.approx(summary["valid_loss"], abs=1e-5)
    export_inrank(ckpt, str(tmp_path / "native"))
    export_hf(ckpt, str(tmp_path / "hf"))
    for path in ("native", "hf"):
        model = inference.load(str(tmp_path / path))
        with torch.no_grad():
            for r, b in zip(reference, batches):
                torch.testing.assert_close(
                    model(b["tokens"]), r[..., : ckpt.vocab_size], rtol=0, atol=1e-5
                )
    return ckpt
