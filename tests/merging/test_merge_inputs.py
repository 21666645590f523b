"""The merge engine's input checks: no input merges, with exit status 0, into wrong values or a file
no later stage can load, and none ends in a traceback.

Refusals are driven through the CLI and checked one way (`refused`): exit status 2, exactly one line
on stderr naming the problem, nothing written, every input as it was, and no expert tensor or Gram
matrix read before the refusal.
"""

import json
from pathlib import Path

import pytest
import torch

import vlmerge.merging.engine as engine
import vlmerge.merging.prepared_merge as prepared_merge
import vlmerge.merging.statistics_checks as statistics_checks
import vlmerge.training.fisher as training_fisher
import vlmerge.training.grams as training_grams
from vlmerge.cli.main import main
from vlmerge.core.errors import MergeError
from vlmerge.io.checkpoint import file_sha256, open_checkpoint, save_checkpoint
from vlmerge.io.grams import save_grams
from vlmerge.io.layout import Layout, foreign_keys
from vlmerge.io.statistics import save_fisher
from vlmerge.merging import build_merge_plan, merge_state_dict
from vlmerge.merging.plan import parse_expert_key
from vlmerge.merging.provenance import WARNINGS_BUDGET, metadata_warnings
from vlmerge.models import VLTransformer, load_model, model_config, save_model


def cli(*args) -> int:
    return main([str(a) for a in args])


def forbid(*_args, **_kwargs):
    raise AssertionError("a tensor was read, or an output written, before the inputs were checked")


def refused(monkeypatch, capsys, args, message, inputs, out) -> str:
    """Run the CLI; assert exit 2, one stderr line containing `message`, no output, inputs unchanged."""
    out = Path(out)
    before = {Path(path): Path(path).read_bytes() for path in inputs}
    capsys.readouterr()
    with monkeypatch.context() as patch:
        for owner, name in [
            (prepared_merge, "_read_finite"),
            (statistics_checks, "_read_gram"),
            (engine, "stream_safetensors"),
            (engine, "save_checkpoint"),
            (training_grams, "load_model"),
            (training_fisher, "load_pretraining_objective"),
        ]:
            patch.setattr(owner, name, forbid)
        code = cli(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], (code, err)
    if out not in before:
        assert not out.exists()
    assert {path: path.read_bytes() for path in before} == before
    return err[0]


def merged(capsys, args) -> list[str]:
    """Run the CLI, assert exit 0; the warning lines it printed."""
    capsys.readouterr()
    code = cli(*args)
    err = capsys.readouterr().err.splitlines()
    assert code == 0, err
    return [line.removeprefix("warning: ") for line in err if line.startswith("warning: ")]


@pytest.fixture
def source(specific_model, tmp_path) -> Path:
    return save_model(specific_model, tmp_path / "specific.safetensors")


def recorded_source(path: Path) -> dict:
    return {"checkpoint": {"path": str(path), "sha256": file_sha256(path)}}


def multi_expert_groups(path: Path):
    reader = open_checkpoint(path)
    return [g for g in build_merge_plan({k: reader.shape(k) for k in reader.keys}).groups if len(g.experts) > 1]


# ----------------------------------------------------------------------------- 1. statistics of unknown source
def identity_grams(path: Path) -> dict[str, torch.Tensor]:
    """A Gram matrix (the identity: RegMean's plain average) for every linear layer a merge of `path` solves."""
    return {
        module: torch.eye(group.shape[1], dtype=torch.float64)
        for group in multi_expert_groups(path)
        if group.is_linear_weight
        for module in group.gram_keys().values()
    }


def statistics_file(source: Path, kind: str, provenance: dict, suffix: str = ".safetensors") -> Path:
    """A Gram, sequential Gram or Fisher file for `source` whose provenance is `provenance`."""
    path = source.parent / f"{kind}{suffix}"
    if kind == "fisher":
        ones = {e.key: torch.ones(g.shape) for g in multi_expert_groups(source) for e in g.experts.values()}
        return save_fisher(path, ones, {}, provenance)
    if kind == "sequential":
        provenance = {**provenance, "sequential": {"alpha": 1.0, "selection": "all"}}
    return save_grams(path, identity_grams(source), {}, provenance)


STATISTICS = {  # kind -> (method, flag of the file, flag that lets a foreign one through, its name in messages)
    "grams": ("regmean", "--grams", "--allow-foreign-grams", "Gram file"),
    "sequential": ("regmean_pp", "--grams", "--allow-foreign-grams", "Gram file"),
    "fisher": ("fisher", "--fisher", "--allow-foreign-fisher", "Fisher file"),
}
UNVERIFIABLE = {
    "no-record": ({}, "its provenance records no checkpoint"),
    "no-hash": ({"checkpoint": {"path": "specific.safetensors"}}, "its checkpoint record has no sha256"),
    "null-hash": ({"checkpoint": {"path": "x", "sha256": None}}, "its checkpoint record has no sha256"),
    "not-a-hash": ({"checkpoint": {"path": "x", "sha256": "the source's"}}, "is not a SHA-256 hash"),
}


