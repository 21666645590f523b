"""Sanity checks of the VLMo and paper-model oracles (tests/multiway_oracles.py).

The oracles are only worth something if they compute what the public code computes, so they
are checked here against a second, plainer description: index matrices built entry by entry
with loops, and an encoder written with other primitives (``unfold`` patches, split q/k/v
projections, ``scaled_dot_product_attention`` with an additive mask that blocks attention
across modalities instead of slicing).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from multiway_oracles import (
    PAPER_BASE,
    VLMO_BASE,
    VLMO_BASE_PLUS,
    PaperShapes,
    VlmoShapes,
    image_relative_position_index,
    paper_image,
    paper_image_through_vl,
    paper_pair,
    paper_state_spec,
    paper_text,
    paper_text_through_vl,
    random_paper_state,
    random_vlmo_state,
    relative_table_rows,
    text_image_relative_position_index,
    text_relative_position_index,
    vlmo_image,
    vlmo_image_through_vl,
    vlmo_pair,
    vlmo_state_spec,
    vlmo_text,
    vlmo_text_through_vl,
)

TINY = dict(
    width=16,
    depth=3,
    heads=2,
    mlp_ratio=2.0,
    image_size=8,
    patch_size=4,
    vocab_size=50,
    max_text_len=5,
    max_text_len_of_initckpt=6,
)
VS = VlmoShapes(**TINY, vlffn_start_layer_index=2, layer_scale=True)
PS = PaperShapes(**TINY, fusion_layer=2)
ATOL = 1e-5


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 8, 8, generator=g)
    ids = torch.randint(1, 50, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return images, ids, mask


# ---------------------------------------------------------------------------
# Independent description: loops and a plain encoder
# ---------------------------------------------------------------------------


def _loop_image_index(w: int) -> torch.Tensor:
    r = (2 * w - 1) ** 2 + 3
    n = w * w + 1
    out = torch.zeros(n, n, dtype=torch.int64)
    for a in range(n):
        for b in range(n):
            if a == 0 and b == 0:
                out[a, b] = r - 1
            elif a == 0:
                out[a, b] = r - 3
            elif b == 0:
                out[a, b] = r - 2
            else:
                (ha, wa), (hb, wb) = divmod(a - 1, w), divmod(b - 1, w)
                out[a, b] = (ha - hb + w - 1) * (2 * w - 1) + (wa - wb + w - 1)
    return out


def _loop_text_index(w: int, t: int, m: int) -> torch.Tensor:
    r = (2 * w - 1) ** 2 + 3
    rows = r + 2 * m + 2
    out = torch.zeros(t, t, dtype=torch.int64)
    for a in range(t):
        for b in range(t):
            if a == 0 and b == 0:
                out[a, b] = rows - 1
            elif a == 0:
                out[a, b] = rows - 3
            elif b == 0:
                out[a, b] = rows - 2
            else:
                out[a, b] = r + 2 + (b - a) + (m - 2)
    return out


def _loop_pair_index(w: int, t: int, m: int) -> torch.Tensor:
    r = (2 * w - 1) ** 2 + 3
    top = torch.cat([_loop_text_index(w, t, m), torch.full((t, w * w + 1), r)], dim=1)
    bottom = torch.cat([torch.full((w * w + 1, t), r + 1), _loop_image_index(w)], dim=1)
    return torch.cat([top, bottom], dim=0)


def _ln(state, x, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], eps)


def _ref_text_embed(state, ids, absolute=False):
    x = state["text_embeddings.word_embeddings.weight"][ids] + state["text_embeddings.token_type_embeddings.weight"][0]
    if absolute:
        x = x + state["text_embeddings.position_embeddings.weight"][: ids.shape[1]]
    return _ln(state, x, "text_embeddings.LayerNorm", 1e-12) + state["token_type_embeddings.weight"][0]


def _ref_image_embed(state, images, patch, absolute=False):
    w = state["transformer.patch_embed.proj.weight"]
    cols = F.unfold(images, patch, stride=patch).transpose(1, 2)  # [B, P, C*p*p], row-major patches
    x = cols @ w.reshape(w.shape[0], -1).T + state["transformer.patch_embed.proj.bias"]
    x = torch.cat([state["transformer.cls_token"].expand(len(images), 1, -1), x], dim=1)
    if absolute:
        x = x + state["transformer.pos_embed"]
    return x + state["token_type_embeddings.weight"][1]


def _ref_layer(state, x, heads, block, attn_groups, ffn_groups, allowed, bias, eps=1e-6):
    """Pre-LN block; each group is (token slice, norm prefix, module prefix), slices in order."""
    batch, n, c = x.shape
    g1, g2 = state.get(f"{block}.gamma_1", 1.0), state.get(f"{block}.gamma_2", 1.0)
    q, k, v = [], [], []
    for tokens, norm, attn in attn_groups:
        h = _ln(state, x[:, tokens], norm, eps)
        wq, wk, wv = state[f"{attn}.qkv.weight"].split(c)
        q.append(h @ wq.T + state[f"{attn}.q_bias"])
        k.append(h @ wk.T)
        v.append(h @ wv.T + state[f"{attn}.v_bias"])

    def heads_first(parts):
        return torch.cat(parts, dim=1).reshape(batch, n, heads, c // heads).transpose(1, 2)

    additive = torch.zeros(batch, heads, n, n)
    if bias is not None:
        additive = additive + bias
    additive = additive.masked_fill(~allowed[:, None], float("-inf"))
    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), attn_mask=additive)
    out = out.transpose(1, 2).reshape(batch, n, c)
    proj = [out[:, t] @ state[f"{a}.proj.weight"].T + state[f"{a}.proj.bias"] for t, _, a in attn_groups]
    x = x + g1 * torch.cat(proj, dim=1)
    ffn = []
    for tokens, norm, mlp in ffn_groups:
        h = _ln(state, x[:, tokens], norm, eps)
        h = F.gelu(h @ state[f"{mlp}.fc1.weight"].T + state[f"{mlp}.fc1.bias"])
        ffn.append(h @ state[f"{mlp}.fc2.weight"].T + state[f"{mlp}.fc2.bias"])
    return x + g2 * torch.cat(ffn, dim=1)


def _ref_encoder(state, shapes, x, key_mask, index, plan):
    """``plan(i)`` -> (attn_groups, ffn_groups, split): with ``split`` no attention across it."""
    batch, n, _ = x.shape
    table = state.get("relative_position_bias_table")
    for i in range(shapes.depth):
        attn_groups, ffn_groups, split = plan(i)
        allowed = key_mask[:, None, :].expand(batch, n, n).clone()
        if split is not None:
            same = torch.zeros(n, n, dtype=torch.bool)
            same[:split, :split] = True
            same[split:, split:] = True
            allowed &= same
        bias = None
        if table is not None:
            bias = table[index][..., i * shapes.heads : (i + 1) * shapes.heads].permute(2, 0, 1)
        x = _ref_layer(state, x, shapes.heads, f"transformer.blocks.{i}", attn_groups, ffn_groups, allowed, bias)
    return _ln(state, x, "transformer.norm", 1e-6)


def _all(n):
    return torch.ones(2, n, dtype=torch.bool)


def _vlmo_plan(s, ffn_of_layer):
    def plan(i):
        b = f"transformer.blocks.{i}"
        return [(slice(None), f"{b}.norm1", f"{b}.attn")], ffn_of_layer(b, i), None

    return plan


def _paper_plan(s, expert_of_layer):
    """expert_of_layer(i) -> one expert for every token, or None for the pair split below fusion."""

    def plan(i):
        b = f"transformer.blocks.{i}"
        m = expert_of_layer(i)
        if m is not None:
            groups = [(slice(None), f"{b}.{{}}.{m}", None)]
        else:
            t = s.max_text_len
            groups = [(slice(0, t), f"{b}.{{}}.l", None), (slice(t, None), f"{b}.{{}}.v", None)]
        attn = [(tok, p.format("norm1"), p.format("attn")) for tok, p, _ in groups]
        ffn = [(tok, p.format("norm2"), p.format("mlp")) for tok, p, _ in groups]
        return attn, ffn, (s.max_text_len if m is None else None)

    return plan


# ---------------------------------------------------------------------------
# Index matrices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("text_len", [1, 2, 5])
def test_index_matrices_equal_entrywise_loops(window, text_len):
    m = 6
    image = image_relative_position_index(window)
    text = text_relative_position_index(window, text_len, m)
    pair = text_image_relative_position_index(window, text_len, m)
    assert image.dtype == text.dtype == torch.int64 and pair.dtype == torch.float32
    assert image.shape == (window**2 + 1,) * 2 and text.shape == (text_len,) * 2
    assert pair.shape == (text_len + window**2 + 1,) * 2
    assert torch.equal(image, _loop_image_index(window))
    assert torch.equal(text, _loop_text_index(window, text_len, m))
    assert torch.equal(pair.long(), _loop_pair_index(window, text_len, m))


def test_index_corners_and_bounds():
    w, t, m = 3, 5, 6
    r = (2 * w - 1) ** 2 + 3
    rows = relative_table_rows(w, m)
    assert rows == r + 2 * m + 2
    image, text = image_relative_position_index(w), text_relative_position_index(w, t, m)
    assert (image[0, 0], image[0, 1], image[1, 0]) == (r - 1, r - 3, r - 2)
    assert (text[0, 0], text[0, 1], text[1, 0]) == (rows - 1, rows - 3, rows - 2)  # the table's last three rows
    assert image[1:, 1:].max() < r - 3  # patch distances below the image cls rows
    # text distances (key minus query, the opposite sign of the image's) sit between the cross rows and the cls rows
    assert text[1, 2] == text[1, 1] + 1 and image[1, 2] == image[1, 1] - 1
    assert text[1:, 1:].min() > r + 1 and text[1:, 1:].max() < rows - 3
    pair = text_image_relative_position_index(w, t, m).long()
    assert (pair[:t, t:] == r).all() and (pair[t:, :t] == r + 1).all()
    assert pair.min() >= 0 and pair.max() < rows
    assert VLMO_BASE.table_rows == PAPER_BASE.table_rows == 27**2 + 3 + 2 * 196 + 2 == 1126


# ---------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------


def _block_keys(spec, i):
    prefix = f"transformer.blocks.{i}."
    return {k[len(prefix) :] for k in spec if k.startswith(prefix)}


def test_vlmo_base_layout():
    spec = vlmo_state_spec(VLMO_BASE)
    shared = {"gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight"}
    shared |= {"attn.proj.weight", "attn.proj.bias"}
    ffn = {f"{n}.{p}" for n in ("norm2_text", "norm2_imag") for p in ("weight", "bias")}
    ffn |= {f"{m}.fc{j}.{p}" for m in ("mlp_text", "mlp_imag") for j in (1, 2) for p in ("weight", "bias")}
    vl = {"norm2_vl.weight", "norm2_vl.bias"} | {f"mlp_vl.fc{j}.{p}" for j in (1, 2) for p in ("weight", "bias")}
    assert _block_keys(spec, 9) == shared | ffn
    assert _block_keys(spec, 10) == _block_keys(spec, 11) == shared | ffn | vl
    outside = {k for k in spec if not k.startswith("transformer.blocks.")}
    assert outside == {
        "relative_position_bias_table",
        "transformer.cls_token",
        "transformer.patch_embed.proj.weight",
        "transformer.patch_embed.proj.bias",
        "transformer.norm.weight",
        "transformer.norm.bias",
        "text_embeddings.position_ids",
        "text_embeddings.word_embeddings.weight",
        "text_embeddings.position_embeddings.weight",
        "text_embeddings.token_type_embeddings.weight",
        "text_embeddings.LayerNorm.weight",
        "text_embeddings.LayerNorm.bias",
        "token_type_embeddings.weight",
        "pooler.dense.weight",
        "pooler.dense.bias",
    }
    assert spec["relative_position_bias_table"][0] == (1126, 144)
    assert spec["transformer.blocks.0.attn.qkv.weight"][0] == (2304, 768)
    assert spec["transformer.blocks.11.mlp_vl.fc1.weight"][0] == (3072, 768)
    assert spec["transformer.patch_embed.proj.weight"][0] == (768, 3, 16, 16)
    assert spec["text_embeddings.position_ids"][0] == (1, 40)
    buffers = set(vlmo_state_spec(VLMO_BASE, with_index_buffers=True)) - set(spec)
    assert buffers == {"relative_position_index", "text_relative_position_index", "text_imag_relative_position_index"}


def test_vlmo_base_plus_layout_has_no_layer_scale_and_absolute_positions():
    spec = vlmo_state_spec(VLMO_BASE_PLUS)
    assert not any("gamma" in k for k in spec) and "relative_position_bias_table" not in spec
    assert spec["transformer.pos_embed"][0] == (1, 197, 544)
    assert "mlp_vl.fc1.weight" in _block_keys(spec, 21) and "mlp_vl.fc1.weight" not in _block_keys(spec, 20)


def test_paper_layout_keys_experts_by_modality():
    spec = paper_state_spec(PAPER_BASE)
    per = {"attn.{}.q_bias", "attn.{}.v_bias", "attn.{}.qkv.weight", "attn.{}.proj.weight", "attn.{}.proj.bias"}
    per |= {"norm1.{}.weight", "norm1.{}.bias", "norm2.{}.weight", "norm2.{}.bias"}
    per |= {f"mlp.{{}}.fc{j}.{p}" for j in (1, 2) for p in ("weight", "bias")}
    assert _block_keys(spec, 9) == {"gamma_1", "gamma_2"} | {k.format(m) for k in per for m in ("v", "l")}
    assert _block_keys(spec, 10) == {"gamma_1", "gamma_2"} | {k.format(m) for k in per for m in ("v", "l", "vl")}
    assert spec["transformer.blocks.10.attn.vl.qkv.weight"][0] == (2304, 768)
    agnostic = paper_state_spec(dataclasses.replace(PAPER_BASE, multiway=False))
    assert _block_keys(agnostic, 10) == {"gamma_1", "gamma_2"} | {k.replace(".{}", "") for k in per}
    assert {"transformer.mask_token", "vl_text_imag_relative_position_index", "mask_for_combining_temporal"} <= set(
        spec
    )
    state = random_paper_state(PS, 0)
    assert state["text_imag_relative_position_index"].dtype == torch.float32
    assert torch.equal(state["relative_position_index"], _loop_image_index(2))
    assert torch.equal(state["text_imag_relative_position_index"].long(), _loop_pair_index(2, 5, 6))


def test_random_states_follow_spec_with_nontrivial_scales():
    state = random_vlmo_state(VS, 3)
    spec = vlmo_state_spec(VS)
    assert list(state) == list(spec)
    assert all(tuple(state[k].shape) == shape for k, (shape, _) in spec.items())
    assert torch.equal(state["text_embeddings.position_ids"], torch.arange(5)[None])
    norm = state["transformer.blocks.0.norm1.weight"]
    assert 0.8 < norm.mean() < 1.2 and norm.std() > 0.03
    gammas = torch.cat([v for k, v in state.items() if "gamma" in k])
    assert 0.08 < gammas.mean() < 0.12 and gammas.std() > 0.005
    assert 0.35 < state["relative_position_bias_table"].std() < 0.65
    assert state["transformer.blocks.0.attn.q_bias"].abs().min() > 0
    again, other = random_vlmo_state(VS, 3), random_vlmo_state(VS, 4)
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["transformer.blocks.0.attn.qkv.weight"], other["transformer.blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------------------
# VLMo forward passes
# ---------------------------------------------------------------------------


def _vlmo_ffn(expert):
    return lambda b, i: [(slice(None), f"{b}.norm2_{expert}", f"{b}.mlp_{expert}")]


def test_vlmo_image_without_bias_and_unit_gamma_is_a_plain_vit():
    state = random_vlmo_state(VS, 0)
    state["relative_position_bias_table"] = torch.zeros_like(state["relative_position_bias_table"])
    for k in [k for k in state if "gamma" in k]:
        state[k] = torch.ones_like(state[k])
    images, _, _ = _inputs()
    plain = dict(state)
    del plain["relative_position_bias_table"]  # the reference then adds no bias at all
    expected = _ref_encoder(
        plain, VS, _ref_image_embed(state, images, 4), _all(5), None, _vlmo_plan(VS, _vlmo_ffn("imag"))
    )
    torch.testing.assert_close(vlmo_image(state, VS, images), expected, atol=ATOL, rtol=0)


def test_vlmo_image_and_text_match_the_reference_with_bias():
    state = random_vlmo_state(VS, 1)
    images, ids, mask = _inputs()
    image = _ref_encoder(
        state, VS, _ref_image_embed(state, images, 4), _all(5), _loop_image_index(2), _vlmo_plan(VS, _vlmo_ffn("imag"))
    )
    torch.testing.assert_close(vlmo_image(state, VS, images), image, atol=ATOL, rtol=0)
    text = _ref_encoder(
        state, VS, _ref_text_embed(state, ids), mask, _loop_text_index(2, 5, 6), _vlmo_plan(VS, _vlmo_ffn("text"))
    )
    torch.testing.assert_close(vlmo_text(state, VS, ids, mask), text, atol=ATOL, rtol=0)
    zero_bias = dict(state, relative_position_bias_table=torch.zeros_like(state["relative_position_bias_table"]))
    assert (vlmo_image(zero_bias, VS, images) - image).abs().max() > 1e-2  # the bias matters


def test_vlmo_pair_attends_across_and_splits_the_ffn_below_the_vl_layer():
    state = random_vlmo_state(VS, 2)
    images, ids, mask = _inputs()

    def ffn(b, i):
        if i >= VS.vlffn_start_layer_index:
            return [(slice(None), f"{b}.norm2_vl", f"{b}.mlp_vl")]
        return [(slice(0, 5), f"{b}.norm2_text", f"{b}.mlp_text"), (slice(5, None), f"{b}.norm2_imag", f"{b}.mlp_imag")]

    x = torch.cat([_ref_text_embed(state, ids), _ref_image_embed(state, images, 4)], dim=1)
    key_mask = torch.cat([mask, _all(5)], dim=1)
    expected = _ref_encoder(state, VS, x, key_mask, _loop_pair_index(2, 5, 6), _vlmo_plan(VS, ffn))
    out = vlmo_pair(state, VS, images, ids, mask)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    other = vlmo_pair(state, VS, images.flip(0), ids, mask)
    assert (other[:, :5] - out[:, :5]).abs().max() > 1e-3  # text sees the image in every layer


def test_vlmo_pair_with_tied_ffns_is_the_same_through_split_or_vl_route():
    """Text and image FFN tied: the split route (no vl layer) equals the vl route from layer 0 with the same FFN."""
    split_shapes = VlmoShapes(**TINY, vlffn_start_layer_index=3, layer_scale=True)
    vl_shapes = VlmoShapes(**TINY, vlffn_start_layer_index=0, layer_scale=True)
    state = random_vlmo_state(split_shapes, 5)
    for k in [k for k in state if "_imag" in k]:
        state[k] = state[k.replace("_imag", "_text")]
    tied = dict(state)
    for k in [k for k in state if "_text" in k]:
        tied[k.replace("_text", "_vl")] = state[k]
    assert set(tied) == set(vlmo_state_spec(vl_shapes))
    images, ids, mask = _inputs()
    torch.testing.assert_close(
        vlmo_pair(state, split_shapes, images, ids, mask),
        vlmo_pair(tied, vl_shapes, images, ids, mask),
        atol=ATOL,
        rtol=0,
    )


def test_vlmo_through_vl_reruns_the_vl_layers_from_the_layer_below():
    state = random_vlmo_state(VS, 6)
    images, ids, mask = _inputs()
    assert (vlmo_text_through_vl(state, VS, ids, mask) - vlmo_text(state, VS, ids, mask)).abs().max() > 1e-3
    tied = dict(state)
    for k in [k for k in state if "_vl" in k]:
        tied[k] = state[k.replace("_vl", "_text")]
    torch.testing.assert_close(
        vlmo_text_through_vl(tied, VS, ids, mask), vlmo_text(tied, VS, ids, mask), atol=ATOL, rtol=0
    )
    for k in [k for k in state if "_vl" in k]:
        tied[k] = state[k.replace("_vl", "_imag")]
    torch.testing.assert_close(vlmo_image_through_vl(tied, VS, images), vlmo_image(tied, VS, images), atol=ATOL, rtol=0)


def test_vlmo_absolute_positions_without_layer_scale():
    shapes = VlmoShapes(**TINY, vlffn_start_layer_index=2, layer_scale=False, relative_position=False)
    state = random_vlmo_state(shapes, 7)
    images, ids, mask = _inputs()
    plan = _vlmo_plan(shapes, _vlmo_ffn("imag"))
    image = _ref_encoder(state, shapes, _ref_image_embed(state, images, 4, absolute=True), _all(5), None, plan)
    torch.testing.assert_close(vlmo_image(state, shapes, images), image, atol=ATOL, rtol=0)
    plan = _vlmo_plan(shapes, _vlmo_ffn("text"))
    text = _ref_encoder(state, shapes, _ref_text_embed(state, ids, absolute=True), mask, None, plan)
    torch.testing.assert_close(vlmo_text(state, shapes, ids, mask), text, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------
# The paper's model
# ---------------------------------------------------------------------------


def test_paper_image_text_and_pair_match_the_reference():
    state = random_paper_state(PS, 8)
    images, ids, mask = _inputs()
    image = _ref_encoder(
        state, PS, _ref_image_embed(state, images, 4), _all(5), _loop_image_index(2), _paper_plan(PS, lambda i: "v")
    )
    torch.testing.assert_close(paper_image(state, PS, images), image, atol=ATOL, rtol=0)
    text = _ref_encoder(
        state, PS, _ref_text_embed(state, ids), mask, _loop_text_index(2, 5, 6), _paper_plan(PS, lambda i: "l")
    )
    torch.testing.assert_close(paper_text(state, PS, ids, mask), text, atol=ATOL, rtol=0)
    x = torch.cat([_ref_text_embed(state, ids), _ref_image_embed(state, images, 4)], dim=1)
    plan = _paper_plan(PS, lambda i: "vl" if i >= PS.fusion_layer else None)
    pair = _ref_encoder(state, PS, x, torch.cat([mask, _all(5)], dim=1), _loop_pair_index(2, 5, 6), plan)
    torch.testing.assert_close(paper_pair(state, PS, images, ids, mask), pair, atol=ATOL, rtol=0)


def test_paper_pair_below_fusion_is_each_modality_alone():
    shapes = PaperShapes(**TINY, fusion_layer=3)  # no vl layer
    state = random_paper_state(shapes, 9)
    images, ids, mask = _inputs()
    pair = paper_pair(state, shapes, images, ids, mask)
    torch.testing.assert_close(pair[:, :5], paper_text(state, shapes, ids, mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(pair[:, 5:], paper_image(state, shapes, images), atol=ATOL, rtol=0)
    fused_state = random_paper_state(PS, 9)  # with a vl layer the text does see the image
    fused, flipped = (paper_pair(fused_state, PS, x, ids, mask)[:, :5] for x in (images, images.flip(0)))
    assert (fused - flipped).abs().max() > 1e-3


def _tie_experts(state, source="v"):
    """Every expert of every block set to ``source``'s tensors (vl too, where present)."""
    tied = dict(state)
    for k in state:
        for m in ("l", "vl"):
            for module in ("attn", "norm1", "mlp", "norm2"):
                marker = f".{module}.{m}."
                if marker in k:
                    tied[k] = state[k.replace(marker, f".{module}.{source}.")]
    return tied


