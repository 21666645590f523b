"""A data source of random pictures with two-word captions and four classes, for tests that need real
pipelines (tokenizer, batches, probes) on data of a known size. A subclass names itself and its sizes;
every split it is asked for is recorded, so a test can tell which splits a command read."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch

from vlmerge.data.sources import SOURCES, CaptionPairs, DataSource, LabelledImages

WORDS = ("red", "blue", "green", "round", "square", "small", "large", "dark", "light", "striped")


class ToyCaptions(DataSource):
    """Pictures seeded by split, captions from `words`, classes cycling through a, b, c, d."""

    sizes: ClassVar[dict[str, int]] = {"train": 24, "val": 20, "test": 12}
    words: ClassVar[tuple[str, ...]] = WORDS
    image_size: ClassVar[int] = 16
    requested: ClassVar[list[str]]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.requested = []  # each subclass its own record

    @classmethod
    @contextmanager
    def registered(cls) -> Iterator[None]:
        """Loadable by its name (`DataConfig(dataset=cls.name)`) inside the block."""
        SOURCES.add(cls.name, cls)
        try:
            yield
        finally:
            SOURCES.remove(cls.name)

    def images(self, split: str) -> torch.Tensor:
        self.check_split(split)
        type(self).requested.append(split)
        generator = torch.Generator().manual_seed(list(self.sizes).index(split))
        shape = (self.sizes[split], 3, self.image_size, self.image_size)
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)

    def pairs(self, split: str) -> CaptionPairs:
        images = self.images(split)
        n = len(self.words)
        captions = tuple(f"{self.words[i % n]} {self.words[(3 * i + 1) % n]}" for i in range(len(images)))
        return CaptionPairs(images, captions, torch.arange(len(images)))

    def image_classes(self, split: str) -> LabelledImages:
        images = self.images(split)
        return LabelledImages(images, torch.arange(len(images)) % 4, ("a", "b", "c", "d"))
