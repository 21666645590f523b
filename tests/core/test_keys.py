"""The one parser of block paths: its parts, its round trip, and that no other module parses keys."""

import ast
from pathlib import Path

import pytest

import vlmerge
from vlmerge.core.keys import BlockPath, block_key, parse_block_path
from vlmerge.core.modality import Modality
from vlmerge.io.layout import to_reference_key
from vlmerge.merging.plan import merged_key, parse_expert_key
from vlmerge.models import MODEL_SIZES, ExpertPlacement, model_config
from vlmerge.models.factory import state_keys

V, L, VL = Modality.V, Modality.L, Modality.VL


@pytest.mark.parametrize(
    "key, parts",
    [
        ("blocks.3.attn.v.qkv.weight", ("", 3, "attn", V, "qkv.weight")),
        ("blocks.0.attn.vl.q_bias", ("", 0, "attn", VL, "q_bias")),
        ("blocks.11.mlp.l.fc1.bias", ("", 11, "mlp", L, "fc1.bias")),
        ("blocks.2.norm1.vl.weight", ("", 2, "norm1", VL, "weight")),
        ("transformer.blocks.10.mlp.v.fc2.weight", ("transformer.", 10, "mlp", V, "fc2.weight")),
        ("model.backbone.blocks.1.norm2.l.bias", ("model.backbone.", 1, "norm2", L, "bias")),
        # shared sub-modules: no modality segment; `v_bias` is a tensor, not the v expert
        ("blocks.3.attn.v_bias", ("", 3, "attn", None, "v_bias")),
        ("blocks.3.mlp.fc1.weight", ("", 3, "mlp", None, "fc1.weight")),
        ("blocks.5.gamma_1", ("", 5, "gamma_1", None, "")),
        # module paths, as Gram matrices are keyed
        ("blocks.3.attn.v.qkv", ("", 3, "attn", V, "qkv")),
        ("transformer.blocks.3.attn.vl", ("transformer.", 3, "attn", VL, "")),
        ("blocks.3.attn", ("", 3, "attn", None, "")),
    ],
)
def test_a_block_path_has_its_parts_and_formats_back_unchanged(key, parts):
    path = parse_block_path(key)
    assert path == BlockPath(*parts)
    assert path.key == str(path) == key


@pytest.mark.parametrize(
    "key",
    [
        "pooler.dense.weight",
        "cls_token",
        "norm.weight",
        "text_embed.word.weight",
        "blocks",
        "blocks.3",
        "blocks.x.attn.v.weight",
        "blocks.03.attn.v.weight",
        "myblocks.3.attn.v.weight",
        "blocks.3.attn.v.",
        "blocks.3.attn.v..weight",
        "blocks.3..weight",
        ".blocks.3.attn.weight",
    ],
)
def test_keys_outside_the_blocks_or_malformed_are_not_block_paths(key):
    assert parse_block_path(key) is None


def test_merged_module_and_child_paths():
    path = parse_block_path("transformer.blocks.3.mlp.l.fc1.weight")
    assert path.merged().key == "transformer.blocks.3.mlp.fc1.weight"
    assert path.module().key == "transformer.blocks.3.mlp.l.fc1"
    assert path.module().module().key == "transformer.blocks.3.mlp.l"
    assert parse_block_path("blocks.3.attn.v.q_bias").module().key == "blocks.3.attn.v"
    assert parse_block_path("blocks.3.attn.v").child("qkv").key == "blocks.3.attn.v.qkv"
    assert parse_block_path("blocks.3.attn").child("qkv").child("weight").key == "blocks.3.attn.qkv.weight"
    with pytest.raises(ValueError, match="names a slot or an expert"):
        parse_block_path("blocks.3.attn.v").module()
    assert block_key(7, "mlp.fc2.bias") == "blocks.7.mlp.fc2.bias"
    assert block_key(7, "gamma_2", "transformer.") == "transformer.blocks.7.gamma_2"


