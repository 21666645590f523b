"""The emoji dataset on the real Debian files: parsing, captions, leak-free splits, rendering, the cache."""

import collections
import os
import random

import pytest
import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data import image_cache
from vlmerge.data.datasets.emoji import dataset as emoji
from vlmerge.data.datasets.emoji.dataset import build_emoji_dataset
from vlmerge.data.datasets.emoji.records import (
    EmojiSources,
    base_emoji,
    emoji_records,
    lookup_cldr,
    parse_cldr,
    parse_emoji_test,
)
from vlmerge.data.datasets.emoji.render import load_font, render_emoji
from vlmerge.data.splits import SPLITS, assign_split

LIMIT = 12  # the first twelve emoji are single-codepoint smileys: fast, and renderable with any Pillow


@pytest.fixture(scope="module")
def sources(emoji_sources):
    return emoji_sources  # conftest's: skips with the Debian packages to install when absent


@pytest.fixture(scope="module")
def records(sources):
    return emoji_records(sources)


@pytest.fixture(scope="module")
def cldr(sources):
    return parse_cldr(sources.cldr_dir)


@pytest.fixture
def small(sources, tmp_path):
    return build_emoji_dataset(image_size=32, cache_dir=tmp_path, sources=sources, limit=LIMIT)


def test_emoji_test_counts(sources):
    entries = parse_emoji_test(sources.emoji_test)
    groups = {entry.group for entry in entries}
    assert len(entries) > 3000
    assert len(groups) in (9, 10) and "Component" not in groups
    assert len({entry.subgroup for entry in entries}) >= 90
    first = entries[0]
    assert (first.emoji, first.name, first.group, first.subgroup) == (
        "😀",
        "grinning face",
        "Smileys & Emotion",
        "face-smiling",
    )
    assert all(chr(code) in entry.emoji for entry in entries[:50] for code in entry.codepoints)


def test_cldr_names_and_keywords(cldr):
    assert cldr["😀"][0] == "grinning face"
    assert cldr["🍕"] == ("pizza", ("cheese", "pizza", "slice"))
    assert cldr["👋🏽"][0] == "waving hand: medium skin tone"  # from annotationsDerived


def test_cldr_key_without_fe0f_matches(cldr, records):
    smiling = "\u263a\ufe0f"  # fully-qualified in emoji-test.txt; CLDR's key is the bare U+263A
    assert smiling not in cldr
    assert lookup_cldr(cldr, smiling)[0] == "smiling face"
    assert next(r for r in records if r.emoji == smiling).name == "smiling face"
    assert lookup_cldr({"\u2764": ("red heart", ())}, "\u2764\ufe0f") == ("red heart", ())


def test_caption_falls_back_to_emoji_test_name(cldr, records):
    uncaptioned = [r for r in records if lookup_cldr(cldr, r.emoji) is None]
    assert all(r.name and r.keywords == () for r in uncaptioned)  # newer emoji than this CLDR release
    assert len(uncaptioned) < 0.05 * len(records)


def test_skin_tone_variants_share_base_and_split(records):
    by_emoji = {r.emoji: r for r in records}
    variants = [by_emoji[e] for e in ("👋", "👋🏻", "👋🏽", "👋🏿")]
    assert {r.base for r in variants} == {"👋"} and len({r.split for r in variants}) == 1
    assert base_emoji("👨🏻\u200d🤝\u200d👨🏿") == "👨\u200d🤝\u200d👨"
    splits_per_base = collections.defaultdict(set)
    for record in records:
        splits_per_base[record.base].add(record.split)
    assert all(len(splits) == 1 for splits in splits_per_base.values())


