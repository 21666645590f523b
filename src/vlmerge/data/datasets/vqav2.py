"""VQAv2 from local files: questions and annotations JSON with the COCO images they ask about, read from
disk when a batch needs them (`FileImages`)."""

import functools
from collections import Counter

import torch

from vlmerge.data.formats import FileImages, VqaExample, load_vqav2
from vlmerge.data.sources import SOURCES, DataSource, Questions
from vlmerge.data.vqa_score import normalize_answer, vqa_score

VQA_MIN_ANSWER_COUNT = 9  # answers given at least this often in train form the vocabulary (3,129 on VQAv2)


@SOURCES.register_class
class VQAv2(DataSource):
    """VQAv2 questions and annotations. Its test answers are not public, so `test` is the
    official val split (as is usual when scoring locally); scores are the official soft
    VQA accuracy over the ten annotators. `data.limit` keeps the first N questions of each split."""

    name = "vqav2"
    splits = ("train", "test")
    path_keys = (
        "train_questions",
        "train_annotations",
        "train_images",
        "test_questions",
        "test_annotations",
        "test_images",
    )
    subsets = {"train": "train2014", "test": "val2014"}

    @functools.cache
    def _examples(self, split: str) -> list[VqaExample]:
        self.check_split(split)
        paths = self.config.paths
        examples = load_vqav2(
            paths[f"{split}_questions"],
            paths[f"{split}_annotations"],
            paths[f"{split}_images"],
            subset=self.subsets[split],
        )
        return examples[: self.config.limit]

    @functools.cache
    def answer_vocabulary(self) -> tuple[str, ...]:
        counts = Counter(normalize_answer(answer) for example in self._examples("train") for answer in example.answers)
        return tuple(sorted(answer for answer, count in counts.items() if count >= VQA_MIN_ANSWER_COUNT))

    def questions(self, split: str, seed: int = 0) -> Questions:
        examples = self._examples(split)
        images = sorted({example.image for example in examples})
        row = {path: index for index, path in enumerate(images)}
        return Questions(
            FileImages(images, self.config.image_size),
            torch.tensor([row[example.image] for example in examples], dtype=torch.long),
            tuple(example.question for example in examples),
            tuple(_soft_scores(example.answers) for example in examples),
            tuple(_question_kind(example.question) for example in examples),
        )


def _soft_scores(answers: tuple[str, ...]) -> dict[str, float]:
    scores = {answer: vqa_score(answer, answers) for answer in {normalize_answer(a) for a in answers}}
    return {answer: score for answer, score in scores.items() if score > 0}


def _question_kind(question: str) -> str:
    """The VQAv2 answer-type split, from the question's first word (the official types need the annotations)."""
    first = question.lower().split(maxsplit=1)[0] if question.strip() else ""
    if first in {"is", "are", "does", "do", "was", "can", "could", "has", "have", "will", "should", "did"}:
        return "yes/no"
    return "number" if question.lower().startswith("how many") else "other"
