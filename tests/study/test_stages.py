"""The recipe end to end on the real emoji data, through the CLI: seed -> specific -> grams ->
merge -> fine-tune every task -> evaluate; plus how each stage starts and what it refuses."""

import json

import pytest
import torch
import yaml

from vlmerge.cli.main import main
from vlmerge.core.errors import ConfigError
from vlmerge.data.sources import load_pairs
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.merging.plan import merged_key, parse_expert_key
from vlmerge.models.checkpoint import load_head_state, load_model
from vlmerge.models.heads import PretrainingHeads
from vlmerge.tasks import TASKS
from vlmerge.training.config import parse_stage_config
from vlmerge.training.objectives import pretraining_losses
from vlmerge.training.pretrain import build_pretraining_model
from vlmerge.training.setup import PairData
from vlmerge.training.trainer import read_metrics

LIMIT = 400  # the first 400 emoji: two groups, ~30 subgroups; renders in a few seconds
DATA = {"image_size": 32, "limit": LIMIT}
OPTIMIZER = {"batch_size": 16, "lr": 2e-3, "warmup_steps": 2}
TASK_METRICS = {
    "retrieval": "i2t_r1",
    "vqa": "vqa_score",
    "nlvr2": "accuracy",
    "classify_image": "top5_accuracy",
    "classify_text": "accuracy",
}


def write_config(path, **fields):
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def train(tmp, stage, run, **fields):
    config = write_config(tmp / f"{run}.yaml", data=DATA, optimizer=OPTIMIZER, **fields)
    assert main(["train", stage, "--config", config, "--run-dir", str(tmp / run), "--quiet"]) == 0
    return tmp / run


def falls(run_dir, key="loss", window=4):
    losses = [record[key] for record in read_metrics(run_dir)]
    return sum(losses[-window:]) / window < sum(losses[:window]) / window


def stage_config(run_dir):
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    return parse_stage_config(saved["stage"], saved)


def pretraining_loss(config, tokenizer, model, heads):
    """The stage's loss on one fixed batch and fixed masks (training losses are too noisy over a few steps)."""
    pairs = PairData.of(load_pairs(config.data, "train"), tokenizer)[:64]
    with torch.no_grad():
        losses = pretraining_losses(
            model.eval(), heads.eval(), pairs, config.objectives, tokenizer.mask_id, torch.Generator().manual_seed(0)
        )
    return losses["loss"].item()


def pretraining_loss_falls(run_dir):
    config = stage_config(run_dir)
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json", config.tokenizer.max_len)
    start = build_pretraining_model(config, tokenizer.vocab_size, tokenizer.max_len)
    trained = load_model(run_dir / "model.safetensors")
    heads = PretrainingHeads(trained.config.width, trained.config.vocab_size)
    heads.load_state_dict(load_head_state(run_dir / "model.safetensors", "heads"))
    before, after = (pretraining_loss(config, tokenizer, *pair) for pair in (start, (trained, heads)))
    return after < before - 0.1, (before, after)


