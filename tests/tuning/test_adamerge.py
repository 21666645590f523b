"""`vlmerge adamerge`: λ learnt on validation pairs lowers its own objective there (recomputed here from
the written files by another path), only the validation split is read, the written spec makes `vlmerge
merge` write the same tensors bit for bit, a killed-and-resumed run equals an uninterrupted one, and a bad
input is one clear error before anything is written."""

import json

import pytest
import torch
from torch.distributions import Categorical
from toy_captions import WORDS, ToyCaptions

from vlmerge.cli.main import main
from vlmerge.core.errors import ConfigError
from vlmerge.data.config import DataConfig
from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.merging import merge_checkpoint
from vlmerge.merging.plan import merged_key
from vlmerge.models import VLTransformer, model_config, save_model
from vlmerge.models.heads import PretrainingHeads
from vlmerge.training.fisher import load_pretraining_objective
from vlmerge.training.objectives import ObjectiveWeights, contrastive_logits, pretraining_losses
from vlmerge.training.pretrain import HEADS
from vlmerge.training.setup import PairData, checkpoint_tokenizer
from vlmerge.training.trainer import step_generator
from vlmerge.tuning.adamerge import AdaMergeConfig, adamerge_checkpoint

SIZES = {"train": 32, "val": 24, "test": 12}
IMAGE_SIZE = 16
BATCH = 8
DATA = DataConfig(dataset="adamerge_toy", image_size=IMAGE_SIZE)


class ToySource(ToyCaptions):
    name = "adamerge_toy"
    sizes = SIZES


@pytest.fixture(scope="module", autouse=True)
def toy_source():
    with ToySource.registered():
        yield


