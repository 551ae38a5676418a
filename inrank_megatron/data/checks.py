"""The data checks of the pre-flight (no torch): is there data, or may ``prepare`` build it, are
its files whole, and does ``data.split`` give every split documents, for each dataset of a blend
(``data.prefix[i]``) and of ``data.valid_prefix``. The rules "data files" and "data split"
(:mod:`inrank_megatron.rules`) run them before any process group starts.
"""

from __future__ import annotations

import os

from inrank_megatron.config import ConfigError, TrainConfig


def dataset_exists(prefix: str) -> bool:
    """Whether the indexed dataset ``prefix`` (``PREFIX.bin`` and ``PREFIX.idx``) exists."""
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def as_blend(value):
    """A dataset value of the config (:func:`inrank_megatron.config.parse_blend`) as
    :func:`inrank_megatron.data.datasets.build_gpt_datasets` takes it: the prefix, or
    ``[(prefix, weight), ...]``."""
    if value is None or isinstance(value, str):
        return value
    return [(entry["prefix"], entry["weight"]) for entry in value]


def datasets_of(cfg: TrainConfig) -> list[tuple[str, str, float]]:
    """``(key, prefix, weight)`` of every dataset the run reads: ``data.prefix`` (or each entry of
    its blend, ``data.prefix[i]``), then ``data.valid_prefix``'s; nothing for an unset one."""
    from inrank_megatron.data.datasets import blend_entries

    return [entry for key in ("prefix", "valid_prefix")
            if getattr(cfg.data, key) is not None
            for entry in blend_entries(as_blend(getattr(cfg.data, key)), f"data.{key}")]


def check_data_config(cfg: TrainConfig) -> None:
    """Fail before any process group starts if there is no data and nothing may build it, or a
    dataset's files are broken. Only a single ``data.prefix`` can be built (``data.corpus``); the
    datasets of a blend and of ``data.valid_prefix`` must exist.

    Raises:
        ConfigError: listing every dataset that fails, each naming its key and file.
    """
    from inrank_megatron.data.datasets import check_indexed_files

    d = cfg.data
    if d.prefix is None:
        raise ConfigError("data.prefix is not set: expected a megatron indexed dataset prefix "
                          "(PREFIX.bin/.idx), e.g. data/wiki_sp8k_text_document")
    problems = []
    for key, prefix, _ in datasets_of(cfg):
        if dataset_exists(prefix):
            try:
                check_indexed_files(prefix, key)
            except ValueError as error:
                problems.append(str(error))
        elif key != "data.prefix":
            problems.append(f"{key}={prefix!r}: {prefix}.bin/.idx not found; the datasets of a "
                            "blend and of data.valid_prefix must exist (make each with "
                            "tools/preprocess_data.py)")
        elif d.corpus == "none":
            problems.append(f"data.prefix={prefix!r}: {prefix}.bin/.idx not found and "
                            "data.corpus=none; run tools/preprocess_data.py or set "
                            "data.corpus=wiki (or wiki+books)")
        elif not prefix.endswith("_text_document"):
            problems.append(f"data.prefix={prefix!r} does not exist and cannot be built: a prefix "
                            "that prepare builds must end in '_text_document'")
    if problems:
        raise ConfigError("; ".join(problems))


def split_report(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of ``data.split`` over each existing dataset's documents
    (:func:`inrank_megatron.data.datasets.split_problems`), or, with ``data.valid_prefix``, of a
    dataset without documents; nothing for a dataset that does not exist yet (prepare builds it)
    or is unreadable (the data files rule reports that)."""
    from inrank_megatron.data.datasets import check_indexed_files, split_problems

    errors, warnings = [], []
    for key, prefix, _ in datasets_of(cfg):
        if not dataset_exists(prefix):
            continue
        try:
            documents = check_indexed_files(prefix, key)["documents"]
            if cfg.data.valid_prefix is None:
                found = split_problems(cfg.data.split, documents,
                                       "" if key == "data.prefix" else f"{key}={prefix!r}")
            elif documents == 0:  # every document is read: only none is a problem
                reader = "every step" if key.startswith("data.prefix") else "every evaluation"
                found = ([f"{key}={prefix!r} has no documents, and {reader} reads it; expected a "
                          "dataset with documents"], [])
            else:
                found = ([], [])
        except (ValueError, AssertionError, ZeroDivisionError):  # the data and split rules say why
            continue
        errors += found[0]
        warnings += found[1]
    return errors, warnings