@pytest.fixture(scope="module")
def recipe(emoji_sources, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    seed = train(tmp, "seed", "seed", steps=24, checkpoint_every=12)
    specific = train(tmp, "specific", "specific", steps=12, checkpoint_every=6, init=str(seed / "model.safetensors"))
    return tmp, seed, specific


def test_each_pretraining_stage_writes_a_complete_run_directory_and_its_loss_falls(recipe):
    _, seed, specific = recipe
    for run in (seed, specific):
        assert {"config.yaml", "metrics.jsonl", "checkpoint.pt", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in run.iterdir()
        }
        fell, (before, after) = pretraining_loss_falls(run)
        assert fell, (run.name, before, after)
    assert not load_model(seed / "model.safetensors").config.is_multiway
    assert load_model(specific / "model.safetensors").config.placement.value == "all"


def test_rerunning_a_finished_stage_does_no_work_and_a_changed_config_is_refused(recipe, capsys):
    tmp, seed, _ = recipe
    before = (seed / "metrics.jsonl").read_text()
    train(tmp, "seed", "seed", steps=24, checkpoint_every=12)
    assert (seed / "metrics.jsonl").read_text() == before
    config = write_config(tmp / "other.yaml", data=DATA, optimizer=OPTIMIZER, steps=30)
    assert main(["train", "seed", "--config", config, "--run-dir", str(seed), "--quiet"]) == 2
    assert "different config" in capsys.readouterr().err


def test_merge_with_collected_grams_then_finetune_and_evaluate_every_task(recipe, capsys):
    tmp, seed, specific = recipe
    grams, merged = tmp / "grams.safetensors", tmp / "merged.safetensors"
    assert (
        main(["grams", str(specific / "model.safetensors"), "--limit", str(LIMIT), "--out", str(grams), "--quiet"]) == 0
    )
    assert (
        main(
            [
                "merge",
                str(specific / "model.safetensors"),
                "--method",
                "regmean",
                "--grams",
                str(grams),
                "--out",
                str(merged),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", str(merged), "--limit", str(LIMIT), "--json"]) == 0  # zero-shot retrieval
    assert set(json.loads(capsys.readouterr().out)) >= {"i2t_r1", "t2i_r10"}
    for task in TASKS:
        run = train(tmp, "finetune", f"ft-{task}", task=task, init=str(merged), steps=16, checkpoint_every=16)
        assert falls(run), (task, read_metrics(run))
        results = json.loads((run / "results.json").read_text())
        assert all(0.0 <= value <= 1.0 for value in results["metrics"].values())
        primary = TASKS.get(task).primary_metric
        assert TASKS.get(task).primary_statistic(results["samples"]) == pytest.approx(results["metrics"][primary])
        capsys.readouterr()
        assert main(["evaluate", str(run)]) == 0
        printed = capsys.readouterr().out
        assert TASK_METRICS[task] in printed
        assert f"{results['metrics'][TASK_METRICS[task]]:.4f}" in printed  # the saved model scores the same


def test_specific_experts_start_as_copies_of_the_seed(recipe):
    _, seed, _ = recipe
    config = parse_stage_config("specific", {"init": str(seed / "model.safetensors"), "data": DATA})
    seed_model = load_model(seed / "model.safetensors")
    seed_state = seed_model.state_dict()
    model, _ = build_pretraining_model(config, seed_model.config.vocab_size, seed_model.config.max_text_len)
    experts = [key for key in model.state_dict() if parse_expert_key(key)]
    assert experts
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, seed_state[merged_key(key)], rtol=0, atol=0)


def test_naive_specific_experts_share_one_random_init():
    config = parse_stage_config("specific", {"data": DATA})
    model, _ = build_pretraining_model(config, vocab_size=64, max_text_len=24)
    groups: dict[str, list[torch.Tensor]] = {}
    for key, value in model.state_dict().items():
        groups.setdefault(merged_key(key), []).append(value)
    shared = [values for values in groups.values() if len(values) > 1]
    assert shared and all(torch.equal(values[0], other) for values in shared for other in values[1:])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"optimizer": {"lrr": 1}}, "did you mean 'lr'"),
        ({"model": {"placement": "all"}}, "modality-agnostic"),
        ({"init": "x.safetensors"}, "init x.safetensors: no such checkpoint"),
        ({"stage": "specific"}, "is run as 'seed'"),
    ],
)
def test_bad_stage_configs_get_one_named_error(tmp_path, capsys, fields, message):
    config = write_config(tmp_path / "bad.yaml", **fields)
    assert main(["train", "seed", "--config", config, "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_seed_pretraining_can_continue_a_modality_agnostic_checkpoint(recipe):
    """The paper's pretrained start: seed pre-training from an image transformer's weights."""
    _, seed, specific = recipe
    seed_state = load_model(seed / "model.safetensors").state_dict()
    config = parse_stage_config("seed", {"init": str(seed / "model.safetensors"), "data": DATA})
    model, heads = build_pretraining_model(config, len(seed_state["text_embed.word.weight"]), 24)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, seed_state[key], rtol=0, atol=0)
    torch.testing.assert_close(heads.state_dict(), load_head_state(seed / "model.safetensors", "heads"))
    with pytest.raises(ConfigError, match="has experts"):
        build_pretraining_model(
            parse_stage_config("seed", {"init": str(specific / "model.safetensors"), "data": DATA}),
            len(seed_state["text_embed.word.weight"]),
            24,
        )
