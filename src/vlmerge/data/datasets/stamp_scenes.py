"""Clip-art scenes for semantic segmentation on a CPU: Tux Paint stamps pasted onto plain, gradient or
noise-textured backgrounds, with exact per-pixel labels. These are composited clip art, not photographs;
scores on them say nothing about ADE20k.

A scene holds 2 to 4 stamps (Debian `tuxpaint-stamps-default`, read where installed; see `tuxpaint`), each
scaled to 35-75 % of the side and placed anywhere inside, later ones over earlier ones. A pixel's class is
the category (top-level folder) of the topmost stamp whose alpha there is at least 0.5, else background
(class 0); the image blends each stamp by its alpha. A stamp belongs to one split (hashed from its path, as
in `tuxpaint`), and a split's scenes paste only its own stamps, so no source picture is in two splits.
Scene i of a split depends only on (SCENE_SEED, split, i) and the stamps: `data.limit` keeps the first N.
Stamps are read once into a cache (cropped to their opaque box, RGBA at the scene size); scenes are
cached per split as one uint8 tensor of 4 channels, RGB and the mask.
"""

import functools
import os

import numpy as np
import PIL
import torch
from PIL import Image

from vlmerge.core.errors import ConfigError
from vlmerge.data.datasets.tuxpaint import Stamp, installed_stamps
from vlmerge.data.image_cache import cache_entry
from vlmerge.data.sources import SOURCES, DataSource, SegmentedImages
from vlmerge.data.splits import SPLITS

FORMAT_VERSION = 1  # bump when reading stamps or composing scenes changes
SCENE_SEED = 0
SCENES = {"train": 2000, "val": 250, "test": 250}
STAMPS_PER_SCENE = (2, 4)
SCALE = (0.35, 0.75)
BACKGROUND = "background"


