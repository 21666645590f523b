"""Fisher merging and RegMean++: each against its closed form or a hand computation, their statistics
files checked on use, and both through the command line end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import make_inputs

from vlmerge.cli.main import main
from vlmerge.core.modality import Modality
from vlmerge.data.tokenizer import RESERVED_TOKENS, TextTokenizer, TokenBatch
from vlmerge.io.checkpoint import file_sha256, open_checkpoint
from vlmerge.io.grams import open_grams, save_grams
from vlmerge.io.statistics import open_fisher, save_fisher
from vlmerge.merging import MERGE_METHODS, MergeInputs, MergeWarning, build_merge_plan, merge_checkpoint
from vlmerge.merging.grams import collect_grams
from vlmerge.merging.plan import merged_key, parse_expert_key
from vlmerge.merging.regmean_pp import SequentialOptions, collect_sequential_grams
from vlmerge.models import VLTransformer, load_model, model_config, save_model
from vlmerge.models.heads import PretrainingHeads
from vlmerge.training.fisher import collect_fisher
from vlmerge.training.objectives import ObjectiveWeights, PairBatch, PretrainingObjective, pretraining_losses

V, L, VL = Modality.V, Modality.L, Modality.VL
MASK_ID = 4  # any id: the objectives below that read it are off


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(method: str, inputs: MergeInputs, **options) -> torch.Tensor:
    entry = MERGE_METHODS.get(method)
    return entry.fn(inputs, entry.options.parse(options))


def cli(*args) -> int:
    return main([str(a) for a in args])


def pair_batches(config, count: int = 2, batch: int = 3) -> list[PairBatch]:
    """Synthetic image-text pairs (one caption padded), one word per token."""
    batches = []
    for seed in range(count):
        x = make_inputs(config, batch=batch, seed=seed)
        mask = x["text_mask"]
        words = torch.where(mask, torch.arange(mask.shape[1]).expand_as(mask), -1)
        batches.append(PairBatch(x["images"], TokenBatch(x["text_ids"], mask, words)))
    return batches


# ----------------------------------------------------------------------------- Fisher: the method
def test_fisher_with_equal_fishers_is_the_plain_mean():
    experts = {m: rand(5, 4, seed=i) for i, m in enumerate((V, L, VL))}
    shared = rand(5, 4, seed=9).abs() + 0.1
    merged = run("fisher", MergeInputs("w", experts, fisher={m: shared.clone() for m in experts}))
    np.testing.assert_allclose(merged.numpy(), sum(w.numpy() for w in experts.values()) / 3, rtol=1e-12)


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_fisher_against_its_closed_form_with_random_fishers(floor):
    experts = {m: rand(6, 3, seed=i) for i, m in enumerate((V, L, VL))}
    fisher = {m: rand(6, 3, seed=10 + i).square() for i, m in enumerate((V, L, VL))}
    fisher[V][0, 0] = 0.0  # one expert's entry unconstrained: the others decide it (or the floor)
    merged = run("fisher", MergeInputs("w", experts, fisher=fisher), fisher_floor=floor)
    weight = {m: np.maximum(fisher[m].numpy(), floor) for m in experts}
    expected = sum(weight[m] * experts[m].numpy() for m in experts) / sum(weight.values())
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-12)


def test_normalize_weighs_each_expert_by_its_fisher_norm_over_the_whole_model():
    method = MERGE_METHODS.get("fisher")
    options = method.options.parse({"normalize": True})
    tensors = [
        MergeInputs(
            f"w{t}",
            {m: rand(4, 2, seed=10 * t + i) for i, m in enumerate((V, L))},
            fisher={m: rand(4, 2, seed=100 + 10 * t + i).square() * (1 + 99 * (m is V)) for i, m in enumerate((V, L))},
        )
        for t in range(2)
    ]
    norms = method.prepare(tensors, options)
    for inputs in tensors:
        merged = method.fn(MergeInputs(inputs.target, inputs.experts, fisher=inputs.fisher, prepared=norms), options)
        scale = {m: 1 / np.sqrt(sum(float((t.fisher[m].numpy() ** 2).sum()) for t in tensors)) for m in (V, L)}
        weight = {m: scale[m] * inputs.fisher[m].numpy() for m in (V, L)}
        expected = sum(weight[m] * inputs.experts[m].numpy() for m in (V, L)) / sum(weight.values())
        np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-10)
    unnormalized = run("fisher", MergeInputs("w0", tensors[0].experts, fisher=tensors[0].fisher))
    assert not torch.allclose(
        unnormalized,
        method.fn(MergeInputs("w0", tensors[0].experts, fisher=tensors[0].fisher, prepared=norms), options),
    )


def test_an_expert_no_token_reached_or_an_entry_no_expert_constrains_falls_back_to_the_plain_mean():
    experts = {m: rand(3, 3, seed=i) for i, m in enumerate((V, L, VL))}
    mean = sum(experts.values()) / 3
    fisher = {
        V: rand(3, 3, seed=5).square(),
        L: rand(3, 3, seed=6).square(),
        VL: torch.zeros(3, 3, dtype=torch.float64),
    }
    with pytest.warns(MergeWarning, match=r"Fisher of expert\(s\) \['vl'\] is all zero"):
        merged = run("fisher", MergeInputs("w", experts, fisher=fisher))
    torch.testing.assert_close(merged, mean)
    with pytest.warns(MergeWarning, match=r"no Fisher statistics for expert\(s\) \['l'\]"):
        torch.testing.assert_close(run("fisher", MergeInputs("w", experts, fisher={**fisher, L: None})), mean)

    fisher[VL] = rand(3, 3, seed=7).square()
    for m in fisher:
        fisher[m][1, 2] = 0.0  # nothing constrains this entry
    with pytest.warns(MergeWarning, match="1 of 9 entries have zero Fisher in every expert"):
        merged = run("fisher", MergeInputs("w", experts, fisher=fisher))
    assert merged[1, 2] == pytest.approx(float(mean[1, 2]), rel=1e-12)
    weighted = sum(fisher[m] * experts[m] for m in experts) / sum(fisher.values())
    assert merged[0, 0] == pytest.approx(float(weighted[0, 0]), rel=1e-12)


# ----------------------------------------------------------------------------- Fisher: the statistics
@pytest.fixture
def objective(micro_config):
    torch.manual_seed(0)
    model = VLTransformer(micro_config)
    heads = PretrainingHeads(micro_config.width, micro_config.vocab_size)
    return PretrainingObjective(model, heads, ObjectiveWeights(itm=0, mlm=0), MASK_ID)


def test_fisher_statistics_are_the_mean_squared_batch_gradients(objective):
    batches = pair_batches(objective.model.config)
    statistics = collect_fisher(objective, enumerate(batches))
    assert statistics.batches == 2
    model = objective.model
    assert all(p.grad is None for p in model.parameters())  # collect_fisher leaves .grad alone
    entries = [
        ("blocks.0.attn.v.qkv.weight", (3, 5)),
        ("blocks.1.mlp.l.fc2.bias", (7,)),
        ("blocks.3.norm1.vl.weight", (2,)),
    ]
    by_hand = {key: [] for key, _ in entries}
    for batch in batches:  # the pre-training loss of each batch, differentiated by autograd, squared
        model.zero_grad()
        pretraining_losses(model, objective.heads, batch, objective.weights, MASK_ID)["loss"].backward()
        for key, index in entries:
            by_hand[key].append(float(model.get_parameter(key).grad[index]) ** 2)
    for key, index in entries:
        assert float(statistics.fisher[key][index]) == pytest.approx(np.mean(by_hand[key]), rel=1e-5)
    assert (
        statistics.fisher["blocks.0.attn.v.qkv.weight"].shape == model.get_parameter("blocks.0.attn.v.qkv.weight").shape
    )
    assert statistics.info["blocks.3.norm1.vl.weight"] == {"modality": "vl", "batches": 2}
    assert all(parse_expert_key(key) is not None for key in statistics.fisher)  # the experts, nothing shared


def test_experts_no_objective_reaches_get_zero_fisher_and_the_merge_says_so(objective, tmp_path):
    """With ITC alone no token is routed to a vl expert: its Fisher is zero, and the fusion layers' tensors
    fall back to the plain mean with a warning; below them the merge is Fisher-weighted."""
    only_itc = PretrainingObjective(objective.model, objective.heads, ObjectiveWeights(itc_vl=0, itm=0, mlm=0), MASK_ID)
    statistics = collect_fisher(only_itc, enumerate(pair_batches(objective.model.config)))
    assert statistics.info["blocks.2.mlp.vl.fc1.weight"]["batches"] == 0
    assert not statistics.fisher["blocks.2.mlp.vl.fc1.weight"].any()
    source = save_model(objective.model, tmp_path / "specific.safetensors")
    provenance = {"checkpoint": {"path": str(source), "sha256": file_sha256(source)}}
    fisher_path = save_fisher(tmp_path / "fisher.safetensors", statistics.fisher, statistics.info, provenance)
    result = merge_checkpoint(source, "fisher", fisher=fisher_path, out=tmp_path / "merged.safetensors")
    fusion_warnings = [note for note in result.warnings if "Fisher of expert(s) ['vl'] is all zero" in note]
    fusion_targets = {g.target for g in result.plan.groups if g.layer >= objective.model.config.fusion_layer}
    assert {note.split(":")[0] for note in fusion_warnings} == fusion_targets
    reader, merged = open_checkpoint(source), open_checkpoint(tmp_path / "merged.safetensors")
    key = "blocks.2.mlp.fc1.weight"
    expected = sum(reader.get(f"blocks.2.mlp.{m}.fc1.weight") for m in ("v", "l", "vl")) / 3
    torch.testing.assert_close(merged.get(key), expected)
    below = "blocks.0.mlp.fc1.weight"
    f = {m: statistics.fisher[f"blocks.0.mlp.{m}.fc1.weight"] for m in ("v", "l")}
    w = {m: reader.get(f"blocks.0.mlp.{m}.fc1.weight").double() for m in ("v", "l")}
    torch.testing.assert_close(merged.get(below).double(), (f["v"] * w["v"] + f["l"] * w["l"]) / (f["v"] + f["l"]))
    record = json.loads(merged.metadata["merge"])
    assert record["inputs"]["fisher"]["sha256"] == file_sha256(fisher_path)


# ----------------------------------------------------------------------------- RegMean++
def gram_batches(config) -> list[dict]:
    inputs = make_inputs(config, batch=3)
    return [{"images": inputs["images"]}, {"text_ids": inputs["text_ids"], "text_mask": inputs["text_mask"]}, inputs]


def gram_set(path, grams, info, provenance=None):
    return open_grams(save_grams(path, grams, info, provenance or {}))


def test_regmean_pp_on_a_one_layer_model_equals_regmean(tmp_path):
    from vlmerge.merging import merge_state_dict

    torch.manual_seed(0)
    model = VLTransformer(model_config("micro", depth=1, layer_scale_init=1.0))
    batches = gram_batches(model.config)
    plain, plain_info = collect_grams(model, batches)
    sequential, info = collect_sequential_grams(model, batches, SequentialOptions(alpha=0.6))
    assert sequential.keys() == plain.keys() and info == plain_info
    assert all(torch.equal(sequential[k], plain[k]) for k in plain)  # no merged layer below layer 0
    record = {"sequential": SequentialOptions(alpha=0.6).model_dump(mode="json")}
    state = model.state_dict()
    pp = merge_state_dict(
        state, "regmean_pp", {"alpha": 0.6}, grams=gram_set(tmp_path / "s.safetensors", sequential, info, record)
    )
    regmean = merge_state_dict(
        state, "regmean", {"alpha": 0.6}, grams=gram_set(tmp_path / "p.safetensors", plain, plain_info)
    )
    assert pp.tensors.keys() == regmean.tensors.keys()
    assert all(torch.equal(pp.tensors[k], regmean.tensors[k]) for k in regmean.tensors)


def test_regmean_pp_grams_of_layer_one_come_from_the_model_whose_layer_zero_is_merged(tmp_path):
    from vlmerge.merging import merge_state_dict

    torch.manual_seed(0)
    model = VLTransformer(model_config("micro", depth=2, fusion_layer=1, layer_scale_init=1.0))
    batches = gram_batches(model.config)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    sequential, _ = collect_sequential_grams(model, batches, SequentialOptions(alpha=0.8))
    plain, plain_info = collect_grams(model, batches)

    # By hand: merge layer 0 by RegMean with the model's own Gram matrices, put it into every expert of
    # layer 0, then take X^T X of what layer 1's experts see.
    state = model.state_dict()
    merged = merge_state_dict(
        state, "regmean", {"alpha": 0.8}, grams=gram_set(tmp_path / "g.safetensors", plain, plain_info)
    )
    hybrid = VLTransformer(model.config)
    hybrid.load_state_dict(
        {
            k: merged.tensors[merged_key(k)] if k.startswith("blocks.0.") and parse_expert_key(k) else v
            for k, v in state.items()
        }
    )
    seen = {}  # what layer 1 receives: its input and the stream's token mask
    hook = hybrid.blocks[1].register_forward_pre_hook(lambda _, args: seen.update(x=args[0], mask=args[2]))
    expected = {}
    for batch, module, expert in [
        (batches[0], "blocks.1.attn.v.qkv", "v"),
        (batches[1], "blocks.1.attn.l.qkv", "l"),
        (batches[2], "blocks.1.attn.vl.qkv", "vl"),
    ]:
        with torch.no_grad():
            hybrid(**batch)
            x = hybrid.blocks[1].norm1[expert](seen["x"])
        rows = x[seen["mask"]] if seen["mask"] is not None else x.reshape(-1, x.shape[-1])
        expected[module] = rows.double().T @ rows.double()
    hook.remove()

    for module, gram in expected.items():
        torch.testing.assert_close(sequential[module], gram, rtol=1e-4, atol=1e-6 * float(gram.abs().max()))
        assert not torch.allclose(plain[module], gram, rtol=1e-3)  # the unmerged model's would differ
    for module in [k for k in plain if k.startswith("blocks.0.")]:
        assert torch.equal(sequential[module], plain[module])  # layer 0 sees the experts' shared embeddings
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())  # the pass merged a copy


# ----------------------------------------------------------------------------- files, checked on use
@pytest.fixture
def files(micro_config, tmp_path):
    """A micro checkpoint with its pre-training heads, its Fisher file, its ordinary and sequential Gram files."""
    torch.manual_seed(0)
    model = VLTransformer(micro_config)
    heads = PretrainingHeads(micro_config.width, micro_config.vocab_size)
    source = save_model(model, tmp_path / "specific.safetensors", heads={"heads": heads})
    checkpoint = {"path": str(source), "sha256": file_sha256(source)}
    objective = PretrainingObjective(model, heads, ObjectiveWeights(itm=0, mlm=0), MASK_ID)
    statistics = collect_fisher(objective, enumerate(pair_batches(micro_config)))
    batches = gram_batches(micro_config)
    plain, plain_info = collect_grams(model, batches)
    sequential, info = collect_sequential_grams(model, batches, SequentialOptions(alpha=0.5))
    record = {"checkpoint": checkpoint, "sequential": {"alpha": 0.5, "selection": "all"}}
    return {
        "source": source,
        "statistics": statistics,
        "fisher": save_fisher(
            tmp_path / "fisher.safetensors", statistics.fisher, statistics.info, {"checkpoint": checkpoint}
        ),
        "grams": save_grams(tmp_path / "grams.safetensors", plain, plain_info, {"checkpoint": checkpoint}),
        "sequential": save_grams(tmp_path / "sequential.safetensors", sequential, info, record),
        "out": tmp_path / "out" / "merged.safetensors",
    }


def refused(capsys, args, message, out) -> str:
    capsys.readouterr()
    assert cli(*args, "--out", out, "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
    return err[0]


def test_a_fisher_file_of_another_checkpoint_is_refused_unless_allowed(files, tmp_path, capsys):
    other = "cd" * 32
    statistics = files["statistics"]
    foreign = save_fisher(
        tmp_path / "foreign.safetensors",
        statistics.fisher,
        statistics.info,
        {"checkpoint": {"path": "x", "sha256": other}},
    )
    args = ["merge", files["source"], "--method", "fisher", "--fisher", foreign]
    line = refused(
        capsys, args, f"Fisher file {foreign} was collected from checkpoint x (sha256 {other})", files["out"]
    )
    assert f"(sha256 {file_sha256(files['source'])})" in line and "--allow-foreign-fisher" in line
    assert cli(*args, "--allow-foreign-fisher", "--out", files["out"], "--quiet") == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: Fisher file")]
    assert len(warned) == 1 and "used anyway (--allow-foreign-fisher)" in warned[0]
    own = merge_checkpoint(files["source"], "fisher", fisher=files["fisher"], out=tmp_path / "own.safetensors")
    assert own.warnings == []
    merged, expected = open_checkpoint(files["out"]), open_checkpoint(own.path)
    assert all(torch.equal(merged.get(k), expected.get(k)) for k in expected.keys)


def bad_fisher(files, tmp_path, kind):
    statistics = files["statistics"]
    fisher = dict(statistics.fisher)
    if kind == "negative":
        fisher["blocks.1.mlp.l.fc1.weight"] = fisher["blocks.1.mlp.l.fc1.weight"].clone()
        fisher["blocks.1.mlp.l.fc1.weight"][2, 3] = -1e-3
    elif kind == "nan":
        fisher["blocks.0.attn.v.proj.bias"] = fisher["blocks.0.attn.v.proj.bias"].clone()
        fisher["blocks.0.attn.v.proj.bias"][0] = float("nan")
    elif kind == "shape":
        fisher["blocks.2.mlp.vl.fc2.weight"] = torch.ones(3, 3)
    elif kind == "none-needed":
        fisher = {"blocks.9.mlp.v.fc1.weight": torch.ones(2, 2)}
    elif kind == "not-fisher":
        return files["grams"]
    provenance = {"checkpoint": {"path": str(files["source"]), "sha256": file_sha256(files["source"])}}
    return save_fisher(tmp_path / f"{kind}.safetensors", fisher, {}, provenance)


BAD_FISHER = {
    "negative": "Fisher statistics blocks.1.mlp.l.fc1.weight have negative entries",
    "nan": "Fisher statistics blocks.0.attn.v.proj.bias contain NaN or Inf",
    "shape": "Fisher statistics blocks.2.mlp.vl.fc2.weight are [3, 3] but the expert tensor is [32, 128]",
    "none-needed": "has none of the tensors this merge needs",
    "not-fisher": "not a Fisher statistics file (metadata format 'vlmerge-grams', expected 'vlmerge-fisher')",
}


@pytest.mark.parametrize("kind", list(BAD_FISHER))
def test_a_fisher_file_that_cannot_be_one_is_refused_by_name(files, tmp_path, capsys, kind):
    path = bad_fisher(files, tmp_path, kind)
    refused(capsys, ["merge", files["source"], "--method", "fisher", "--fisher", path], BAD_FISHER[kind], files["out"])


def test_fisher_needs_its_file(files, capsys):
    refused(
        capsys, ["merge", files["source"], "--method", "fisher"], "needs Fisher statistics (--fisher)", files["out"]
    )


@pytest.mark.parametrize(
    "grams, options, message",
    [
        ("grams", [], "is not sequential: its matrices come from each expert's own lower layers"),
        (
            "sequential",
            ["--alpha", "0.7"],
            "collected sequentially with alpha 0.5, selection all, but this merge uses alpha 0.7, selection all",
        ),
        (
            "sequential",
            ["--alpha", "0.5", "--selection", "retrieval"],
            "but this merge uses alpha 0.5, selection retrieval",
        ),
        ("sequential", ["--alpha", '{"attn": 0.5, "mlp": 0.7}'], "but this merge uses alpha 0.7, selection all"),
    ],
)
def test_regmean_pp_refuses_a_gram_file_not_collected_for_it(files, capsys, grams, options, message):
    args = ["merge", files["source"], "--method", "regmean_pp", "--grams", files[grams], *options]
    line = refused(capsys, args, message, files["out"])
    assert "vlmerge grams --sequential" in line


def test_regmean_pp_merges_a_sequential_file_as_regmean_does(files, tmp_path):
    from vlmerge.merging import merge_state_dict

    result = merge_checkpoint(
        files["source"], "regmean_pp", {"alpha": 0.5}, grams=files["sequential"], out=files["out"]
    )
    state = open_checkpoint(files["source"]).state_dict()
    expected = merge_state_dict(state, "regmean", {"alpha": 0.5}, grams=open_grams(files["sequential"]))
    merged = open_checkpoint(result.path)
    assert all(torch.equal(merged.get(k), t) for k, t in expected.tensors.items())
    assert json.loads(merged.metadata["merge"])["method"] == "regmean_pp"
    plain = merge_state_dict(state, "regmean", {"alpha": 0.5}, grams=open_grams(files["grams"]))
    assert not torch.allclose(merged.get("blocks.3.mlp.fc1.weight"), plain.tensors["blocks.3.mlp.fc1.weight"])
    assert torch.equal(merged.get("blocks.0.mlp.fc1.weight"), plain.tensors["blocks.0.mlp.fc1.weight"])


# ----------------------------------------------------------------------------- the command line, end to end
@pytest.fixture
def trained_checkpoint(emoji_sources, tmp_path):
    """A micro modality-specific checkpoint as `vlmerge train specific` leaves it: tokenizer, heads, run config."""
    (tmp_path / "vocab.txt").write_text("\n".join([*RESERVED_TOKENS, "a", "face", "smiling", "cat"]) + "\n")
    tokenizer = TextTokenizer.from_vocab(tmp_path / "vocab.txt")
    torch.manual_seed(0)
    config = model_config("micro", vocab_size=tokenizer.vocab_size)
    metadata = {"tokenizer": tokenizer.to_json(), "run_config": json.dumps({"objectives": {"itm": 0.5}})}
    heads = PretrainingHeads(config.width, config.vocab_size)
    return save_model(
        VLTransformer(config), tmp_path / "specific.safetensors", extra_metadata=metadata, heads={"heads": heads}
    )


def test_fisher_and_regmean_pp_from_the_command_line(trained_checkpoint, tmp_path, capsys):
    fisher_path, grams_path = tmp_path / "fisher.safetensors", tmp_path / "sequential.safetensors"
    assert cli("fisher", trained_checkpoint, "--limit", "8", "--batch-size", "4", "--out", fisher_path, "--quiet") == 0
    fisher = open_fisher(fisher_path)
    assert fisher.provenance["checkpoint"]["sha256"] == file_sha256(trained_checkpoint)
    assert fisher.provenance["objectives"]["itm"] == 0.5 and fisher.provenance["batch_size"] == 4
    examples = fisher.provenance["data"]["examples"]
    assert examples == 4 * fisher.provenance["batches"] and examples > 0
    source = open_checkpoint(trained_checkpoint)
    plan = build_merge_plan({key: source.shape(key) for key in source.keys})
    assert {e.key for g in plan.groups for e in g.experts.values()} == set(fisher.keys)  # every expert tensor

    out = tmp_path / "fisher-merged.safetensors"
    assert (
        cli(
            "merge",
            trained_checkpoint,
            "--method",
            "fisher",
            "--fisher",
            fisher_path,
            "--fisher-floor",
            "1e-12",
            "--out",
            out,
            "--quiet",
        )
        == 0
    )
    assert not load_model(out).config.is_multiway  # strict
    record = json.loads(open_checkpoint(out).metadata["merge"])
    assert record["options"] == {"fisher_floor": 1e-12, "normalize": False}
    assert record["inputs"]["fisher"]["sha256"] == file_sha256(fisher_path)

    args = ["grams", trained_checkpoint, "--limit", "8", "--batch-size", "4", "--quiet"]
    assert cli(*args, "--sequential", "--alpha", "0.9", "--out", grams_path) == 0
    assert open_grams(grams_path).provenance["sequential"] == {"alpha": 0.9, "selection": "all"}
    merged = tmp_path / "pp-merged.safetensors"
    assert (
        cli(
            "merge",
            trained_checkpoint,
            "--method",
            "regmean_pp",
            "--alpha",
            "0.9",
            "--grams",
            grams_path,
            "--out",
            merged,
            "--quiet",
        )
        == 0
    )
    load_model(merged)
    capsys.readouterr()
    assert cli(*args, "--alpha", "0.9", "--out", tmp_path / "never.safetensors") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vlmerge grams: error: --alpha set the merge of a sequential (RegMean++) pass; add --sequential"]
