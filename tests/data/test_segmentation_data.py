"""Segmentation data: ADE20k and VOC-style folders read from small files in their public layouts, bad
masks refused with the file named, and the clip-art scenes deterministic with no stamp in two splits."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlmerge.core.errors import ConfigError
from vlmerge.data.config import DataConfig
from vlmerge.data.datasets import stamp_scenes
from vlmerge.data.datasets.stamp_scenes import StampScenes
from vlmerge.data.datasets.tuxpaint import DEFAULT_ROOT
from vlmerge.data.sources import SOURCES


def write_pair(image_path, mask_path, values: np.ndarray, mode: str = "L", image_size=None) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    height, width = image_size or values.shape
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(image_path)
    mask = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":
        mask = mask.convert("P")
        mask.putpalette([v for i in range(256) for v in (i, i, i)])
    elif mode != "L":
        mask = mask.convert(mode)
    mask.save(mask_path)


def quadrants(top_left: int, top_right: int, bottom: int) -> np.ndarray:
    values = np.full((16, 24), bottom)
    values[:8, :12], values[:8, 12:] = top_left, top_right
    return values


@pytest.fixture
def ade20k(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for folder, stem, values in [
        ("training", "ADE_train_00000001", quadrants(0, 1, 150)),
        ("training", "ADE_train_00000002", quadrants(3, 3, 3)),
        ("validation", "ADE_val_00000001", quadrants(2, 0, 5)),
    ]:
        write_pair(root / "images" / folder / f"{stem}.jpg", root / "annotations" / folder / f"{stem}.png", values)
    return root


def load(name: str, **paths) -> object:
    return SOURCES.get(name)(DataConfig(dataset=name, image_size=8, paths={k: str(v) for k, v in paths.items()}))


def test_ade20k_reduces_the_zero_label(ade20k):
    source = load("ade20k", root=ade20k)
    train = source.segments("train")
    assert len(train) == 2 and len(source.classes) == 150 and train.images[:].shape == (2, 3, 8, 8)
    masks = train.masks[:]
    assert masks.shape == (2, 8, 8) and masks.dtype == torch.uint8
    assert masks[0, 0, 0] == 255 and masks[0, 0, 7] == 0 and masks[0, 7, 0] == 149  # 0 ignored, k -> k - 1
    assert masks[1].unique().tolist() == [2]
    assert source.segments("test").masks[:][0, 0, 0] == 1


def test_ade20k_names_its_classes_from_object_info(ade20k):
    names = ["wall", "building"] + [f"thing {i}" for i in range(148)]
    rows = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i + 1}\t0.1\t1\t1\t{name}" for i, name in enumerate(names)]
    (ade20k / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    assert load("ade20k", root=ade20k).classes[:2] == ("wall", "building")


def test_voc_folder_keeps_255_and_reads_its_split_lists(tmp_path):
    for stem, values in [("2007_000001", quadrants(0, 15, 255)), ("2007_000002", quadrants(20, 1, 0))]:
        write_pair(tmp_path / "JPEGImages" / f"{stem}.jpg", tmp_path / "SegmentationClass" / f"{stem}.png", values, "P")
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    source = load("segmentation_folder", root=tmp_path)
    assert len(source.classes) == 21
    mask = source.segments("train").masks[:][0]
    assert (mask[0, 0], mask[0, 7], mask[7, 0]) == (0, 15, 255)
    assert source.segments("test").masks[:][0, 0, 0] == 20
    (tmp_path / "names.txt").write_text("sky\nground\n")
    with pytest.raises(ConfigError, match="2007_000001.png: values \\[15\\]"):
        load("segmentation_folder", root=tmp_path, classes=tmp_path / "names.txt").segments("train").masks[:]


@pytest.mark.parametrize(
    "problem, message",
    [
        ("size", "mask is \\(24, 16\\) but its image"),
        ("range", "values \\[151\\] are not among the 150 classes"),
        ("format", "must be a PNG, not JPEG"),
        ("mode", "mode L or P\\), not mode RGB"),
    ],
)
def test_bad_masks_are_refused_naming_the_file(tmp_path, problem, message):
    root = tmp_path / "ADEChallengeData2016"
    image, mask = root / "images/training/bad.jpg", root / "annotations/training/bad.png"
    values = quadrants(1, 2, 151 if problem == "range" else 3)
    write_pair(image, mask, values, "RGB" if problem == "mode" else "L", (20, 20) if problem == "size" else None)
    if problem == "format":
        Image.open(mask).convert("L").save(mask, format="JPEG")
    with pytest.raises(ConfigError, match=f"bad.png: .*{message}" if problem != "size" else message):
        load("ade20k", root=root).segments("train").masks[:]


def test_a_missing_mask_is_named(ade20k):
    (ade20k / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(ConfigError, match="ADE_train_00000002.png"):
        load("ade20k", root=ade20k).segments("train")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    if not DEFAULT_ROOT.is_dir():
        pytest.skip("Tux Paint stamps absent: apt-get install tuxpaint-stamps-default")
    cache = tmp_path_factory.mktemp("scene-cache")
    return StampScenes(DataConfig(dataset="stamp_scenes", image_size=32, limit=24, cache_dir=str(cache)))


def test_scenes_are_labelled_clip_art(scenes):
    train = scenes.segments("train")
    assert scenes.classes[0] == "background" and len(scenes.classes) == 17
    images, masks = train.images[:], train.masks[:]
    assert images.shape == (24, 3, 32, 32) and masks.shape == (24, 32, 32)
    assert masks.max() < len(scenes.classes) and (masks == 0).any() and (masks > 0).float().mean() > 0.2
    assert all(len(mask.unique()) >= 2 for mask in masks)  # every scene shows a stamp


def test_scenes_are_deterministic_across_loads_and_caches(scenes, tmp_path):
    again = StampScenes(DataConfig(dataset="stamp_scenes", image_size=32, limit=24, cache_dir=str(tmp_path)))
    for split in ("train", "test"):
        assert torch.equal(scenes.scenes(split), again.scenes(split))  # one from cache, one composed afresh
    fewer = StampScenes(DataConfig(dataset="stamp_scenes", image_size=32, limit=5, cache_dir=str(tmp_path)))
    assert torch.equal(fewer.scenes("val"), again.scenes("val")[:5])  # the limit keeps the first scenes


def test_a_splits_scenes_paste_only_its_own_stamps(scenes, tmp_path, monkeypatch):
    by_split = {split: {stamp.relative for stamp in scenes.stamps if stamp.split == split} for split in scenes.splits}
    assert all(by_split.values()) and sum(map(len, by_split.values())) == len(scenes.stamps)
    assert not any("_mirror" in name for names in by_split.values() for name in names)  # no mirrored twin leaks
    pictures = stamp_scenes.stamp_pictures(scenes.stamps, 32, scenes.config.cache_dir)
    pasted = {}
    compose = stamp_scenes.compose_scenes

    def recording(chosen, labels, count, size, key):
        pasted[key] = chosen
        return compose(chosen, labels, count, size, key)

    monkeypatch.setattr(stamp_scenes, "compose_scenes", recording)
    fresh = StampScenes(DataConfig(dataset="stamp_scenes", image_size=32, limit=3, cache_dir=str(tmp_path)))
    for key, split in enumerate(fresh.splits):
        fresh.scenes(split)
        rows = [row for row, stamp in enumerate(scenes.stamps) if stamp.split == split]
        assert torch.equal(pasted[key], pictures[rows])
