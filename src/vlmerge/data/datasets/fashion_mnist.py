"""Fashion-MNIST as a data source: 70,000 28 x 28 grey pictures of Zalando articles in 10 classes (Debian
`dataset-fashion-mnist`, MIT), read from its gzipped IDX files.

IDX: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, each size as a big-endian uint32,
then the data. The magic number and the data length are checked, so a corrupt or truncated file fails by name.
Pictures stay in memory at 28 x 28 (47 MB) and are resized when a batch is taken (`ResizedImages`: bicubic,
antialiased when shrinking, grey repeated over three channels), so 60,000 at 112 px never sit in memory at once.
"""

import functools
import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.formats import ResizedImages
from vlmerge.data.installed import debian
from vlmerge.data.sources import SOURCES, CaptionPairs, DataSource, LabelledImages
from vlmerge.data.splits import train_or_val

PACKAGE = debian("dataset-fashion-mnist")
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": "train", "test": "t10k"}  # split of the files -> their prefix
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CAPTIONS = (
    "a photo of a t-shirt or top.",
    "a photo of trousers.",
    "a photo of a pullover.",
    "a photo of a dress.",
    "a photo of a coat.",
    "a photo of a sandal.",
    "a photo of a shirt.",
    "a photo of a sneaker.",
    "a photo of a bag.",
    "a photo of an ankle boot.",
)
IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file, gunzipped when its name ends in .gz, as an array of the shape its header gives."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ConfigError(f"{path}: cannot read ({error})") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES:
        raise ConfigError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise ConfigError(f"{path}: IDX header cut short")
    shape = struct.unpack(f">{data[3]}I", data[4:header])
    dtype = IDX_TYPES[data[2]]
    if len(data) - header != math.prod(shape) * dtype.itemsize:
        raise ConfigError(
            f"{path}: {len(data) - header} bytes of data for shape {shape} of {dtype}; truncated or corrupt"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


@SOURCES.register_class
class FashionMNIST(DataSource):
    """Fashion-MNIST: `image_classes` (10 classes, CLASSES) and `pairs` (each picture with its class as a
    caption, "a photo of a sneaker."). Splits: `test` is its 10,000 test pictures; `train` and `val` divide its
    60,000 train pictures about 90 / 10 by a hash of the picture's index in the file. `data.limit` keeps the
    first N pictures of each split. `data.paths.dir` points at another folder with the four .gz files."""

    name = "fashion_mnist"
    optional_path_keys = ("dir",)

    @functools.cache
    def _file(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, 28, 28) uint8, labels (n,)) of the train or test files."""
        folder = Path(self.config.paths.get("dir", DEFAULT_DIR))
        images = read_idx(PACKAGE.require(self.name, folder / f"{FILES[part]}-images-idx3-ubyte.gz", "dir"))
        labels = read_idx(PACKAGE.require(self.name, folder / f"{FILES[part]}-labels-idx1-ubyte.gz", "dir"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8:
            raise ConfigError(
                f"{folder}: {part} images {images.shape} {images.dtype} do not match labels {labels.shape}"
            )
        if len(labels) and labels.max() >= len(CLASSES):
            raise ConfigError(f"{folder}: {part} labels reach {labels.max()}, beyond the {len(CLASSES)} classes")
        return images, labels

    @functools.cache
    def split(self, split: str) -> tuple[ResizedImages, torch.Tensor]:
        self.check_split(split)
        images, labels = self._file("test" if split == "test" else "train")
        rows = [row for row in range(len(labels)) if split == "test" or train_or_val(f"train/{row}") == split]
        rows = rows[: self.config.limit]
        pictures = torch.from_numpy(images[rows]).unsqueeze(1)  # (n, 1, 28, 28)
        return ResizedImages(pictures, self.config.image_size), torch.from_numpy(labels[rows].astype(np.int64))

    def image_classes(self, split: str) -> LabelledImages:
        images, labels = self.split(split)
        return LabelledImages(images, labels, CLASSES)

    def pairs(self, split: str) -> CaptionPairs:
        images, labels = self.split(split)
        return CaptionPairs(images, tuple(CAPTIONS[label] for label in labels.tolist()), torch.arange(len(labels)))
