"""`vlmerge tune`: typed grids, scores that equal evaluations of `vlmerge merge` outputs computed
here by another path, the best written as `vlmerge merge` writes it with the search table beside
its merge record, only the validation (and, for a probe, training) split read, and one clear error
for a bad grid before anything is merged."""

import json
from enum import Enum

import pytest
import torch
from toy_captions import WORDS, ToyCaptions

from vlmerge.cli.main import main
from vlmerge.core.errors import ConfigError
from vlmerge.data.config import DataConfig
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.merging import MERGE_METHODS, build_merge_plan, merge_checkpoint
from vlmerge.merging.engine import PreparedMerge
from vlmerge.merging.inspection import format_summary, summarize
from vlmerge.models import VLTransformer, model_config, save_model
from vlmerge.models.heads import PretrainingHeads
from vlmerge.tasks.base import Evaluation
from vlmerge.tasks.finetune import evaluate_checkpoint, run_finetune
from vlmerge.training.config import FinetuneConfig
from vlmerge.training.pretrain import HEADS
from vlmerge.tuning import (
    GridAxis,
    RetrievalScorer,
    TuneObjective,
    best_index,
    candidate_options,
    grid_points,
    parse_grid,
    read_search_table,
    tune_checkpoint,
)

SIZES = {"train": 24, "val": 20, "test": 12}
IMAGE_SIZE = 16
DATA = DataConfig(dataset="tune_toy", image_size=IMAGE_SIZE)


class ToySource(ToyCaptions):
    name = "tune_toy"
    sizes = SIZES


@pytest.fixture(scope="module", autouse=True)
def toy_source():
    with ToySource.registered():
        yield


