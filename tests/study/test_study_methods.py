"""The study compares every merge method family: the statistics Fisher merging and RegMean++ need are
stages planned from the registry (one per specific model and seed, shared and cached), coefficient specs
are recipe options checked before any work, and the methods figure stays readable at ~18 entries."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from vlmerge.cli.main import main
from vlmerge.merging import MERGE_METHODS, register_method, unregister_method
from vlmerge.merging.fisher import FisherOptions
from vlmerge.merging.fisher import fisher as fisher_merge
from vlmerge.merging.methods import RegMeanOptions, regmean
from vlmerge.merging.registry import Statistics
from vlmerge.merging.regmean_pp import check_sequential
from vlmerge.study import plots
from vlmerge.study.assemble import sweeps
from vlmerge.study.plan import StageKind, plan_study
from vlmerge.study.recipe import MergeSpec, load_recipe
from vlmerge.study.results import Group, ModelKind, ModelResult, SweepPoint
from vlmerge.study.runner import run_study

RECIPES = Path(__file__).parents[2] / "recipes"
MICRO = yaml.safe_load((RECIPES / "micro-test.yaml").read_text())
MICRO_MERGES = MICRO["merges"]  # arithmetic and regmean (alpha 0.9)


def write_recipe(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**MICRO, **changes}))
    return path


# ----------------------------------------------------------------------------- the plan
STATISTICS_MERGES = [
    *MICRO_MERGES,
    {"method": "regmean_pp", "options": {"alpha": 0.9}},
    {"method": "regmean_pp"},  # the merge's default alpha, 1.0, is the one its Gram pass must use
    {"method": "fisher"},
    {"method": "fisher", "options": {"normalize": True}},
]


@pytest.fixture(scope="module")
def statistics_plan(tmp_path_factory):
    changes = {"random_seeds": [0, 1], "merges": STATISTICS_MERGES, "fisher": {"batch_size": 24, "limit": 300}}
    return plan_study(load_recipe(write_recipe(tmp_path_factory.mktemp("plan"), **changes)))


def test_fisher_and_sequential_grams_are_one_stage_per_specific_model_and_seed(statistics_plan):
    plan = statistics_plan
    seed_of = {run.checkpoint.key: run.random_seed for run in plan.model("specific").runs}
    fisher = [s for s in plan.stages if s.kind is StageKind.FISHER]
    grams = [s for s in plan.stages if s.kind is StageKind.GRAMS]
    # one Fisher file per specific model, both fisher merges of it read the same one
    assert sorted(seed_of[s.inputs["model"].key] for s in fisher) == [0, 1]
    for stage in fisher:
        assert stage.output.name == "fisher.safetensors"
        assert stage.settings.random_seed == seed_of[stage.inputs["model"].key]
        assert (stage.settings.split, stage.settings.batch_size, stage.settings.data.limit) == (
            "train",
            24,
            300,
        )
    ordinary = [s for s in grams if s.settings.sequential is None]
    sequential = {
        (seed_of[s.inputs["model"].key], json.dumps(s.settings.sequential.model_dump(mode="json")))
        for s in grams
        if s not in ordinary
    }
    assert sorted(seed_of[s.inputs["model"].key] for s in ordinary) == [0, 1]
    assert sequential == {
        (seed, json.dumps({"alpha": alpha, "selection": "all"})) for seed in (0, 1) for alpha in (0.9, 1.0)
    }
    assert len(grams) == 2 + 4  # no stage twice: ordinary and sequential differ by their settings


def test_each_merge_reads_the_statistics_its_registry_entry_names(statistics_plan):
    plan = statistics_plan
    position = {s.key: i for i, s in enumerate(plan.stages)}
    expected_roles = {
        "arithmetic": {"source", "seed_checkpoint"},
        "regmean": {"source", "grams"},
        "regmean_pp": {"source", "grams"},
        "fisher": {"source", "fisher"},
    }
    fisher_files = {}
    for model in plan.models.values():
        if model.merge is None or model.merge.method not in expected_roles:
            continue
        for run in model.runs:
            merge = run.checkpoint
            assert set(merge.inputs) == expected_roles[model.merge.method], model.id
            for role in set(merge.inputs) - {"source", "seed_checkpoint"}:
                statistics = merge.inputs[role]
                assert statistics.inputs["model"] is merge.inputs["source"]  # of the model it merges
                assert position[statistics.key] < position[merge.key]
            if model.merge.method == "regmean":
                assert merge.inputs["grams"].settings.sequential is None
            if model.merge.method == "regmean_pp":
                alpha = model.merge.options.get("alpha", 1.0)
                assert merge.inputs["grams"].settings.sequential.model_dump(mode="json") == {
                    "alpha": alpha,
                    "selection": "all",
                }
            if model.merge.method == "fisher":
                fisher_files.setdefault(run.random_seed, set()).add(merge.inputs["fisher"].key)
    assert {seed: len(keys) for seed, keys in fisher_files.items()} == {0: 1, 1: 1}


@pytest.fixture
def user_methods():
    """Two methods a user registers under names of their own: one merges with Fisher statistics, one
    checks its Gram file as RegMean++ does."""
    register_method("weighted_by_fisher", FisherOptions, statistics=Statistics.FISHER)(fisher_merge)
    register_method("layerwise", RegMeanOptions, statistics=Statistics.GRAMS, check_statistics=check_sequential)(
        regmean
    )
    yield
    unregister_method("weighted_by_fisher")
    unregister_method("layerwise")


def test_the_statistics_come_from_the_registry_entry_not_the_name(tmp_path, user_methods):
    merges = [{"method": "weighted_by_fisher"}, {"method": "layerwise", "options": {"alpha": 0.5}}]
    plan = plan_study(load_recipe(write_recipe(tmp_path, merges=merges)))
    (fisher_run,) = plan.model("merge-weighted_by_fisher").runs
    (layerwise_run,) = plan.model("merge-layerwise-alpha0.5").runs
    assert fisher_run.checkpoint.inputs["fisher"].kind is StageKind.FISHER
    sequential = layerwise_run.checkpoint.inputs["grams"].settings.sequential
    assert sequential.model_dump(mode="json") == {"alpha": 0.5, "selection": "all"}


def test_new_methods_leave_every_existing_stage_as_it_was(statistics_plan):
    """Adding methods to a recipe adds stages and changes none: a study's cache is reused."""
    before = plan_study(load_recipe(RECIPES / "micro-test.yaml"))
    assert {s.key for s in before.stages} <= {s.key for s in statistics_plan.stages}


