"""End-to-end merges through files and the CLI; every bad input gets one clear error and no output."""

import json
import pickle

import pytest
import torch
from conftest import make_inputs
from pydantic import Field
from safetensors import safe_open

from vlmerge.cli.main import main
from vlmerge.core.config import StrictConfig
from vlmerge.data.config import DataConfig
from vlmerge.io.checkpoint import file_sha256, open_checkpoint, save_checkpoint
from vlmerge.io.grams import open_grams, save_grams
from vlmerge.merging import (
    MERGE_METHODS,
    MergeInputs,
    build_merge_plan,
    merge_checkpoint,
    register_method,
    unregister_method,
)
from vlmerge.merging.grams import collect_grams
from vlmerge.merging.inspection import format_summary, summarize
from vlmerge.merging.provenance import metadata_warnings
from vlmerge.merging.registry import Statistics
from vlmerge.metrics import mergeability
from vlmerge.models import VLTransformer, count_parameters, load_model, model_config, save_model
from vlmerge.tasks.finetune import run_checkpoint
from vlmerge.training.setup import resolve_data


@pytest.fixture
def files(specific_model, tmp_path):
    seed = VLTransformer(specific_model.config.agnostic())
    inputs = make_inputs(specific_model.config)
    grams, info = collect_grams(
        specific_model,
        [inputs, {"images": inputs["images"]}, {"text_ids": inputs["text_ids"], "text_mask": inputs["text_mask"]}],
    )
    source = save_model(specific_model, tmp_path / "specific.safetensors")
    provenance = {"data": "test", "checkpoint": {"path": str(source), "sha256": file_sha256(source)}}
    return {
        "source": source,
        "seed": save_model(seed, tmp_path / "seed.safetensors"),
        "grams": save_grams(tmp_path / "grams.safetensors", grams, info, provenance),
        "out": tmp_path / "out" / "merged.safetensors",
    }


def cli(*args) -> int:
    return main([str(a) for a in args])


# Every method the fixture's files serve: a seed and an ordinary Gram file (not a Fisher or a sequential one).
FILE_METHODS = [
    name
    for name in MERGE_METHODS
    if MERGE_METHODS.get(name).statistics in (None, Statistics.GRAMS)
    and MERGE_METHODS.get(name).check_statistics is None
]


@pytest.mark.parametrize("method", FILE_METHODS)
def test_cli_merge_writes_a_strictly_loadable_self_describing_checkpoint(files, method, capsys):
    # A method that takes two experts per tensor (slerp) merges v and l: the fusion layers of `all` have three.
    selection = "retrieval" if MERGE_METHODS.get(method).max_experts == 2 else "all"
    assert (
        cli(
            "merge",
            files["source"],
            "--method",
            method,
            "--experts",
            selection,
            "--seed-checkpoint",
            files["seed"],
            "--grams",
            files["grams"],
            "--out",
            files["out"],
            "--quiet",
        )
        == 0
    )
    merged = load_model(files["out"])  # strict: no missing or unexpected keys
    assert not merged.config.is_multiway
    with safe_open(str(files["out"]), "pt") as handle:
        record = json.loads(handle.metadata()["merge"])
    assert record["method"] == method and record["selection"] == selection
    assert len(record["inputs"]["source"]["sha256"]) == 64
    assert "parameters:" in capsys.readouterr().out


def test_passthrough_tensors_are_unchanged_and_the_model_is_about_half_the_size(files):
    source = open_checkpoint(files["source"])
    merge_checkpoint(files["source"], "interpolation", out=files["out"])
    merged = open_checkpoint(files["out"])
    for key in ["blocks.0.gamma_1", "pos_embed", "text_embed.word.weight", "pooler.dense.weight"]:
        assert torch.equal(merged.get(key), source.get(key))
    base = model_config("base")
    with torch.device("meta"):
        specific, agnostic = VLTransformer(base), VLTransformer(base.agnostic())
    assert count_parameters(agnostic, True) / count_parameters(specific, True) == pytest.approx(0.46, abs=0.01)