@pytest.mark.parametrize("variant", list(UNVERIFIABLE))
@pytest.mark.parametrize("kind", list(STATISTICS))
def test_statistics_whose_source_cannot_be_verified_need_the_flag(source, monkeypatch, capsys, kind, variant):
    provenance, why = UNVERIFIABLE[variant]
    statistics = statistics_file(source, kind, provenance)
    method, option, flag, name = STATISTICS[kind]
    out = source.parent / "merged.safetensors"
    args = ["merge", source, "--method", method, option, statistics, "--out", out, "--quiet"]
    line = refused(monkeypatch, capsys, args, f"{name} {statistics} does not say which checkpoint", [source], out)
    assert why in line and flag in line

    warned = merged(capsys, [*args, flag])
    assert warned[0].startswith(f"{name} {statistics} does not say") and f"used anyway ({flag})" in warned[0]
    assert json.loads(open_checkpoint(out).metadata["merge"])["warnings"][0] == warned[0]


def test_a_torch_gram_file_like_the_papers_needs_the_flag(source, monkeypatch, capsys):
    statistics = statistics_file(source, "grams", recorded_source(source), suffix=".pt")  # torch files keep no metadata
    out = source.parent / "merged.safetensors"
    args = ["merge", source, "--method", "regmean", "--grams", statistics, "--out", out, "--quiet"]
    line = refused(monkeypatch, capsys, args, "a .pt file records no provenance", [source], out)
    assert "--allow-foreign-grams" in line
    assert merged(capsys, [*args, "--allow-foreign-grams"])[0].endswith("used anyway (--allow-foreign-grams)")


def test_statistics_that_record_the_source_merge_without_a_warning(source, capsys):
    for kind, (method, option, _, _) in STATISTICS.items():
        statistics = statistics_file(source, kind, recorded_source(source))
        out = source.parent / f"{kind}-merged.safetensors"
        assert merged(capsys, ["merge", source, "--method", method, option, statistics, "--out", out]) == []


# ----------------------------------------------------------------------------- 2. experts that are not floating point
def with_tensors(source: Path, out: Path, changes: dict) -> Path:
    """`source`'s tensors (and, for safetensors, its metadata) with those named changed by their function."""
    reader = open_checkpoint(source)
    state = reader.state_dict()
    for key, change in changes.items():
        state[key] = change(state[key])
    return save_checkpoint(out, state, reader.metadata if out.suffix == ".safetensors" else None)