@pytest.fixture(autouse=True)
def no_splits_yet():
    ToySource.requested.clear()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A modality-specific micro checkpoint with a tokenizer and pre-training heads, and its seed."""
    root = tmp_path_factory.mktemp("tune")
    tokenizer = TextTokenizer.train([" ".join(WORDS)], vocab_size=40, max_len=8)
    config = model_config(
        "micro", image_size=IMAGE_SIZE, vocab_size=tokenizer.vocab_size, max_text_len=8, layer_scale_init=1.0
    )
    torch.manual_seed(0)
    specific, seed = VLTransformer(config), VLTransformer(config.agnostic())
    heads = {HEADS: PretrainingHeads(config.width, tokenizer.vocab_size)}
    metadata = {"tokenizer": tokenizer.to_json()}
    return {
        "source": save_model(specific, root / "specific.safetensors", extra_metadata=metadata, heads=heads),
        "seed": save_model(seed, root / "seed.safetensors", extra_metadata=metadata, heads=heads),
    }


def tune(files, out, grid, method="arithmetic", fixed=None, **kwargs):
    return tune_checkpoint(
        files["source"], method, grid, fixed, out=out, data=DATA, seed_checkpoint=files["seed"], **kwargs
    )


def cli(*args) -> int:
    return main([str(a) for a in args])


def test_a_range_is_evenly_spaced_with_both_ends_and_values_are_typed_as_their_option():
    assert GridAxis.parse("lam=0.3:1.0:8", "arithmetic").values == (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert GridAxis.parse("lam=1:0:3", "arithmetic").values == (1.0, 0.5, 0.0)
    seeds = GridAxis.parse("random-seed=0:6:4", "dare")
    assert seeds == GridAxis("random_seed", (0, 2, 4, 6)) and all(type(v) is int for v in seeds.values)
    assert GridAxis.parse("random_seed=3,1", "dare").values == (3, 1)
    assert GridAxis.parse("scope=global,tensor", "ties").values == ("global", "tensor")
    assert GridAxis.parse("density=0.25, 0.5", "ties").values == (0.25, 0.5)


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_every_scalar_option_of_every_method_takes_a_grid_of_its_own_type(method):
    for name, field in MERGE_METHODS.get(method).options.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if field.is_required() or default is None or isinstance(default, list | dict):
            continue
        value = default.value if isinstance(default, Enum) else default
        text = str(value).lower() if isinstance(value, bool) else str(value)
        (parsed,) = GridAxis.parse(f"{name}={text}", method).values
        assert parsed == value and type(parsed) is type(value), (method, name)


def test_the_product_of_axes_in_the_order_given_the_last_fastest_with_the_fixed_options_beside(files):
    axes = parse_grid(["density=0.5,1.0", "lam=0.2:0.4:2"], "ties", {"scope": "global"})
    points = grid_points(axes, "ties", {"scope": "global"})
    assert points == [
        {"scope": "global", "density": density, "lam": lam} for density in (0.5, 1.0) for lam in (0.2, 0.4)
    ]
    reader = open_checkpoint(files["source"])
    plan = build_merge_plan({key: reader.shape(key) for key in reader.keys})
    full = candidate_options("dare", grid_points(parse_grid(["lam=0.5,1.5"], "dare"), "dare", {"drop": "0.25"}), plan)
    assert full == [{"drop": 0.25, "lam": lam, "random_seed": 0} for lam in (0.5, 1.5)]  # as merge records them


@pytest.mark.parametrize(
    ("method", "grid", "fixed", "message"),
    [
        ("arithmetic", ["lamm=0.1,0.2"], {}, "unknown option 'lamm' of method 'arithmetic'; did you mean 'lam'?"),
        ("arithmetic", ["density=0.1,0.2"], {}, "method 'arithmetic' has no option 'density' (an option of ties"),
        ("ties", ["density=0:1:3"], {}, "--grid density=0.0"),
        ("interpolation", ["ratio=0.5,1.5"], {}, "--grid ratio=1.5"),
        ("arithmetic", [], {}, "the grid is empty"),
        ("arithmetic", ["lam="], {}, "the grid is empty"),
        ("arithmetic", ["lam=0.1,"], {}, "an empty value"),
        ("arithmetic", ["lam=0.5:0.5:1"], {}, "COUNT of at least 2"),
        ("arithmetic", ["lam=0.5,0.5"], {}, "gives 0.5 more than once"),
        ("arithmetic", ["lam=0.5,nan"], {}, "not a finite number"),
        ("arithmetic", ["lam=0.5", "lam=0.6"], {}, "names 'lam' twice"),
        ("arithmetic", ["lam=0.5,0.6"], {"lam": "0.3"}, "'lam' is both fixed and searched"),
        ("dare", ["random_seed=0:3:3"], {}, "not all integers"),
        ("dare", ["random_seed=1.5,2"], {}, "'1.5' is not an integer"),
        ("ties", ["scope=tensor,layer"], {}, "'layer' is not a choice of the option (tensor, global)"),
        ("ties", ["lam=0.5,1"], {"density": "2"}, "ties options: density"),
        ("nosuch", ["lam=0.5,1"], {}, "unknown merge method 'nosuch'"),
        ("ties", ["lam=0.5,1"], {"density": [0.5, 2.0]}, "ties options at blocks."),  # a gradient out of bounds
    ],
)
def test_a_bad_grid_is_one_clear_error_before_any_merge(files, tmp_path, monkeypatch, method, grid, fixed, message):
    def no_merge(*args, **kwargs):
        raise AssertionError("a merge was prepared before the grid was checked")

    monkeypatch.setattr("vlmerge.merging.engine.MergeFiles.prepare", no_merge)
    out = tmp_path / "best.safetensors"
    with pytest.raises(ConfigError) as error:
        tune(files, out, grid, method, fixed)
    assert message in str(error.value)
    assert not out.exists() and ToySource.requested == []


def test_scores_equal_evaluations_of_vlmerge_merge_outputs_and_the_best_is_their_first_argmax(files, tmp_path):
    result = tune(files, tmp_path / "best.safetensors", ["lam=0.25:1.0:4"])
    expected = []
    for lam in (0.25, 0.5, 0.75, 1.0):  # another path: a file per candidate, evaluated from that file
        path = merge_checkpoint(
            files["source"],
            "arithmetic",
            {"lam": lam},
            out=tmp_path / f"{lam}.safetensors",
            seed_checkpoint=files["seed"],
        ).path
        expected.append(evaluate_checkpoint(path, "retrieval", "val", DATA).metrics)
    table = result.table
    assert [c.searched for c in table.candidates] == [{"lam": lam} for lam in (0.25, 0.5, 0.75, 1.0)]
    assert [c.metrics for c in table.candidates] == expected
    scores = [metrics["mean_recall"] for metrics in expected]
    assert len(set(scores)) > 1  # the candidates differ, so picking the best means something
    assert table.best == scores.index(max(scores))
    assert result.best.score == max(scores) and result.best.options == {"lam": (0.25, 0.5, 0.75, 1.0)[table.best]}


def test_the_written_file_is_vlmerge_merge_with_the_best_options_plus_the_search_table(files, tmp_path, capsys):
    out = tmp_path / "best.safetensors"
    result = tune(files, out, ["density=0.5,1.0", "lam=0.5,1.0"], "ties", {"scope": "global"})
    best = result.best.options
    merged = tmp_path / "merged.safetensors"
    args = ["merge", files["source"], "--method", "ties", "--seed-checkpoint", files["seed"], "--out", merged]
    assert cli(*args, "--density", best["density"], "--lam", best["lam"], "--scope", "global", "--quiet") == 0
    tuned, plain = open_checkpoint(out), open_checkpoint(merged)
    assert tuned.keys == plain.keys
    assert all(torch.equal(tuned.get(key), plain.get(key)) for key in plain.keys)
    assert tuned.metadata.keys() == plain.metadata.keys()
    assert all(tuned.metadata[key] == plain.metadata[key] for key in plain.metadata if key != "merge")
    tuned_record, plain_record = json.loads(tuned.metadata["merge"]), json.loads(plain.metadata["merge"])
    search = tuned_record.pop("search")
    assert tuned_record == plain_record  # the merge record as `vlmerge merge` writes it, `prepared` included
    assert search == result.table.as_dict()
    assert "merged by     ties" in format_summary(summarize(tuned))  # `vlmerge inspect` still reads it


def test_fixed_options_may_be_coefficient_specs(files, tmp_path):
    result = tune(files, tmp_path / "best.safetensors", ["drop=0.25,0.5"], "dare", {"lam": [0.2, 0.8]})
    assert [c.options for c in result.table.candidates] == [
        {"drop": drop, "lam": [0.2, 0.8], "random_seed": 0} for drop in (0.25, 0.5)
    ]
    plain = merge_checkpoint(
        files["source"], "dare", result.best.options, out=tmp_path / "m.safetensors", seed_checkpoint=files["seed"]
    )
    tuned, merged = open_checkpoint(tmp_path / "best.safetensors"), open_checkpoint(plain.path)
    assert all(torch.equal(tuned.get(key), merged.get(key)) for key in merged.keys)


def test_the_search_table_in_the_metadata(files, tmp_path):
    out = tmp_path / "best.safetensors"
    result = tune(files, out, ["lam=0.5,1.0"])
    table = read_search_table(out)
    assert table == result.table
    record = json.loads(open_checkpoint(out).metadata["merge"])["search"]
    assert record["method"] == "arithmetic" and record["split"] == "val" and record["train_split"] is None
    assert record["objective"]["kind"] == "retrieval" and record["metric"] == "mean_recall"
    assert DataConfig.parse(record["data"]) == DATA
    assert record["grid"] == [{"name": "lam", "values": [0.5, 1.0]}]
    assert [c["options"] for c in record["candidates"]] == [{"lam": 0.5}, {"lam": 1.0}]
    assert record["best"] == best_index([c["score"] for c in record["candidates"]])


def test_ties_go_to_the_first_candidate(files, tmp_path, monkeypatch):
    assert best_index([0.1, 0.3, 0.3, 0.2]) == 1 and best_index([0.5, 0.5]) == 0
    monkeypatch.setattr(RetrievalScorer, "__call__", lambda self, tensors: Evaluation({"mean_recall": 0.5}, {}))
    out = tmp_path / "best.safetensors"
    result = tune(files, out, ["lam=0.9,0.1,0.5"])
    assert result.table.best == 0
    assert json.loads(open_checkpoint(out).metadata["merge"])["options"] == {"lam": 0.9}


def test_zero_shot_scoring_reads_the_validation_split_only(files, tmp_path):
    tune(files, tmp_path / "best.safetensors", ["lam=0.5,1.0"])
    assert set(ToySource.requested) == {"val"}


def test_a_probe_trains_on_train_scores_on_val_and_equals_fine_tuning_code_on_the_written_file(files, tmp_path):
    objective = TuneObjective(kind="probe", task="classify_image", probe_steps=3, probe_batch_size=8)
    out = tmp_path / "best.safetensors"
    result = tune(files, out, ["lam=0.5,1.0"], objective=objective)
    assert set(ToySource.requested) == {"train", "val"}
    assert result.table.metric == "accuracy" and read_search_table(out).as_dict()["train_split"] == "train"
    config = FinetuneConfig.parse(
        {
            "task": "classify_image",
            "init": str(out),
            "steps": 3,
            "checkpoint_every": 3,
            "eval_split": "val",
            "freeze_backbone": True,
            "data": DATA.model_dump(),
            "optimizer": {"batch_size": 8},
        }
    )
    assert run_finetune(config, tmp_path / "probe", progress=False).metrics == result.best.metrics
    assert "test" not in ToySource.requested


def test_a_probe_that_cannot_run_is_refused_before_any_merge(files, tmp_path, monkeypatch):
    def no_merge(self, progress=False):
        raise AssertionError("a candidate was merged before the probe was checked")

    monkeypatch.setattr(PreparedMerge, "tensors", no_merge)
    objective = TuneObjective(kind="probe", task="classify_image", probe_batch_size=64)
    with pytest.raises(ConfigError, match="probe batch size 64 exceeds the 24 training examples"):
        tune(files, tmp_path / "best.safetensors", ["lam=0.5,1.0"], objective=objective)
    with pytest.raises(ConfigError, match="zero-shot scoring is retrieval only"):
        TuneObjective.parse({"kind": "retrieval", "task": "classify_image"})


def test_cli_tune_end_to_end(files, tmp_path, capsys):
    out = tmp_path / "best.safetensors"
    common = ["tune", files["source"], "--method", "arithmetic", "--seed-checkpoint", files["seed"], "--out", out]
    assert cli(*common, "--grid", "lam=0.5:1.0:2", "--data", "tune_toy", "--json", "--quiet") == 0
    table = json.loads(capsys.readouterr().out)
    assert table == read_search_table(out).as_dict() and len(table["candidates"]) == 2
    assert set(ToySource.requested) == {"val"}
    assert cli(*common, "--grid", "lam=0.5,1.0", "--data", "tune_toy") == 0
    captured = capsys.readouterr()
    assert "[1/2] lam=0.5: mean_recall" in captured.err and "[2/2] lam=1.0: mean_recall" in captured.err
    assert f'best of 2: {{"lam": {table["candidates"][table["best"]]["options"]["lam"]}}}' in captured.out
    assert cli(*common, "--grid", "lam=0.5,1.0", "--grid", "density=0.5", "--data", "tune_toy") == 2
    assert "has no option 'density'" in capsys.readouterr().err
