"""Training configuration (inrank_megatron/config.py): YAML + overrides -> checked dataclasses.

Pins down:
- A YAML file plus `section.key=value` overrides (read as YAML: `3e-4`, `false`, `[fc1,qkv]`,
  `null`) gives the expected TrainConfig; no file means all defaults; `to_dict` / `from_dict` and
  a saved `config.yaml` round-trip exactly.
- Every bad input fails with a ConfigError naming the full dotted key: unknown section or key
  (listing the valid keys, with a "did you mean" hint), wrong type (int accepted for float, bool
  rejected for int, text rejected for numbers, null only for Optional), a disallowed or
  out-of-range value, an override without '='.
- Every rule of `rules.validate` fires with a message naming its key and the expected value,
  including InRank rank settings checked against each layer kind's own full shape.
- tests/tiny.yaml (the suite's copy of tiny-cpu's spec-like settings) loads and passes
  `rules.validate(world_size=2)`, dense variant too.
- configs/README.md is what tools/config_doc.py generates now.
- `diff_incompatible` flags model/inrank/tokenizer changes and ignores schedule/output changes.

No torch.distributed; the whole file runs in well under a second after imports.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import pytest

from inrank_megatron import config as C
from inrank_megatron.config import (
    ConfigError,
    TrainConfig,
    data_parallel_size,
    diff_incompatible,
    from_dict,
    grad_accumulation_steps,
    load_config,
    save_config,
    to_dict,
)
from inrank_megatron import rules
from inrank_megatron.config_reference import render_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny.yaml")
README = os.path.join(ROOT, "configs", "README.md")


def tiny(*overrides: str) -> TrainConfig:
    return load_config(TINY, list(overrides))


# ------------------------------------------------------------------------------------ round trip
def test_defaults_without_a_file():
    assert load_config(None, []) == TrainConfig()
    assert load_config("", []) == TrainConfig()
    cfg = TrainConfig()
    assert cfg.model.ffn() == 512 and cfg.model.max_positions() == 128
    assert cfg.train.decay_steps() == cfg.train.steps
    assert cfg.inrank.layers == ["fc1", "fc2"] and cfg.inrank.buffer == 100


def test_overrides_are_read_as_yaml():
    cfg = tiny(
        "train.lr=3e-4",
        "model.inrank=false",
        "inrank.layers=[fc1,qkv]",
        "inrank.stage1_steps=null",
        "train.steps=50",
        "train.steps=60",
        "inrank.init_scale=2",
        "output.resume=auto",
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.inrank is False
    assert cfg.inrank.layers == ["fc1", "qkv"]
    assert cfg.inrank.stage1_steps is None
    assert cfg.train.steps == 60  # later overrides win
    assert cfg.inrank.init_scale == 2.0 and isinstance(cfg.inrank.init_scale, float)
    assert cfg.output.resume == "auto"
    assert tiny("output.dir=2024").output.dir == "2024"  # an integer is text too
    # Keys the overrides did not touch keep the file's values.
    assert cfg.model.hidden_size == 128 and cfg.inrank.buffer == 16


def test_yaml_exponent_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  min_lr: 5E-5\n  adam_eps: 1.0e-6\n")
    cfg = load_config(str(path), [])
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.adam_eps) == (1e-3, 5e-5, 1e-6)


def test_dict_and_yaml_round_trip(tmp_path):
    cfg = tiny("inrank.layers=[qkv,proj]", "train.save_interval=null", "model.ffn_hidden_size=null")
    d = to_dict(cfg)
    assert from_dict(d) == cfg
    d["inrank"]["layers"].append("fc1")  # to_dict copies lists
    assert cfg.inrank.layers == ["qkv", "proj"]
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path), []) == cfg


def test_every_field_is_documented():
    for section, cls in C.SECTIONS.items():
        types = C.field_types(section)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help"
            assert f.name in types
            assert (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )


def test_inrank_section_converts_to_core():
    import torch

    from inrank_megatron.core.config import InRankConfig

    core = tiny("inrank.spectrum_dtype=float64").inrank.to_core()
    assert type(core) is InRankConfig
    assert (core.rank, core.buffer, core.stage1_steps, core.spectrum_torch_dtype) == (
        2,
        16,
        60,
        torch.float64,
    )
    # The section is the core's settings (the same fields, declared once) plus its own keys.
    core_keys = [f.name for f in dataclasses.fields(InRankConfig)]
    inherited = dataclasses.fields(C.InRankSection)[: len(core_keys)]
    assert all(a is b for a, b in zip(inherited, dataclasses.fields(InRankConfig)))
    assert InRankConfig(spectrum_dtype=torch.float64).spectrum_dtype == "float64"


# ---------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "train.lrr=1",
            [
                "unknown key 'train.lrr'",
                "valid keys of section 'train'",
                "steps, ",
                "did you mean 'lr'?",
            ],
        ),
        ("trian.lr=1", ["unknown section 'trian'", "model, inrank", "did you mean 'train'?"]),
        ("model.inrank.rank=3", ["unknown key 'model.inrank.rank'"]),
        ("model=3", ["'model=3' names a section", "num_layers"]),
        ("train.lr", ["override 'train.lr' has no '='", "section.key=value"]),
        ("train.lr=abc", ["train.lr", "expected float", "'abc'"]),
        ("train.lr='3e-4'", ["train.lr", "expected float", "'3e-4'"]),
        ("train.lr=true", ["train.lr", "expected float", "true"]),
        ("train.steps=true", ["train.steps", "expected int", "true (bool)"]),
        ("train.steps=1.5", ["train.steps", "expected int", "1.5"]),
        ("train.steps=null", ["train.steps", "expected int", "null"]),
        ("train.save_interval=ten", ["train.save_interval", "expected int | null", "'ten'"]),
        ("model.inrank=1", ["model.inrank", "expected bool", "1 (int)"]),
        ("output.dir=1.5", ["output.dir", "expected str", "quote it"]),
        ("output.resume=false", ["output.resume", "expected str", "false (bool)"]),
        ("inrank.layers=fc1", ["inrank.layers", "expected list[str]", "'fc1'"]),
        (
            "inrank.layers=[fc1,fc3]",
            ["inrank.layers", "'fc3' is not allowed", "fc1, fc2, qkv, proj"],
        ),
        ("inrank.layers=[fc1,fc1]", ["inrank.layers", "repeats fc1"]),
        (
            "inrank.layers=[fc1",
            ["override 'inrank.layers=[fc1'", "'[fc1' is not valid YAML", "expected ',' or ']'"],
        ),
        ("model.activation=relu", ["model.activation", "'relu' is not allowed", "gelu, swiglu"]),
        ("model.normalization=layernorm", ["model.normalization", "did you mean 'LayerNorm'?"]),
        ("parallel.backend=ddp", ["parallel.backend", "torch, megatron, deepspeed"]),
        ("parallel.zero_stage=4", ["parallel.zero_stage", "0, 1, 2, 3"]),
        ("inrank.mode=full", ["inrank.mode", "efficient, cumulative"]),
        ("inrank.init=svd", ["inrank.init", "'svd' is not allowed", "kaiming, spectral"]),
        ("inrank.lr_multiplier=0", ["inrank.lr_multiplier", "> 0.0", "got 0"]),
        ("inrank.frobenius_decay=-0.1", ["inrank.frobenius_decay", ">= 0.0", "got -0.1"]),
        ("inrank.frobenius_decay=high", ["inrank.frobenius_decay", "expected float"]),
        ("inrank.threshold=1", ["inrank.threshold", "< 1.0"]),
        ("train.micro_batch_size=0", ["train.micro_batch_size", ">= 1", "got 0"]),
    ],
)
def test_bad_override(override, expected):
    with pytest.raises(ConfigError) as info:
        tiny(override)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))
    assert isinstance(info.value, ValueError)
    assert repr(override) in str(info.value)  # says which override it was


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "model:\n  hiden_size: 64\n",
            ["unknown key 'model.hiden_size'", "did you mean 'hidden_size'?"],
        ),
        ("modle:\n  hidden_size: 64\n", ["unknown section 'modle'", "did you mean 'model'?"]),
        ("model: 64\n", ["model", "expected a mapping of keys"]),
        ("- 1\n- 2\n", ["expected a mapping of sections"]),
        ("train:\n  steps: '300'\n", ["train.steps", "expected int", "'300'"]),
        ("train: [steps\n", ["is not valid YAML"]),
    ],
)
def test_bad_file(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [])
    for snippet in expected:
        assert snippet in str(info.value), (snippet, str(info.value))
    assert str(path) in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml", [])


def test_empty_file_and_sections_are_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(str(path), []) == TrainConfig()
    path.write_text("model:\ntrain:\n")
    assert load_config(str(path), ["train.steps=7"]) == TrainConfig(
        train=dataclasses.replace(TrainConfig().train, steps=7)
    )


def test_tokenizer_switch_drops_the_inherited_sentencepiece_model():
    """Issue 15 item 2: ``data.tokenizer=gpt2`` over tiny-cpu.yaml used to keep the file's
    ``data.tokenizer_model`` and crash inside the ranks (build_tokenizer: "takes no model file")."""
    notes = []
    cfg = load_config(TINY, ["data.tokenizer=gpt2", "data.prefix=data/x_text_document"], notes)
    assert (cfg.data.tokenizer, cfg.data.tokenizer_model) == ("gpt2", None)
    assert notes == [
        "data.tokenizer=gpt2 implies data.tokenizer_model=null (the value "
        f"'data/wiki_sp8k.model' in {TINY} is only read by "
        "data.tokenizer=sentencepiece)"
    ]
    rules.validate(cfg, 2)
    # Said on the command line, the model is kept (and is the rules' to judge); no switch, no note.
    cfg = load_config(TINY, ["data.tokenizer=gpt2", "data.tokenizer_model=m.model"], notes := [])
    assert cfg.data.tokenizer_model == "m.model" and notes == []
    assert load_config(TINY, ["train.steps=3"], notes).data.tokenizer_model is not None
    assert notes == []


# ------------------------------------------------------------------------------------- layout
@pytest.fixture
def ds_json(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    return str(path)


LAYOUT_ERRORS = [
    # (overrides, world_size, expected snippets)
    (
        [],
        3,
        [
            "parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size",
            "world_size=3",
            "expected a divisor of 3",
        ],
    ),
    (
        ["model.num_attention_heads=3"],
        2,
        [
            "model.hidden_size=128 is not divisible by model.num_attention_heads=3",
            "expected a multiple of 3",
        ],
    ),
    (
        [
            "model.hidden_size=126",
            "model.num_attention_heads=3",
            "parallel.tensor_model_parallel_size=4",
        ],
        4,
        ["model.hidden_size=126 is not divisible by parallel.tensor_model_parallel_size=4"],
    ),
    (
        ["model.num_attention_heads=2", "parallel.tensor_model_parallel_size=4"],
        4,
        [
            "model.num_attention_heads=2 is not divisible by parallel.tensor_model_parallel_size=4",
            "expected a multiple of 4",
        ],
    ),
    (
        ["model.ffn_hidden_size=513"],
        2,
        ["model.ffn_hidden_size (resolved)=513", "parallel.tensor_model_parallel_size=2"],
    ),
    (
        ["parallel.sequence_parallel=true", "model.seq_length=127"],
        2,
        ["model.seq_length=127", "sequence parallelism", "expected a multiple of 2"],
    ),
    (
        ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=true"],
        2,
        ["parallel.sequence_parallel", "parallel.tensor_model_parallel_size > 1"],
    ),
    (
        ["parallel.pipeline_model_parallel_size=3"],
        6,
        ["model.num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=3"],
    ),
    (
        ["train.global_batch_size=12"],
        4,
        [
            "train.global_batch_size=12",
            "train.micro_batch_size * data-parallel size = 4 * 2 = 8",
            "expected a multiple of 8",
        ],
    ),
    (
        ["parallel.backend=deepspeed"],
        2,
        ["parallel.deepspeed_config is required", "parallel.backend=deepspeed"],
    ),
    (
        ["parallel.backend=deepspeed", "parallel.deepspeed_config=no/such.json"],
        2,
        ["parallel.deepspeed_config='no/such.json'", "file not found"],
    ),
    (
        [
            "parallel.backend=deepspeed",
            "parallel.deepspeed_config={ds}",
            "parallel.pipeline_model_parallel_size=2",
        ],
        4,
        ["parallel.pipeline_model_parallel_size=2", "not supported", "expected 1"],
    ),
    (["parallel.deepspeed_config={ds}"], 2, ["parallel.deepspeed_config", "expected null"]),
    # The planner and the trainer used to disagree here (the trainer refused it after
    # rules.validate had passed it): one rule now.
    (
        ["parallel.pipeline_model_parallel_size=2", "parallel.backend=megatron"],
        4,
        ["parallel.pipeline_model_parallel_size=2", "parallel.backend='megatron'", "expected 1"],
    ),
    (["parallel.zero_stage=2"], 2, ["parallel.zero_stage=2", "expected null"]),
    (
        ["model.activation=swiglu"],
        2,
        ["inrank.layers contains fc1", "model.activation=swiglu", "without fc1"],
    ),
    (
        ["inrank.buffer=64"],
        2,
        [
            "inrank.buffer=64",
            "layer fc1 (128 -> 512) has max_rank=64",
            "expected inrank.buffer < 64",
        ],
    ),
    (
        ["inrank.rank=50"],
        2,
        [
            "inrank.rank + inrank.buffer = 50 + 16 = 66",
            "layer fc1 (128 -> 512) has max_rank=64",
            "expected inrank.rank <= 48",
        ],
    ),
    (
        ["inrank.max_rank=200"],
        2,
        ["inrank.max_rank=200 exceeds min(in, out)=128", "layer fc1", "expected <= 128"],
    ),
    # Each kind is checked against its own shape: fc2 is 64 -> 128 here, max_rank 32.
    (
        ["model.ffn_hidden_size=64", "inrank.buffer=40", "inrank.layers=[qkv,proj,fc2]"],
        2,
        ["inrank.buffer=40", "layer fc2 (64 -> 128) has max_rank=32"],
    ),
    (["inrank.mode=cumulative"], 2, ["inrank.stage1_steps=60", "cumulative", "expected null"]),
    (
        ["inrank.mode=cumulative", "inrank.stage1_steps=null", "inrank.init=spectral"],
        2,
        ["inrank.init=spectral with inrank.mode=cumulative", "expected inrank.mode=efficient"],
    ),
    (
        ["model.position_embedding_type=rope", "model.hidden_size=132"],
        2,
        ["model.position_embedding_type=rope", "even head dimension", "33"],
    ),
    (
        ["model.max_position_embeddings=64"],
        2,
        ["model.max_position_embeddings=64", "expected >= 128"],
    ),
    (["train.min_lr=0.1"], 2, ["train.min_lr=0.1", "expected <= 0.001"]),
    (["train.lr_warmup_steps=200"], 2, ["train.lr_warmup_steps=200", "expected < 200"]),
    (["data.tokenizer_model=null"], 2, ["data.tokenizer_model is required"]),
    (["data.prefix=null", "data.corpus=none"], 2, ["data.prefix is null", "data.corpus=wiki"]),
    (["data.split=90;10"], 2, ["data.split='90;10'", "train,valid,test"]),
    (["data.split=0,1,0"], 2, ["data.split='0,1,0'"]),
]


@pytest.mark.parametrize("overrides, world_size, expected", LAYOUT_ERRORS)
def test_layout_error(overrides, world_size, expected, ds_json):
    cfg = tiny(*[o.format(ds=ds_json) for o in overrides])  # loads: each field alone is fine
    with pytest.raises(ConfigError) as info:
        rules.validate(cfg, world_size)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))


@pytest.mark.parametrize(
    "overrides, world_size",
    [
        ([], 2),
        (["model.inrank=false"], 2),  # the dense baseline is a one-key change
        (["model.inrank=false", "inrank.buffer=100", "model.activation=swiglu"], 2),
        (["model.activation=swiglu", "inrank.layers=[fc2]"], 2),
        (["inrank.mode=cumulative", "inrank.stage1_steps=null"], 2),
        (["inrank.init=spectral"], 2),
        (["model.inrank=false", "inrank.mode=cumulative", "inrank.init=spectral"], 2),  # not read
        (["inrank.rank=48"], 2),  # rank + buffer == max_rank exactly
        (["inrank.layers=[fc1,fc2,qkv,proj]", "inrank.max_rank=128", "inrank.buffer=100"], 2),
        (["parallel.sequence_parallel=true", "train.precision=bf16"], 2),
        (["parallel.tensor_model_parallel_size=1", "train.global_batch_size=16"], 2),
        (
            [
                "parallel.backend=deepspeed",
                "parallel.deepspeed_config={ds}",
                "parallel.zero_stage=2",
            ],
            2,
        ),
        (["train.lr_decay_style=constant", "train.lr_warmup_steps=300"], 2),
        (["data.tokenizer=gpt2", "data.tokenizer_model=null", "data.split=100"], 2),
    ],
)
def test_layout_ok(overrides, world_size, ds_json):
    rules.validate(tiny(*[o.format(ds=ds_json) for o in overrides]), world_size)


def test_layout_rechecks_fields_of_a_config_built_in_code():
    cfg = tiny()
    cfg.inrank.layers = ["fc1", "mlp"]
    with pytest.raises(ConfigError, match=r"inrank.layers: 'mlp' is not allowed"):
        rules.validate(cfg, 2)
    cfg = tiny()
    cfg.train.steps = True
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got true"):
        rules.validate(cfg, 2)


def test_tiny_cpu_config():
    cfg = tiny()
    rules.validate(cfg, world_size=2)
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert data_parallel_size(cfg, 2) == 1 and grad_accumulation_steps(cfg, 2) == 2
    assert C.inrank_layer_shapes(cfg) == {"fc1": (128, 512), "fc2": (512, 128)}
    assert cfg.inrank.layer_max_rank(128, 512) == 64
    assert (cfg.inrank.rank, cfg.inrank.buffer, cfg.inrank.stage1_steps) == (2, 16, 60)
    assert cfg.output.dir == "runs/tiny-cpu" and cfg.train.steps == 200


# ---------------------------------------------------------------------------- docs and resume
def test_readme_is_generated():
    with open(README, encoding="utf-8") as f:
        assert f.read() == render_reference(), "run: python tools/config_doc.py > configs/README.md"


def test_config_doc_check(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "config_doc", os.path.join(ROOT, "tools", "config_doc.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    stale = tmp_path / "README.md"
    stale.write_text("old\n")
    assert tool.main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    stale.write_text(render_reference())
    assert tool.main(["--check", str(stale)]) == 0


def test_diff_incompatible():
    saved = tiny()
    assert diff_incompatible(saved, tiny("model.hidden_size=256")) == ["model.hidden_size"]
    assert (
        diff_incompatible(
            saved,
            tiny(
                "train.steps=400",
                "train.lr=1e-4",
                "output.dir=x",
                "train.eval_interval=10",
                "inrank.resize_policy=project",
                "parallel.tensor_model_parallel_size=1",
            ),
        )
        == []
    )
    # How activations are computed is free to change on resume (same parameters).
    assert (
        diff_incompatible(
            saved,
            tiny("model.attention=sdpa", "model.recompute=full", "model.recompute_num_layers=2"),
        )
        == []
    )
    # Compared resolved: null ffn is 4 * hidden = 512 here.
    assert diff_incompatible(saved, tiny("model.ffn_hidden_size=null")) == []
    assert diff_incompatible(saved, tiny("inrank.layers=[fc2,fc1]")) == []
    assert diff_incompatible(
        saved, tiny("inrank.buffer=8", "data.tokenizer_model=other.model")
    ) == ["inrank.buffer", "data.tokenizer_model"]
    assert diff_incompatible(saved, tiny("model.inrank=false")) == ["model.inrank"]
    assert diff_incompatible(
        saved, tiny("inrank.lr_multiplier=2", "inrank.frobenius_decay=0.1", "inrank.init=spectral")
    ) == ["inrank.init", "inrank.lr_multiplier", "inrank.frobenius_decay"]
    dense = tiny("model.inrank=false")
    assert diff_incompatible(dense, tiny("model.inrank=false", "inrank.buffer=8")) == []


# ------------------------------------------------------------------------------------ the rules
def test_every_failure_is_reported_with_its_key():
    from inrank_megatron import rules

    cfg = tiny("parallel.zero_stage=2", "inrank.buffer=64", "train.min_lr=0.1")
    failures = rules.check(cfg, world_size=3)
    assert [(f.key, f.value) for f in failures] == [
        ("parallel.tensor_model_parallel_size", None),
        ("parallel.zero_stage", 2),
        ("inrank.buffer", 64),
        ("inrank.buffer", 64),
        ("train.min_lr", 0.1),
    ]
    assert [f.expected for f in failures[1:]] == ["null", "< 64", "< 64", "<= 0.001"]
    with pytest.raises(ConfigError) as info:
        rules.validate(cfg, 3)
    assert info.value.failures == failures
    assert str(info.value) == "; ".join(str(f) for f in failures)
    assert "\n" not in str(info.value)  # the launch scripts print it as one line


def test_megatron_distributed_optimizer_passes_the_trainer_and_the_planner_alike():
    # It used to pass rules.validate and FAIL tools/plan.py ("only read by deepspeed").
    from inrank_megatron import rules
    from inrank_megatron.planning.plan import plan

    for stage, strategy in ((None, "zero0"), (0, "zero0"), (1, "megatron")):
        cfg = load_config(
            os.path.join(ROOT, "configs", "gpt2-medium.yaml"),
            [
                "parallel.backend=megatron",
                f"parallel.zero_stage={format(stage)}"
                if stage is not None
                else "parallel.zero_stage=null",
            ],
        )
        rules.validate(cfg, 8)
        p = plan(cfg, 1, 8)
        assert p.ok and p.strategy == strategy, [c for c in p.checks if not c.ok]
    cfg.parallel.zero_stage = 2
    with pytest.raises(ConfigError, match="parallel.zero_stage=2 with parallel.backend=megatron"):
        rules.validate(cfg, 8)
    assert [c.name for c in plan(cfg, 1, 8).checks if not c.ok] == ["backend"]
    assert [c.name for c in plan(cfg, 1, 8).checks] == [r.name for r in rules.applicable(8)]


def test_readme_lists_every_rule():
    from inrank_megatron import rules

    text = render_reference()
    for r in rules.RULES:
        assert f"- **{r.name}** (" in text and r.doc in text
