"""Checkpoint conversion: a checkpoint trained at TP=2 (the session's ``tp2_run``, step 12) and
resharded to TP=1 and then TP=4 gives identical losses on the same batch at every layout (model,
growth state and learned ranks carried), resumed training after a reshard continues, ``to-dense``
merges the factors into megatron's dense GPT with the same loss, and bad input (a partial
checkpoint, a layout that does not divide) is refused with the source untouched and nothing
written."""

import os
import shutil

import pytest
import torch

from tests.distributed import REPO, SHORT, read_summary, run_distributed, run_train


def _loss_body(rank, world_size, step_dir):
    from inrank_megatron.checkpoint import read_meta
    from inrank_megatron.config import from_dict
    from inrank_megatron.data.tokenizers import build_tokenizer
    from inrank_megatron.growth.controller import GrowthController
    from inrank_megatron.checkpoint import manager as ckpt
    from inrank_megatron.training.backends import build_backend
    from inrank_megatron.training.data import build_datasets, step_microbatches
    from inrank_megatron.models.gpt import build_model
    from inrank_megatron.training.parallel import init_parallel, set_seeds

    meta = read_meta(step_dir)
    cfg = from_dict(meta.config)
    groups = init_parallel(cfg.parallel.tensor_model_parallel_size, 1, backend="gloo")
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_model)
    data = build_datasets(cfg, tokenizer, groups.dp_size)
    set_seeds(99)  # a different init: everything must come from the checkpoint
    model = build_model(cfg, tokenizer.vocab_size, groups.tp_size)
    controller = GrowthController(model, stage1_steps=cfg.inrank.stage1_steps)
    ckpt.load_growth_state(step_dir, controller)
    backend = build_backend(cfg, model, groups)
    if meta.weights_only:
        ckpt.load_model_weights(step_dir, model)
    else:
        backend.load(step_dir)
    # The same global batch on every layout: DP ranks take their part, losses averaged.
    batches = step_microbatches(data.train, 0, cfg, groups.dp_size, groups.dp_rank)
    losses = torch.tensor([backend.eval_loss(b).item() for b in batches], dtype=torch.float64)
    total = torch.stack([losses.sum(), torch.tensor(float(len(batches)), dtype=torch.float64)])
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item(), controller.ranks()


@pytest.mark.slow
def test_reshard_tp2_to_tp1_to_tp4(tp2_run, tmp_path, capsys, monkeypatch):
    import tools.convert_checkpoint as cli

    monkeypatch.chdir(REPO)
    src = os.path.join(tp2_run, "checkpoints", "step_000012")
    loss2, ranks2 = run_distributed(_loss_body, 2, src)[0]

    tp1 = str(tmp_path / "tp1" / "checkpoints" / "step_000012")
    os.makedirs(os.path.dirname(tp1))
    assert cli.main(["reshard", src, tp1, "--tp", "1"]) == 0
    loss1, ranks1 = run_distributed(_loss_body, 1, tp1)[0]
    tp4 = str(tmp_path / "tp4" / "checkpoints" / "step_000012")
    os.makedirs(os.path.dirname(tp4))
    assert cli.main(["reshard", tp1, tp4, "--tp", "4"]) == 0
    results4 = run_distributed(_loss_body, 4, tp4)
    assert ranks1 == ranks2 and all(r == ranks2 for _, r in results4)
    assert all(r > 2 for r in ranks2.values())  # learned ranks, after the cut at step 8
    assert loss1 == pytest.approx(loss2, rel=1e-6)
    assert all(l == pytest.approx(loss2, rel=1e-6) for l, _ in results4)

    # --to-dense: W0 + B A merged into megatron's dense GPT (model.inrank=false), same function.
    dense = str(tmp_path / "dense" / "step_000012")
    assert cli.main(["to-dense", src, dense]) == 0
    loss_dense, dense_ranks = run_distributed(_loss_body, 2, dense)[0]
    assert dense_ranks == {} and loss_dense == pytest.approx(loss2, rel=1e-5)

    # Training continues from the resharded checkpoint (TP=1 x DP=2 on 2 processes).
    with open(os.path.join(os.path.dirname(tp1), "latest"), "w") as f:
        f.write("step_000012\n")
    run_train(
        [
            *SHORT,
            f"output.dir={tmp_path / 'tp1'}",
            "output.resume=auto",
            "parallel.tensor_model_parallel_size=1",
            "train.steps=14",
        ]
    )
    s = read_summary(str(tmp_path / "tp1"))
    assert s["steps"] == 14 and len(s["train_losses"]) == 2

    # Bad input: a layout that does not divide (TP=3), a partial checkpoint.
    capsys.readouterr()
    assert cli.main(["reshard", src, str(tmp_path / "tp3"), "--tp", "3"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "tp3")
    partial = str(tmp_path / "partial")
    shutil.copytree(src, partial)
    os.remove(os.path.join(partial, "meta.json"))
    assert cli.main(["reshard", partial, str(tmp_path / "x"), "--tp", "1"]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