def test_paper_with_tied_experts_equals_the_agnostic_model():
    agnostic_shapes = PaperShapes(**TINY, fusion_layer=2, multiway=False)
    tied = _tie_experts(random_paper_state(PS, 10))
    agnostic = {}
    for k, v in tied.items():
        for module in ("attn", "norm1", "mlp", "norm2"):
            if f".{module}.v." in k:
                agnostic[k.replace(f".{module}.v.", f".{module}.")] = v
        if not any(f".{module}." in k for module in ("attn", "norm1", "mlp", "norm2")):
            agnostic[k] = v
    assert set(agnostic) == set(paper_state_spec(agnostic_shapes))
    images, ids, mask = _inputs()
    for multiway_out, agnostic_out in [
        (paper_image(tied, PS, images), paper_image(agnostic, agnostic_shapes, images)),
        (paper_text(tied, PS, ids, mask), paper_text(agnostic, agnostic_shapes, ids, mask)),
        (paper_pair(tied, PS, images, ids, mask), paper_pair(agnostic, agnostic_shapes, images, ids, mask)),
    ]:
        torch.testing.assert_close(multiway_out, agnostic_out, atol=ATOL, rtol=0)


def test_paper_through_vl_uses_the_vl_experts():
    state = random_paper_state(PS, 11)
    images, ids, mask = _inputs()
    assert (paper_text_through_vl(state, PS, ids, mask) - paper_text(state, PS, ids, mask)).abs().max() > 1e-3
    as_text = _tie_experts(state, "l")  # vl := l
    torch.testing.assert_close(
        paper_text_through_vl(as_text, PS, ids, mask), paper_text(as_text, PS, ids, mask), atol=ATOL, rtol=0
    )
    as_image = dict(state)
    for k in state:
        for module in ("attn", "norm1", "mlp", "norm2"):
            if f".{module}.vl." in k:
                as_image[k] = state[k.replace(f".{module}.vl.", f".{module}.v.")]
    torch.testing.assert_close(
        paper_image_through_vl(as_image, PS, images), paper_image(as_image, PS, images), atol=ATOL, rtol=0
    )


