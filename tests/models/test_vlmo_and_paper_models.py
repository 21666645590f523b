"""VLMo and the paper's model, imported from their released key layouts, against the oracle.

Neither family installs, so tests/multiway_oracles.py re-implements their forward passes from
their public code; here random states with their real key names are saved as released files
are (Lightning `state_dict`), read back by vlmerge (layout detected, config read from the shapes)
and run through vlmerge's one model. Max abs differences are printed (pytest -s).
"""

import pytest
import torch
from multiway_oracles import (
    PaperShapes,
    VlmoShapes,
    paper_image,
    paper_image_through_vl,
    paper_pair,
    paper_text,
    paper_text_through_vl,
    random_paper_state,
    random_vlmo_state,
    vlmo_image,
    vlmo_image_through_vl,
    vlmo_pair,
    vlmo_text,
    vlmo_text_through_vl,
)

from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.io.layout import Layout
from vlmerge.merging import merge_checkpoint
from vlmerge.models.checkpoint import load_model

TOLERANCE = 1e-4
SIZES = dict(width=32, depth=3, heads=2, mlp_ratio=2.0, image_size=32, patch_size=8, vocab_size=50)
VLMO = VlmoShapes(**SIZES, max_text_len=8, max_text_len_of_initckpt=10, vlffn_start_layer_index=2, layer_scale=True)
VLMO_BASE_PLUS_LIKE = VlmoShapes(
    **SIZES,
    max_text_len=8,
    max_text_len_of_initckpt=10,
    vlffn_start_layer_index=2,
    layer_scale=False,
    relative_position=False,
)
PAPER = PaperShapes(**SIZES, max_text_len=8, max_text_len_of_initckpt=10, fusion_layer=2)


def inputs(shapes):
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, shapes.image_size, shapes.image_size, generator=generator)
    text_ids = torch.randint(1, shapes.vocab_size, (2, shapes.max_text_len), generator=generator)
    text_mask = torch.ones(2, shapes.max_text_len, dtype=torch.long)
    text_mask[1, 5:] = 0
    return images, text_ids, text_mask


