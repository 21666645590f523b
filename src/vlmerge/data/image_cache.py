"""Decoded, resized pictures kept on disk between runs, for datasets that take seconds to make them.

An entry is `<stem>.safetensors` (one uint8 tensor, "images") and, for datasets that record what each picture
shows, a manifest `<stem>.json` beside it. The stem names the dataset, the size and a hash of everything the
pictures are made from, so a changed file, size or renderer is another entry and a stale one is never read.
Each file is written atomically, images first, so a manifest marks a complete entry.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlmerge.io.atomic import atomic_path

LAYOUT_VERSION = 2  # of the entry's files and stem; 1 was each dataset's own cache, named `<dataset>-v1-...`
DEFAULT_ROOT = Path("~/.cache/vlmerge")


@dataclass(frozen=True)
class CacheEntry:
    """One cached set of pictures: its images and, for datasets that keep one, its manifest."""

    images_path: Path
    manifest_path: Path

    def complete(self, manifest: bool = False) -> bool:
        return self.images_path.is_file() and (not manifest or self.manifest_path.is_file())

    def load_images(self) -> torch.Tensor:
        return load_file(str(self.images_path))["images"]

    def load_manifest(self) -> Any:
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def save(self, images: torch.Tensor, version: int, manifest: Any = None) -> None:
        """Images first, then the manifest when there is one; `version` is the dataset's format version."""
        with atomic_path(self.images_path) as tmp:
            save_file({"images": images}, str(tmp), metadata={"format_version": str(version)})
        if manifest is not None:
            with atomic_path(self.manifest_path) as tmp:
                tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")


def cache_entry(
    dataset: str, version: int, image_size: int, part: str, made_from: Any, directory: str | os.PathLike | None = None
) -> CacheEntry:
    """The entry for `part` of a dataset (e.g. "all", "first12") in `directory`, else ~/.cache/vlmerge/<dataset>.
    `made_from` is every input of the pictures besides the size, as JSON (file sizes and times, renderer
    versions); `version` is the dataset's own, bumped when how it makes pictures changes."""
    key = hashlib.sha256(
        json.dumps([LAYOUT_VERSION, dataset, version, image_size, part, made_from], ensure_ascii=False).encode()
    ).hexdigest()[:16]
    folder = Path(directory if directory else DEFAULT_ROOT / dataset).expanduser()
    stem = f"{dataset}-{image_size}px-{part}-{key}"  # no `-v1-` after the name: never an old cache's name
    return CacheEntry(folder / f"{stem}.safetensors", folder / f"{stem}.json")
