"""Which emoji there are and what they are called, from two Debian packages (`EmojiSources` also finds the
third's font, which render.py draws with):

- `unicode-data`: emoji-test.txt says which sequences are emoji, in CLDR order, with group and subgroup;
- `unicode-cldr-core`: the CLDR English annotations give each emoji a name (the caption) and keywords.

Only fully-qualified entries are kept, one per emoji. The "Component" group (skin-tone and hair swatches) is
dropped: its entries are colour patches, not pictures of anything. emoji-test.txt gives them the status
`component`, so the fully-qualified filter already removes them; the group is also excluded by name, so a
future file that lists them as fully-qualified changes nothing. An emoji's split is hashed from the emoji with
its skin tones removed, so the variants of one emoji never straddle two splits.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from vlmerge.core.errors import ConfigError
from vlmerge.data.splits import assign_split

EXCLUDED_GROUPS = frozenset({"Component"})
SKIN_TONES = frozenset(chr(code) for code in range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers U+1F3FB..U+1F3FF
EMOJI_PRESENTATION = "\ufe0f"  # variation selector 16, which CLDR keys leave out
DEBIAN_PACKAGES = "fonts-noto-color-emoji unicode-cldr-core unicode-data"


@dataclass(frozen=True)
class EmojiSources:
    """The three source files, wherever this system keeps them."""

    font: Path
    cldr_dir: Path
    emoji_test: Path

    @classmethod
    def default(
        cls,
        font: str | os.PathLike | None = None,
        cldr_dir: str | os.PathLike | None = None,
        emoji_test: str | os.PathLike | None = None,
    ) -> "EmojiSources":
        """Each path from the argument, else its environment variable, else where Debian installs it."""
        return cls(
            _pick(font, "VLMERGE_EMOJI_FONT", "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
            _pick(cldr_dir, "VLMERGE_CLDR_DIR", "/usr/share/unicode/cldr/common"),
            _pick(emoji_test, "VLMERGE_EMOJI_TEST", "/usr/share/unicode/emoji/emoji-test.txt"),
        )

    def files(self) -> dict[Path, str]:
        """Every file read, with the Debian package that provides it."""
        return {
            self.font: "fonts-noto-color-emoji",
            **dict.fromkeys(cldr_files(self.cldr_dir), "unicode-cldr-core"),
            self.emoji_test: "unicode-data",
        }

    def check(self) -> None:
        """Fail before any work, naming each missing file and the package to install."""
        missing = [f"{path} (Debian package {package})" for path, package in self.files().items() if not path.is_file()]
        if missing:
            raise ConfigError(
                f"emoji dataset source missing: {'; '.join(missing)}. Install with "
                f"`apt-get install {DEBIAN_PACKAGES}`, or set VLMERGE_EMOJI_FONT, VLMERGE_CLDR_DIR, "
                f"VLMERGE_EMOJI_TEST to other copies"
            )

    def fingerprint(self) -> str:
        """Changes whenever a source file is replaced or edited, so a stale cache is never reused."""
        stats = [(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in self.files()]
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _pick(argument: str | os.PathLike | None, variable: str, debian_path: str) -> Path:
    return Path(argument if argument is not None else os.environ.get(variable) or debian_path).expanduser()


@dataclass(frozen=True)
class EmojiTestEntry:
    """One fully-qualified line of emoji-test.txt."""

    emoji: str
    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str


@dataclass(frozen=True)
class EmojiRecord:
    emoji: str
    codepoints: tuple[int, ...]
    name: str  # the CLDR name, else the emoji-test name; the caption
    keywords: tuple[str, ...]
    group: str
    subgroup: str
    base: str  # the emoji without skin tones: the key that keeps its variants in one split
    split: str


def parse_emoji_test(path: str | os.PathLike) -> list[EmojiTestEntry]:
    """The fully-qualified emoji in file (CLDR) order, outside the Component group."""
    path = Path(path)
    entries, group, subgroup = [], "", ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            entry = _parse_entry(line, group, subgroup, f"{path}:{number}")
            if entry is not None and group not in EXCLUDED_GROUPS:
                entries.append(entry)
    return entries


def _parse_entry(line: str, group: str, subgroup: str, where: str) -> EmojiTestEntry | None:
    """`1F600 ; fully-qualified # 😀 E1.0 grinning face`; None for any other status."""
    try:
        codes, rest = line.split(";", 1)
        status, comment = rest.split("#", 1)
        codepoints = tuple(int(code, 16) for code in codes.split())
        _, _, name = comment.split(maxsplit=2)  # emoji, version (E1.0), name
    except ValueError as error:
        raise ConfigError(f"{where}: not an emoji-test line ({line!r})") from error
    if status.strip() != "fully-qualified":
        return None
    return EmojiTestEntry("".join(map(chr, codepoints)), codepoints, name.strip(), group, subgroup)


def cldr_files(cldr_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Hand-written annotations, then the derived ones that add skin-tone and ZWJ sequences."""
    return Path(cldr_dir) / "annotations" / "en.xml", Path(cldr_dir) / "annotationsDerived" / "en.xml"


def parse_cldr(cldr_dir: str | os.PathLike) -> dict[str, tuple[str, tuple[str, ...]]]:
    """CLDR key -> (English name, keywords); keys have U+FE0F removed."""
    names: dict[str, str] = {}
    keywords: dict[str, tuple[str, ...]] = {}
    for path in cldr_files(cldr_dir):
        for element in _read_xml(path).iter("annotation"):
            key, text = element.get("cp"), (element.text or "").strip()
            if key is None:
                continue
            if element.get("type") == "tts":
                names[key] = text
            else:
                keywords[key] = tuple(word.strip() for word in text.split("|") if word.strip())
    return {key: (names.get(key, ""), keywords.get(key, ())) for key in {**names, **keywords}}


def _read_xml(path: Path) -> ElementTree.Element:
    try:
        return ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise ConfigError(f"{path}: not a readable CLDR annotation file ({error})") from error


def lookup_cldr(cldr: dict[str, tuple[str, tuple[str, ...]]], emoji: str) -> tuple[str, tuple[str, ...]] | None:
    """Exact key first, then without U+FE0F, which CLDR keys omit but fully-qualified sequences contain."""
    return cldr.get(emoji) or cldr.get(emoji.replace(EMOJI_PRESENTATION, ""))


def base_emoji(emoji: str) -> str:
    """The emoji with skin-tone modifiers removed: every skin-tone variant maps to the same base."""
    return "".join(char for char in emoji if char not in SKIN_TONES)


def emoji_records(sources: EmojiSources | None = None, limit: int | None = None) -> list[EmojiRecord]:
    """Every fully-qualified emoji (or the first `limit` in file order) with caption, labels and split."""
    sources = sources or EmojiSources.default()
    sources.check()
    cldr = parse_cldr(sources.cldr_dir)
    return [_record(entry, cldr) for entry in parse_emoji_test(sources.emoji_test)[:limit]]


def _record(entry: EmojiTestEntry, cldr: dict[str, tuple[str, tuple[str, ...]]]) -> EmojiRecord:
    name, keywords = lookup_cldr(cldr, entry.emoji) or ("", ())
    base = base_emoji(entry.emoji)
    return EmojiRecord(
        entry.emoji,
        entry.codepoints,
        name or entry.name,
        keywords,
        entry.group,
        entry.subgroup,
        base,
        assign_split(base),
    )
