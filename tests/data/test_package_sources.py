"""Data sources read from installed packages (Tux Paint stamps, easy-VQA, Fashion-MNIST, WordNet), on the real
files: counts, captions, answers, labels and pixels re-derived here independently of the sources' parsers."""

import collections
import gzip
import hashlib
import importlib.util
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmerge.core.errors import ConfigError
from vlmerge.data.config import DataConfig
from vlmerge.data.datasets import easy_vqa, fashion_mnist, tuxpaint, wordnet
from vlmerge.data.formats import ResizedImages, read_image
from vlmerge.data.sources import SOURCES, load_source

PACKAGED = {"tuxpaint": "pairs", "easy_vqa": "questions", "fashion_mnist": "image_classes", "wordnet": "texts"}


def require(path: Path | None, install: str) -> Path:
    if path is None or not path.exists():
        pytest.skip(f"{path or 'package'} absent; {install}")
    return path


def easy_vqa_dir() -> Path:
    try:
        return require(easy_vqa.package_data_dir(), "pip install --no-deps easy-vqa")
    except ConfigError:
        pytest.skip("easy-vqa absent; pip install --no-deps easy-vqa")


def source(name: str, **fields):
    return load_source(DataConfig(dataset=name, **fields))


def hash_split(key: str, bounds: tuple[float, float] = (0.8, 0.9)) -> str:
    """emoji.assign_split's rule, written out: the first 8 bytes of sha256 as a fraction of 2**64."""
    position = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "train" if position < bounds[0] else "val" if position < bounds[1] else "test"


@pytest.mark.parametrize("name", PACKAGED)
def test_each_source_documents_its_splits_and_names_its_package_when_absent(name, tmp_path, monkeypatch):
    cls = SOURCES.get(name)
    assert PACKAGED[name] in cls.provides() and all(split in cls.__doc__ for split in cls.splits)
    key = cls.optional_path_keys[0]
    broken = cls(DataConfig(dataset=name, paths={key: str(tmp_path / "absent")}))
    manager, package, install = {
        "tuxpaint": ("Debian", "tuxpaint-stamps-default", "apt-get install"),
        "easy_vqa": ("PyPI", "easy-vqa", "pip install --no-deps"),
        "fashion_mnist": ("Debian", "dataset-fashion-mnist", "apt-get install"),
        "wordnet": ("Debian", "wordnet-base", "apt-get install"),
    }[name]
    message = rf"dataset '{name}' needs the {manager} package {package} \(.*absent.* not found\): {install} {package}"
    with pytest.raises(ConfigError, match=message):
        getattr(broken, PACKAGED[name])("test")
    if name == "easy_vqa":  # the package itself absent
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
        with pytest.raises(
            ConfigError,
            match=re.escape(
                "needs the PyPI package easy-vqa (not installed in this Python): pip install --no-deps easy-vqa"
            ),
        ):
            cls(DataConfig(dataset=name)).questions("test")


# ---------------------------------------------------------------- Tux Paint stamps


@pytest.fixture(scope="module")
def stamps_root() -> Path:
    return require(tuxpaint.DEFAULT_ROOT, "apt-get install tuxpaint-stamps-default")


@pytest.fixture(scope="module")
def stamps(stamps_root, tmp_path_factory):
    return source("tuxpaint", image_size=32, limit=6, cache_dir=str(tmp_path_factory.mktemp("tuxpaint")))


def test_tuxpaint_counts_and_classes(stamps_root):
    found = tuxpaint.find_stamps(stamps_root)
    pngs = list(stamps_root.rglob("*.png"))
    assert 700 < len(found) < 900 and len(pngs) - len(found) < 40  # 785 of 802 in the 2022.06.04 package
    mirrors = {p for p in pngs if p.stem.endswith("_mirror")}  # mirror images of captioned stamps, no .txt
    assert mirrors and not mirrors & {stamp.path for stamp in found}
    categories = collections.Counter(stamp.category for stamp in found)
    assert 12 <= len(categories) <= 20 and {name for name, _ in categories.most_common(2)} == {"animals", "symbols"}
    splits = collections.Counter(stamp.split for stamp in found)
    assert 0.7 < splits["train"] / len(found) < 0.9 and min(splits.values()) > 40
    assert all(".utf8=" not in stamp.caption and stamp.caption for stamp in found)


