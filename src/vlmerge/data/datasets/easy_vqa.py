"""easy-VQA as a data source: 64 x 64 pictures of one shape in one colour on a pale background, with generated
questions about them (PyPI `easy-vqa`, MIT: 4,000 train and 1,000 test images, 38,575 + 9,673 questions,
13 answers).

The package is read, never imported (its data lies beside its code): `easy_vqa/data/answers.txt` is the answer
vocabulary, `{train,test}/questions.json` a list of `[question, answer, image id]`, and `{train,test}/images/
<id>.png` the pictures. The JSON carries no question type, so the kind is read from the question's opening:
"what color ..." / "what is the color ..." ask for the colour, any other "what ..." for the shape, the rest are
yes/no.

Statements (NLVR2-style) are built from each image's shape and colour, recovered from its questions: the answer
to a "what" question, a word such a question names ("what color is the triangle?"), a yes/no answer that asserts
one ("is there not a blue shape?" -> no), or all values but one excluded. About 11% of the images are never
settled on one of the two (e.g. only asked "is there a red shape?" -> no); they take no part in statements.
"""

import functools
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.formats import ResizedImages, read_image
from vlmerge.data.installed import pypi
from vlmerge.data.sources import SOURCES, DataSource, Questions, Statements
from vlmerge.data.splits import train_or_val
from vlmerge.data.statements import LabelLevel, build_statements
from vlmerge.io.packaged import package_roots

PACKAGE = pypi("easy-vqa")
NATIVE_SIZE = 64  # every easy-VQA picture is 64 x 64
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
STATEMENT_TEMPLATES: dict[str, tuple[str, str, str]] = {  # kind -> (image the statement names, level, statement)
    "same-shape": ("both", "shape", "both images show the same shape."),
    "same-color": ("both", "color", "both shapes are the same color."),
    "left-shape": ("left", "shape", "the left image shows a {label}."),
    "left-color": ("left", "color", "the left image shows a {label} shape."),
    "right-shape": ("right", "shape", "the right image shows a {label}."),
    "right-color": ("right", "color", "the right image shows a {label} shape."),
}


@dataclass(frozen=True)
class EasyQuestion:
    question: str
    answer: str
    image: int  # the picture's id in its file split: images/<id>.png


@dataclass(frozen=True, eq=False)
class EasyPart:
    """One split: its pictures (ids in order), their questions (image = row into ids) and the pictures' store."""

    ids: tuple[int, ...]
    questions: tuple[EasyQuestion, ...]
    images: ResizedImages


def package_data_dir() -> Path:
    """The installed package's data folder, found without importing the package."""
    roots = package_roots("easy_vqa")
    if not roots:
        raise PACKAGE.missing("easy_vqa", "not installed in this Python", "data")
    return roots[0] / "data"


def read_answers(path: Path) -> tuple[str, ...]:
    answers = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    missing = [word for word in (*SHAPES, *YES_NO) if word not in answers]
    if missing:
        raise ConfigError(f"{path}: the answers lack {missing}; not easy-VQA's answers.txt")
    return answers


def read_questions(path: Path, answers: Sequence[str]) -> list[EasyQuestion]:
    """questions.json: a list of [question, answer, image id], every answer one of `answers`."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not readable JSON ({error})") from error
    known, questions = set(answers), []
    for number, entry in enumerate(entries if isinstance(entries, list) else [None]):
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], int)
        ):
            raise ConfigError(f"{path}: entry {number} is not [question, answer, image id]: {entry!r}")
        if entry[1] not in known:
            raise ConfigError(f"{path}: entry {number} answers {entry[1]!r}, not one of answers.txt")
        questions.append(EasyQuestion(*entry))
    return questions


def question_kind(question: str) -> str:
    """ "color", "shape" or "yes/no", from the question's opening words."""
    text = question.lower()
    if text.startswith(("what color", "what is the color")):
        return "color"
    return "shape" if text.startswith("what") else "yes/no"


def image_attributes(questions: Sequence[EasyQuestion], colors: Sequence[str]) -> dict[int, dict[str, str]]:
    """Per image id, its "shape" and "color" where its questions settle them (see the module's docstring)."""
    vocabulary = {"shape": SHAPES, "color": tuple(colors)}
    level_of = {word: level for level, words in vocabulary.items() for word in words}
    asserted: dict[int, dict[str, set[str]]] = defaultdict(lambda: {level: set() for level in vocabulary})
    excluded: dict[int, set[str]] = defaultdict(set)
    for question in questions:
        words = re.findall(r"[a-z]+", question.question.lower())
        named = [word for word in words if word in level_of]
        if question.answer in YES_NO:
            holds = (question.answer == "yes") != ("not" in words or "no" in words)
            for word in named:
                (asserted[question.image][level_of[word]].add(word) if holds else excluded[question.image].add(word))
        else:
            for word in (*named, question.answer):
                asserted[question.image][level_of[word]].add(word)
    attributes: dict[int, dict[str, str]] = {}
    for image in sorted({question.image for question in questions}):
        attributes[image] = {}
        for level, words in vocabulary.items():
            said = asserted[image][level]
            if len(said) > 1 or said & excluded[image]:
                raise ConfigError(
                    f"easy-VQA image {image}: its questions contradict each other on its {level} "
                    f"({sorted(said)} asserted, {sorted(excluded[image])} excluded)"
                )
            possible = said or set(words) - excluded[image]
            if len(possible) == 1:
                attributes[image][level] = possible.pop()
    return attributes