def pretrain(model: VLTransformer, heads: PretrainingHeads, pairs: PairData, mask_id: int, steps: int = 40) -> None:
    optimizer = torch.optim.Adam([*model.parameters(), *heads.parameters()], lr=3e-3)
    for step in range(steps):
        batch = pairs[slice((step % 4) * BATCH, (step % 4 + 1) * BATCH)]
        loss = pretraining_losses(model, heads, batch, ObjectiveWeights(), mask_id)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A seed pre-trained a few steps, and a modality-specific micro model started from it (every expert
    a copy of the shared weight) and trained a few steps more with its pre-training heads, so that its
    task vectors mean something."""
    root = tmp_path_factory.mktemp("adamerge")
    tokenizer = TextTokenizer.train([" ".join(WORDS)], vocab_size=40, max_len=8)
    config = model_config(
        "micro", image_size=IMAGE_SIZE, vocab_size=tokenizer.vocab_size, max_text_len=8, layer_scale_init=1.0
    )
    torch.manual_seed(0)
    seed, specific = VLTransformer(config.agnostic()), VLTransformer(config)
    heads = PretrainingHeads(config.width, tokenizer.vocab_size)
    pairs = PairData.of(ToySource(DATA).pairs("train"), tokenizer)
    pretrain(seed, heads, pairs, tokenizer.mask_id)
    shared = seed.state_dict()
    specific.load_state_dict({key: shared[merged_key(key)].clone() for key in specific.state_dict()})
    pretrain(specific, heads, pairs, tokenizer.mask_id)
    metadata = {"tokenizer": tokenizer.to_json()}
    return {
        "source": save_model(specific, root / "specific.safetensors", extra_metadata=metadata, heads={HEADS: heads}),
        "seed": save_model(seed, root / "seed.safetensors", extra_metadata=metadata),
        "headless": save_model(specific, root / "headless.safetensors", extra_metadata=metadata),
    }


@pytest.fixture(autouse=True)
def no_splits_yet():
    ToySource.requested.clear()


def adamerge(files, out, **settings):
    hooks = {name: settings.pop(name) for name in ("on_step", "state") if name in settings}
    config = AdaMergeConfig(**{"steps": 12, "lr": 0.05, "batch_size": BATCH, **settings})
    return adamerge_checkpoint(
        files["source"], seed_checkpoint=files["seed"], out=out, config=config, data=DATA, **hooks
    )


def cli(*args) -> int:
    return main([str(a) for a in args])


def tensors(path) -> dict[str, torch.Tensor]:
    reader = open_checkpoint(path)
    return {key: reader.get(key) for key in reader.keys}


def heldout_mean(path, random_seed: int = 0) -> float:
    """The pre-training loss of a checkpoint file over the validation split's full batches, each drawn
    with the generator adamerge scores that batch with: recomputed from the file, not from adamerge."""
    reader = open_checkpoint(path)
    objective = load_pretraining_objective(path, reader).eval()
    pairs = PairData.of(ToySource(DATA).pairs("val"), checkpoint_tokenizer(reader, 8))
    values = []
    with torch.no_grad():
        for index in range(len(pairs) // BATCH):
            generator = step_generator(random_seed, index, "adamerge-eval")
            values.append(float(objective(pairs[slice(index * BATCH, (index + 1) * BATCH)], generator)["loss"]))
    return sum(values) / len(values)


def entropy_mean(path) -> float:
    """The mean entropy of the in-batch softmax both ways, ITC and ITC-vl weighed alike (as the default
    recipe weighs them), over the validation split's full batches: written out here, from the file."""
    reader = open_checkpoint(path)
    objective = load_pretraining_objective(path, reader).eval()
    model, heads = objective.model, objective.heads
    pairs = PairData.of(ToySource(DATA).pairs("val"), checkpoint_tokenizer(reader, 8))
    values = []
    with torch.no_grad():
        for index in range(len(pairs) // BATCH):
            batch = pairs[slice(index * BATCH, (index + 1) * BATCH)]
            each = []
            for image_head, text_head, scale, vl in (
                (heads.itc_image, heads.itc_text, heads.logit_scale, False),
                (heads.itc_vl_image, heads.itc_vl_text, heads.vl_logit_scale, True),
            ):
                image = image_head(model(images=batch.images, unimodal_through_vl=vl).cls)
                text = text_head(model(text_ids=batch.text.ids, text_mask=batch.text.mask, unimodal_through_vl=vl).cls)
                logits = contrastive_logits(image, text, scale)
                each += [Categorical(logits=logits).entropy().mean(), Categorical(logits=logits.T).entropy().mean()]
            values.append(float(sum(each) / 4))
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("objective", "granularity", "score"),
    [("heldout", "layer", heldout_mean), ("contrastive-entropy", "layer-expert", entropy_mean)],
)
def test_learnt_lambda_lowers_its_objective_on_validation_pairs_and_only_they_are_read(
    files, tmp_path, objective, granularity, score
):
    out = tmp_path / "merged.safetensors"
    result = adamerge(files, out, objective=objective, granularity=granularity)
    assert ToySource.requested == ["val"]  # the test split is never read (nor the training split)
    start = merge_checkpoint(
        files["source"], "arithmetic", {"lam": 0.3}, out=tmp_path / "start.safetensors", seed_checkpoint=files["seed"]
    ).path
    # adamerge's own numbers are those of the files, recomputed here from them
    assert result.objective_start == pytest.approx(score(start), rel=1e-5)
    assert result.objective_end == pytest.approx(score(out), rel=1e-5)
    assert result.objective_end < result.objective_start - 1e-3, (result.objective_start, result.objective_end)
    if objective == "contrastive-entropy":  # why it is not the default: confident is not right
        assert heldout_mean(out) > heldout_mean(start)
    assert len(result.losses) == 12 and result.resumed_from == 0
    record = json.loads(open_checkpoint(out).metadata["merge"])
    assert record["method"] == "arithmetic" and record["options"]["lam"] == result.spec
    assert record["adamerge"]["objective"] == objective and record["adamerge"]["objective_end"] == result.objective_end
    assert json.loads(result.spec_path.read_text()) == result.spec
    values = result.spec if granularity == "layer" else [v for each in result.spec.values() for v in each]
    assert all(0.0 <= value <= 1.0 for value in values) and len(set(values)) > 1  # λ moved, layer by layer


@pytest.mark.parametrize("granularity", ["layer", "layer-expert"])
def test_the_spec_makes_vlmerge_merge_write_the_same_tensors_bit_for_bit(files, tmp_path, capsys, granularity):
    out, spec = tmp_path / "merged.safetensors", tmp_path / "lam.json"
    assert cli(
        "adamerge", files["source"], "--seed-checkpoint", files["seed"], "--data", DATA.dataset, "--out", out,
        "--spec-out", spec, "--granularity", granularity, "--steps", 4, "--lr", 0.05, "--batch-size", BATCH, "--quiet",
    ) == 0  # fmt: skip
    assert f"lam spec -> {spec}" in capsys.readouterr().out
    again = tmp_path / "again.safetensors"
    assert cli(
        "merge", files["source"], "--seed-checkpoint", files["seed"], "--method", "arithmetic",
        "--lam", spec.read_text(), "--out", again, "--quiet",
    ) == 0  # fmt: skip
    learnt, merged = tensors(out), tensors(again)
    assert learnt.keys() == merged.keys()
    assert all(learnt[k].dtype == merged[k].dtype and torch.equal(learnt[k], merged[k]) for k in learnt)
    ours, theirs = open_checkpoint(out).metadata, open_checkpoint(again).metadata
    assert ours["config"] == theirs["config"] and ours["heads"] == theirs["heads"]
    assert json.loads(ours["merge"])["options"] == json.loads(theirs["merge"])["options"]
    if granularity == "layer-expert":
        assert set(json.loads(spec.read_text())) == {"v", "l", "vl"}