def test_tuxpaint_captions_are_line_one_of_the_txt(stamps, stamps_root):
    quarter = stamps_root / "symbols/money/us/coins/025quarter"
    lines = quarter.with_suffix(".txt").read_text(encoding="utf-8").splitlines()
    assert lines[1].split("=", 1)[0].endswith(".utf8")  # line 2 on: translations
    known = next(s for s in tuxpaint.find_stamps(stamps_root) if s.path == quarter.with_suffix(".png"))
    assert known.caption == lines[0].strip() == "A US 25 cent piece ($.25) called a quarter."
    for split in ("train", "val", "test"):
        pairs, classes = stamps.pairs(split), stamps.image_classes(split)
        chosen = [s for s in stamps.chosen if s.split == split]
        assert len(pairs) == len(chosen) == 6 and pairs.image_of.tolist() == list(range(6))
        for stamp, caption, label in zip(chosen, pairs.captions, classes.labels.tolist()):
            assert caption == stamp.path.with_suffix(".txt").open(encoding="utf-8").readline().strip()
            assert classes.classes[label] == stamp.path.relative_to(stamps_root).parts[0]
            assert stamp.split == hash_split(stamp.path.relative_to(stamps_root).as_posix())
        assert pairs.images.dtype == torch.uint8 and pairs.images.shape == (6, 3, 32, 32)


def test_tuxpaint_transparency_is_white(stamps, stamps_root):
    def transparent_corner(path: Path) -> bool:  # top-left 4 x 4 fully transparent over non-white colour
        with Image.open(path) as image:
            rgba = np.array(image.convert("RGBA"))[:4, :4]
        return (rgba[..., 3] == 0).all() and (rgba[..., :3] != 255).any()

    square = [
        row
        for row, s in enumerate(stamps.chosen)
        if transparent_corner(s.path) and Image.open(s.path).size[0] == Image.open(s.path).size[1]
    ]
    assert square, "no square stamp with a transparent corner among the first ones of each split"
    assert (stamps.images[square][:, :, 0, 0] == 255).all()
    by_mode = {}
    for path in sorted(stamps_root.rglob("*.png")):
        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA", "P") and image.mode not in by_mode and transparent_corner(path):
                by_mode[image.mode] = path
    assert set(by_mode) == {"RGBA", "LA", "P"}
    for path in by_mode.values():
        assert (read_image(path, 32)[:, 0, 0] == 255).all()


def test_tuxpaint_cache_is_reused(stamps, tmp_path, monkeypatch):
    first = tuxpaint.TuxPaintStamps(DataConfig(dataset="tuxpaint", image_size=32, limit=2, cache_dir=str(tmp_path)))
    images = first.images
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]
    monkeypatch.setattr(tuxpaint, "read_image", lambda *args, **kwargs: pytest.fail("read despite a cache"))
    again = tuxpaint.TuxPaintStamps(DataConfig(dataset="tuxpaint", image_size=32, limit=2, cache_dir=str(tmp_path)))
    assert torch.equal(again.images, images) and torch.equal(images, stamps.images[[0, 1, 6, 7, 12, 13]])


# ---------------------------------------------------------------- easy-VQA

RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}


def drawn_attributes(image: torch.Tensor) -> dict[str, str]:
    """Shape and colour read from the pixels: the colour is the pure one drawn most; a rectangle fills its box,
    a triangle is far from symmetric under a flip, a circle is neither."""
    pixels = image.permute(1, 2, 0).int().numpy()
    counts = {name: int((np.abs(pixels - rgb).sum(-1) == 0).sum()) for name, rgb in RGB.items()}
    color = max(counts, key=counts.get)
    mask = np.abs(pixels - RGB[color]).sum(-1) < 60
    ys, xs = mask.nonzero()
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    symmetry = min((box & flipped).sum() / (box | flipped).sum() for flipped in (box[::-1], box[:, ::-1]))
    shape = "triangle" if symmetry < 0.7 else "rectangle" if box.mean() > 0.955 else "circle"
    return {"shape": shape, "color": color}


@pytest.fixture(scope="module")
def vqa_dir() -> Path:
    return easy_vqa_dir()


@pytest.fixture(scope="module")
def vqa(vqa_dir):
    return source("easy_vqa", image_size=64, limit=40)


def test_easy_vqa_counts_vocabulary_and_kinds(vqa, vqa_dir):
    answers = (vqa_dir / "answers.txt").read_text().split()
    assert vqa.answer_vocabulary() == tuple(answers) and len(answers) == 13
    for part, questions, images in (("train", 38575, 4000), ("test", 9673, 1000)):
        entries = json.loads((vqa_dir / part / "questions.json").read_text())
        assert len(entries) == questions and len(list((vqa_dir / part / "images").glob("*.png"))) == images
        for text, answer, _ in entries:
            kind = easy_vqa.question_kind(text)
            assert kind == ("yes/no" if answer in ("yes", "no") else "shape" if answer in easy_vqa.SHAPES else "color")


