"""Coefficient specs: a scalar option by role, by expert or over depth, resolved per merged tensor and
checked against values computed here (numpy's interp, the methods' closed forms), not by the code itself."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vlmerge.cli.main import main
from vlmerge.cli.options import options_from_text
from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import ConfigError
from vlmerge.core.modality import Modality
from vlmerge.io.checkpoint import reader_from_state_dict
from vlmerge.merging import (
    MERGE_METHODS,
    build_merge_plan,
    merge_checkpoint,
    merge_state_dict,
    register_method,
)
from vlmerge.merging.coefficients import resolve_options
from vlmerge.merging.engine import prepare_merge
from vlmerge.models import VLTransformer, save_model

V, L, VL = Modality.V, Modality.L, Modality.VL
LAYERS = 4  # the micro model; experts v, l in layers 0-1, v, l, vl from the fusion layer 2 on


@pytest.fixture
def state(specific_model):
    return specific_model.state_dict()


@pytest.fixture
def seed(specific_model):
    torch.manual_seed(1)
    return VLTransformer(specific_model.config.agnostic()).state_dict()


def expert(state, target: str, modality: Modality) -> torch.Tensor:
    """The expert tensor of a merged key: `blocks.1.mlp.fc1.weight` -> `blocks.1.mlp.l.fc1.weight`."""
    blocks, layer, slot, *rest = target.split(".")
    return state[".".join([blocks, layer, slot, modality.value, *rest])]


def layer_of(target: str) -> int:
    return int(target.split(".")[1])


def role(target: str) -> str:
    """The role a test expects for a merged key, from its name alone."""
    slot = target.split(".")[2]
    return "norm" if slot in ("norm1", "norm2") else slot


def depth(values: list[float], layer: int, layers: int = LAYERS) -> float:
    """mergekit's gradient, by numpy: layer i at t = i / (L - 1) (t = 1 for one layer), values spaced evenly."""
    t = layer / (layers - 1) if layers > 1 else 1.0
    return float(np.interp(t, np.linspace(0.0, 1.0, len(values)), values))


def interpolation(state, target: str, ratio: float) -> torch.Tensor:
    """Interpolation: r V + (1 - r) L; with vl, (2/3) r V + (2/3)(1 - r) L + (1/3) VL, in float64."""
    v, l_ = (expert(state, target, m).double() for m in (V, L))
    if layer_of(target) < 2:
        return ratio * v + (1 - ratio) * l_
    return 2 / 3 * ratio * v + 2 / 3 * (1 - ratio) * l_ + 1 / 3 * expert(state, target, VL).double()


def merged_modalities(target: str) -> tuple[Modality, ...]:
    return (V, L) if layer_of(target) < 2 else (V, L, VL)


# ----------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("layers", [1, 2, 4, 7, 12])
@pytest.mark.parametrize("values", [[0.2, 0.8], [0.9, 0.1, 0.5], [0.0, 1.0, 0.25, 0.75, 0.5]])
def test_a_gradient_gives_each_layer_mergekits_interpolation(layers, values):
    shapes = {f"blocks.{i}.mlp.{m}.fc1.weight": (3, 2) for i in range(layers) for m in "vl"}
    plan = build_merge_plan(shapes)
    resolved = resolve_options(MERGE_METHODS.get("interpolation"), {"ratio": values}, plan)
    for i in range(layers):
        got = resolved.at(f"blocks.{i}.mlp.fc1.weight").ratio
        assert got == pytest.approx(depth(values, i, layers), abs=1e-12)
    assert resolved.at(f"blocks.{layers - 1}.mlp.fc1.weight").ratio == values[-1]  # the last layer: exactly
    if layers > 1:
        assert resolved.at("blocks.0.mlp.fc1.weight").ratio == values[0]


def test_roles_by_slot_with_default_and_the_options_own_default(state):
    plan = build_merge_plan({k: tuple(v.shape) for k, v in state.items()})
    method = MERGE_METHODS.get("interpolation")
    spec = {"attn": 0.1, "mlp": {"default": [0.2, 0.8]}, "default": 0.9}
    resolved = resolve_options(method, {"ratio": spec}, plan)
    partial = resolve_options(method, {"ratio": {"attn": 0.3}}, plan)
    targets = [g.target for g in plan.groups]
    assert {role(t) for t in targets} == {"attn", "mlp", "norm"}
    for target in targets:
        expected = {"attn": 0.1, "mlp": depth([0.2, 0.8], layer_of(target)), "norm": 0.9}[role(target)]
        assert resolved.at(target).ratio == pytest.approx(expected, abs=1e-12), target
        assert partial.at(target).ratio == (0.3 if role(target) == "attn" else 0.5)  # left out: the default 0.5
    # the q and v biases are attention's
    assert resolved.at("blocks.0.attn.q_bias").ratio == resolved.at("blocks.0.attn.v_bias").ratio == 0.1


