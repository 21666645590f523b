"""Semantic segmentation from local files: ADE20k's public layout, and Pascal VOC style folders.

Images are resized to data.image_size square (bicubic, aspect not kept) and masks to the same grid
(nearest, so every value stays a class); both are read when a batch needs them. A mask must be a PNG
of mode L or P (index values), the size of its image, with values that are classes or 255 (ignored);
anything else is one ConfigError naming the file.

- `ade20k`: `ADEChallengeData2016/images/{training,validation}/*.jpg` with
  `annotations/{training,validation}/*.png`, 150 classes; 0 ("other") becomes 255 and k becomes k - 1
  (mmsegmentation's reduce_zero_label). Class names come from `objectInfo150.txt` when present.
- `segmentation_folder`: `JPEGImages/*.jpg`, `SegmentationClass/*.png` and
  `ImageSets/Segmentation/{train,val}.txt` (one stem per line); Pascal VOC's 21 classes unless
  `data.paths.classes` names a text file of class names, one per line.
"""

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmerge.core.errors import ConfigError
from vlmerge.data.formats import FileImages
from vlmerge.data.sources import IGNORE_LABEL, SOURCES, DataSource, SegmentedImages

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
ADE20K_CLASSES = 150


def read_mask(
    path: os.PathLike, image: os.PathLike, classes: int, size: int, reduce_zero_label: bool = False
) -> torch.Tensor:
    """uint8 (size, size): a class or IGNORE_LABEL per pixel, from an index PNG the size of `image`."""
    path = Path(path)
    try:
        with Image.open(path) as mask, Image.open(image) as picture:
            if mask.format != "PNG":
                raise ConfigError(f"{path}: a mask must be a PNG, not {mask.format}")
            if mask.mode not in ("L", "P"):
                raise ConfigError(f"{path}: a mask must be an index image (mode L or P), not mode {mask.mode}")
            if mask.size != picture.size:
                raise ConfigError(f"{path}: mask is {mask.size} but its image {image} is {picture.size}")
            values = np.array(mask, dtype=np.uint8)
    except OSError as error:
        raise ConfigError(f"{path}: not a readable mask ({error})") from error
    labels = values - np.uint8(1) if reduce_zero_label else values  # 0 - 1 wraps to 255: ignored
    bad = (labels >= classes) & (labels != IGNORE_LABEL)
    if bad.any():
        found = sorted(set(values[bad].tolist()))
        raise ConfigError(f"{path}: values {found[:5]} are not among the {classes} classes (nor 255, ignored)")
    resized = Image.fromarray(labels).resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.array(resized, dtype=np.uint8))


class FileMasks:
    """A mask store over files, read, checked and resized when indexed."""

    def __init__(
        self, paths: Sequence[Path], images: Sequence[Path], classes: int, size: int, reduce_zero_label: bool = False
    ) -> None:
        self.paths, self.images, self.classes, self.size = list(paths), list(images), classes, size
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        indices = range(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).reshape(-1).tolist()
        if not len(indices):
            return torch.empty(0, self.size, self.size, dtype=torch.uint8)
        return torch.stack(
            [read_mask(self.paths[i], self.images[i], self.classes, self.size, self.reduce_zero_label) for i in indices]
        )


def paired_files(images: list[Path], mask_dir: Path) -> list[Path]:
    """The mask `<stem>.png` in `mask_dir` of every image; a missing one is an error naming it."""
    masks = [mask_dir / f"{image.stem}.png" for image in images]
    missing = [str(mask) for mask in masks if not mask.is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} images have no mask, e.g. {missing[0]}")
    return masks


def segmented_files(
    images: list[Path], mask_dir: Path, classes: tuple[str, ...], size: int, reduce_zero_label: bool = False
) -> SegmentedImages:
    masks = paired_files(images, mask_dir)
    return SegmentedImages(
        FileImages(images, size), FileMasks(masks, images, len(classes), size, reduce_zero_label), classes
    )


@SOURCES.register_class
class Ade20k(DataSource):
    """ADE20k (SceneParsing) from `data.paths.root`, the ADEChallengeData2016 folder: train is its training
    images, test its validation images (the benchmark's evaluation set: its test labels are not public, and
    a study evaluates on `test`). `data.limit` keeps the first N."""

    name = "ade20k"
    splits = ("train", "test")
    path_keys = ("root",)
    FOLDERS = {"train": "training", "test": "validation"}

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        info = Path(self.config.paths["root"]) / "objectInfo150.txt"
        if info.is_file():  # Idx Ratio Train Val Name, tab-separated, a header line first
            names = [line.split("\t")[-1].strip() for line in info.read_text(encoding="utf-8").splitlines()[1:]]
            if len(names) == ADE20K_CLASSES and all(names):
                return tuple(names)
        return tuple(f"class{index}" for index in range(1, ADE20K_CLASSES + 1))

    @functools.cache
    def segments(self, split: str) -> SegmentedImages:
        self.check_split(split)
        root = Path(self.config.paths["root"])
        folder = root / "images" / self.FOLDERS[split]
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such folder; data.paths.root should be ADEChallengeData2016")
        images = sorted(folder.glob("*.jpg"))[: self.config.limit]
        if not images:
            raise ConfigError(f"{folder}: no .jpg images")
        return segmented_files(
            images, root / "annotations" / self.FOLDERS[split], self.classes, self.config.image_size, True
        )


@SOURCES.register_class
class SegmentationFolder(DataSource):
    """Pascal VOC style folders under `data.paths.root`: the split lists in ImageSets/Segmentation name the
    images of JPEGImages whose masks are in SegmentationClass; test reads val.txt (VOC's evaluation list, as
    a study evaluates on `test`). `data.limit` keeps the first N of each list."""

    name = "segmentation_folder"
    splits = ("train", "test")
    LISTS = {"train": "train", "test": "val"}
    path_keys = ("root",)
    optional_path_keys = ("classes",)

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        if "classes" not in self.config.paths:
            return VOC_CLASSES
        path = Path(self.config.paths["classes"])
        if not path.is_file():
            raise ConfigError(f"{path}: no such class list")
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if not names:
            raise ConfigError(f"{path}: no class names")
        return names

    @functools.cache
    def segments(self, split: str) -> SegmentedImages:
        self.check_split(split)
        root = Path(self.config.paths["root"])
        listing = root / "ImageSets" / "Segmentation" / f"{self.LISTS[split]}.txt"
        if not listing.is_file():
            raise ConfigError(f"{listing}: no such split list")
        stems = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
        images = [root / "JPEGImages" / f"{stem}.jpg" for stem in stems[: self.config.limit]]
        missing = [str(image) for image in images if not image.is_file()]
        if missing or not images:
            raise ConfigError(f"{listing}: {len(missing)} listed images missing, e.g. {missing[:1]}")
        return segmented_files(images, root / "SegmentationClass", self.classes, self.config.image_size)