def read_stamp(path: os.PathLike, size: int) -> torch.Tensor:
    """uint8 (4, size, size): the stamp's opaque box centred on a transparent square, resized."""
    try:
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
    except OSError as error:
        raise ConfigError(f"{path}: not a readable image ({error})") from error
    box = rgba.getchannel("A").point(lambda a: 255 if a >= 128 else 0).getbbox()
    if box is None:
        raise ConfigError(f"{path}: the stamp is fully transparent")
    rgba = rgba.crop(box)
    side = max(rgba.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    # Premultiplied resizing keeps transparent pixels' colours out of the edges.
    resized = square.convert("RGBa").resize((size, size), Image.Resampling.LANCZOS).convert("RGBA")
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def stamp_pictures(stamps: list[Stamp], size: int, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """uint8 (len(stamps), 4, size, size), cached by the files, the size and Pillow's version."""
    stats = [(stamp.relative, stamp.path.stat().st_size, stamp.path.stat().st_mtime_ns) for stamp in stamps]
    entry = cache_entry("stamp_scenes", FORMAT_VERSION, size, "stamps", [PIL.__version__, stats], cache_dir)
    if entry.complete():
        pictures = entry.load_images()
        if pictures.shape == (len(stamps), 4, size, size):
            return pictures
    pictures = torch.stack([read_stamp(stamp.path, size) for stamp in stamps])
    entry.save(pictures, FORMAT_VERSION)
    return pictures


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float (size, size, 3) in [0, 1]: a plain colour, a linear gradient or a smooth noise texture."""
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(rng.random(3), (size, size, 3)).copy()
    if kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = (x * np.cos(angle) + y * np.sin(angle))[..., None]
        t = (t - t.min()) / max(np.ptp(t), 1e-9)
        return (1 - t) * rng.random(3) + t * rng.random(3)
    coarse = torch.from_numpy(rng.random((1, 3, 4, 4)))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return smooth[0].permute(1, 2, 0).clamp(0, 1).numpy()


def compose_scene(
    rng: np.random.Generator, pictures: torch.Tensor, labels: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One scene from `pictures` (n, 4, T, T) uint8 with class `labels` (n,): uint8 (size, size, 3) and
    uint8 (size, size) mask (0 background)."""
    image = background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(STAMPS_PER_SCENE[0], STAMPS_PER_SCENE[1] + 1)):
        chosen = int(rng.integers(len(pictures)))
        side = max(int(round(rng.uniform(*SCALE) * size)), 2)
        top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
        stamp = (
            torch.nn.functional.interpolate(
                pictures[chosen : chosen + 1].double() / 255, size=(side, side), mode="bilinear", antialias=True
            )[0]
            .permute(1, 2, 0)
            .clamp(0, 1)
            .numpy()
        )
        alpha = stamp[..., 3:]
        region = (slice(top, top + side), slice(left, left + side))
        image[region] = image[region] * (1 - alpha) + stamp[..., :3] * alpha
        mask[region][alpha[..., 0] >= 0.5] = labels[chosen]
    return np.round(image * 255).astype(np.uint8), mask


def compose_scenes(pictures: torch.Tensor, labels: np.ndarray, count: int, size: int, key: int) -> torch.Tensor:
    """uint8 (count, 4, size, size), RGB then mask; scene i from its own generator (SCENE_SEED, key, i)."""
    scenes = np.empty((count, size, size, 4), dtype=np.uint8)
    for index in range(count):
        image, mask = compose_scene(np.random.default_rng([SCENE_SEED, key, index]), pictures, labels, size)
        scenes[index, ..., :3], scenes[index, ..., 3] = image, mask
    return torch.from_numpy(scenes).permute(0, 3, 1, 2).contiguous()


@SOURCES.register_class
class StampScenes(DataSource):
    """Tux Paint stamps composited into scenes (`segments`): background plus the 16 stamp categories.
    Scenes per split: 2000 / 250 / 250, or the first `data.limit`; `data.image_size` sets the side (64 px
    gives a micro model's 8 px patches an 8 x 8 grid). `data.paths.stamps` points at another copy."""

    name = "stamp_scenes"
    optional_path_keys = ("stamps",)

    @functools.cached_property
    def stamps(self) -> list[Stamp]:
        return installed_stamps(self)

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        return (BACKGROUND, *sorted({stamp.category for stamp in self.stamps}))

    @functools.cache
    def scenes(self, split: str) -> torch.Tensor:
        """uint8 (n, 4, S, S): RGB and the mask, cached by the split's stamps, the count and the size."""
        self.check_split(split)
        stamps = [stamp for stamp in self.stamps if stamp.split == split]
        if not stamps:
            raise ConfigError(f"dataset {self.name!r}: no stamps fall in split {split!r}")
        count, size = min(SCENES[split], self.config.limit or SCENES[split]), self.config.image_size
        stats = [(stamp.relative, stamp.path.stat().st_size, stamp.path.stat().st_mtime_ns) for stamp in stamps]
        made_from = [PIL.__version__, torch.__version__, np.__version__, SCENE_SEED, stats]
        entry = cache_entry(self.name, FORMAT_VERSION, size, f"{split}{count}", made_from, self.config.cache_dir)
        if entry.complete() and (scenes := entry.load_images()).shape == (count, 4, size, size):
            return scenes
        pictures = stamp_pictures(self.stamps, size, self.config.cache_dir)
        rows = [row for row, stamp in enumerate(self.stamps) if stamp.split == split]
        index = {name: label for label, name in enumerate(self.classes)}
        labels = np.array([index[self.stamps[row].category] for row in rows], dtype=np.uint8)
        scenes = compose_scenes(pictures[rows], labels, count, size, SPLITS.index(split))
        entry.save(scenes, FORMAT_VERSION)
        return scenes

    def segments(self, split: str) -> SegmentedImages:
        scenes = self.scenes(split)
        return SegmentedImages(scenes[:, :3], scenes[:, 3], self.classes)