# ----------------------------------------------------------------------------- merges
def test_a_depth_gradient_merge_equals_each_layers_scalar_merge(state):
    values = [0.1, 0.9]
    graded = merge_state_dict(state, "interpolation", {"ratio": values}).tensors
    for layer in range(LAYERS):
        scalar = merge_state_dict(state, "interpolation", {"ratio": depth(values, layer)}).tensors
        keys = [k for k in scalar if k.startswith(f"blocks.{layer}.") and k in graded]
        assert len(keys) == 15  # 13 merged tensors and layer scale, in every layer
        for key in keys:
            torch.testing.assert_close(graded[key], scalar[key], rtol=1e-6, atol=1e-7)
    first, last = (merge_state_dict(state, "interpolation", {"ratio": r}).tensors for r in values)
    assert torch.equal(graded["blocks.0.mlp.fc1.weight"], first["blocks.0.mlp.fc1.weight"])
    assert torch.equal(graded["blocks.3.mlp.fc1.weight"], last["blocks.3.mlp.fc1.weight"])


def test_a_role_dict_merges_each_role_by_its_closed_form(state):
    result = merge_state_dict(state, "interpolation", {"ratio": {"attn": 0.3, "mlp": [0.2, 0.8]}})
    merged = [g.target for g in result.plan.groups]
    assert len(merged) == 52
    for target in merged:
        ratio = {"attn": 0.3, "mlp": depth([0.2, 0.8], layer_of(target)), "norm": 0.5}[role(target)]
        expected = interpolation(state, target, ratio).float()
        torch.testing.assert_close(result.tensors[target], expected, rtol=1e-5, atol=1e-6)


def test_per_expert_lam_of_arithmetic_is_the_sum_of_each_scaled_modality_vector(state, seed):
    lam = {"v": 1.0, "l": 0.25, "vl": -0.5}
    result = merge_state_dict(state, "arithmetic", {"lam": lam}, seed_state=seed)
    for group in result.plan.groups:
        origin = seed[group.target].double()
        vectors = {m: expert(state, group.target, m).double() - origin for m in merged_modalities(group.target)}
        expected = origin + sum(lam[m.value] * tau for m, tau in vectors.items())
        torch.testing.assert_close(result.tensors[group.target].double(), expected, rtol=1e-5, atol=1e-6)