def compare(ours, state, shapes, family: str) -> dict[str, float]:
    """Max abs differences between vlmerge and the oracle on every route (padded text positions apart)."""
    images, ids, mask = inputs(shapes)
    real = mask.bool()
    oracle = {
        "vlmo": (vlmo_image, vlmo_text, vlmo_pair, vlmo_image_through_vl, vlmo_text_through_vl),
        "paper": (paper_image, paper_text, paper_pair, paper_image_through_vl, paper_text_through_vl),
    }[family]
    image, text, pair, image_vl, text_vl = oracle
    with torch.no_grad():
        pair_real = torch.cat([real, torch.ones(2, images.shape[-1] ** 2 // shapes.patch_size**2 + 1).bool()], 1)
        return {
            "image": float((image(state, shapes, images) - ours(images=images).hidden).abs().max()),
            "text": float(
                (text(state, shapes, ids, mask) - ours(text_ids=ids, text_mask=mask).hidden)[real].abs().max()
            ),
            "pair": float(
                (pair(state, shapes, images, ids, mask) - ours(images=images, text_ids=ids, text_mask=mask).hidden)[
                    pair_real
                ]
                .abs()
                .max()
            ),
            "image through vl": float(
                (image_vl(state, shapes, images) - ours(images=images, unimodal_through_vl=True).hidden).abs().max()
            ),
            "text through vl": float(
                (
                    text_vl(state, shapes, ids, mask)
                    - ours(text_ids=ids, text_mask=mask, unimodal_through_vl=True).hidden
                )[real]
                .abs()
                .max()
            ),
        }


def released(tmp_path, state, name: str):
    path = tmp_path / name
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


@pytest.mark.parametrize("shapes", [VLMO, VLMO_BASE_PLUS_LIKE], ids=["relative-positions", "base-plus-absolute"])
def test_an_imported_vlmo_reproduces_the_oracle(tmp_path, shapes):
    state = random_vlmo_state(shapes, seed=0)
    path = released(tmp_path, state, "vlmo.ckpt")
    assert open_checkpoint(path).layout is Layout.VLMO
    overrides = {"image_size": 32} if shapes.relative_position else {"heads": 2}
    ours = load_model(path, overrides=overrides).eval()
    assert (ours.config.family, ours.config.fusion_layer, ours.config.layer_scale) == ("vlmo", 2, shapes.layer_scale)
    differences = compare(ours, state, shapes, "vlmo")
    print(f"VLMo ({'relative' if shapes.relative_position else 'absolute'}) vs oracle: {differences}")
    assert max(differences.values()) <= TOLERANCE


def test_vlmo_files_with_index_buffers_read_the_same(tmp_path):
    state = random_vlmo_state(VLMO, seed=0, with_index_buffers=True)
    reader = open_checkpoint(released(tmp_path, state, "vlmo.ckpt"))
    assert "relative_position_index" in reader.mapping.unused  # computed from the shapes
    assert "text_embed.position.weight" in reader  # BERT's table, carried unused beside the relative one
    model = load_model(released(tmp_path, state, "again.ckpt"), overrides={"image_size": 32})
    assert model.config.max_text_len == VLMO.max_text_len and not model.config.text_positions


def test_an_imported_paper_model_reproduces_the_oracle(tmp_path):
    state = random_paper_state(PAPER, seed=0)
    path = released(tmp_path, state, "paper.ckpt")
    assert open_checkpoint(path).layout is Layout.REFERENCE
    ours = load_model(path, overrides={"image_size": 32}).eval()
    assert (ours.config.family, ours.config.placement.value, ours.config.pair_attention) == ("paper", "all", "within")
    differences = compare(ours, state, PAPER, "paper")
    print(f"paper model vs oracle: {differences}")
    assert max(differences.values()) <= TOLERANCE


def test_a_merged_paper_model_runs_as_the_papers_agnostic_model(tmp_path):
    """Interpolation of the paper's experts, written in its layout, is what its `ufo` model runs."""
    state = random_paper_state(PAPER, seed=0)
    out = tmp_path / "merged.pt"
    path = released(tmp_path, state, "paper.ckpt")
    merge_checkpoint(path, "interpolation", out=out, layout="reference", overrides={"image_size": 32})
    merged = torch.load(out, weights_only=True)
    agnostic = PaperShapes(**SIZES, max_text_len=8, max_text_len_of_initckpt=10, fusion_layer=2, multiway=False)
    oracle_state = {**random_paper_state(agnostic, seed=0), **merged}
    ours = load_model(out, overrides={"image_size": 32}).eval()
    assert not ours.config.is_multiway
    images, ids, mask = inputs(PAPER)
    with torch.no_grad():
        difference = (paper_image(oracle_state, agnostic, images) - ours(images=images).hidden).abs().max()
    assert difference <= TOLERANCE


def test_vlmo_merges_its_ffn_experts_and_writes_them_tied(tmp_path):
    state = random_vlmo_state(VLMO, seed=0)
    out = tmp_path / "merged.pt"
    path = released(tmp_path, state, "vlmo.ckpt")
    merge_checkpoint(path, "interpolation", out=out, layout="vlmo", overrides={"image_size": 32})
    merged = torch.load(out, weights_only=True)
    key = "transformer.blocks.0.mlp_{}.fc1.weight"
    expected = (state[key.format("imag")] + state[key.format("text")]) / 2
    torch.testing.assert_close(merged[key.format("imag")], expected)
    torch.testing.assert_close(merged[key.format("text")], expected)
    torch.testing.assert_close(
        merged["transformer.blocks.0.attn.qkv.weight"], state["transformer.blocks.0.attn.qkv.weight"]
    )
    vl = "transformer.blocks.2.mlp_{}.fc2.bias"  # three experts from the vl layer on: 2/3 r V + 2/3 (1-r) L + 1/3 VL
    expected = (state[vl.format("imag")] + state[vl.format("text")] + state[vl.format("vl")]) / 3
    torch.testing.assert_close(merged[vl.format("vl")], expected)
    assert "transformer.blocks.0.mlp_vl.fc1.weight" not in merged  # below the vl layer VLMo has no vl expert


@pytest.mark.parametrize("window, text_len, span", [(1, 1, 1), (2, 3, 5), (4, 8, 10), (14, 40, 196)])
def test_relative_position_indices_match_the_oracle(window, text_len, span):
    from multiway_oracles import (
        image_relative_position_index,
        relative_table_rows,
        text_image_relative_position_index,
        text_relative_position_index,
    )

    from vlmerge.core.modality import Modality
    from vlmerge.models.positions import image_index, relative_index, table_rows, text_index

    assert table_rows(window, span) == relative_table_rows(window, span)
    assert torch.equal(image_index(window), image_relative_position_index(window).long())
    assert torch.equal(text_index(text_len, window, span), text_relative_position_index(window, text_len, span).long())
    pair = relative_index(((Modality.L, text_len), (Modality.V, window**2 + 1)), window, span)
    assert torch.equal(pair, text_image_relative_position_index(window, text_len, span).long())


def native_shapes_in_layout(size: str, layout: Layout) -> dict[str, tuple[int, ...]]:
    """The registered size's state, built on the meta device (no memory), named as `layout` names it."""
    from vlmerge.io.layout import foreign_keys
    from vlmerge.models import create_model

    with torch.device("meta"):
        model = create_model(size)
    return {
        name: tuple(value.shape[1:] if squeeze else value.shape)
        for key, value in model.state_dict().items()
        for name, squeeze in foreign_keys(key, layout)
    }


@pytest.mark.parametrize(
    "size, spec",
    [
        ("vlmo-base", "VLMO_BASE"),
        ("vlmo-large", "VLMO_LARGE"),
        ("vlmo-base-plus", "VLMO_BASE_PLUS"),
        ("paper-base", "PAPER_BASE"),
    ],
)
def test_registered_family_sizes_have_the_releases_keys_and_shapes(size, spec):
    """Every tensor a release's forward reads, with its shape, and nothing else (index buffers and the
    paper's video tables are read from files but never built)."""
    import multiway_oracles

    from vlmerge.io.layout import LAYOUTS

    shapes = getattr(multiway_oracles, spec)
    if spec.startswith("VLMO"):
        release, layout = multiway_oracles.vlmo_state_spec(shapes), Layout.VLMO
    else:
        release, layout = multiway_oracles.paper_state_spec(shapes), Layout.REFERENCE
    used = {key: shape for key, (shape, _) in release.items() if not LAYOUTS[layout].is_unused(key, set(release))}
    assert native_shapes_in_layout(size, layout) == used
