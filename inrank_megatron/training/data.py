"""Data for the training loop: build the default corpus when missing, megatron GPT datasets, and a
deterministic per-data-parallel-rank batch order that a resume re-enters exactly.

Sample order: optimizer step ``s`` (0-based) consumes global samples ``[s * gbs, (s + 1) * gbs)``;
micro-batch ``i`` of data-parallel rank ``r`` takes ``mbs`` consecutive ones starting at
``s * gbs + (i * dp + r) * mbs``. The data position is therefore just the step, and TP ranks of one
replica read the same samples.
"""

from __future__ import annotations

import os

import torch

from inrank_megatron.config import TrainConfig
from inrank_megatron.data.checks import as_blend, dataset_exists


def prepare_data(cfg: TrainConfig) -> None:
    """Build the tokenizer and the default corpus dataset when missing (a single ``data.prefix``;
    a blend's datasets exist, :func:`check_data_config`). Call on one rank only."""
    from inrank_megatron.data.corpus import corpus_documents
    from inrank_megatron.data.preprocess import preprocess
    from inrank_megatron.data.tokenizers import build_tokenizer
    from inrank_megatron.data.train_tokenizer import train_sentencepiece

    d = cfg.data
    if not isinstance(d.prefix, str) or dataset_exists(d.prefix):
        return
    os.makedirs(os.path.dirname(d.prefix) or ".", exist_ok=True)
    if d.tokenizer == "sentencepiece" and not os.path.isfile(d.tokenizer_model):
        model_prefix = d.tokenizer_model.removesuffix(".model")
        os.makedirs(os.path.dirname(model_prefix) or ".", exist_ok=True)
        train_sentencepiece(model_prefix, documents=corpus_documents(d.corpus))
    tokenizer = build_tokenizer(d.tokenizer, d.tokenizer_model)
    preprocess(d.prefix.removesuffix("_text_document"), tokenizer=tokenizer, corpus=d.corpus)


def num_samples(cfg: TrainConfig, dp_size: int) -> tuple[int, int, int]:
    """Samples of the train, valid and test splits a run reads: every step's global batch; the
    fixed set each evaluation reads (``eval_iters`` micro-batches per data-parallel rank)."""
    t = cfg.train
    return t.steps * t.global_batch_size, t.eval_iters * t.micro_batch_size * dp_size, 0


def build_datasets(cfg: TrainConfig, tokenizer, dp_size: int):
    """Train and valid GPT datasets sized for the run (valid: the fixed set each eval reads)."""
    from inrank_megatron.data.datasets import build_gpt_datasets

    return build_gpt_datasets(
        as_blend(cfg.data.prefix),
        cfg.model.seq_length,
        tokenizer=tokenizer,
        num_samples=num_samples(cfg, dp_size),
        seed=cfg.data.seed,
        split=cfg.data.split,
        valid_prefix=as_blend(cfg.data.valid_prefix),
    )


def data_report(cfg: TrainConfig, dp_size: int) -> list[str]:
    """What the run reads of each dataset, as text lines (the console at start, ``tools/plan.py``):
    a line on the samples and the split, then a table of each dataset's weight, documents, tokens,
    samples and epochs, train and valid (:func:`inrank_megatron.data.datasets.dataset_usage`).

    Raises:
        ValueError: a dataset's files are missing or broken (naming its key).
    """
    from inrank_megatron.data.datasets import dataset_usage, usage_table

    t, d = cfg.train, cfg.data
    rows = dataset_usage(
        as_blend(d.prefix),
        cfg.model.seq_length,
        num_samples(cfg, dp_size)[:2],
        split=d.split,
        valid_prefix=as_blend(d.valid_prefix),
    )
    blended = sum(r.split == "train" for r in rows)
    source = f", a blend of {blended} datasets" if blended > 1 else ""
    split = (
        f"data.split {d.split}{' of each' if blended > 1 else ''}"
        if d.valid_prefix is None
        else "train: every document of data.prefix, valid: every document of data.valid_prefix"
    )
    return [
        f"data: {t.steps * t.global_batch_size:,} train samples of {cfg.model.seq_length} "
        f"tokens ({t.steps} steps x {t.global_batch_size}){source}; {split}",
        *usage_table(rows),
    ]


def _collate(samples) -> dict:
    return {
        k: torch.stack([torch.as_tensor(s[k]) for s in samples])
        for k in ("tokens", "labels", "loss_mask", "position_ids")
    }


def step_microbatches(dataset, step: int, cfg: TrainConfig, dp_size: int, dp_rank: int) -> list:
    """The micro-batches of optimizer step ``step`` (0-based) for this data-parallel rank."""
    t = cfg.train
    mbs, gbs = t.micro_batch_size, t.global_batch_size
    out = []
    for i in range(gbs // (mbs * dp_size)):
        start = step * gbs + (i * dp_size + dp_rank) * mbs
        out.append(_collate([dataset[j] for j in range(start, start + mbs)]))
    return out


def eval_microbatches(dataset, cfg: TrainConfig, dp_size: int, dp_rank: int) -> list:
    """The fixed validation micro-batches of this data-parallel rank."""
    mbs = cfg.train.micro_batch_size
    return [
        _collate(
            [
                dataset[j]
                for j in range((i * dp_size + dp_rank) * mbs, (i * dp_size + dp_rank + 1) * mbs)
            ]
        )
        for i in range(cfg.train.eval_iters)
    ]
