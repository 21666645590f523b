"""The emoji dataset: every emoji the font draws as one picture, with its record, rendered once and cached
(`vlmerge.data.image_cache`: uint8 images plus a JSON manifest of the records)."""

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from vlmerge.core.errors import ConfigError
from vlmerge.data.datasets.emoji.records import EmojiRecord, EmojiSources, emoji_records
from vlmerge.data.datasets.emoji.render import load_font, render_emoji, renderer
from vlmerge.data.image_cache import CacheEntry, cache_entry
from vlmerge.data.splits import SPLITS

FORMAT_VERSION = 1  # bump when rendering or the manifest changes, so old caches are not reused


@dataclass(frozen=True, eq=False)  # tensors have no single truth value for ==
class EmojiDataset:
    """Rendered emoji with their records; `groups` and `subgroups` are the label vocabularies of the whole build."""

    records: tuple[EmojiRecord, ...]
    images: torch.Tensor  # (N, 3, S, S) uint8, RGB on white
    groups: tuple[str, ...]
    subgroups: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # emoji the font could not draw, left out of the whole build

    @classmethod
    def from_records(
        cls, records: Iterable[EmojiRecord], images: torch.Tensor, skipped: Iterable[str] = ()
    ) -> "EmojiDataset":
        records = tuple(records)
        if len(records) != len(images):
            raise ConfigError(f"{len(records)} emoji records but {len(images)} images")
        return cls(
            records,
            images,
            tuple(sorted({r.group for r in records})),
            tuple(sorted({r.subgroup for r in records})),
            tuple(skipped),
        )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def split(self, name: str) -> "EmojiDataset":
        """The records of one split, keeping the full label vocabularies so label indices agree across splits."""
        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; expected one of {SPLITS}")
        keep = [i for i, record in enumerate(self.records) if record.split == name]
        return replace(self, records=tuple(self.records[i] for i in keep), images=self.images[keep])

    def image_tensor(self, index: int) -> torch.Tensor:
        """(3, S, S) float in [0, 1]."""
        return self.images[index].float() / 255

    def caption(self, index: int) -> str:
        return self.records[index].name

    def labels(self, level: Literal["group", "subgroup"]) -> torch.Tensor:
        """Class indices into `groups` or `subgroups`, for classification."""
        vocabulary = {"group": self.groups, "subgroup": self.subgroups}[level]
        index = {label: i for i, label in enumerate(vocabulary)}
        return torch.tensor([index[getattr(record, level)] for record in self.records], dtype=torch.long)


def build_emoji_dataset(
    image_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    sources: EmojiSources | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> EmojiDataset:
    """The dataset from its cache, rendered once when the sources, size, renderer or format version change."""
    if image_size < 1 or (limit is not None and limit < 1):
        raise ConfigError(f"image_size and limit must be positive, got {image_size} and {limit}")
    sources = sources or EmojiSources.default()
    sources.check()
    entry = cache_entry(
        "emoji",
        FORMAT_VERSION,
        image_size,
        "all" if limit is None else f"first{limit}",
        [sources.fingerprint(), renderer()],
        cache_dir,
    )
    if entry.complete(manifest=True):
        return _load_cache(entry)
    dataset = _render_dataset(sources, image_size, limit, progress)
    entry.save(dataset.images, FORMAT_VERSION, _manifest(dataset, sources))
    return dataset


def _render_dataset(sources: EmojiSources, image_size: int, limit: int | None, progress: bool) -> EmojiDataset:
    font = load_font(sources.font)
    kept, pictures, skipped = [], [], []
    for record in tqdm(emoji_records(sources, limit), desc="rendering emoji", unit="emoji", disable=not progress):
        picture = render_emoji(font, record.emoji, image_size)
        if picture is None:
            skipped.append(record.emoji)
            continue
        kept.append(record)
        pictures.append(torch.from_numpy(np.array(picture)).permute(2, 0, 1))  # (S, S, 3) -> (3, S, S)
    if not pictures:
        raise ConfigError(f"{sources.font}: none of the {len(skipped)} emoji could be rendered")
    return EmojiDataset.from_records(kept, torch.stack(pictures).contiguous(), skipped)


def _manifest(dataset: EmojiDataset, sources: EmojiSources) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "image_size": dataset.image_size,
        "renderer": renderer(),
        "sources": {str(path): package for path, package in sources.files().items()},
        "skipped": list(dataset.skipped),
        "records": [asdict(record) for record in dataset.records],
    }


def _load_cache(entry: CacheEntry) -> EmojiDataset:
    manifest = entry.load_manifest()
    records = [
        EmojiRecord(**{**fields, "codepoints": tuple(fields["codepoints"]), "keywords": tuple(fields["keywords"])})
        for fields in manifest["records"]
    ]
    images = entry.load_images()
    if len(records) != len(images):
        raise ConfigError(
            f"{entry.images_path}: {len(images)} images for {len(records)} records; delete the cache entry"
        )
    return EmojiDataset.from_records(records, images, manifest["skipped"])
