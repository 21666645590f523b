"""The multiway and agnostic transformers: sizes, routing, equivalence, gradients."""

import pytest
import torch
from conftest import ROUTES, make_inputs

from vlmerge.core.errors import ConfigError
from vlmerge.core.modality import Modality
from vlmerge.merging import merge_state_dict
from vlmerge.merging.plan import merged_key
from vlmerge.models import MODEL_SIZES, ExpertPlacement, VLTransformer, count_parameters, model_config
from vlmerge.models.transformer import Segment

# Backbone sizes at base width from the paper's architecture study, in millions.
PAPER_BACKBONE_M = {"none": 85, "all": 184, "ffn": 151, "attention": 118, "norms": 85}


@pytest.mark.parametrize("size", MODEL_SIZES.names())
def test_every_registered_size_builds_with_any_depth(size):
    config = model_config(size)
    with torch.device("meta"):
        model = VLTransformer(config)
    assert len(model.blocks) == config.depth
    # The vl experts take the last two layers unless a size (a family's release) says otherwise;
    # a model without vl experts has no fusion layer.
    default = config.depth - 2 if config.vl_experts else config.depth
    assert config.fusion_layer == MODEL_SIZES.get(size).get("fusion_layer", default)


@pytest.mark.parametrize("placement", [p.value for p in ExpertPlacement])
def test_base_backbone_sizes_match_the_paper(placement):
    with torch.device("meta"):
        model = VLTransformer(model_config("base", placement=placement))
    assert count_parameters(model, backbone_only=True) / 1e6 == pytest.approx(PAPER_BACKBONE_M[placement], rel=0.01)


def test_config_errors_are_named():
    with pytest.raises(ConfigError, match="did you mean 'fusion_layer'"):
        model_config("micro", fusion_layr=2)
    with pytest.raises(ConfigError, match="not divisible"):
        model_config("micro", heads=3)
    with pytest.raises(ConfigError, match="fusion_layer 9"):
        model_config("micro", fusion_layer=9)


def identical_experts_state(agnostic: VLTransformer, config) -> dict:
    """A multiway state dict whose every expert is a copy of the agnostic weights."""
    shared = agnostic.state_dict()
    return {k: shared[merged_key(k)].clone() for k in VLTransformer(config).state_dict()}


@pytest.mark.parametrize("placement", ["all", "attention", "ffn", "norms"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_identical_experts_equal_the_agnostic_model(micro_config, placement, route):
    config = micro_config.with_placement(placement)
    torch.manual_seed(1)
    agnostic = VLTransformer(config.agnostic()).eval()
    specific = VLTransformer(config).eval()
    specific.load_state_dict(identical_experts_state(agnostic, config))
    inputs = ROUTES[route](make_inputs(config))
    torch.testing.assert_close(specific(**inputs).hidden, agnostic(**inputs).hidden, rtol=0, atol=1e-6)


def _perturb(model: VLTransformer, fragment: str) -> VLTransformer:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if fragment in name:
                param.add_(torch.randn_like(param))
    return model


@pytest.mark.parametrize(
    "fragment, changes",
    [
        (".v.", {"image": True, "text": False, "pair": True}),
        (".l.", {"image": False, "text": True, "pair": True}),
        (".vl.", {"image": False, "text": False, "pair": True}),
    ],
)
def test_routing_uses_the_expert_of_each_modality(specific_model, fragment, changes):
    inputs = make_inputs(specific_model.config)
    before = {r: specific_model(**f(inputs)).hidden for r, f in ROUTES.items()}
    _perturb(specific_model, fragment)
    for route, f in ROUTES.items():
        changed = not torch.allclose(before[route], specific_model(**f(inputs)).hidden)
        assert changed == changes[route], f"{fragment} experts changed the {route} route: {changed}"


def test_pair_uses_vl_not_v_in_fusion_layers(specific_model):
    inputs = make_inputs(specific_model.config)
    before = specific_model(**inputs).hidden
    fusion = specific_model.config.fusion_layer
    _perturb(specific_model, f"blocks.{fusion}.mlp.v.")
    torch.testing.assert_close(specific_model(**inputs).hidden, before)


def test_attention_stays_within_each_modality_below_the_fusion_layer(specific_model):
    """Text states entering the fusion layer equal a text-only pass through the lower layers."""
    fusion = specific_model.config.fusion_layer
    captured = {}
    specific_model.blocks[fusion].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    inputs = make_inputs(specific_model.config)
    specific_model(**inputs)
    text = specific_model.embed_text(inputs["text_ids"])
    num_text = inputs["text_ids"].shape[1]
    segments, mask = (Segment(Modality.L, 0, num_text),), inputs["text_mask"].bool()
    for block in specific_model.blocks[:fusion]:
        text = block(text, segments, mask, mask[:, None, None, :])
    real = inputs["text_mask"]
    torch.testing.assert_close(captured["x"][:, :num_text][real], text[real])


def test_padding_does_not_change_real_tokens(specific_model):
    inputs = make_inputs(specific_model.config)
    out = specific_model(**inputs)
    padded = dict(inputs, text_ids=inputs["text_ids"].clone())
    padded["text_ids"][~inputs["text_mask"]] = 3
    out2 = specific_model(**padded)
    keep = out.mask
    torch.testing.assert_close(out.hidden[keep], out2.hidden[keep])


def test_every_parameter_gets_a_gradient(specific_model):
    inputs = make_inputs(specific_model.config)
    loss = sum(specific_model.pool(specific_model(**f(inputs))).square().mean() for f in ROUTES.values())
    loss.backward()
    missing = [n for n, p in specific_model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_merged_checkpoint_loads_strictly_into_the_agnostic_model(specific_model):
    merged = merge_state_dict(specific_model.state_dict(), "interpolation", {"ratio": 0.3})
    agnostic = VLTransformer(specific_model.config.agnostic())
    agnostic.load_state_dict(merged.tensors, strict=True)
    assert merged.merged_parameters == count_parameters(agnostic)


def test_unimodal_input_can_run_through_the_vl_experts(specific_model):
    inputs = make_inputs(specific_model.config)
    image = {"images": inputs["images"]}
    plain = specific_model(**image).hidden
    through_vl = specific_model(**image, unimodal_through_vl=True)
    assert through_vl.modality is Modality.VL and not torch.allclose(plain, through_vl.hidden)
    _perturb(specific_model, f"blocks.{specific_model.config.fusion_layer}.mlp.v.")
    torch.testing.assert_close(specific_model(**image, unimodal_through_vl=True).hidden, through_vl.hidden)