def test_per_expert_density_of_ties_trims_each_vector_at_its_own_density(state, seed):
    density = {"v": 0.25, "l": 0.75}
    result = merge_state_dict(state, "ties", {"density": density, "lam": 1.0}, seed_state=seed)
    target = "blocks.0.mlp.fc1.weight"  # layer 0: v and l
    origin = seed[target].double()
    trimmed = []
    for m in (V, L):
        tau = (expert(state, target, m).double() - origin).flatten()
        keep = math.ceil(density[m.value] * tau.numel())
        cut = tau.abs().sort(descending=True).values[keep - 1]
        trimmed.append(torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    mean = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    expected = origin + mean.view_as(origin)
    torch.testing.assert_close(result.tensors[target].double(), expected, rtol=1e-5, atol=1e-6)


PER_EXPERT = [(name, option) for name in MERGE_METHODS for option in sorted(MERGE_METHODS.get(name).per_expert)]


@pytest.mark.parametrize("method, option", PER_EXPERT)
def test_one_value_for_every_expert_merges_as_that_value_does(state, seed, method, option):
    """For every per-expert option of every method: the same value per expert is the scalar merge."""
    value = {"lam": 0.7, "density": 0.6, "drop": 0.3}[option]
    per_expert = merge_state_dict(state, method, {option: {"v": value, "l": value, "vl": value}}, seed_state=seed)
    scalar = merge_state_dict(state, method, {option: value}, seed_state=seed)
    for key, tensor in scalar.tensors.items():
        torch.testing.assert_close(per_expert.tensors[key], tensor, rtol=1e-5, atol=1e-6)
    assert per_expert.coefficients.values_at("blocks.2.attn.qkv.weight")[option] == {
        "v": value,
        "l": value,
        "vl": value,
    }


# ----------------------------------------------------------------------------- errors
def unread(state):
    """A reader that fails on any tensor read: the errors below come before the first one."""
    reader = reader_from_state_dict(state)

    def refuse(key):
        raise AssertionError(f"read {key} before the options were checked")

    reader.get = refuse
    return reader


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("interpolation", {"ratio": {"attn": 0.3, "mlpp": 0.5}}, "unknown key 'mlpp', neither a role nor an expert; "),
        ("interpolation", {"ratio": {"attn": 0.3, "mlpp": 0.5}}, "did you mean 'mlp'?"),
        ("interpolation", {"ratio": [0.3]}, "a gradient over depth needs at least 2 values, got [0.3]"),
        ("interpolation", {"ratio": []}, "a gradient over depth needs at least 2 values, got []"),
        ("interpolation", {"ratio": {}}, "interpolation option ratio: an empty dict"),
        ("interpolation", {"ratio": ["0.2", 0.8]}, "expected a number in a gradient or dict, got '0.2'"),
        ("interpolation", {"ratio": {"attn": True}}, "expected a number in a gradient or dict, got True"),
        ("interpolation", {"ratio": {"attn": {"mlp": 0.2}}}, "a dict by roles inside another dict by roles"),
        ("interpolation", {"ratio": {"attn": 0.2, "v": 0.4}}, "mixes roles (attn) and experts (v) in one dict"),
        (
            "interpolation",
            {"ratio": {"v": 0.3, "l": 0.7}},
            "interpolation option ratio: interpolation applies ratio to each merged tensor as a whole, "
            "so it takes no value per expert (v, l); options interpolation takes per expert: none",
        ),
        (
            "interpolation",
            {"ratio": {"mlp": [0.5, 1.3]}},
            "interpolation options at blocks.2.mlp.fc1.bias: ratio: Input should be less than or equal to 1 "
            '(ratio=1.0333333333333334 from {"mlp": [0.5, 1.3]})',
        ),
        ("ties", {"density": {"v": 1.5}}, "ties options at blocks.0.attn.proj.bias for expert v: density: Input"),
        ("ties", {"lam": {"v": {"vl": 1.0}}}, "a dict by experts inside another dict by experts"),
        ("dare", {"random_seed": [0, 1]}, "dare options at blocks.1.attn.proj.bias: random_seed: Input should be"),
        (
            "ties",
            {"density": [0.2, 0.9], "scope": "global"},
            "the ties pre-pass over the whole model takes one density",
        ),
        ("interpolation", {"ratoi": [0.2, 0.8]}, "interpolation options: unknown field 'ratoi'; did you mean 'ratio'?"),
    ],
)
def test_bad_specs_get_one_named_error_before_any_tensor_is_read(state, seed, method, options, message):
    with pytest.raises(ConfigError) as error:
        prepare_merge(unread(state), method, options, origin=reader_from_state_dict(seed))
    assert message in str(error.value)


def test_global_ties_takes_a_lam_that_varies_but_one_density(state, seed):
    result = merge_state_dict(state, "ties", {"scope": "global", "lam": [0.5, 1.0]}, seed_state=seed)
    assert set(result.prepared.thresholds) == {V, L, VL}
    uniform = merge_state_dict(
        state, "ties", {"scope": "global", "density": {"v": 0.3, "l": 0.3, "vl": 0.3}}, seed_state=seed
    )
    scalar = merge_state_dict(state, "ties", {"scope": "global", "density": 0.3}, seed_state=seed)
    assert uniform.prepared == scalar.prepared


class ScaleOptions(StrictConfig):
    scale: float = 1.0
    name: str = "x"


def test_per_expert_is_declared_for_int_and_float_options_only():
    for option in ("name", "missing"):
        with pytest.raises(ConfigError, match=f"per-expert option '{option}' is no int or float option"):
            register_method("bad_per_expert", ScaleOptions, per_expert=(option,))
    assert "bad_per_expert" not in MERGE_METHODS


# ----------------------------------------------------------------------------- record, command line
def test_the_merged_file_records_the_spec_as_given_and_each_tensors_value(specific_model, tmp_path):
    source = save_model(specific_model, tmp_path / "specific.safetensors")
    spec = {"attn": 0.3, "mlp": [0.2, 0.8]}
    result = merge_checkpoint(source, "interpolation", {"ratio": spec}, out=tmp_path / "merged.safetensors")
    with safe_open(str(result.path), "pt") as handle:
        record = json.loads(handle.metadata()["merge"])
    assert record["options"] == result.options == {"ratio": spec}
    assert record["resolved"] == result.coefficients.record()
    taken = {t: entry["value"] for entry in record["resolved"]["ratio"] for t in entry["tensors"]}
    assert sorted(taken) == sorted(g.target for g in result.plan.groups)  # every merged tensor, once
    for target, value in taken.items():
        assert value == pytest.approx(
            {"attn": 0.3, "mlp": depth([0.2, 0.8], layer_of(target)), "norm": 0.5}[role(target)]
        )
    assert len(record["resolved"]["ratio"]) == 6  # 0.3, 0.5 and four layers' mlp values
    plain = merge_checkpoint(source, "interpolation", {"ratio": 0.4}, out=tmp_path / "plain.safetensors")
    with safe_open(str(plain.path), "pt") as handle:
        assert json.loads(handle.metadata()["merge"])["resolved"] == {}