@pytest.mark.parametrize(
    "dtype, change, suffix",
    [
        ("complex64", lambda t: t.to(torch.complex64), ".pt"),  # safetensors holds no complex tensors
        ("int32", lambda t: (t * 100).to(torch.int32), ".safetensors"),
        ("bool", lambda t: t > 0, ".safetensors"),
    ],
)
def test_an_expert_that_is_not_floating_point_is_named_before_any_read(
    source, monkeypatch, capsys, dtype, change, suffix
):
    key = "blocks.1.mlp.v.fc1.weight"
    bad = with_tensors(source, source.parent / f"bad{suffix}", {key: change})
    out = source.parent / "merged.safetensors"
    args = ["merge", bad, "--method", "interpolation", "--out", out, "--quiet"]
    line = refused(monkeypatch, capsys, args, key, [bad], out)  # a reader may refuse the dtype first, by name
    assert dtype in line


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.bool])
def test_merging_an_expert_that_is_not_floating_point_is_refused_in_memory_too(specific_model, dtype):
    state = dict(specific_model.state_dict())
    key = "blocks.1.mlp.v.fc1.weight"
    state[key] = state[key].to(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(MergeError, match=f"expert tensor {key} is {name}; a merge needs floating point"):
        merge_state_dict(state, "interpolation")


def test_a_seed_tensor_that_is_not_floating_point_is_named(source, specific_model, monkeypatch, capsys):
    seed = save_model(VLTransformer(specific_model.config.agnostic()), source.parent / "seed.safetensors")
    key = "blocks.2.attn.qkv.weight"
    bad = with_tensors(seed, source.parent / "bad-seed.safetensors", {key: lambda t: t.long()})
    out = source.parent / "merged.safetensors"
    args = ["merge", source, "--method", "arithmetic", "--seed-checkpoint", bad, "--out", out, "--quiet"]
    refused(monkeypatch, capsys, args, f"seed checkpoint tensor {key} is int64", [source, bad], out)


# ----------------------------------------------------------------------------- 3. files that do not fit their model
def test_a_native_file_whose_shapes_disagree_with_its_config_is_refused(source, monkeypatch, capsys):
    narrow = {f"blocks.1.mlp.{m}.fc1.weight": (lambda t: t[:64]) for m in ("v", "l")}  # a consistent pair
    bad = with_tensors(source, source.parent / "narrow.safetensors", narrow)
    out = source.parent / "merged.safetensors"
    args = ["merge", bad, "--method", "interpolation", "--out", out, "--quiet"]
    line = refused(monkeypatch, capsys, args, "tensor 'blocks.1.mlp.v.fc1.weight' has shape [64, 32]", [bad], out)
    assert "the model its config describes has [128, 32] (1 more of another shape: blocks.1.mlp.l.fc1.weight)" in line


def released_state(config, layout: Layout) -> dict[str, torch.Tensor]:
    """A random model of `config` under `layout`'s names, as that family's code saves it."""
    torch.manual_seed(0)
    return {
        name: value.squeeze(0) if squeeze else value
        for key, value in VLTransformer(config).state_dict().items()
        for name, squeeze in foreign_keys(key, layout)
    }


def beit3_variants() -> list[tuple[str, str]]:
    """(key, change) for every key outside the layers and every key of layer 0's vision expert."""
    keys = released_state(model_config("beit3-micro"), Layout.BEIT3)
    chosen = [k for k in keys if not k.startswith("encoder.layers.") or (".0." in k and ".A." in k)]
    return [(key, change) for key in chosen for change in ("drop", "rename", "reshape")]


@pytest.fixture(scope="module")
def beit3_state():
    return released_state(model_config("beit3-micro"), Layout.BEIT3)


@pytest.mark.parametrize("key, change", beit3_variants())
def test_a_beit3_file_with_a_key_dropped_renamed_or_reshaped_never_merges_into_an_unloadable_file(
    beit3_state, tmp_path, capsys, key, change
):
    state = dict(beit3_state)
    value = state.pop(key)
    if change == "rename":
        state[f"{key}_x"] = value
    elif change == "reshape":
        state[key] = torch.zeros(value.shape[0] + 1, *value.shape[1:])
    path, out = tmp_path / "beit3.pth", tmp_path / "merged.safetensors"
    torch.save({"model": state}, path)
    code = cli("merge", path, "--method", "interpolation", "--out", out, "--quiet")
    err = capsys.readouterr().err.strip().splitlines()
    if change != "reshape":  # the file lacks a tensor the model needs
        assert code == 2, err
    if code == 2:
        assert len(err) == 1 and not out.exists(), err
    else:  # a size read from the shapes, the vocabulary say: a model of that size, and its file loads
        load_model(out)


def test_a_paper_file_at_another_image_size_needs_image_size(tmp_path, monkeypatch, capsys):
    path, out = tmp_path / "paper.ckpt", tmp_path / "merged.safetensors"
    torch.save({"state_dict": released_state(model_config("paper-micro"), Layout.REFERENCE)}, path)
    args = ["merge", path, "--method", "interpolation", "--out", out, "--quiet"]
    line = refused(monkeypatch, capsys, args, "does not fit 224-pixel images", [path], out)
    assert "--image-size" in line
    assert merged(capsys, [*args, "--image-size", 32]) == []
    assert open_checkpoint(out).config["image_size"] == 32 and load_model(out).config.relative_text_span == 24


def test_a_released_files_heads_are_named_in_the_merge_so_it_loads(tmp_path, capsys):
    state = released_state(model_config("paper-micro"), Layout.REFERENCE)
    state["itm_score.fc.weight"] = torch.randn(2, 32)  # a task head, as the paper's files carry
    path, out = tmp_path / "paper.ckpt", tmp_path / "merged.safetensors"
    torch.save({"state_dict": state}, path)
    assert merged(capsys, ["merge", path, "--method", "interpolation", "--image-size", 32, "--out", out]) == []
    assert json.loads(open_checkpoint(out).metadata["heads"]) == ["itm_score"]
    load_model(out)


def test_a_vlmo_file_without_a_relative_table_needs_heads(tmp_path, monkeypatch, capsys):
    absolute = dict(position_bias="none", image_positions=True, text_positions=True, layer_scale=False)
    path, out = tmp_path / "vlmo.ckpt", tmp_path / "merged.safetensors"
    torch.save({"state_dict": released_state(model_config("vlmo-micro", **absolute), Layout.VLMO)}, path)
    args = ["merge", path, "--method", "interpolation", "--out", out, "--quiet"]
    line = refused(monkeypatch, capsys, args, "the head count is not in the shapes", [path], out)
    assert "--heads" in line
    assert merged(capsys, [*args, "--heads", 2]) == []
    assert load_model(out).config.heads == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", 64], "tensor 'pos_embed' has shape [1, 17, 32], but the model its config describes has"),
        (["--image-size", -32], "image_size must be a positive integer, got -32"),
        (["--heads", 0], "heads must be a positive integer, got 0"),
    ],
)
def test_an_override_that_contradicts_the_shapes_or_is_no_size_is_refused(source, monkeypatch, capsys, flags, message):
    out = source.parent / "merged.safetensors"
    args = ["merge", source, "--method", "interpolation", *flags, "--out", out, "--quiet"]
    refused(monkeypatch, capsys, args, message, [source], out)


