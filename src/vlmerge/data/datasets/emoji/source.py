"""The emoji build as a data source: every use, the tasks' examples generated from its metadata."""

import functools

import torch

from vlmerge.data.config import DataConfig
from vlmerge.data.datasets.emoji.dataset import EmojiDataset, build_emoji_dataset
from vlmerge.data.datasets.emoji.tasks import build_nlvr2, build_vqa, vqa_answers
from vlmerge.data.sources import SOURCES, CaptionPairs, DataSource, LabelledImages, LabelledTexts, Questions, Statements


@SOURCES.register_class
class EmojiSource(DataSource):
    """Pictures of emoji (Noto Color Emoji) named by their CLDR names (Debian packages)."""

    name = "emoji"

    def __init__(self, config: DataConfig, progress: bool = False) -> None:
        super().__init__(config, progress)
        self.dataset = build_emoji_dataset(config.image_size, config.cache_dir, limit=config.limit, progress=progress)

    @functools.cache
    def split(self, split: str) -> EmojiDataset:
        self.check_split(split)
        return self.dataset.split(split)

    def pairs(self, split: str) -> CaptionPairs:
        part = self.split(split)
        return CaptionPairs(part.images, tuple(record.name for record in part.records), torch.arange(len(part)))

    def questions(self, split: str, seed: int = 0) -> Questions:
        part = self.split(split)
        examples = build_vqa(part, seed=seed).examples
        return Questions(
            part.images,
            torch.tensor([e.image for e in examples], dtype=torch.long),
            tuple(e.question for e in examples),
            tuple(e.answers for e in examples),
            tuple(e.kind for e in examples),
        )

    def answer_vocabulary(self) -> tuple[str, ...]:
        return vqa_answers(self.dataset)

    def statements(self, split: str, seed: int = 0) -> Statements:
        part = self.split(split)
        examples = build_nlvr2(part, seed=seed)
        return Statements(
            part.images,
            torch.tensor([e.left for e in examples], dtype=torch.long),
            torch.tensor([e.right for e in examples], dtype=torch.long),
            tuple(e.statement for e in examples),
            torch.tensor([e.label for e in examples]),
        )

    def image_classes(self, split: str) -> LabelledImages:
        part = self.split(split)
        return LabelledImages(part.images, part.labels("subgroup"), self.dataset.subgroups)

    def text_classes(self, split: str) -> LabelledTexts:
        part = self.split(split)
        return LabelledTexts(tuple(record.name for record in part.records), part.labels("group"), self.dataset.groups)