def test_task_selection_picks_the_experts_each_task_uses(files):
    source = open_checkpoint(files["source"])
    fusion = 2  # micro: the last two of four layers
    vqa_out, retrieval_out = files["out"].with_name("vqa.safetensors"), files["out"].with_name("retrieval.safetensors")
    merge_checkpoint(files["source"], "interpolation", {"ratio": 0.5}, out=vqa_out, selection="vqa")
    retrieval = merge_checkpoint(
        files["source"], "interpolation", {"ratio": 0.5}, out=retrieval_out, selection="retrieval"
    )
    key = f"blocks.{fusion}.mlp.fc1.weight"
    assert torch.equal(open_checkpoint(vqa_out).get(key), source.get(f"blocks.{fusion}.mlp.vl.fc1.weight"))
    expected = 0.5 * source.get(f"blocks.{fusion}.mlp.v.fc1.weight") + 0.5 * source.get(
        f"blocks.{fusion}.mlp.l.fc1.weight"
    )
    torch.testing.assert_close(open_checkpoint(retrieval_out).get(key), expected)
    assert any(".vl." in k for k in retrieval.plan.dropped)


def test_metrics_and_inspect(files, capsys):
    assert cli("metrics", files["source"], "--reference", files["seed"], "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["model"]) == {"l2", "l2_normalized", "cosine", "ssd", "tssd"}
    assert report["relative_to_reference"] is True
    assert cli("inspect", files["source"], "--plan", "vqa") == 0
    out = capsys.readouterr().out
    assert "modality-specific" in out and "fusion layer  2" in out and "-> merge vl" in out


# ----------------------------------------------------------------------------- bad input
def corrupt(files, tmp_path, kind):
    """Write a broken input of the given kind; return the CLI arguments that use it."""
    state = open_checkpoint(files["source"]).state_dict()
    bad = tmp_path / "bad.safetensors"
    if kind == "shapes":
        state["blocks.1.mlp.l.fc1.weight"] = torch.zeros(7, 32)
    elif kind == "missing-expert":
        del state["blocks.1.mlp.l.fc2.bias"]
    elif kind == "nan":
        state["blocks.0.attn.v.qkv.weight"][0, 0] = float("nan")
    elif kind == "inf-seed":
        seed = open_checkpoint(files["seed"]).state_dict()
        seed["blocks.0.mlp.fc1.weight"][0, 0] = float("inf")
        save_checkpoint(bad, seed)
        return [files["source"], "--method", "arithmetic", "--seed-checkpoint", bad]
    elif kind == "pickle-with-code":
        bad = tmp_path / "bad.ckpt"
        bad.write_bytes(pickle.dumps({"state_dict": state, "hparams": Exploit()}))
        return [bad, "--method", "interpolation"]
    elif kind == "truncated":
        bad.write_bytes(files["source"].read_bytes()[:-100])
        return [bad, "--method", "interpolation"]
    elif kind in ("garbage-header", "offsets-past-end"):
        bad.write_bytes(broken_header(files["source"].read_bytes(), kind))
        return [bad, "--method", "interpolation"]
    elif kind == "inf-gram":  # read lazily, so found mid-stream: the half-written output must vanish
        grams = open_grams(files["grams"])
        broken = {k: grams.get(k) for k in grams.keys}
        broken["blocks.3.mlp.l.fc2"][1, 1] = float("inf")
        save_grams(bad, broken, {}, grams.provenance)
        return [files["source"], "--method", "regmean", "--grams", bad]
    elif kind == "unknown-key":  # a typo in a shared tensor's name
        state["pooler.dence.weight"] = state.pop("pooler.dense.weight")
    elif kind == "unknown-expert-key":  # a complete v/l pair the plan would merge, but the model has no fc3
        state |= {f"blocks.0.mlp.{m}.fc3.weight": torch.zeros(4, 4) for m in ("v", "l")}
    elif kind == "missing-shared":  # not an expert, so only the model's layout knows it is needed
        del state["pos_embed"]
    elif kind == "gram-size":
        save_grams(bad, {"blocks.0.mlp.v.fc1": torch.eye(5, dtype=torch.float64)}, {}, {})
        return [files["source"], "--method", "regmean", "--grams", bad]
    elif kind == "unknown-method":
        return [files["source"], "--method", "regmeen"]
    elif kind == "no-seed":
        return [files["source"], "--method", "ties"]
    save_checkpoint(bad, state, open_checkpoint(files["source"]).metadata)  # keeps the config
    return [bad, "--method", "interpolation"]


def broken_header(raw: bytes, kind: str) -> bytes:
    """The file with a valid 8-byte length prefix but a broken header: not JSON, or offsets past the end."""
    length = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    if kind == "garbage-header":
        encoded = b"{not json" + b" " * (length - 9)
    else:  # the last tensor's end offset points 4 KB past the end of the file
        last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        start, end = header[last]["data_offsets"]
        header[last] |= {"shape": [(end - start + 4096) // 4], "data_offsets": [start, end + 4096]}
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + body


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


BAD_INPUTS = {
    "shapes": "differ in shape",
    "missing-expert": "missing expert for blocks.1.mlp.fc2.bias",
    "nan": "NaN or Inf",
    "inf-seed": "NaN or Inf",
    "pickle-with-code": "not a torch file vlmerge reads",  # a plain pickle: refused before its globals are resolved
    "truncated": "truncated",
    "garbage-header": "not a readable safetensors file",
    "offsets-past-end": "not a readable safetensors file",
    "inf-gram": "Gram matrix blocks.3.mlp.l.fc2 contains NaN or Inf",
    "unknown-key": "unknown tensor 'pooler.dence.weight', not part of the model its config describes; "
    "did you mean 'pooler.dense.weight'?",
    "unknown-expert-key": "unknown tensor 'blocks.0.mlp.l.fc3.weight'",
    "missing-shared": "missing tensor 'pos_embed', which the model its config describes needs",
    "gram-size": "Gram matrix blocks.0.mlp.v.fc1 is [5, 5]",
    "unknown-method": "did you mean 'regmean'",
    "no-seed": "needs the seed checkpoint",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_error_and_no_output(files, tmp_path, capsys, kind):
    args = corrupt(files, tmp_path, kind)
    assert cli("merge", *args, "--out", files["out"], "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and BAD_INPUTS[kind] in err[0], err
    assert not files["out"].exists()
    assert not list(files["out"].parent.glob("*")) if files["out"].parent.exists() else True


SINGULAR = "summed Gram matrix is singular; using the minimum-norm least-squares solution"


def test_singular_grams_still_merge_with_one_warning_per_tensor(files, tmp_path, capsys):
    """Not an error: the documented fallback for a singular Gram sum is least squares, and it says so."""
    grams = open_grams(files["grams"])
    singular = {}
    for key in grams.keys:  # no token ever reached input 0 of any layer: row and column 0 are zero
        singular[key] = grams.get(key).clone()
        singular[key][0, :] = singular[key][:, 0] = 0
    singular_path = save_grams(tmp_path / "singular.safetensors", singular, {}, grams.provenance)
    assert (
        cli("merge", files["source"], "--method", "regmean", "--grams", singular_path, "--out", files["out"], "--quiet")
        == 0
    )

    source = open_checkpoint(files["source"])
    plan = build_merge_plan({k: source.shape(k) for k in source.keys})
    linear = [g for g in plan.groups if g.is_linear_weight and len(g.experts) > 1]
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert sorted(warned) == sorted(f"warning: {g.target}: {SINGULAR}" for g in linear)
    merged = open_checkpoint(files["out"])
    recorded = json.loads(merged.metadata["merge"])["warnings"]  # one line for the warning repeated over tensors
    assert recorded == [f"{len(linear)} tensors ({', '.join(g.target for g in linear[:3])}, ...): {SINGULAR}"]
    assert all(torch.isfinite(merged.get(key)).all() for key in merged.keys)
    load_model(files["out"])  # strict

    group = next(g for g in linear if g.target == "blocks.3.mlp.fc1.weight")  # v, l and vl experts
    weights = {m: source.get(e.key).double() for m, e in group.experts.items()}
    gram_of = {m: singular[module] for m, module in group.gram_keys().items()}
    expected = sum(weights[m] @ gram_of[m] for m in weights) @ torch.linalg.pinv(sum(gram_of.values()))
    torch.testing.assert_close(merged.get(group.target).double(), expected, rtol=1e-4, atol=1e-5)


def test_streamed_file_equals_the_in_memory_merge_and_records_late_warnings(files, tmp_path):
    from vlmerge.io.grams import open_grams
    from vlmerge.merging import merge_state_dict

    state = open_checkpoint(files["source"]).state_dict()
    partial = tmp_path / "partial-grams.safetensors"  # no Gram matrices for the l experts: fallback warnings
    grams = open_grams(files["grams"])
    save_grams(partial, {k: grams.get(k) for k in grams.keys if ".l." not in k}, {}, grams.provenance)
    with pytest.warns(Warning):
        expected = merge_state_dict(state, "regmean", {"alpha": 0.5}, grams=open_grams(partial))
    result = merge_checkpoint(files["source"], "regmean", {"alpha": 0.5}, grams=partial, out=files["out"])
    streamed = open_checkpoint(files["out"])
    assert sorted(streamed.keys) == sorted(expected.tensors)
    for key, tensor in expected.tensors.items():
        assert torch.equal(streamed.get(key), tensor), key
    record = json.loads(streamed.metadata["merge"])
    assert result.warnings == expected.warnings and len(result.warnings) > 0
    assert record["warnings"] == metadata_warnings(result.warnings)


# ----------------------------------------------------------------------------- methods from the registry
class OffsetOptions(StrictConfig):
    offset: float = Field(0.0, description="added to every entry of the plain average")
    scales: dict[str, float] = Field(default_factory=dict, description="per-expert factor before averaging")


def offset_mean(inputs: MergeInputs, options: OffsetOptions) -> torch.Tensor:
    """Plain average of the (scaled) experts, plus an offset."""
    scaled = [options.scales.get(m.value, 1.0) * w for m, w in inputs.experts.items()]
    return sum(scaled) / len(scaled) + options.offset


@pytest.fixture
def offset_method():
    """A method registered the way a user would; removed again so other tests see the built-in registry."""
    register_method("offset_mean", OffsetOptions)(offset_mean)
    yield "offset_mean"
    unregister_method("offset_mean")
    assert "offset_mean" not in MERGE_METHODS


def test_a_registered_method_is_usable_through_its_derived_flag_and_through_option(files, offset_method, capsys):
    source = open_checkpoint(files["source"])
    key, experts = "blocks.0.mlp.fc1.weight", ("v", "l")  # below the fusion layer: v and l only
    weights = {m: source.get(f"blocks.0.mlp.{m}.fc1.weight") for m in experts}
    for args, offset, scales in [
        (["--offset", "0.25"], 0.25, {}),
        (["--option", "offset=-1.5", "--option", 'scales={"v": 3}'], -1.5, {"v": 3.0}),
    ]:
        assert cli("merge", files["source"], "--method", offset_method, *args, "--out", files["out"], "--quiet") == 0
        merged = open_checkpoint(files["out"])
        expected = sum(scales.get(m, 1.0) * w for m, w in weights.items()) / 2 + offset
        torch.testing.assert_close(merged.get(key), expected)
        record = json.loads(merged.metadata["merge"])
        assert record["method"] == offset_method and record["options"] == {"offset": offset, "scales": scales}
    capsys.readouterr()
    assert cli("merge", files["source"], "--method", "interpolation", "--offset", "1", "--out", files["out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vlmerge merge: error: interpolation options: unknown field 'offset' (valid: ratio)"]


def test_merge_help_lists_every_option_of_every_registered_method(offset_method, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("merge", "--help")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())  # argparse wraps the flags' help
    for name in MERGE_METHODS:
        method = MERGE_METHODS.get(name)
        assert f" {name} {method.summary}" in text
        for option, field in method.options.model_fields.items():
            flag = "--" + option.replace("_", "-")
            default = field.get_default(call_default_factory=True)
            assert f"{flag} {field.description} (default {default})" in text, (name, option)
            assert f"[{flag} " in text  # a flag of its own in the usage line
    assert "--option NAME=VALUE" in text


class IntLam(StrictConfig):
    lam: int = 1


class OutOption(StrictConfig):
    out: float = 1.0


@pytest.mark.parametrize(
    "options, message",
    [
        (
            IntLam,
            "merge option 'lam' is float for arithmetic, ties, dare, dare_ties, breadcrumbs, breadcrumbs_ties, della, "
            "della_ties, magmax, tsv, iso_c, iso_cts, wudi but int for unflaggable",
        ),
        (OutOption, "merge option 'out' of unflaggable clashes with `vlmerge merge --out`"),
    ],
)
def test_an_option_the_command_line_cannot_express_fails_when_the_parser_is_built(options, message, capsys):
    register_method("unflaggable", options)(offset_mean)
    try:
        assert cli("inspect", "x.safetensors") == 2  # every command: the parser is built first
    finally:
        unregister_method("unflaggable")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_option_values_reach_the_method_and_only_given_ones_are_recorded(files, capsys):
    """--random-seed is DARE's random seed; `--option` and the flag name one option; what is left out is the default."""
    merged = {}
    for name, args in [
        ("flag", ["--random-seed", "7"]),
        ("option", ["--option", "random_seed=7"]),
        ("default", []),
        ("other", ["--option", "random-seed=8"]),
    ]:
        out = files["out"].with_name(f"{name}.safetensors")
        assert (
            cli(
                "merge",
                files["source"],
                "--method",
                "dare",
                "--drop",
                "0.5",
                *args,
                "--seed-checkpoint",
                files["seed"],
                "--out",
                out,
                "--quiet",
            )
            == 0
        )
        merged[name] = open_checkpoint(out)
    key = "blocks.0.mlp.fc1.weight"
    assert json.loads(merged["flag"].metadata["merge"])["options"] == {"drop": 0.5, "lam": 0.5, "random_seed": 7}
    assert torch.equal(merged["flag"].get(key), merged["option"].get(key))
    assert json.loads(merged["default"].metadata["merge"])["options"]["random_seed"] == 0
    assert not torch.equal(merged["flag"].get(key), merged["other"].get(key))


def test_global_ties_records_its_cutoffs_apart_from_the_options(files, capsys):
    assert (
        cli(
            "merge",
            files["source"],
            "--method",
            "ties",
            "--scope",
            "global",
            "--density",
            "0.3",
            "--seed-checkpoint",
            files["seed"],
            "--out",
            files["out"],
            "--quiet",
        )
        == 0
    )
    merged = open_checkpoint(files["out"])
    record = json.loads(merged.metadata["merge"])
    assert record["options"] == {"density": 0.3, "lam": 1.0, "scope": "global"}
    assert set(record["prepared"]["thresholds"]) == {"v", "l", "vl"}
    result = merge_checkpoint(
        files["source"],
        "ties",
        {"scope": "global", "density": 0.3},
        seed_checkpoint=files["seed"],
        out=files["out"].with_name("again.safetensors"),
    )
    assert {m.value: t for m, t in result.prepared.thresholds.items()} == record["prepared"]["thresholds"]
    assert "selection=all" in format_summary(summarize(merged))


def test_metrics_table_is_the_reports_own(files, capsys):
    assert cli("metrics", files["source"], "--selection", "retrieval", "--per-tensor") == 0
    table = capsys.readouterr().out
    report = mergeability(open_checkpoint(files["source"]), selection="retrieval")
    assert table == report.format_table(per_tensor=True) + "\n"
    header, *rows = table.splitlines()
    assert header.split() == list(report.model) and rows[-1].split()[0] == "model"
    assert len(rows) == len(report.tensors) + len(report.per_layer) + 1
    assert [float(v) for v in rows[-1].split()[1:]] == pytest.approx(list(report.model.values()), abs=1e-4)


def test_data_names_and_yaml_configs_resolve_at_the_checkpoints_image_size(files, tmp_path):
    image_size = open_checkpoint(files["source"]).config["image_size"]
    assert resolve_data(None, files["source"]) == DataConfig(dataset="emoji", image_size=image_size)
    assert resolve_data("emoji", files["source"], limit=5).limit == 5
    config = tmp_path / "data.yaml"
    config.write_text("dataset: emoji\nimage_size: 64\n")
    assert resolve_data(config, files["source"]) == DataConfig(dataset="emoji", image_size=64)
    assert run_checkpoint(tmp_path) == tmp_path / "model.safetensors"
    assert run_checkpoint(files["source"]) == files["source"]