# ----------------------------------------------------------------------------- 4. warnings the header cannot hold
def test_a_merge_with_many_warnings_writes_its_file_and_prints_them_all(tmp_path, capsys):
    """48 layers of all-zero Fisher: a warning per merged tensor, more than the header's reserve holds."""
    model = VLTransformer(model_config("micro", depth=48))
    source = save_model(model, tmp_path / "deep.safetensors")
    zeros = {key: torch.zeros_like(value) for key, value in model.state_dict().items() if parse_expert_key(key)}
    fisher = save_fisher(tmp_path / "fisher.safetensors", zeros, {}, recorded_source(source))
    out = tmp_path / "merged.safetensors"
    warned = merged(capsys, ["merge", source, "--method", "fisher", "--fisher", fisher, "--out", out, "--quiet"])
    groups = multi_expert_groups(source)
    assert len(warned) == len(groups) and len(json.dumps(warned)) > engine.METADATA_RESERVE
    recorded = json.loads(open_checkpoint(out).metadata["merge"])["warnings"]
    assert recorded == metadata_warnings(warned) and len(recorded) == 2  # below the fusion layer, and from it on
    first = [g.target for g in groups if g.layer < 46][:3]
    assert recorded[0] == (
        f"{46 * len(groups) // 48} tensors ({', '.join(first)}, ...): Fisher of expert(s) ['v', 'l'] is all zero "
        "(no token reached them); using the plain average"
    )
    load_model(out)


def test_recorded_warnings_never_outgrow_their_budget():
    notes = [f'blocks.{i}.attn.qkv.weight: {i} entries "quoted" and non-ASCII é' for i in range(5000)]
    recorded = metadata_warnings(notes)
    assert sum(len(json.dumps(json.dumps(line))) + 2 for line in recorded) <= WARNINGS_BUDGET
    assert recorded[:2] == notes[:2]
    assert (
        recorded[-1]
        == f"{5001 - len(recorded)} more warning lines left out of the file's metadata (5000 warnings in all)"
    )
    assert metadata_warnings(["x" * 5000]) == ["x" * 997 + "..."]
    assert metadata_warnings(["same note", "same note"]) == ["same note (2 times)"]


# ----------------------------------------------------------------------------- 5. scalars where sizes are read
SCALAR_KEYS = {
    "paper": ("paper-micro", Layout.REFERENCE, ["transformer.cls_token", "relative_position_bias_table"]),
    "vlmo": (
        "vlmo-micro",
        Layout.VLMO,
        ["transformer.patch_embed.proj.weight", "text_embeddings.word_embeddings.weight"],
    ),
    "beit3": ("beit3-micro", Layout.BEIT3, ["vision_embed.cls_token", "encoder.embed_positions.A.weight"]),
}


@pytest.mark.parametrize("family, key", [(f, k) for f, (_, _, keys) in SCALAR_KEYS.items() for k in keys])
def test_a_scalar_where_a_released_files_sizes_are_read_is_named(tmp_path, monkeypatch, capsys, family, key):
    size, layout, _ = SCALAR_KEYS[family]
    state = released_state(model_config(size), layout)
    state[key] = torch.tensor(0.5)
    path, out = tmp_path / "released.pth", tmp_path / "merged.safetensors"
    torch.save({"model": state}, path)
    args = ["merge", path, "--method", "interpolation", "--image-size", 32, "--out", out, "--quiet"]
    refused(monkeypatch, capsys, args, f"tensor {key!r} has shape [], expected", [path], out)


# ----------------------------------------------------------------------------- 6. outputs over a data config
@pytest.mark.parametrize("command", ["grams", "fisher"])
def test_out_naming_the_data_config_is_refused_before_any_work(source, monkeypatch, capsys, command):
    data = source.parent / "data.yaml"
    data.write_text("dataset: emoji\nlimit: 8\n")
    args = [command, source, "--data", data, "--out", data, "--quiet"]
    refused(monkeypatch, capsys, args, f"{data}: is the input {data}", [source, data], data)