@SOURCES.register_class
class EasyVQA(DataSource):
    """easy-VQA: `questions` (13 answers, one per question, soft score 1.0; kinds color / shape / yes/no) and
    `statements` (two pictures, true or false, balanced overall and per kind; see STATEMENT_TEMPLATES). Splits:
    `test` is easy-VQA's test; `train` and `val` divide its train pictures about 90 / 10 by a hash of the
    picture's id, so a picture's questions stay in one split. `data.limit` keeps the first N pictures (by id)
    of each split, with all their questions. `data.paths.data` points at another copy of easy_vqa/data."""

    name = "easy_vqa"
    optional_path_keys = ("data",)

    @functools.cached_property
    def data_dir(self) -> Path:
        given = self.config.paths.get("data")
        return PACKAGE.require(self.name, Path(given) if given else package_data_dir(), "data")

    @functools.cache
    def answer_vocabulary(self) -> tuple[str, ...]:
        return read_answers(PACKAGE.require(self.name, self.data_dir / "answers.txt", "data"))

    @functools.cached_property
    def colors(self) -> tuple[str, ...]:
        return tuple(answer for answer in self.answer_vocabulary() if answer not in (*SHAPES, *YES_NO))

    @functools.cache
    def split(self, split: str) -> EasyPart:
        self.check_split(split)
        folder = self.data_dir / ("test" if split == "test" else "train")
        questions = read_questions(
            PACKAGE.require(self.name, folder / "questions.json", "data"), self.answer_vocabulary()
        )
        every = sorted(int(path.stem) for path in (folder / "images").glob("*.png") if path.stem.isdigit())
        unknown = sorted({question.image for question in questions} - set(every))
        if unknown:
            raise ConfigError(
                f"{folder / 'questions.json'}: questions about images {unknown[:5]} that {folder / 'images'} lacks"
            )
        ids = [image for image in every if split == "test" or train_or_val(f"train/{image}") == split]
        ids = ids[: self.config.limit]
        if not ids:
            raise ConfigError(f"{folder / 'images'}: no pictures for split {split!r}")
        row = {image: index for index, image in enumerate(ids)}
        pictures = torch.stack([read_image(folder / "images" / f"{image}.png", NATIVE_SIZE) for image in ids])
        return EasyPart(
            tuple(ids),
            tuple(EasyQuestion(q.question, q.answer, row[q.image]) for q in questions if q.image in row),
            ResizedImages(pictures, self.config.image_size),
        )

    def questions(self, split: str, seed: int = 0) -> Questions:
        """easy-VQA's own questions; `seed` changes nothing."""
        part = self.split(split)
        return Questions(
            part.images,
            torch.tensor([q.image for q in part.questions], dtype=torch.long),
            tuple(q.question for q in part.questions),
            tuple({q.answer: 1.0} for q in part.questions),
            tuple(question_kind(q.question) for q in part.questions),
        )

    def attributes(self, split: str) -> dict[int, dict[str, str]]:
        """Row of the split's images -> its settled "shape" and "color"."""
        return image_attributes(self.split(split).questions, self.colors)

    def statements(self, split: str, seed: int = 0) -> Statements:
        """Two statements per picture whose shape and colour are both settled, deterministic for a seed."""
        part = self.split(split)
        known = {row: found for row, found in self.attributes(split).items() if len(found) == 2}
        rows = sorted(known)
        levels = {
            "shape": LabelLevel.of((known[row]["shape"] for row in rows), SHAPES),
            "color": LabelLevel.of((known[row]["color"] for row in rows), self.colors),
        }
        examples = build_statements(levels, STATEMENT_TEMPLATES, seed=seed, noun=f"easy-VQA {split} pictures")
        to_row = torch.tensor(rows, dtype=torch.long)
        return Statements(
            part.images,
            to_row[[e.left for e in examples]],
            to_row[[e.right for e in examples]],
            tuple(e.statement for e in examples),
            torch.tensor([e.label for e in examples]),
        )
