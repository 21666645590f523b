"""An ImageNet-style image folder from local files, for the vision-only task; images are read from disk when a
batch needs them (`FileImages`)."""

import functools
from pathlib import Path

import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.formats import FileImages, image_folder
from vlmerge.data.sources import SOURCES, DataSource, LabelledImages


@SOURCES.register_class
class ImageFolder(DataSource):
    """ImageNet-style folders, one subfolder per class (`train/n01440764/*.JPEG`); the classes
    are the train folder's subfolders, so indices agree across splits. `data.limit` keeps the first N
    images of each class."""

    name = "image_folder"
    splits = ("train", "test")
    path_keys = ("train", "test")

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        root = Path(self.config.paths["train"])
        classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir())) if root.is_dir() else ()
        if not classes:
            raise ConfigError(f"{root}: no class subfolders")
        return classes

    @functools.cache  # walking ImageNet's folders takes a while; the head and the examples both ask
    def image_classes(self, split: str) -> LabelledImages:
        self.check_split(split)
        root = Path(self.config.paths[split])
        files = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in list(image_folder(root / name))[: self.config.limit]
        ]
        if not files:
            raise ConfigError(f"{root}: no images in the class folders {list(self.classes)[:5]}...")
        return LabelledImages(
            FileImages([path for path, _ in files], self.config.image_size),
            torch.tensor([label for _, label in files], dtype=torch.long),
            self.classes,
        )