def test_a_dry_run_lists_the_statistics_stages(tmp_path, capsys):
    path = write_recipe(tmp_path, random_seeds=[0, 1], merges=STATISTICS_MERGES)
    assert main(["study", str(path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("  fisher     of specific-") for line in lines) == 2
    for alpha in ("0.9", "1.0"):
        start = f"  grams      sequential (alpha {alpha}, selection all) of specific-"
        assert sum(line.startswith(start) for line in lines) == 2
    assert sum(line.startswith("  grams      of specific-") for line in lines) == 2


# ----------------------------------------------------------------------------- end to end
TINY = """
name: tiny-methods
random_seeds: [1]  # not the default 0: the Fisher pass must get the run's seed
data: {image_size: 32, limit: 200}
model: {size: micro}
tokenizer: {vocab_size: 400}
pretrain_optimizer: {batch_size: 16, lr: 2.0e-3, warmup_steps: 0}
total_steps: 4
checkpoint_every: 2
seed_fractions: [0.5]
architectures: [all]
control: false
protocols: [zeroshot]
tasks: [retrieval]
claims: [seed, size]
merges:
  - {method: fisher}
  - {method: regmean_pp, options: {alpha: 0.9}}
  - {method: tsv, options: {non_matrix: mean}}
fisher: {batch_size: 16}
gallery_size: 0
"""
ALPHA = 0.9


@pytest.fixture(scope="module")
def tiny(emoji_sources, tmp_path_factory):
    """The micro-test sizes, 4 pre-training steps and zero-shot evaluation only: every stage these
    merges need runs for real, in a few seconds."""
    out = tmp_path_factory.mktemp("tiny")
    (out / "recipe.yaml").write_text(TINY)
    recipe = load_recipe(out / "recipe.yaml")
    results = run_study(recipe, out / "study", progress=False, report=False)
    return out / "study", plan_study(recipe), results


def _file(study: Path, stage) -> Path:
    return study / "cache" / stage.name / stage.output


def _metadata(path: Path) -> dict:
    with safe_open(path, "pt") as handle:
        return handle.metadata()


def _expert_key(merged_key: str, modality: str) -> str:
    """blocks.1.mlp.fc1.weight -> blocks.1.mlp.v.fc1.weight (the paper's layout)."""
    _, layer, slot, rest = merged_key.split(".", 3)
    return f"blocks.{layer}.{slot}.{modality}.{rest}"


def _experts(specific: dict, merged_key: str) -> dict[str, torch.Tensor]:
    """The expert tensors behind one merged key; {} for a tensor outside the experts."""
    if not merged_key.startswith("blocks.") or merged_key.count(".") < 3:
        return {}
    keys = {m: _expert_key(merged_key, m) for m in ("v", "l", "vl")}
    return {m: specific[key] for m, key in keys.items() if key in specific}


def _run(plan, model_id):
    (run,) = plan.model(model_id).runs
    return run.checkpoint


def test_fisher_regmean_pp_and_tsv_run_end_to_end_and_are_scored(tiny):
    study, plan, results = tiny
    for model_id in ("merge-fisher", "merge-regmean_pp-alpha0.9", "merge-tsv-non_matrixmean"):
        model = results.model(model_id)
        assert model.kind is ModelKind.MERGED and Group.METHODS in model.groups
        assert 0.0 <= model.score("zeroshot", "retrieval").estimate.mean <= 1.0
        assert model.parameters == results.model("seed-merge").parameters  # one expert per layer, like the rest
    again = run_study(plan.recipe, study, progress=False, report=False)
    assert again.timing.stages_run == 0 and again.models == results.models


def test_the_fisher_merge_is_the_fisher_weighted_mean_of_the_specific_models_experts(tiny):
    study, plan, _ = tiny
    merge = _run(plan, "merge-fisher")
    source, fisher_file = _file(study, merge.inputs["source"]), _file(study, merge.inputs["fisher"])
    provenance = json.loads(_metadata(fisher_file)["provenance"])
    assert provenance["checkpoint"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert (provenance["batch_size"], provenance["random_seed"], provenance["data"]["split"]) == (16, 1, "train")
    specific, fisher, merged = load_file(source), load_file(fisher_file), load_file(_file(study, merge))
    merged_tensors = [key for key in merged if len(_experts(specific, key)) > 1]
    # 13 tensors per expert and layer (qkv, q and v bias, proj, fc1, fc2, two norms); v, l below the fusion layer 2
    assert len(merged_tensors) == 13 * 4 and len(fisher) == 13 * (2 + 2 + 3 + 3)
    for key in merged_tensors:
        experts = _experts(specific, key)
        weights = {m: fisher[_expert_key(key, m)].double() for m in experts}
        # every expert of this model sees tokens, so no entry takes the zero-Fisher fallback
        assert all(bool((w > 0).all()) for w in weights.values()), key
        expected = sum(weights[m] * experts[m].double() for m in experts) / sum(weights.values())
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-7)


def test_the_regmean_pp_merge_solves_with_gram_matrices_collected_sequentially_with_its_alpha(tiny):
    study, plan, _ = tiny
    merge = _run(plan, "merge-regmean_pp-alpha0.9")
    source, gram_file = _file(study, merge.inputs["source"]), _file(study, merge.inputs["grams"])
    provenance = json.loads(_metadata(gram_file)["provenance"])
    assert provenance["sequential"] == {"alpha": ALPHA, "selection": "all"}
    assert provenance["checkpoint"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    specific, grams, merged = load_file(source), load_file(gram_file), load_file(_file(study, merge))
    modules = {"qkv.weight": ".qkv", "proj.weight": ".proj", "fc1.weight": ".fc1", "fc2.weight": ".fc2"}
    checked = 0
    for key in merged:
        suffix = ".".join(key.split(".")[-2:])
        if suffix not in modules or len(experts := _experts(specific, key)) < 2:
            continue
        block, slot = key.split(".")[1], key.split(".")[2]
        shrunk = {}
        for m in experts:  # G~ = alpha G + (1 - alpha) diag(G)
            gram = grams[f"blocks.{block}.{slot}.{m}{modules[suffix]}"].double()
            shrunk[m] = ALPHA * gram + (1 - ALPHA) * torch.diag(torch.diag(gram))
        weighted = sum(experts[m].double() @ shrunk[m] for m in experts)
        expected = torch.linalg.solve(sum(shrunk.values()), weighted.T).T  # W* (sum G~) = sum W G~
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 4 * 4  # qkv, proj, fc1, fc2 in each of the micro model's 4 layers


def test_the_tsv_merge_averages_what_has_no_singular_basis(tiny):
    """non_matrix: mean with lam 1: theta_0 + mean_m (theta_m - theta_0), the experts' mean, for 1-D tensors."""
    study, plan, _ = tiny
    merge = _run(plan, "merge-tsv-non_matrixmean")
    assert "seed_checkpoint" in merge.inputs and "grams" not in merge.inputs and "fisher" not in merge.inputs
    specific, merged = load_file(_file(study, merge.inputs["source"])), load_file(_file(study, merge))
    vectors = [k for k in merged if merged[k].ndim == 1 and len(_experts(specific, k)) > 1]
    assert vectors
    for key in vectors:
        experts = list(_experts(specific, key).values())
        torch.testing.assert_close(merged[key], sum(experts) / len(experts), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- coefficient specs
COEFFICIENT_MERGES = [
    {"method": "ties", "options": {"density": {"attn": 0.3, "mlp": [0.1, 0.5]}, "lam": 1.0}},
    {"method": "arithmetic", "options": {"lam": {"v": 0.6, "l": 0.4, "default": 0.5}}},
]


def test_a_recipe_with_coefficient_specs_validates_and_plans(tmp_path):
    path = write_recipe(
        tmp_path, merges=COEFFICIENT_MERGES, main_merge={"method": "interpolation", "options": {"ratio": [0.3, 0.7]}}
    )
    plan = plan_study(load_recipe(path))
    ties = plan.model("merge-ties-density{attn:0.3,mlp:[0.1,0.5]}-lam1.0")
    assert ties.label.startswith("ties (density={attn:0.3,mlp:[0.1,0.5]}, lam=1.0)")
    (run,) = ties.runs
    assert run.checkpoint.settings.options == COEFFICIENT_MERGES[0]["options"]  # the engine resolves the spec as given
    assert "merge-arithmetic-lam{default:0.5,l:0.4,v:0.6}" in plan.models
    assert plan.model("arch-ffn-merge").merge.options == {"ratio": [0.3, 0.7]}


@pytest.mark.parametrize(
    "merge, message",
    [
        (
            {"method": "ties", "options": {"density": {"atn": 0.3}}},
            "merges.0: ties option density: unknown key 'atn', neither a role nor an expert; did you mean 'attn'?",
        ),
        (
            {"method": "interpolation", "options": {"ratio": {"v": 0.3, "default": 0.5}}},
            "merges.0: interpolation option ratio: interpolation applies ratio to each merged tensor as a whole",
        ),
        ({"method": "ties", "options": {"density": [0.5]}}, "a gradient over depth needs at least 2 values"),
        ({"method": "ties", "options": {"densty": [0.2, 0.5]}}, "did you mean 'density'?"),
        # density 0.2 + 1.4 * i / 3 over the micro model's 4 layers: 0.2, 0.67, 1.13, 1.6; layer 2 is the first above 1
        ({"method": "ties", "options": {"density": [0.2, 1.6]}}, "merges.0: ties options at blocks.2."),
        ({"method": "regmean_pp", "options": {"alpha": [0.5, 0.9]}}, "alpha must be one number here"),
    ],
)
def test_a_bad_coefficient_spec_is_one_named_error_before_any_work(tmp_path, capsys, merge, message):
    path = write_recipe(tmp_path, merges=[merge])
    assert main(["study", str(path), "--out", str(tmp_path / "study"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    "fisher, message",
    [
        ({"batch_sise": 32}, "unknown field 'fisher.batch_sise'; did you mean 'batch_size'?"),
        ({"batch_size": 1}, "fisher.batch_size: Input should be greater than or equal to 2"),
        ({"split": "validation"}, "fisher.split"),
    ],
)
def test_the_fisher_block_is_validated_like_the_grams_block(tmp_path, capsys, fisher, message):
    path = write_recipe(tmp_path, fisher=fisher)
    assert main(["study", str(path), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_a_ratio_given_as_a_spec_is_no_point_of_the_ratio_sweep():
    def merged(model_id, options):
        return ModelResult(
            model_id, model_id, ModelKind.MERGED, (Group.METHODS,), 0.5, "all", "interpolation", options, {}, 1, {}
        )

    models = {m.id: m for m in (merged("a", {"ratio": 0.75}), merged("b", {"ratio": [0.2, 0.8]}), merged("c", {}))}
    assert sweeps(models).interpolation_ratio == (SweepPoint(0.5, "c"), SweepPoint(0.75, "a"))


def test_option_labels_tell_entries_apart_and_keep_the_ids_of_plain_options():
    assert MergeSpec(method="ties", options={"lam": 1.0, "density": 0.2}).key == "ties-density0.2-lam1.0"
    assert MergeSpec(method="ties", options={"lam": 1.0, "density": 0.2}).label == "ties (density=0.2, lam=1.0)"
    assert MergeSpec(method="tsv").label == "tsv"


def test_the_full_recipe_compares_every_method_family():
    recipe = load_recipe(RECIPES / "emoji-full.yaml")
    methods = {spec.method for spec in [recipe.main_merge, *recipe.merges]}
    families = {"tsv", "iso_c", "iso_cts", "dare_ties", "breadcrumbs", "della", "fisher", "regmean_pp"}
    families |= {"wudi", "model_stock", "karcher", "magmax", "sce"}
    assert families | {"interpolation", "arithmetic", "regmean", "ties", "dare"} <= methods <= set(MERGE_METHODS)
    assert any(spec.adamerge is not None for spec in recipe.merges)  # learnt coefficients too
    plan = plan_study(recipe)
    compared = [m for m in plan.models.values() if Group.METHODS in m.groups]
    assert len(compared) == 1 + len(recipe.merges) == 23
    assert len({m.merge.label for m in compared}) == len(compared)


# ----------------------------------------------------------------------------- the figure
@pytest.fixture
def figures(monkeypatch):
    """The figures the plots save (a closed figure still holds what was drawn on it)."""
    pytest.importorskip("matplotlib")
    kept = []
    save = plots._save

    def keep(fig, path):
        kept.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def test_the_methods_figure_gives_each_method_a_row_in_every_task_panel(tmp_path, figures):
    names = [f"method {i}" for i in range(18)]
    series = {
        "retrieval": [(0.3 + 0.01 * i, 0.28 + 0.01 * i, 0.32 + 0.01 * i) for i in range(18)],
        "vqa": [None if i == 4 else (0.5, 0.45, 0.55) for i in range(18)],
    }
    plots.method_panels(tmp_path / "methods.png", "Score per method", names, series, "primary metric")
    few = plots.method_panels(tmp_path / "few.png", "Score per method", names[:4], {"vqa": series["vqa"][:4]})
    (fig, small) = figures
    retrieval, vqa = fig.axes
    assert [t.get_text() for t in retrieval.get_yticklabels()] == names  # top to bottom, in the given order
    assert [ax.get_title() for ax in fig.axes] == ["retrieval", "vqa"]
    for ax, values in ((retrieval, series["retrieval"]), (vqa, series["vqa"])):
        points = {
            round(float(line.get_ydata()[0])): float(line.get_xdata()[0])
            for line in ax.get_lines()
            if line.get_marker() == "o"
        }
        assert points == {18 - i: v[0] for i, v in enumerate(values) if v is not None}  # row 18 is the first
        (reference,) = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert float(reference.get_xdata()[0]) == values[0][0]  # the first method's estimate
    assert fig.get_size_inches()[1] > small.get_size_inches()[1] + 18 * 0.25 - 4 * 0.3
    assert few.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_names_each_method_by_its_options_in_the_figure_and_the_table(tiny, figures):
    from vlmerge.study.report import write_report

    study, _, results = tiny
    spec = {"density": {"attn": 0.3, "mlp": [0.1, 0.5]}}
    models = {
        **results.models,
        "merge-tsv-non_matrixmean": replace(
            results.model("merge-tsv-non_matrixmean"),
            options=spec,
            merge_label=MergeSpec(method="tsv", options=spec).label,  # as the study records a recipe's entry
        ),
    }
    write_report(study, replace(results, models=models))
    (methods,) = [fig for fig in figures if fig.get_suptitle().startswith("Score per method")]
    names = [t.get_text() for t in methods.axes[0].get_yticklabels()]
    assert names == [
        "interpolation (ratio=0.5)",
        "fisher",
        "regmean_pp (alpha=0.9)",
        "tsv (density={attn:0.3,mlp:[0.1,0.5]})",
    ]
    section = (study / "report.md").read_text().split("## Merging methods")[1].split("## ")[0]
    assert "| tsv | density={attn:0.3,mlp:\\[0.1,0.5\\]} |" in section
