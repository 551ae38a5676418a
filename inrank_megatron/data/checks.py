"""The data checks of the pre-flight (no torch): is there data, or may ``prepare`` build it, and
does ``data.split`` give every split documents. The rules "data files" and "data split"
(:mod:`inrank_megatron.rules`) run them before any process group starts.
"""

from __future__ import annotations

import os

from inrank_megatron.config import ConfigError, TrainConfig


def dataset_exists(prefix: str) -> bool:
    """Whether the indexed dataset ``prefix`` (``PREFIX.bin`` and ``PREFIX.idx``) exists."""
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def check_data_config(cfg: TrainConfig) -> None:
    """Fail before any process group starts if there is no data and nothing may build it."""
    d = cfg.data
    if d.prefix is None:
        raise ConfigError("data.prefix is not set: expected a megatron indexed dataset prefix "
                          "(PREFIX.bin/.idx), e.g. data/wiki_sp8k_text_document")
    if not dataset_exists(d.prefix) and d.corpus == "none":
        raise ConfigError(f"data.prefix={d.prefix!r}: {d.prefix}.bin/.idx not found and "
                          "data.corpus=none; run tools/preprocess_data.py or set data.corpus=wiki "
                          "(or wiki+books)")
    if not dataset_exists(d.prefix) and not d.prefix.endswith("_text_document"):
        raise ConfigError(f"data.prefix={d.prefix!r} does not exist and cannot be built: a prefix "
                          "that prepare builds must end in '_text_document'")
    if dataset_exists(d.prefix):
        from inrank_megatron.data.datasets import check_indexed_files

        try:
            check_indexed_files(d.prefix)
        except ValueError as error:
            raise ConfigError(str(error)) from None


def split_report(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of ``data.split`` over the existing dataset's documents
    (:func:`inrank_megatron.data.datasets.split_problems`); nothing when the data does not exist
    yet (prepare builds it) or is unreadable (the data files rule reports that)."""
    from inrank_megatron.data.datasets import check_indexed_files, split_problems

    d = cfg.data
    if d.prefix is None or not dataset_exists(d.prefix):
        return [], []
    try:
        return split_problems(d.split, check_indexed_files(d.prefix)["documents"])
    except (ValueError, AssertionError, ZeroDivisionError):  # the data and split rules say why
        return [], []