def test_options_from_text_reads_specs_as_json_and_numbers_as_text():
    assert options_from_text("interpolation", {"ratio": " [0.2, 0.8]"}) == {"ratio": [0.2, 0.8]}
    assert options_from_text("ties", {"lam": '{"v": 1}', "density": "0.3"}) == {"lam": {"v": 1}, "density": "0.3"}
    with pytest.raises(ConfigError, match="option ratio: '\\[0.2,' is not a JSON list or object"):
        options_from_text("interpolation", {"ratio": "[0.2,"})


def cli(*args) -> int:
    return main([str(a) for a in args])


def test_cli_merges_and_inspects_with_specs(specific_model, seed, tmp_path, capsys):
    state = specific_model.state_dict()
    source = save_model(specific_model, tmp_path / "specific.safetensors")
    seed_file = tmp_path / "seed.safetensors"
    torch.manual_seed(1)
    save_model(VLTransformer(specific_model.config.agnostic()), seed_file)
    spec = '{"attn": 0.3, "mlp": [0.2, 0.8]}'
    out = tmp_path / "merged.safetensors"
    assert cli("merge", source, "--method", "interpolation", "--ratio", spec, "--out", out, "--quiet") == 0
    expected = merge_state_dict(state, "interpolation", {"ratio": json.loads(spec)}).tensors
    with safe_open(str(out), "pt") as handle:
        for key in ["blocks.0.attn.qkv.weight", "blocks.3.mlp.fc1.weight", "blocks.2.norm1.weight"]:
            assert torch.equal(handle.get_tensor(key), expected[key])
    lam = '{"v": 1.0, "l": 0.25, "vl": 0.5}'
    out = tmp_path / "arithmetic.safetensors"
    args = ["--option", f"lam={lam}", "--seed-checkpoint", seed_file, "--out", out, "--quiet"]
    assert cli("merge", source, "--method", "arithmetic", *args) == 0
    expected = merge_state_dict(state, "arithmetic", {"lam": json.loads(lam)}, seed_state=seed).tensors
    with safe_open(str(out), "pt") as handle:
        assert torch.equal(handle.get_tensor("blocks.2.mlp.fc2.weight"), expected["blocks.2.mlp.fc2.weight"])
    capsys.readouterr()

    assert cli("inspect", source, "--plan", "all", "--method", "interpolation", "--ratio", spec) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line.split() for line in lines if line.startswith("  blocks.")}
    assert row["blocks.3.mlp.fc1.weight"][-1] == "ratio=0.8" and row["blocks.3.mlp.fc1.weight"][3] == "mlp"
    assert row["blocks.1.attn.q_bias"][-1] == "ratio=0.3" and row["blocks.0.norm2.bias"][-1] == "ratio=0.5"
    assert f"interpolation options as given: ratio={json.dumps(json.loads(spec))}" in lines
    assert cli("inspect", source, "--plan", "vqa", "--method", "arithmetic", "--lam", lam) == 0
    row = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  blocks.")}
    assert row["blocks.2.attn.qkv.weight"].endswith("copied (one expert)")
    assert row["blocks.0.attn.qkv.weight"].endswith('lam={"v": 1.0, "l": 0.25}')

    assert cli("inspect", source, "--ratio", "0.3") == 2
    assert cli("merge", source, "--method", "interpolation", "--ratio", "[0.2,", "--out", out) == 2
    assert cli("inspect", source, "--method", "interpolation", "--ratio", "[1.2, 0.8]") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "vlmerge inspect: error: merge options need --method: whose options they are"
    assert "is not a JSON list or object" in err[1]
    assert err[2].startswith("vlmerge inspect: error: interpolation options at blocks.0.attn.proj.bias: ratio: Input")


def test_merge_help_says_every_scalar_option_takes_specs(capsys):
    with pytest.raises(SystemExit):
        cli("merge", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "Every FLOAT and INT option also takes a coefficient spec in JSON" in text
    assert "--lam scale of the summed modality vectors (default 0.5) [per expert]" in text
