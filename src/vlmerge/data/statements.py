"""NLVR2-style statements about two images, generated from per-image labels, true and false in balance.

A dataset gives each candidate image one label per level (an emoji's group and subgroup, a shape and its
colour) and a template per statement kind: `(side, level, text)`, where side "both" says the two images share
the level's label and "left" / "right" names one image's label (`{label}` in the text). Kinds are taken in
turn, each true then false, so labels are balanced overall and within each kind.
"""

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from vlmerge.core.errors import ConfigError

T = TypeVar("T")
SIDES = ("both", "left", "right")


@dataclass(frozen=True)
class StatementExample:
    left: int  # indices into the images the labels were given for; never equal
    right: int
    statement: str
    label: bool
    kind: str  # a key of the templates


@dataclass(frozen=True)
class LabelLevel:
    """One label level of the candidate images, indexed for constant-time draws."""

    labels: tuple[str, ...]  # per image
    vocabulary: tuple[str, ...]  # the labels a false statement may name: the dataset's, plus the labels present
    members: dict[str, list[int]]  # label -> its images
    others: dict[str, list[int]]  # label -> the images with another label

    @classmethod
    def of(cls, labels: Iterable[str], vocabulary: Iterable[str] = ()) -> "LabelLevel":
        labels = tuple(labels)
        members: dict[str, list[int]] = {}
        for image, label in enumerate(labels):
            members.setdefault(label, []).append(image)
        others = {label: [i for i, other in enumerate(labels) if other != label] for label in members}
        return cls(labels, tuple(sorted(set(vocabulary) | set(labels))), members, others)

    def lefts(self, side: str, label: bool) -> list[int]:
        """The images that can be the left one of a true or false statement about `side`."""
        if side != "both":
            possible = len(self.labels) >= 2 and (label or len(self.vocabulary) >= 2)
            return list(range(len(self.labels))) if possible else []
        return [i for i, own in enumerate(self.labels) if (len(self.members[own]) >= 2 if label else self.others[own])]


def build_statements(
    levels: Mapping[str, LabelLevel],
    templates: Mapping[str, tuple[str, str, str]],
    num_examples: int | None = None,
    seed: int = 0,
    kinds: Sequence[str] | None = None,
    noun: str = "images",
) -> tuple[StatementExample, ...]:
    """Statements about two different images (default 2 per image), kinds in turn, each kind true then false, so
    labels are balanced overall and within each kind (within one example when num_examples is odd). `noun` names
    the images in errors."""
    kinds = tuple(templates) if kinds is None else tuple(kinds)
    count = len(next(iter(levels.values())).labels) if levels else 0
    if any(len(level.labels) != count for level in levels.values()):
        raise ConfigError(f"label levels {list(levels)} label different numbers of {noun}")
    num_examples = 2 * count if num_examples is None else num_examples
    if num_examples < 1:
        raise ConfigError(f"num_examples must be >= 1, got {num_examples}")
    unknown = sorted(set(kinds) - templates.keys())
    if unknown or not kinds:
        raise ConfigError(f"unknown NLVR2 kinds {unknown or list(kinds)}; expected some of {list(templates)}")
    for kind in kinds:
        side, level, _ = templates[kind]
        if side not in SIDES or level not in levels:
            raise ConfigError(f"NLVR2 template {kind!r}: side must be one of {SIDES} and level one of {list(levels)}")
    lefts = {
        (kind, label): levels[templates[kind][1]].lefts(templates[kind][0], label)
        for kind in kinds
        for label in (True, False)
    }
    impossible = [f"{str(label).lower()} {kind!r}" for (kind, label), images in lefts.items() if not images]
    if impossible:
        raise ConfigError(
            f"{count} {noun} cannot give a {', '.join(impossible)} example (too few images or "
            f"labels); pass kinds= without those kinds"
        )
    rng = random.Random(seed)
    plan = [(kinds[(j // 2) % len(kinds)], j % 2 == 0) for j in range(num_examples)]
    return tuple(_statement(rng, levels, templates[kind], kind, label, lefts[kind, label]) for kind, label in plan)


def _statement(
    rng: random.Random,
    levels: Mapping[str, LabelLevel],
    template: tuple[str, str, str],
    kind: str,
    label: bool,
    lefts: Sequence[int],
) -> StatementExample:
    side, level_name, text = template
    level = levels[level_name]
    left = rng.choice(lefts)
    if side == "both":
        own = level.labels[left]
        right = _choose_except(rng, level.members[own], left) if label else rng.choice(level.others[own])
        return StatementExample(left, right, text, label, kind)
    right = _choose_except(rng, range(len(level.labels)), left)
    truth = level.labels[left if side == "left" else right]
    named = truth if label else _choose_except(rng, level.vocabulary, truth)
    return StatementExample(left, right, text.format(label=named), label, kind)


def _choose_except(rng: random.Random, items: Sequence[T], excluded: T) -> T:
    """A uniform draw from items other than `excluded`, which items must hold exactly once."""
    pick = items[rng.randrange(len(items) - 1)]
    return items[-1] if pick == excluded else pick