def test_paper_short_text_with_max_vl_text_len_equals_padded_text():
    shapes = PaperShapes(**TINY, fusion_layer=2, max_vl_text_len=5)
    state = random_paper_state(shapes, 12)
    _, ids, _ = _inputs()
    short = paper_text(state, shapes, ids[:, :3], torch.ones(2, 3, dtype=torch.bool))
    padded_mask = torch.zeros(2, 5, dtype=torch.bool)
    padded_mask[:, :3] = True
    padded = paper_text(state, shapes, ids, padded_mask)
    torch.testing.assert_close(short, padded[:, :3], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="max_text_len"):
        paper_text(random_paper_state(PS, 12), PS, ids[:, :3], torch.ones(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------
# Both
# ---------------------------------------------------------------------------

_TEXT_PATHS = {
    "vlmo": lambda ids, mask: vlmo_text(random_vlmo_state(VS, 13), VS, ids, mask),
    "vlmo_vl": lambda ids, mask: vlmo_text_through_vl(random_vlmo_state(VS, 13), VS, ids, mask),
    "paper": lambda ids, mask: paper_text(random_paper_state(PS, 13), PS, ids, mask),
    "vlmo_pair": lambda ids, mask: vlmo_pair(random_vlmo_state(VS, 13), VS, _inputs()[0], ids, mask),
    "paper_pair": lambda ids, mask: paper_pair(random_paper_state(PS, 13), PS, _inputs()[0], ids, mask),
}


@pytest.mark.parametrize("path", sorted(_TEXT_PATHS))
def test_padding_does_not_change_real_tokens(path):
    _, ids, mask = _inputs()
    changed = ids.clone()
    changed[0, 3:] = (ids[0, 3:] + 7) % 49 + 1  # only padded positions of row 0
    before, after = _TEXT_PATHS[path](ids, mask), _TEXT_PATHS[path](changed, mask)
    torch.testing.assert_close(before[0, :3], after[0, :3], atol=ATOL, rtol=0)
    torch.testing.assert_close(before[1], after[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(before[0, 5:], after[0, 5:], atol=ATOL, rtol=0)  # image tokens of a pair
    assert (before[0, 3:5] - after[0, 3:5]).abs().max() > 1e-3  # the padded queries did change


def test_bad_inputs_are_refused():
    images, ids, mask = _inputs()
    state = random_vlmo_state(VS, 0)
    with pytest.raises(ValueError, match="padded to max_text_len"):
        vlmo_text(state, VS, ids[:, :4], mask[:, :4])
    with pytest.raises(ValueError, match="differ"):
        vlmo_text(state, VS, ids, mask[:, :4])
    with pytest.raises(ValueError, match="images must be 8x8"):
        vlmo_image(state, VS, images[..., :4, :4])
    with pytest.raises(ValueError, match="multiple of heads"):
        VlmoShapes(**{**TINY, "width": 15}, vlffn_start_layer_index=2, layer_scale=True)
    with pytest.raises(ValueError, match="fusion_layer"):
        PaperShapes(**TINY, fusion_layer=4)
