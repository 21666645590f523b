"""Tux Paint's stamps as a data source: clip art with a one-sentence English caption each (Debian
`tuxpaint-stamps-default`, GPL-2; read where installed, never copied).

A stamp is `<category>/<...>/x.png` under /usr/share/tuxpaint/stamps; its caption is line 1 of `x.txt` (the
other lines are translations, `fr.utf8=...`). Kept: every PNG whose .txt has a non-empty English first line
(785 of the 802 PNGs in the 2022.06.04 package). Left out, by rule rather than by list:
- PNGs without a .txt: the `*_mirror.png` variants (mirror images of captioned stamps) and six Tux faces;
- a .txt whose first line is empty or already a translation (`xx.utf8=`): none today;
- SVG-only stamps (165): Pillow cannot draw SVG, and a renderer is not worth a dependency. Where a stamp has
  both, the PNG is used.
The class of a stamp is its top-level folder (16 with captioned stamps: animals ... vehicles; the `cartoon`
folder holds only uncaptioned Tux faces). Pictures are centred on a white square (transparency composited onto
white) and resized, kept in memory as uint8 and cached on disk: reading all 785 takes 8-14 s, the cache 0.2 s.
"""

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import PIL
import torch
from tqdm import tqdm

from vlmerge.core.errors import ConfigError
from vlmerge.data.formats import read_image
from vlmerge.data.image_cache import cache_entry
from vlmerge.data.installed import debian
from vlmerge.data.sources import SOURCES, CaptionPairs, DataSource, LabelledImages
from vlmerge.data.splits import SPLITS, assign_split

PACKAGE = debian("tuxpaint-stamps-default")
DEFAULT_ROOT = Path("/usr/share/tuxpaint/stamps")
FORMAT_VERSION = 1  # bump when reading the pictures changes
TRANSLATION = re.compile(r"^[A-Za-z_@]+\.utf8=")  # `fr.utf8=...`, `zh_TW.utf8=...`


@dataclass(frozen=True)
class Stamp:
    path: Path  # the PNG
    relative: str  # its path under the stamps folder, posix: the key its split is hashed from
    caption: str
    category: str  # the top-level folder
    split: str


def read_caption(path: Path) -> str | None:
    """Line 1 of a stamp's .txt, the English description; None when the file is absent or has none."""
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error})") from error
    first = lines[0].strip() if lines else ""
    return first if first and not TRANSLATION.match(first) else None


def find_stamps(root: Path) -> list[Stamp]:
    """Every captioned PNG stamp under `root`, in path order, with its split hashed from its relative path."""
    stamps = []
    for png in sorted(root.rglob("*.png")):
        caption = read_caption(png.with_suffix(".txt"))
        if caption is not None:
            relative = png.relative_to(root)
            category = relative.parts[0] if len(relative.parts) > 1 else "uncategorised"
            stamps.append(Stamp(png, relative.as_posix(), caption, category, assign_split(relative.as_posix())))
    return stamps


def stamp_images(
    stamps: list[Stamp], size: int, cache_dir: str | os.PathLike | None = None, progress: bool = False
) -> torch.Tensor:
    """uint8 (len(stamps), 3, size, size), from a cache keyed by the files, the size and Pillow's version."""
    stats = [(stamp.relative, stamp.path.stat().st_size, stamp.path.stat().st_mtime_ns) for stamp in stamps]
    entry = cache_entry("tuxpaint", FORMAT_VERSION, size, f"{len(stamps)}stamps", [PIL.__version__, stats], cache_dir)
    if entry.complete():
        images = entry.load_images()
        if images.shape == (len(stamps), 3, size, size):
            return images
    images = torch.stack(
        [
            read_image(stamp.path, size, square=True)
            for stamp in tqdm(stamps, desc="reading stamps", disable=not progress)
        ]
    )
    entry.save(images, FORMAT_VERSION)
    return images


def installed_stamps(source: DataSource) -> list[Stamp]:
    """Every captioned stamp under the source's `data.paths.stamps`, else the Debian package's folder."""
    root = PACKAGE.require(source.name, Path(source.config.paths.get("stamps", DEFAULT_ROOT)), "stamps")
    stamps = find_stamps(root)
    if not stamps:
        raise ConfigError(f"{root}: no PNG stamps with a caption (.txt beside them)")
    return stamps


@SOURCES.register_class
class TuxPaintStamps(DataSource):
    """Tux Paint stamps: `pairs` (the stamp and its English sentence) and `image_classes` (its top-level
    folder, 16 classes). Splits train / val / test (about 80 / 10 / 10) from a hash of the stamp's path under
    the stamps folder, so a stamp's split never depends on which other stamps are installed. `data.limit`
    keeps the first N stamps (in path order) of each split. `data.paths.stamps` points at another copy."""

    name = "tuxpaint"
    optional_path_keys = ("stamps",)

    @functools.cached_property
    def stamps(self) -> list[Stamp]:
        """Every captioned stamp, before the limit: the classes come from these."""
        return installed_stamps(self)

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted({stamp.category for stamp in self.stamps}))

    @functools.cached_property
    def chosen(self) -> list[Stamp]:
        """The first `limit` stamps of each split, in path order."""
        return [
            stamp for split in SPLITS for stamp in [s for s in self.stamps if s.split == split][: self.config.limit]
        ]

    @functools.cached_property
    def images(self) -> torch.Tensor:
        return stamp_images(self.chosen, self.config.image_size, self.config.cache_dir, self.progress)

    @functools.cache
    def split(self, split: str) -> tuple[list[Stamp], torch.Tensor]:
        self.check_split(split)
        rows = [row for row, stamp in enumerate(self.chosen) if stamp.split == split]
        return [self.chosen[row] for row in rows], self.images[rows]

    def pairs(self, split: str) -> CaptionPairs:
        stamps, images = self.split(split)
        return CaptionPairs(images, tuple(stamp.caption for stamp in stamps), torch.arange(len(stamps)))

    def image_classes(self, split: str) -> LabelledImages:
        stamps, images = self.split(split)
        index = {name: label for label, name in enumerate(self.classes)}
        return LabelledImages(
            images, torch.tensor([index[stamp.category] for stamp in stamps], dtype=torch.long), self.classes
        )