def test_easy_vqa_questions_match_the_json(vqa, vqa_dir):
    seen = set()
    for split in ("train", "val", "test"):
        folder = vqa_dir / ("test" if split == "test" else "train")
        part, questions = vqa.split(split), vqa.questions(split)
        assert len(part.ids) == 40 and part.ids == tuple(sorted(part.ids))
        assert all(split == "test" or hash_split(f"train/{i}", (0.9, 1.0)) == split for i in part.ids)
        entries = [e for e in json.loads((folder / "questions.json").read_text()) if e[2] in set(part.ids)]
        got = [
            [q, *a, part.ids[i]] for q, a, i in zip(questions.questions, questions.answers, questions.image_of.tolist())
        ]
        assert got == entries and all(a[next(iter(a))] == 1.0 and len(a) == 1 for a in questions.answers)
        for row in (0, 39):  # pictures unchanged at their own size
            png = np.array(Image.open(folder / "images" / f"{part.ids[row]}.png").convert("RGB"))
            assert torch.equal(part.images[[row]][0], torch.from_numpy(png).permute(2, 0, 1))
        seen |= {(folder.name, i) for i in part.ids}
    assert len(seen) == 120  # train and val never share a picture
    first = vqa.questions("train" if hash_split("train/0", (0.9, 1.0)) == "train" else "val")
    assert first.questions[0] == "what is the blue shape?" and first.answers[0] == {"rectangle": 1.0}
    assert first.kinds[:3] == ("shape", "color", "yes/no")


def test_easy_vqa_statements_are_true_of_the_pictures_and_balanced(vqa):
    for split in ("val", "test"):
        images = vqa.split(split).images
        drawn = [drawn_attributes(images[[row]][0]) for row in range(len(images))]
        settled = vqa.attributes(split)
        assert all(drawn[row][level] == value for row, found in settled.items() for level, value in found.items())
        assert sum(len(found) == 2 for found in settled.values()) > 30
        statements = vqa.statements(split, seed=3)
        truth = collections.Counter()
        for left, right, text, label in zip(
            statements.left.tolist(), statements.right.tolist(), statements.statements, statements.labels.tolist()
        ):
            a, b = drawn[left], drawn[right]
            assert left != right and len(settled[left]) == len(settled[right]) == 2
            if text == "both images show the same shape.":
                kind, holds = "same-shape", a["shape"] == b["shape"]
            elif text == "both shapes are the same color.":
                kind, holds = "same-color", a["color"] == b["color"]
            else:
                side, named = re.fullmatch(r"the (left|right) image shows a (\w+)(?: shape)?\.", text).groups()
                level = "color" if text.endswith(" shape.") else "shape"
                kind, holds = f"{side}-{level}", (a if side == "left" else b)[level] == named
            assert holds == label, text
            truth[kind, label] += 1
        assert set(truth) == {(kind, label) for kind in easy_vqa.STATEMENT_TEMPLATES for label in (True, False)}
        assert all(abs(truth[kind, True] - truth[kind, False]) <= 1 for kind in easy_vqa.STATEMENT_TEMPLATES)
        again = vqa.statements(split, seed=3)
        assert again.statements == statements.statements and torch.equal(again.left, statements.left)
        assert vqa.statements(split, seed=4).left.tolist() != statements.left.tolist()


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion_dir() -> Path:
    return require(fashion_mnist.DEFAULT_DIR, "apt-get install dataset-fashion-mnist")


def idx_labels(path: Path, count: int) -> list[int]:
    with gzip.open(path, "rb") as handle:
        magic, total = struct.unpack(">II", handle.read(8))
        assert magic == 2049
        return list(handle.read(min(count, total)))


def test_fashion_mnist_labels_and_pixels_match_the_idx_files(fashion_dir):
    mnist = source("fashion_mnist", image_size=28, limit=16)
    test = mnist.image_classes("test")
    assert test.labels.tolist() == idx_labels(fashion_dir / "t10k-labels-idx1-ubyte.gz", 16)
    assert test.classes[test.labels[0]] == "Ankle boot" and len(test.classes) == 10
    with gzip.open(fashion_dir / "t10k-images-idx3-ubyte.gz", "rb") as handle:
        assert struct.unpack(">IIII", handle.read(16)) == (2051, 10000, 28, 28)
        first = torch.frombuffer(bytearray(handle.read(28 * 28)), dtype=torch.uint8).reshape(28, 28)
    assert torch.equal(test.images[[0]][0], first.expand(3, 28, 28))
    train_labels = idx_labels(fashion_dir / "train-labels-idx1-ubyte.gz", 200)
    for split in ("train", "val"):
        rows = [r for r in range(200) if hash_split(f"train/{r}", (0.9, 1.0)) == split][:16]
        assert mnist.image_classes(split).labels.tolist() == [train_labels[r] for r in rows]
    pairs = mnist.pairs("test")
    assert pairs.captions[0] == "a photo of an ankle boot." and len(pairs) == 16


