"""VQA- and NLVR2-style examples built from the emoji metadata alone (retrieval and classification need nothing
beyond `EmojiDataset`).

Both builders are deterministic for a seed and only index the dataset they are given: a caller that passes one
split gets examples whose images all come from that split. Text is lowercased, labels and keywords alike.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.datasets.emoji.dataset import EmojiDataset
from vlmerge.data.datasets.emoji.records import EmojiRecord
from vlmerge.data.statements import LabelLevel, StatementExample, build_statements

YES, NO = "yes", "no"
LABEL_QUESTIONS = {"group": "which group is this emoji in?", "subgroup": "which subgroup is this emoji in?"}
KEYWORD_QUESTION = "is this emoji about {keyword}?"
NLVR2_TEMPLATES: dict[str, tuple[str, str, str]] = {  # kind -> (image the statement names, level, statement)
    "same-group": ("both", "group", "both emoji are in the same group."),
    "same-subgroup": ("both", "subgroup", "both emoji are in the same subgroup."),
    "left-group": ("left", "group", "the left emoji is in the group {label}."),
    "left-subgroup": ("left", "subgroup", "the left emoji is in the subgroup {label}."),
    "right-group": ("right", "group", "the right emoji is in the group {label}."),
    "right-subgroup": ("right", "subgroup", "the right emoji is in the subgroup {label}."),
}


@dataclass(frozen=True)
class VQAExample:
    image: int  # index into the dataset the examples were built from
    question: str
    answers: dict[str, float]  # every valid answer -> its soft score in (0, 1]; several may be valid
    kind: str  # "group", "subgroup" or "keyword"

    def __post_init__(self) -> None:
        if not self.answers or not all(0 < score <= 1 for score in self.answers.values()):
            raise ConfigError(f"VQA answers need soft scores in (0, 1], got {self.answers} for {self.question!r}")


@dataclass(frozen=True)
class VQASet:
    """Examples and the answer vocabulary, which is the whole build's so answer indices agree across splits."""

    examples: tuple[VQAExample, ...]
    answers: tuple[str, ...]

    def answer_index(self) -> dict[str, int]:
        return {answer: i for i, answer in enumerate(self.answers)}

    def target(self, example: VQAExample) -> torch.Tensor:
        """(A,) float: each valid answer's soft score, 0 elsewhere."""
        return self.targets([example])[0]

    def targets(self, examples: Sequence[VQAExample] | None = None) -> torch.Tensor:
        """(N, A) float soft targets of the given examples (default all); an unknown answer is an error."""
        examples = self.examples if examples is None else examples
        index, rows = self.answer_index(), torch.zeros(len(examples), len(self.answers))
        for row, example in enumerate(examples):
            unknown = sorted(set(example.answers) - index.keys())
            if unknown:
                raise ConfigError(f"answers {unknown} of {example.question!r} are not in the answer vocabulary")
            for answer, score in example.answers.items():
                rows[row, index[answer]] = score
        return rows

    @staticmethod
    def score(example: VQAExample, predicted: str) -> float:
        """The VQA score: the predicted answer's soft score (0 if not valid), i.e. accuracy when one answer is valid."""
        return example.answers.get(predicted, 0.0)


def vqa_answers(dataset: EmojiDataset) -> tuple[str, ...]:
    """From the build's label vocabularies, not from the examples, so every split of one build gets the same list."""
    return tuple(sorted({label.lower() for label in (*dataset.groups, *dataset.subgroups, YES, NO)}))


def build_vqa(dataset: EmojiDataset, seed: int = 0, keyword_questions_per_image: int = 1) -> VQASet:
    """Per image: its group, its subgroup, and up to `keyword_questions_per_image` pairs of keyword questions,
    one answered yes (a keyword of its own) and one no (a keyword of another subgroup), so yes and no stay balanced.
    An emoji without keywords gets no keyword questions."""
    _check_not_empty(dataset)
    if keyword_questions_per_image < 0:
        raise ConfigError(f"keyword_questions_per_image must be >= 0, got {keyword_questions_per_image}")
    rng, foreign = random.Random(seed), _foreign_keywords(dataset.records)
    examples = []
    for image, record in enumerate(dataset.records):
        examples += [
            VQAExample(image, question, {getattr(record, kind).lower(): 1.0}, kind)
            for kind, question in LABEL_QUESTIONS.items()
        ]
        examples += [
            VQAExample(image, KEYWORD_QUESTION.format(keyword=keyword), {answer: 1.0}, "keyword")
            for keyword, answer in _keyword_questions(
                rng, record, foreign[record.subgroup], keyword_questions_per_image
            )
        ]
    return VQASet(tuple(examples), vqa_answers(dataset))


def _check_not_empty(dataset: EmojiDataset) -> None:
    if len(dataset) == 0:
        raise ConfigError("cannot build task examples from an empty emoji dataset")


def _keywords(record: EmojiRecord) -> list[str]:
    return list(dict.fromkeys(keyword.lower() for keyword in record.keywords))


def _foreign_keywords(records: Sequence[EmojiRecord]) -> dict[str, list[str]]:
    """Per subgroup, the keywords of emoji in other subgroups, sorted so draws never depend on set order."""
    owners: dict[str, set[str]] = {}
    for record in records:
        for keyword in _keywords(record):
            owners.setdefault(keyword, set()).add(record.subgroup)
    ordered = sorted(owners)
    return {
        subgroup: [keyword for keyword in ordered if owners[keyword] != {subgroup}]
        for subgroup in dict.fromkeys(record.subgroup for record in records)
    }


def _keyword_questions(
    rng: random.Random, record: EmojiRecord, foreign: Sequence[str], count: int
) -> list[tuple[str, str]]:
    """(keyword, answer) pairs: as many no as yes; a no keyword is never one of its keywords or words of its name."""
    own = _keywords(record)
    present = rng.sample(own, min(count, len(own)))
    name = record.name.lower()
    absent = _draw_outside(rng, foreign, {*own, name, *name.split()}, len(present))
    return [(keyword, YES) for keyword in present[: len(absent)]] + [(keyword, NO) for keyword in absent]


def _draw_outside(rng: random.Random, pool: Sequence[str], exclude: set[str], count: int) -> list[str]:
    """Up to `count` distinct uniform draws from pool outside exclude; among count + len(exclude) distinct draws
    at least `count` are allowed, so no pass over the whole pool is needed."""
    drawn = rng.sample(range(len(pool)), min(len(pool), count + len(exclude)))
    return [pool[i] for i in drawn if pool[i] not in exclude][:count]


NLVR2Example = StatementExample  # its kind is a key of NLVR2_TEMPLATES


def build_nlvr2(
    dataset: EmojiDataset, num_examples: int | None = None, seed: int = 0, kinds: Sequence[str] = tuple(NLVR2_TEMPLATES)
) -> tuple[NLVR2Example, ...]:
    """Statements about two different emoji of `dataset` (default 2 per emoji) on their groups and subgroups,
    balanced true / false overall and within each kind (see `build_statements`)."""
    _check_not_empty(dataset)
    levels = {
        level: LabelLevel.of(
            (getattr(record, level).lower() for record in dataset.records),
            (label.lower() for label in getattr(dataset, f"{level}s")),
        )
        for level in ("group", "subgroup")
    }
    return build_statements(levels, NLVR2_TEMPLATES, num_examples, seed, kinds, noun="emoji")