@pytest.fixture(scope="module")
def model_keys() -> list[str]:
    """Every state-dict key of every registered size and expert placement."""
    return sorted(
        {
            key
            for size in MODEL_SIZES.names()
            for placement in ExpertPlacement
            for key in state_keys(model_config(size, placement=placement.value))
        }
    )


@pytest.mark.parametrize("layout", [str, to_reference_key], ids=["native", "reference"])
def test_every_model_key_round_trips_and_only_block_keys_parse(model_keys, layout):
    for native in model_keys:
        key = layout(native)
        path = parse_block_path(key)
        assert (path is not None) == native.startswith("blocks."), key
        assert path is None or path.key == key


@pytest.mark.parametrize("size", MODEL_SIZES.names())
@pytest.mark.parametrize("placement", [p.value for p in ExpertPlacement])
def test_expert_keys_merge_to_the_agnostic_models_keys(size, placement):
    config = model_config(size, placement=placement)
    merged = {merged_key(k) for k in state_keys(config)}
    assert merged == set(state_keys(config.agnostic()))
    experts = [parse_expert_key(k) for k in state_keys(config)]
    expected = {V, L, VL} if config.vl_experts else {V, L}  # BEiT-3's sizes have no vl expert
    assert {e.modality for e in experts if e} == (expected if placement != "none" else set())


# --- no module but core/keys.py parses `blocks.{i}...` key strings ------------------------------------

PARSER = Path(vlmerge.__file__).parent / "core" / "keys.py"
STRING_METHODS = {
    "split",
    "rsplit",
    "partition",
    "rpartition",
    "startswith",
    "endswith",
    "removeprefix",
    "removesuffix",
    "find",
    "rfind",
    "index",
    "rindex",
    "count",
    "replace",
}
REGEX_FUNCTIONS = {"compile", "match", "fullmatch", "search", "sub", "subn", "split", "findall", "finditer"}


def _mentions_blocks(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and "blocks" in n.value for n in ast.walk(node))


def key_parsing(source: str) -> list[int]:
    """Lines that split, match or test strings over `blocks`: a regex, str.split and kin, `in`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "blocks\\." in node.value:
            found.append(node.lineno)  # regex text, wherever it is used
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            regex = isinstance(node.func.value, ast.Name) and node.func.value.id == "re"
            if node.func.attr in (REGEX_FUNCTIONS if regex else STRING_METHODS) and any(
                map(_mentions_blocks, node.args)
            ):
                found.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            if _mentions_blocks(node.left) or any(map(_mentions_blocks, node.comparators)):
                found.append(node.lineno)
    return sorted(set(found))


@pytest.mark.parametrize(
    "snippet",
    [
        'layers = {int(k.split("blocks.", 1)[1].split(".")[0]) for k in keys if "blocks." in k}',
        'skip = ".blocks." not in f".{name}"',
        'KEY = re.compile(r"^(?:.*\\.)?blocks\\.(\\d+)\\.attn$")',
        'KEY = re.compile("blocks[.]([0-9]+)")',
        'ref = any(k.startswith("transformer.blocks.") for k in keys)',
        'ref = key.startswith(("blocks.", "transformer.blocks."))',
    ],
)
def test_the_scan_finds_hand_written_key_parsing(snippet):
    assert key_parsing(snippet) == [1]


# The layout tables (io/layout.py) hold the patterns of the foreign names they rename to native ones.
LAYOUT_TABLES = PARSER.parents[1] / "io" / "layout.py"


def test_no_module_parses_block_keys_but_the_parser():
    offenders = [
        f"{path.relative_to(PARSER.parents[2])}:{line}"
        for path in sorted(PARSER.parents[1].rglob("*.py"))
        if path not in (PARSER, LAYOUT_TABLES)
        for line in key_parsing(path.read_text())
    ]
    assert offenders == [], "parse keys with vlmerge.core.keys.parse_block_path instead"
