"""Datasets as the stages see them: one interface, whatever the files behind it.

A data source (emoji, COCO, VQAv2, NLVR2, ...) provides some of these uses, per split:

- `pairs`: images with captions (pre-training, retrieval, Gram collection);
- `questions`: VQA questions with soft-scored answers;
- `statements`: NLVR2-style statements about two images, true or false;
- `image_classes` / `text_classes`: single-modality classification;
- `texts`: text alone (masked language modelling);
- `segments`: images with a class per pixel (semantic segmentation).

Examples index their images by row into an image store, so a picture asked about ten
times is held once, and a store may read its files lazily: anything with `len()` and
`store[rows] -> uint8 (n, 3, S, S)` works, an in-memory tensor included.
"""

import functools
from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from vlmerge.core.errors import ConfigError
from vlmerge.core.registry import Registry, suggest
from vlmerge.data.config import DataConfig

USES = ("pairs", "questions", "statements", "image_classes", "text_classes", "texts", "segments")
IGNORE_LABEL = 255  # a mask's value for pixels that no class is scored on (unlabelled, "other")


class ImageStore(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class CaptionPairs:
    images: ImageStore
    captions: tuple[str, ...]
    image_of: torch.Tensor  # (captions,) long: the image each caption describes

    def __post_init__(self) -> None:
        _check_rows("captions", len(self.captions), {"image_of": self.image_of}, len(self.images))

    def __len__(self) -> int:
        return len(self.captions)


@dataclass(frozen=True, eq=False)
class Questions:
    images: ImageStore
    image_of: torch.Tensor  # (questions,) long
    questions: tuple[str, ...]
    answers: tuple[dict[str, float], ...]  # every valid answer -> its soft score in (0, 1]
    kinds: tuple[str, ...]  # question type, for per-kind accuracy

    def __post_init__(self) -> None:
        _check_rows("questions", len(self.questions), {"image_of": self.image_of}, len(self.images))
        if not len(self.answers) == len(self.kinds) == len(self.questions):
            raise ConfigError(
                f"{len(self.questions)} questions but {len(self.answers)} answer sets and {len(self.kinds)} kinds"
            )

    def __len__(self) -> int:
        return len(self.questions)


@dataclass(frozen=True, eq=False)
class Statements:
    images: ImageStore
    left: torch.Tensor  # (statements,) long
    right: torch.Tensor
    statements: tuple[str, ...]
    labels: torch.Tensor  # (statements,) bool: is the statement true of the two images

    def __post_init__(self) -> None:
        _check_rows(
            "statements",
            len(self.statements),
            {"left": self.left, "right": self.right, "labels": self.labels},
            len(self.images),
        )

    def __len__(self) -> int:
        return len(self.statements)


@dataclass(frozen=True, eq=False)
class LabelledImages:
    images: ImageStore
    labels: torch.Tensor  # (images,) long into classes
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_labels(self.labels, len(self.images), self.classes)

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True, eq=False)
class LabelledTexts:
    texts: tuple[str, ...]
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_labels(self.labels, len(self.texts), self.classes)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True, eq=False)
class SegmentedImages:
    """Images with a class per pixel: `masks[rows]` is uint8 (n, S, S), aligned with `images[rows]`, a class
    index or IGNORE_LABEL per pixel. A mask store may read its files when indexed, as an image store does."""

    images: ImageStore
    masks: ImageStore
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.masks) != len(self.images):
            raise ConfigError(f"{len(self.images)} images but {len(self.masks)} masks")
        if not 0 < len(self.classes) < IGNORE_LABEL:
            raise ConfigError(f"segmentation needs 1 to {IGNORE_LABEL - 1} classes, got {len(self.classes)}")

    def __len__(self) -> int:
        return len(self.images)


def _check_rows(what: str, count: int, indices: dict[str, torch.Tensor], images: int) -> None:
    for name, tensor in indices.items():
        if tensor.shape != (count,):
            raise ConfigError(f"{count} {what} but {name} has shape {tuple(tensor.shape)}")
        if name != "labels" and count and (tensor.min() < 0 or tensor.max() >= images):
            raise ConfigError(f"{name} indexes outside the {images} images")


def _check_labels(labels: torch.Tensor, count: int, classes: tuple[str, ...]) -> None:
    if labels.shape != (count,):
        raise ConfigError(f"{count} examples but labels of shape {tuple(labels.shape)}")
    if count and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ConfigError(f"labels outside the {len(classes)} classes")


