"""Every registered merge method through the engine's basic contract, on a micro model: each gets the
inputs its registry entry asks for (the seed for `needs_origin`, Gram matrices or a Fisher file for its
`statistics`, a sequential Gram file where it checks how its statistics were collected). A new method
is tested here by registering it."""

import pytest
import torch
from conftest import make_inputs

from vlmerge.core.errors import MergeError
from vlmerge.data.tokenizer import TokenBatch
from vlmerge.io.grams import open_grams, save_grams
from vlmerge.io.statistics import open_fisher, save_fisher
from vlmerge.merging import MERGE_METHODS, merge_state_dict
from vlmerge.merging.grams import collect_grams
from vlmerge.merging.plan import merged_key, parse_expert_key
from vlmerge.merging.registry import Statistics
from vlmerge.merging.regmean_pp import SEQUENTIAL, SequentialOptions, collect_sequential_grams
from vlmerge.models import VLTransformer, model_config
from vlmerge.models.heads import PretrainingHeads
from vlmerge.training.fisher import collect_fisher
from vlmerge.training.objectives import ObjectiveWeights, PairBatch, PretrainingObjective

METHODS = MERGE_METHODS.names()
# Normalised inputs make some summed Gram matrices singular; the documented fallback is tested elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:.*summed Gram matrix is singular")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Random experts, an agnostic seed and every statistics file a method may ask for, built once."""
    tmp = tmp_path_factory.mktemp("every_method")
    torch.manual_seed(0)
    config = model_config("micro", layer_scale_init=1.0)
    model, seed = VLTransformer(config), VLTransformer(config.agnostic())
    inputs = make_inputs(config, batch=8, text_len=8)  # more tokens than width: nonsingular Gram sums
    batches = [{"images": inputs["images"]}, {"text_ids": inputs["text_ids"], "text_mask": inputs["text_mask"]}, inputs]
    grams, info = collect_grams(model, batches)
    files = {"grams": save_grams(tmp / "grams.safetensors", grams, info, {})}
    for name in METHODS:  # a method that checks its Gram file checks it was collected sequentially with its options
        method = MERGE_METHODS.get(name)
        if method.check_statistics is not None:
            sequential = SequentialOptions(alpha=method.options.parse({}).alpha)
            collected, sequential_info = collect_sequential_grams(model, batches, sequential)
            record = {SEQUENTIAL: sequential.model_dump(mode="json")}
            files[name] = save_grams(tmp / f"sequential-{name}.safetensors", collected, sequential_info, record)
    heads = PretrainingHeads(config.width, config.vocab_size)
    objective = PretrainingObjective(model, heads, ObjectiveWeights(itm=0, mlm=0), mask_id=4)
    mask = inputs["text_mask"]
    words = torch.where(mask, torch.arange(mask.shape[1]).expand_as(mask), -1)
    pairs = [PairBatch(inputs["images"], TokenBatch(inputs["text_ids"], mask, words))]
    statistics = collect_fisher(objective, enumerate(pairs))
    files["fisher"] = save_fisher(tmp / "fisher.safetensors", statistics.fisher, statistics.info, {})
    return model.state_dict(), seed.state_dict(), files


def selection_for(method) -> str:
    """All experts, or v and l only (retrieval) for a method that takes at most two per tensor (slerp):
    the fusion layers of `all` have three."""
    return "retrieval" if method.max_experts is not None and method.max_experts < 3 else "all"


def merge_with_its_inputs(name: str, state: dict, seed_state: dict, files: dict):
    """merge_state_dict with exactly the inputs the method's registry entry asks for, default options."""
    method = MERGE_METHODS.get(name)
    grams = None
    if method.statistics is Statistics.GRAMS:
        grams = open_grams(files[name] if method.check_statistics is not None else files["grams"])
    fisher = open_fisher(files["fisher"]) if method.statistics is Statistics.FISHER else None
    return merge_state_dict(
        state,
        name,
        selection=selection_for(method),
        seed_state=seed_state if method.needs_origin else None,
        grams=grams,
        fisher=fisher,
    ).tensors


def test_every_kind_of_input_is_exercised():
    """The inputs built above cover every statistic a method can ask for, and some method asks for each."""
    entries = [MERGE_METHODS.get(name) for name in METHODS]
    assert {m.statistics for m in entries} == {None, *Statistics}
    assert any(m.needs_origin for m in entries) and any(not m.needs_origin for m in entries)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_merges_random_experts_into_every_seed_key_finite_and_of_its_shape(micro, method):
    state, seed_state, files = micro
    merged = merge_with_its_inputs(method, state, seed_state, files)
    assert merged.keys() == seed_state.keys()
    for key, tensor in merged.items():
        assert tensor.shape == seed_state[key].shape and tensor.dtype == seed_state[key].dtype, key
        assert bool(torch.isfinite(tensor).all()), key


@pytest.mark.parametrize("method", METHODS)
def test_every_method_merges_experts_equal_to_the_seed_back_to_the_seed(micro, method):
    """With default options. Methods on modality vectors (needs_origin) see zero vectors and add nothing,
    bit for bit; the others average or solve over identical experts, which gives them back up to rounding."""
    _, seed_state, files = micro
    copies = {}
    for key in micro[0]:
        copies[key] = seed_state[merged_key(key) if parse_expert_key(key) else key].clone()
    merged = merge_with_its_inputs(method, copies, seed_state, files)
    assert merged.keys() == seed_state.keys()
    for key, tensor in merged.items():
        if MERGE_METHODS.get(method).needs_origin:
            assert torch.equal(tensor, seed_state[key]), key
        else:
            torch.testing.assert_close(tensor, seed_state[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_two_expert_method_refuses_three_expert_tensors_before_reading_any(micro):
    state, _, _ = micro
    with pytest.raises(MergeError, match=r"method 'slerp' takes at most 2 experts, but blocks\.\d+\..* has 3"):
        merge_state_dict(state, "slerp")