def test_split_is_deterministic_and_roughly_proportional(records):
    bases = sorted({r.base for r in records})
    shuffled = random.Random(0).sample(bases, len(bases))
    assert [assign_split(b) for b in bases] == [assign_split(b) for b in bases]
    assert {b: assign_split(b) for b in shuffled} == {b: assign_split(b) for b in bases}
    counts = collections.Counter(assign_split(b) for b in bases)
    for split, fraction in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert abs(counts[split] / len(bases) - fraction) < 0.03
    assert {assign_split(b, (1.0, 0.0, 0.0)) for b in bases[:100]} == {"train"}
    with pytest.raises(ConfigError, match="summing to 1"):
        assign_split("😀", (0.5, 0.2, 0.2))


def test_rendering_gives_distinct_non_blank_images(small):
    assert len(small) + len(small.skipped) == LIMIT and len(small) == LIMIT
    assert small.images.shape == (LIMIT, 3, 32, 32) and small.images.dtype == torch.uint8
    flat = small.images.reshape(LIMIT, -1)
    assert (flat.min(dim=1).values < 128).all()  # every picture has dark pixels on the white ground
    assert len(torch.unique(flat, dim=0)) == LIMIT
    image = small.image_tensor(0)
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert small.caption(0) == "grinning face"
    assert small.image_size == 32


def test_unrenderable_emoji_are_none(sources):
    font = load_font(sources.font)
    assert render_emoji(font, "x", 32) is None  # not in the font: blank
    assert render_emoji(font, "😀😀", 32) is None  # two glyphs, not one picture
    assert render_emoji(font, "🍕", 16).size == (16, 16)


def test_split_views_keep_vocabularies(small):
    parts = [small.split(name) for name in SPLITS]
    assert sum(len(part) for part in parts) == len(small)
    for name, part in zip(SPLITS, parts):
        assert all(r.split == name for r in part.records) and part.groups == small.groups
        assert part.images.shape[0] == len(part)
    assert small.labels("subgroup").max() < len(small.subgroups)
    with pytest.raises(ConfigError, match="unknown split"):
        small.split("dev")


def test_second_build_reuses_the_cache(sources, tmp_path, monkeypatch):
    first = build_emoji_dataset(cache_dir=tmp_path, sources=sources, limit=LIMIT)
    cached = {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    assert sorted(path.suffix for path in cached) == [".json", ".safetensors"]

    def fail(*args, **kwargs):
        raise AssertionError("re-rendered despite a valid cache")

    monkeypatch.setattr(emoji, "render_emoji", fail)
    second = build_emoji_dataset(cache_dir=tmp_path, sources=sources, limit=LIMIT)
    assert torch.equal(first.images, second.images) and first.records == second.records
    assert {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == cached
    with pytest.raises(AssertionError, match="re-rendered"):  # another size is another cache entry
        build_emoji_dataset(image_size=16, cache_dir=tmp_path, sources=sources, limit=LIMIT)


def test_changed_source_changes_the_cache_key(sources, tmp_path):
    copy = tmp_path / "emoji-test.txt"
    copy.write_bytes(sources.emoji_test.read_bytes())
    moved = EmojiSources(sources.font, sources.cldr_dir, copy)
    before = moved.fingerprint()
    os.utime(copy, ns=(0, 10**18))
    assert moved.fingerprint() != before


def test_failed_cache_write_leaves_nothing(sources, tmp_path, monkeypatch):
    def write_half_then_crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half a safetensors file")
        raise OSError("disk full")

    monkeypatch.setattr(image_cache, "save_file", write_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        build_emoji_dataset(cache_dir=tmp_path, sources=sources, limit=3)
    assert list(tmp_path.iterdir()) == []


def test_missing_source_names_the_debian_package(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"nope\.ttf \(Debian package fonts-noto-color-emoji\).*apt-get install"):
        EmojiSources.default(font=tmp_path / "nope.ttf").check()
    monkeypatch.setenv("VLMERGE_EMOJI_TEST", str(tmp_path / "emoji-test.txt"))
    assert EmojiSources.default().emoji_test == tmp_path / "emoji-test.txt"
    with pytest.raises(ConfigError, match="Debian package unicode-data"):
        build_emoji_dataset(cache_dir=tmp_path, limit=3)
