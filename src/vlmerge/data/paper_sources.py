"""The paper's public datasets from local files: COCO and Flickr30k captions (Karpathy
splits), VQAv2, NLVR2, and an ImageNet-style image folder for the vision-only task.

Images are read from disk when a batch needs them (`FileImages`), so the full datasets
need not fit in memory. `data.limit` keeps the first N images (or statements) per split.
"""

import functools
from collections import Counter
from pathlib import Path

import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.config import DataConfig
from vlmerge.data.formats import FileImages, image_folder, load_karpathy_captions, load_nlvr2, load_vqav2
from vlmerge.data.sources import SOURCES, CaptionPairs, DataSource, LabelledImages, Questions, Statements
from vlmerge.data.vqa_score import normalize_answer, vqa_score

VQA_MIN_ANSWER_COUNT = 9  # answers given at least this often in train form the vocabulary (3,129 on VQAv2)


def _limited(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


class KarpathyCaptions(DataSource):
    """Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`): restval counts as train."""

    path_keys = ("karpathy_json", "images")

    @functools.cache
    def pairs(self, split: str) -> CaptionPairs:
        self.check_split(split)
        entries = _limited(load_karpathy_captions(self.config.paths["karpathy_json"], self.config.paths["images"],
                                                  split), self.config.limit)
        if not entries:
            raise ConfigError(f"{self.config.paths['karpathy_json']}: no images in split {split!r}")
        image_of = [row for row, entry in enumerate(entries) for _ in entry.captions]
        return CaptionPairs(FileImages([entry.image for entry in entries], self.config.image_size),
                            tuple(caption for entry in entries for caption in entry.captions),
                            torch.tensor(image_of, dtype=torch.long))


@SOURCES.register("coco")
class CocoCaptions(KarpathyCaptions):
    name = "coco"


@SOURCES.register("flickr30k")
class Flickr30kCaptions(KarpathyCaptions):
    name = "flickr30k"


@SOURCES.register("vqav2")
class VQAv2(DataSource):
    """VQAv2 questions and annotations. Its test answers are not public, so `test` is the
    official val split (as is usual when scoring locally); scores are the official soft
    VQA accuracy over the ten annotators."""

    name = "vqav2"
    splits = ("train", "test")
    path_keys = ("train_questions", "train_annotations", "train_images",
                 "test_questions", "test_annotations", "test_images")
    subsets = {"train": "train2014", "test": "val2014"}

    @functools.cache
    def _examples(self, split: str) -> list:
        self.check_split(split)
        paths = self.config.paths
        examples = load_vqav2(paths[f"{split}_questions"], paths[f"{split}_annotations"], paths[f"{split}_images"],
                              subset=self.subsets[split])
        return _limited(examples, self.config.limit)

    @functools.cache
    def answer_vocabulary(self) -> tuple[str, ...]:
        counts = Counter(normalize_answer(answer) for example in self._examples("train") for answer in example.answers)
        return tuple(sorted(answer for answer, count in counts.items() if count >= VQA_MIN_ANSWER_COUNT))

    def questions(self, split: str, seed: int = 0) -> Questions:
        examples = self._examples(split)
        images = sorted({example.image for example in examples})
        row = {path: index for index, path in enumerate(images)}
        return Questions(FileImages(images, self.config.image_size),
                         torch.tensor([row[example.image] for example in examples], dtype=torch.long),
                         tuple(example.question for example in examples),
                         tuple(_soft_scores(example.answers) for example in examples),
                         tuple(_question_kind(example.question) for example in examples))


def _soft_scores(answers: tuple[str, ...]) -> dict[str, float]:
    scores = {answer: vqa_score(answer, answers) for answer in {normalize_answer(a) for a in answers}}
    return {answer: score for answer, score in scores.items() if score > 0}


def _question_kind(question: str) -> str:
    """The VQAv2 answer-type split, from the question's first word (the official types need the annotations)."""
    first = question.lower().split(maxsplit=1)[0] if question.strip() else ""
    if first in {"is", "are", "does", "do", "was", "can", "could", "has", "have", "will", "should", "did"}:
        return "yes/no"
    return "number" if question.lower().startswith("how many") else "other"


@SOURCES.register("nlvr2")
class NLVR2(DataSource):
    """NLVR2 JSONL with its image folders; `val` is dev and `test` is test1."""

    name = "nlvr2"
    path_keys = ("train_json", "train_images", "val_json", "val_images", "test_json", "test_images")

    def statements(self, split: str, seed: int = 0) -> Statements:
        self.check_split(split)
        examples = _limited(load_nlvr2(self.config.paths[f"{split}_json"], self.config.paths[f"{split}_images"]),
                            self.config.limit)
        images = sorted({path for example in examples for path in (example.left, example.right)})
        row = {path: index for index, path in enumerate(images)}
        return Statements(FileImages(images, self.config.image_size),
                          torch.tensor([row[e.left] for e in examples], dtype=torch.long),
                          torch.tensor([row[e.right] for e in examples], dtype=torch.long),
                          tuple(e.sentence for e in examples), torch.tensor([e.label for e in examples]))


@SOURCES.register("image_folder")
class ImageFolder(DataSource):
    """ImageNet-style folders, one subfolder per class (`train/n01440764/*.JPEG`); the classes
    are the train folder's subfolders, so indices agree across splits."""

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
        files = [(path, label) for label, name in enumerate(self.classes)
                 for path in _limited(list(image_folder(root / name)), self.config.limit)]
        if not files:
            raise ConfigError(f"{root}: no images in the class folders {list(self.classes)[:5]}...")
        return LabelledImages(FileImages([path for path, _ in files], self.config.image_size),
                              torch.tensor([label for _, label in files], dtype=torch.long), self.classes)