def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(files, tmp_path):
    whole = adamerge(files, tmp_path / "whole.safetensors", steps=6, checkpoint_every=2, granularity="layer-expert")

    def killed(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    out, state = tmp_path / "resumed.safetensors", tmp_path / "run.adamerge.pt"
    with pytest.raises(KeyboardInterrupt):
        adamerge(files, out, steps=6, checkpoint_every=2, granularity="layer-expert", on_step=killed, state=state)
    assert state.is_file() and not out.exists()
    resumed = adamerge(files, out, steps=6, checkpoint_every=2, granularity="layer-expert", state=state)
    assert resumed.resumed_from == 2
    assert resumed.losses == whole.losses and resumed.spec == whole.spec
    first, second = tensors(whole.merge.path), tensors(out)
    assert all(torch.equal(first[key], second[key]) for key in first)
    longer = adamerge(files, tmp_path / "longer.safetensors", steps=8, granularity="layer-expert", state=state)
    assert longer.resumed_from == 6 and longer.losses[:6] == whole.losses  # more steps extend a finished run


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--seed-checkpoint", "{tmp}/none.safetensors"], "none.safetensors: no such checkpoint file"),
        (["--seed-checkpoint", "{seed}", "--source", "{headless}"], "carries no pre-training heads ('heads')"),
        (["--seed-checkpoint", "{seed}", "--batch-size", "30"], "the val split has 24 pairs, fewer than one batch"),
        (["--seed-checkpoint", "{seed}", "--init-lam", "1.5"], "settings: init_lam: Input should be less than"),
        (["--seed-checkpoint", "{seed}", "--steps", "0"], "settings: steps: Input should be greater than"),
        (["--seed-checkpoint", "{seed}", "--batch-size", "1"], "settings: batch_size: Input should be greater than"),
        (["--seed-checkpoint", "{seed}", "--out", "{source}"], "is the input"),
        (["--seed-checkpoint", "{seed}", "--spec-out", "{tmp}/merged.safetensors"], "is also --out"),
        (["--seed-checkpoint", "{source}"], "specific.safetensors has no tensor blocks.0"),  # no origin
    ],
)
def test_a_bad_input_is_one_clear_error_and_nothing_is_written(files, tmp_path, capsys, arguments, message):
    names = {"tmp": tmp_path, **files}
    given = [argument.format(**names) for argument in arguments]
    source = files["source"]
    if "--source" in given:
        at = given.index("--source")
        source, given = given[at + 1], given[:at] + given[at + 2 :]
    out = [] if "--out" in given else ["--out", tmp_path / "merged.safetensors"]
    assert cli("adamerge", source, "--data", DATA.dataset, "--steps", 2, "--quiet", *out, *given) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("vlmerge adamerge: error: ") and message in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_test_split_and_a_missing_seed_are_refused_by_the_parser(files, tmp_path, capsys):
    for extra in (["--split", "test", "--seed-checkpoint", files["seed"]], []):
        with pytest.raises(SystemExit) as stop:
            cli("adamerge", files["source"], "--out", tmp_path / "m.safetensors", *extra)
        assert stop.value.code == 2
    errors = capsys.readouterr().err
    assert "invalid choice: 'test'" in errors and "required: --seed-checkpoint" in errors
    with pytest.raises(ConfigError, match="give --seed-checkpoint"):
        adamerge_checkpoint(files["source"], seed_checkpoint=None, out=tmp_path / "m.safetensors")


def test_a_state_file_of_other_settings_is_refused(files, tmp_path):
    state = tmp_path / "run.adamerge.pt"
    adamerge(files, tmp_path / "a.safetensors", steps=2, state=state)
    with pytest.raises(ConfigError, match=r"holds a run with other inputs or settings \(settings.lr differ\)"):
        adamerge(files, tmp_path / "b.safetensors", steps=2, lr=0.01, state=state)
    with pytest.raises(ConfigError, match="at step 2, past --steps 1"):
        adamerge(files, tmp_path / "b.safetensors", steps=1, state=state)
    assert not (tmp_path / "b.safetensors").exists()
