"""WordNet 3.0 glosses as a text-only data source (Debian `wordnet-base`): 117,659 synsets, each a definition
and often example sentences, in four files by part of speech.

A line of `data.{noun,verb,adj,adv}` is `offset lex_filenum ss_type w_cnt word lex_id ... | gloss`; the gloss
is the definition, then example sentences in double quotes separated by `;` ("draw air into, and expel out of,
the lungs; "I can breathe better when the air is clean""). The license header lines start with two spaces. The
definition is the gloss up to its first quote; the examples are its quoted parts. Twenty glosses have unbalanced
quotes (typos such as `"I"m siding`); there a stray fragment is dropped, and parts without two letters are not
examples.
"""

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmerge.core.errors import ConfigError
from vlmerge.data.installed import debian
from vlmerge.data.sources import SOURCES, DataSource, LabelledTexts
from vlmerge.data.splits import SPLITS, assign_split

PACKAGE = debian("wordnet-base")
DEFAULT_DIR = Path("/usr/share/wordnet")
PARTS_OF_SPEECH = {"noun": ("noun", "n"), "verb": ("verb", "v"), "adj": ("adjective", "as"), "adv": ("adverb", "r")}
CLASSES = tuple(name for name, _ in PARTS_OF_SPEECH.values())  # file suffix order: noun, verb, adjective, adverb
QUOTED = re.compile(r'"([^"]*)"')


@dataclass(frozen=True)
class Synset:
    key: str  # "noun/00001740": file and byte offset, unique; its split is hashed from it
    label: int  # index into CLASSES: the file it came from
    definition: str
    examples: tuple[str, ...]
    split: str


def parse_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """(definition, example sentences) of a gloss."""
    definition, _, rest = gloss.partition('"')
    examples = (example.strip(" ;:") for example in QUOTED.findall(f'"{rest}' if rest else ""))
    return definition.strip(" ;"), tuple(e for e in examples if sum(char.isalpha() for char in e) >= 2)


def read_synsets(path: Path, label: int, ss_types: str) -> list[Synset]:
    """Every synset of one data file, in file order; each line's synset type must be one of `ss_types`."""
    synsets = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a readable WordNet data file ({error})") from error
    for number, line in enumerate(lines, start=1):
        if line.startswith("  ") or not line.strip():
            continue  # the license header
        fields, bar, gloss = line.partition(" | ")
        parts = fields.split()
        if not bar or len(parts) < 4 or parts[2] not in ss_types:
            raise ConfigError(f"{path}:{number}: not a WordNet data line of synset type {' or '.join(ss_types)}")
        definition, examples = parse_gloss(gloss.strip())
        key = f"{path.suffix[1:]}/{parts[0]}"
        synsets.append(Synset(key, label, definition, examples, assign_split(key)))
    return synsets


@SOURCES.register_class
class WordNet(DataSource):
    """WordNet glosses: `texts` (every definition and example sentence) and `text_classes` (a definition ->
    its part of speech: noun, verb, adjective or adverb, the file it came from; adjective satellites count as
    adjectives). Splits train / val / test (about 80 / 10 / 10) from a hash of the synset's file and offset, so a
    synset's definition and examples share a split. `data.limit` keeps the first N synsets of each file in each
    split, so every class stays present. `data.paths.dir` points at another WordNet dict folder."""

    name = "wordnet"
    optional_path_keys = ("dir",)

    @functools.cached_property
    def synsets(self) -> list[Synset]:
        folder = Path(self.config.paths.get("dir", DEFAULT_DIR))
        chosen = []
        for label, (suffix, (_, ss_types)) in enumerate(PARTS_OF_SPEECH.items()):
            found = read_synsets(PACKAGE.require(self.name, folder / f"data.{suffix}", "dir"), label, ss_types)
            chosen += [
                synset for split in SPLITS for synset in [s for s in found if s.split == split][: self.config.limit]
            ]
        return chosen

    @functools.cache
    def split(self, split: str) -> tuple[Synset, ...]:
        self.check_split(split)
        return tuple(synset for synset in self.synsets if synset.split == split)

    def texts(self, split: str) -> tuple[str, ...]:
        return tuple(text for synset in self.split(split) for text in (synset.definition, *synset.examples))

    def text_classes(self, split: str) -> LabelledTexts:
        synsets = self.split(split)
        return LabelledTexts(
            tuple(synset.definition for synset in synsets),
            torch.tensor([synset.label for synset in synsets], dtype=torch.long),
            CLASSES,
        )
