"""Every task's evaluation on the emoji data: per-example samples from which the task's primary
statistic recomputes its primary metric, also over bootstrap resamples; and the linear probe,
which trains the task head alone and leaves the pre-trained model bit-identical."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from vlmerge.data.config import DataConfig
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.models.checkpoint import load_head_state, load_model
from vlmerge.tasks import TASKS
from vlmerge.tasks.base import ClassifierTask, Evaluation
from vlmerge.tasks.finetune import TASK_HEAD, load_task, read_evaluation, run_finetune
from vlmerge.tasks.vqa import VisualQuestionAnswering, answer_scores, vqa_metrics
from vlmerge.training.config import parse_stage_config
from vlmerge.training.pretrain import HEADS, run_pretraining

DATA = {"image_size": 32, "limit": 400}
OPTIMIZER = {"batch_size": 16, "lr": 2e-3, "warmup_steps": 0}
RESAMPLES = 200


@pytest.fixture(scope="module")
def seed_checkpoint(emoji_sources, tmp_path_factory):
    config = parse_stage_config(
        "seed",
        {"steps": 4, "checkpoint_every": 4, "data": DATA, "optimizer": OPTIMIZER, "tokenizer": {"vocab_size": 300}},
    )
    return run_pretraining(config, tmp_path_factory.mktemp("samples") / "seed", progress=False)


@pytest.fixture(scope="module")
def evaluations(seed_checkpoint):
    """Each task on its test split: the seed model with the head it starts fine-tuning from."""
    found = {}
    for name in TASKS:
        model, task = load_task(name, seed_checkpoint, DataConfig(**DATA))
        torch.manual_seed(0)
        head = task.make_head(model.config)
        task.init_head(head, load_head_state(seed_checkpoint, HEADS))
        found[name] = task, task.evaluate(model, head, "test", batch_size=64)
    return found


def resampled(samples: dict[str, list[float]], generator: np.random.Generator) -> dict[str, np.ndarray]:
    """RESAMPLES bootstrap resamples of each array, stacked on a leading axis."""
    return {
        name: np.asarray(values)[generator.integers(0, len(values), (RESAMPLES, len(values)))]
        for name, values in samples.items()
    }


@pytest.mark.parametrize("name", list(TASKS))
def test_the_primary_statistic_of_the_samples_is_the_primary_metric(evaluations, name):
    task, evaluation = evaluations[name]
    assert isinstance(evaluation, Evaluation)
    lengths = {key: len(values) for key, values in evaluation.samples.items()}
    if name == "retrieval":
        assert lengths == {"i2t": len(task.image_store("test")), "t2i": task.num_examples("test")}
    else:
        assert set(lengths) == {"score" if name == "vqa" else "correct"}
        assert set(lengths.values()) == {task.num_examples("test")}
    assert all(0.0 <= value <= 1.0 for values in evaluation.samples.values() for value in values)
    statistic = type(task).primary_statistic(evaluation.samples)
    assert isinstance(statistic, float)
    assert statistic == pytest.approx(evaluation.metrics[task.primary_metric], rel=1e-6, abs=1e-7)
    as_arrays = {key: np.asarray(values) for key, values in evaluation.samples.items()}
    assert task.primary_statistic(as_arrays) == statistic


@pytest.mark.parametrize("name", list(TASKS))
def test_bootstrap_resamples_through_the_primary_statistic(evaluations, name):
    task, evaluation = evaluations[name]
    draws = resampled(evaluation.samples, np.random.default_rng(0))
    vectorised = task.primary_statistic(draws)
    assert vectorised.shape == (RESAMPLES,)
    assert np.all((vectorised >= 0.0) & (vectorised <= 1.0))
    one_by_one = [task.primary_statistic({key: values[row] for key, values in draws.items()}) for row in range(5)]
    np.testing.assert_allclose(vectorised[:5], one_by_one, rtol=1e-12)
    # scipy's convention: one positional array per named sample, per-example values along `axis`.
    names = sorted(evaluation.samples)

    def statistic(*arrays, axis=-1):
        return task.primary_statistic(dict(zip(names, arrays)), axis=axis)

    interval = stats.bootstrap(
        tuple(np.asarray(evaluation.samples[key]) for key in names),
        statistic,
        vectorized=True,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    assert 0.0 <= interval.low <= interval.high <= 1.0


@pytest.mark.parametrize("name", [name for name in TASKS if issubclass(TASKS.get(name), ClassifierTask)])
def test_classifier_samples_follow_the_metric_on_random_logits(evaluations, name):
    """Logits right about half the time, so the metric is far from 0 and 1."""
    task, _ = evaluations[name]
    generator = torch.Generator().manual_seed(1)
    examples = task.examples("test")
    classes = examples["targets"].shape[1] if name == "vqa" else int(examples["labels"].max()) + 2
    logits = torch.randn(task.num_examples("test"), classes, generator=generator)
    truth = examples["targets"].argmax(dim=1) if name == "vqa" else examples["labels"]
    right = torch.rand(len(logits), generator=generator) < 0.5
    logits[right, truth[right]] += 100.0
    metrics, samples = task.metrics(logits, "test"), task.samples(logits, "test")
    assert 0.3 < metrics[task.primary_metric] < 0.7
    assert task.primary_statistic(samples) == pytest.approx(metrics[task.primary_metric], rel=1e-6)


def test_vqa_samples_are_soft_scores():
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.6, 1.0], [0.0, 0.0, 1.0], [0.3, 1.0, 0.0]])
    logits = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    scores = answer_scores(logits, targets).tolist()
    assert scores == pytest.approx([0.3, 0.6, 1.0, 0.0])
    metrics = vqa_metrics(logits, targets, torch.zeros(4, dtype=torch.long), ("any",))
    assert VisualQuestionAnswering.primary_statistic({"score": scores}) == pytest.approx(metrics["vqa_score"])
    assert metrics["vqa_score"] == pytest.approx(1.9 / 4) and metrics["accuracy"] == 0.75


def test_an_evaluation_round_trips_through_its_dict():
    evaluation = Evaluation({"accuracy": 0.5}, {"correct": [1.0, 0.0]})
    assert Evaluation.from_dict(json.loads(json.dumps(evaluation.as_dict()))) == evaluation


def finetune(seed_checkpoint, run_dir, task: str, freeze_backbone: bool) -> Evaluation:
    config = parse_stage_config(
        "finetune",
        {
            "task": task,
            "init": str(seed_checkpoint),
            "steps": 4,
            "checkpoint_every": 4,
            "data": DATA,
            "optimizer": {**OPTIMIZER, "head_lr_multiplier": 10},
            "freeze_backbone": freeze_backbone,
        },
    )
    return run_finetune(config, run_dir, progress=False)


def initial_head(seed_checkpoint, task_name: str) -> dict[str, torch.Tensor]:
    """The head a fine-tuning run starts from (as run_finetune makes it, random seed 0)."""
    model, task = load_task(task_name, seed_checkpoint, DataConfig(**DATA))
    torch.manual_seed(0)
    head = task.make_head(model.config)
    task.init_head(head, load_head_state(seed_checkpoint, HEADS))
    return head.state_dict()


@pytest.mark.parametrize("name", list(TASKS))
def test_a_linear_probe_trains_the_head_alone(seed_checkpoint, tmp_path, name):
    evaluation = finetune(seed_checkpoint, tmp_path / "probe", name, freeze_backbone=True)
    saved = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert {"task", "split", "init", "steps", "metrics", "samples"} <= set(saved)
    assert read_evaluation(tmp_path / "probe") == evaluation
    assert TASKS.get(name).primary_statistic(evaluation.samples) == pytest.approx(
        evaluation.metrics[TASKS.get(name).primary_metric], rel=1e-6, abs=1e-7
    )
    start, probed = load_model(seed_checkpoint).state_dict(), load_model(tmp_path / "probe" / "model.safetensors")
    for key, value in probed.state_dict().items():
        assert torch.equal(value, start[key]), key
    head, before = (
        load_head_state(tmp_path / "probe" / "model.safetensors", TASK_HEAD),
        initial_head(seed_checkpoint, name),
    )
    assert head.keys() == before.keys()
    assert all(not torch.equal(head[key], before[key]) for key in head), "every head tensor trains"
    resumable = torch.load(tmp_path / "probe" / "checkpoint.pt", weights_only=True)
    assert set(resumable["modules"]) == {"head"}  # the model is the init's, read again on resume
    optimized = sum(len(group["params"]) for group in resumable["optimizer"]["param_groups"])
    assert optimized == len(head)  # the optimizer holds the head's parameters alone
    assert open_checkpoint(tmp_path / "probe" / "model.safetensors").metadata["task"] == name


def test_fine_tuning_changes_the_backbone(seed_checkpoint, tmp_path):
    finetune(seed_checkpoint, tmp_path / "finetune", "classify_image", freeze_backbone=False)
    start = load_model(seed_checkpoint).state_dict()
    tuned = load_model(tmp_path / "finetune" / "model.safetensors").state_dict()
    changed = [key for key, value in tuned.items() if not torch.equal(value, start[key])]
    assert any(key.startswith("blocks.") for key in changed), changed