def test_fashion_mnist_counts_and_resizing(fashion_dir):
    images = fashion_mnist.read_idx(fashion_dir / "train-images-idx3-ubyte.gz")
    labels = fashion_mnist.read_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    full = source("fashion_mnist", image_size=56)
    sizes = {split: len(full.image_classes(split)) for split in ("train", "val", "test")}
    assert sizes["test"] == 10000 and sizes["train"] + sizes["val"] == 60000 and 5000 < sizes["val"] < 7000
    big = full.image_classes("test").images[torch.arange(8)]
    assert big.shape == (8, 3, 56, 56) and big.dtype == torch.uint8
    assert ResizedImages(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), 56)[[]].shape == (0, 3, 56, 56)
    test_images = torch.tensor(fashion_mnist.read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")[:8]).float()
    assert (big.float().mean((1, 2, 3)) - test_images.mean((1, 2))).abs().max() < 3


def test_corrupt_idx_files_fail_by_name(tmp_path, fashion_dir):
    good = gzip.decompress((fashion_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    cases = {"magic.gz": b"\x00\x01" + good[2:], "short.gz": good[:-5], "gzip.gz": None}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(gzip.compress(content) if content is not None else b"not gzip at all")
    with pytest.raises(ConfigError, match=r"magic.gz: not an IDX file \(magic number 00010801\)"):
        fashion_mnist.read_idx(tmp_path / "magic.gz")
    with pytest.raises(ConfigError, match=r"short.gz: 9995 bytes of data for shape \(10000,\).*truncated"):
        fashion_mnist.read_idx(tmp_path / "short.gz")
    with pytest.raises(ConfigError, match="gzip.gz: cannot read"):
        fashion_mnist.read_idx(tmp_path / "gzip.gz")


# ---------------------------------------------------------------- WordNet


@pytest.fixture(scope="module")
def wordnet_dir() -> Path:
    return require(wordnet.DEFAULT_DIR / "data.noun", "apt-get install wordnet-base").parent


def test_wordnet_counts_and_a_known_gloss(wordnet_dir):
    counts = {}
    for label, (suffix, (_, types)) in enumerate(wordnet.PARTS_OF_SPEECH.items()):
        synsets = wordnet.read_synsets(wordnet_dir / f"data.{suffix}", label, types)
        counts[suffix] = len(synsets)
        assert not any("Princeton" in s.definition or "LICENSEE" in s.definition for s in synsets[:50])
        if suffix == "verb":
            breathe = next(s for s in synsets if s.key == "verb/00001740")
            assert breathe.definition == "draw air into, and expel out of, the lungs"
            assert breathe.examples == ("I can breathe better when the air is clean", "The patient is respiring")
    expected = {"noun": 82115, "verb": 13767, "adj": 18156, "adv": 3621}  # WordNet 3.0
    assert all(abs(counts[pos] - n) < 0.02 * n for pos, n in expected.items())
    assert wordnet.parse_gloss('utter with seeming casualness; "drop a hint"; drop names"') == (
        "utter with seeming casualness",
        ("drop a hint",),
    )


def test_wordnet_labels_come_from_the_file_and_splits_from_the_key(wordnet_dir):
    wn = source("wordnet", limit=5)
    suffixes = list(wordnet.PARTS_OF_SPEECH)
    lines = {
        suffix: {
            line[:8]: line
            for line in (wordnet_dir / f"data.{suffix}").read_text().splitlines()
            if not line.startswith("  ")
        }
        for suffix in suffixes
    }
    for split in ("train", "val", "test"):
        classes, synsets = wn.text_classes(split), wn.split(split)
        assert classes.labels.tolist() == [label for label in range(4) for _ in range(5)]
        for synset, text, label in zip(synsets, classes.texts, classes.labels.tolist()):
            suffix, offset = synset.key.split("/")
            assert suffix == suffixes[label] and synset.split == split == hash_split(synset.key)
            gloss = lines[suffix][offset].split(" | ", 1)[1]
            assert gloss.startswith(text) and lines[suffix][offset].split()[2] in wordnet.PARTS_OF_SPEECH[suffix][1]
        texts = wn.texts(split)
        assert texts == tuple(t for s in synsets for t in (s.definition, *s.examples))
        assert len(texts) > len(synsets)  # some have example sentences
