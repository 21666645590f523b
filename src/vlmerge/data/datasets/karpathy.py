"""COCO and Flickr30k captions from local files, in Karpathy's split JSON (`dataset_coco.json`,
`dataset_flickr30k.json`), the splits the paper's retrieval numbers use. Images are read from disk when a
batch needs them (`FileImages`), so the full datasets need not fit in memory."""

import functools

import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.formats import FileImages, load_karpathy_captions
from vlmerge.data.sources import SOURCES, CaptionPairs, DataSource


class KarpathyCaptions(DataSource):
    """Karpathy split JSON and its image folder: restval counts as train. `data.limit` keeps the first N
    images of each split, with all their captions."""

    path_keys = ("karpathy_json", "images")

    @functools.cache
    def pairs(self, split: str) -> CaptionPairs:
        self.check_split(split)
        entries = load_karpathy_captions(self.config.paths["karpathy_json"], self.config.paths["images"], split)[
            : self.config.limit
        ]
        if not entries:
            raise ConfigError(f"{self.config.paths['karpathy_json']}: no images in split {split!r}")
        image_of = [row for row, entry in enumerate(entries) for _ in entry.captions]
        return CaptionPairs(
            FileImages([entry.image for entry in entries], self.config.image_size),
            tuple(caption for entry in entries for caption in entry.captions),
            torch.tensor(image_of, dtype=torch.long),
        )


@SOURCES.register_class
class CocoCaptions(KarpathyCaptions):
    name = "coco"


@SOURCES.register_class
class Flickr30kCaptions(KarpathyCaptions):
    name = "flickr30k"