class DataSource(ABC):
    """One dataset at one image size. Subclasses override the uses they provide; `seed` fixes
    examples a source builds itself (questions or statements generated from metadata).
    Label vocabularies (answers, classes) belong to the whole dataset, so indices agree across splits."""

    name: ClassVar[str]  # its name in SOURCES: register with @SOURCES.register_class
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    path_keys: ClassVar[tuple[str, ...]] = ()  # the local files it reads, keys of DataConfig.paths
    optional_path_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DataConfig, progress: bool = False) -> None:
        self.config = config
        self.progress = progress

    @classmethod
    def provides(cls) -> tuple[str, ...]:
        return tuple(use for use in USES if getattr(cls, use) is not getattr(DataSource, use))

    @classmethod
    def check_config(cls, config: DataConfig) -> None:
        """Everything that can be checked without reading files: the keys of `paths`."""
        allowed = (*cls.path_keys, *cls.optional_path_keys)
        for key in config.paths:
            if key not in allowed:
                raise ConfigError(
                    f"data.paths.{key}: not a file of dataset {cls.name!r}"
                    f"{suggest(key, list(allowed)) if allowed else ' (it reads no paths)'}"
                )
        missing = [key for key in cls.path_keys if key not in config.paths]
        if missing:
            raise ConfigError(f"dataset {cls.name!r} needs data.paths {missing}")

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ConfigError(f"dataset {self.name!r} has no split {split!r}; it has {list(self.splits)}")

    @classmethod
    def unsupported(cls, use: str) -> ConfigError:
        return ConfigError(
            f"dataset {cls.name!r} provides no {use}; datasets with {use}: "
            f"{sorted(name for name in SOURCES if use in SOURCES.get(name).provides())}"
        )

    def pairs(self, split: str) -> CaptionPairs:
        raise self.unsupported("pairs")

    def questions(self, split: str, seed: int = 0) -> Questions:
        raise self.unsupported("questions")

    def answer_vocabulary(self) -> tuple[str, ...]:
        raise self.unsupported("questions")

    def statements(self, split: str, seed: int = 0) -> Statements:
        raise self.unsupported("statements")

    def image_classes(self, split: str) -> LabelledImages:
        raise self.unsupported("image_classes")

    def text_classes(self, split: str) -> LabelledTexts:
        raise self.unsupported("text_classes")

    def texts(self, split: str) -> tuple[str, ...]:
        raise self.unsupported("texts")

    def segments(self, split: str) -> SegmentedImages:
        raise self.unsupported("segments")


SOURCES: Registry[type[DataSource]] = Registry("dataset")


def check_data(config: DataConfig, uses: Sequence[str] = ()) -> None:
    """Fail early, before anything is read, on unknown datasets, bad paths keys or missing uses."""
    if len(config.names) > 1:
        if set(uses) - {"pairs", "texts"}:
            raise ConfigError(f"datasets {list(config.names)} can be pooled for pre-training only; a task reads one")
        for key in config.paths:
            owner = key.split(".", 1)[0]
            if "." not in key or owner not in config.names:
                raise ConfigError(
                    f"data.paths.{key}: with several datasets, path keys start with the dataset's "
                    f"name, one of {list(config.names)} (e.g. coco.karpathy_json)"
                )
    for name in config.names:
        source = SOURCES.get(name)
        source.check_config(config.part(name))
        for use in uses:
            if use not in source.provides():
                raise source.unsupported(use)


@functools.lru_cache(maxsize=8)
def _load(key: str, name: str, progress: bool) -> DataSource:
    return SOURCES.get(name)(DataConfig.model_validate_json(key), progress)


def load_source(config: DataConfig, progress: bool = False) -> DataSource:
    """The one dataset `config` names, loaded once per process (a study runs many stages)."""
    if len(config.names) != 1:
        raise ConfigError(f"a task reads one dataset, got {list(config.names)}")
    check_data(config)
    return _load(config.key(), config.names[0], progress)


def load_pairs(config: DataConfig, split: str, progress: bool = False) -> CaptionPairs:
    """Image-text pairs of every named dataset, pooled in the order named."""
    check_data(config, ["pairs"])
    parts = [_load(config.part(name).key(), name, progress).pairs(split) for name in config.names]
    return parts[0] if len(parts) == 1 else pool_pairs(parts)


def pool_pairs(parts: Sequence[CaptionPairs]) -> CaptionPairs:
    offsets = torch.tensor([0, *(len(part.images) for part in parts)]).cumsum(0)
    return CaptionPairs(
        ConcatImages([part.images for part in parts]),
        tuple(caption for part in parts for caption in part.captions),
        torch.cat([part.image_of + offset for part, offset in zip(parts, offsets)]),
    )


class ConcatImages:
    """Several image stores as one; rows are gathered from each and put back in order."""

    def __init__(self, stores: Sequence[ImageStore]) -> None:
        sizes = {tuple(store[:1].shape[1:]) for store in stores if len(store)}
        if len(sizes) > 1:
            raise ConfigError(f"pooled datasets have images of different shapes {sorted(sizes)}")
        self.stores = list(stores)
        self.offsets = torch.tensor([0, *(len(store) for store in stores)]).cumsum(0)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        rows = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).reshape(-1)
        store_of = torch.bucketize(rows, self.offsets[1:], right=True)
        out = None
        for index, store in enumerate(self.stores):
            chosen = (store_of == index).nonzero().squeeze(1)
            if len(chosen):
                images = store[rows[chosen] - self.offsets[index]]
                out = out if out is not None else images.new_empty((len(rows), *images.shape[1:]))
                out[chosen] = images
        if out is None:
            return self.stores[0][rows]
        return out
