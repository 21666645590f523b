"""Emoji pictures captioned with their CLDR names: a small, real image-text dataset from three Debian packages.

- `unicode-data`: emoji-test.txt says which sequences are emoji, in CLDR order, with group and subgroup;
- `unicode-cldr-core`: the CLDR English annotations give each emoji a name (the caption) and keywords;
- `fonts-noto-color-emoji`: Noto Color Emoji gives the pictures, rendered with Pillow.

Only fully-qualified entries are kept, one per emoji. The "Component" group (skin-tone and hair swatches) is
dropped: its entries are colour patches, not pictures of anything. emoji-test.txt gives them the status
`component`, so the fully-qualified filter already removes them; the group is also excluded by name, so a
future file that lists them as fully-qualified changes nothing.

Splits come from a hash of the emoji with its skin tones removed, so the variants of one emoji never
straddle two splits. The rendered set is cached as one safetensors file of uint8 images plus a JSON of records.
"""

import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal
from xml.etree import ElementTree

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, ImageFont, features
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vlmerge.core.errors import ConfigError
from vlmerge.io.atomic import atomic_path

FORMAT_VERSION = 1  # bump when rendering or the cached layout changes, so old caches are not reused
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
EXCLUDED_GROUPS = frozenset({"Component"})
SKIN_TONES = frozenset(chr(code) for code in range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers U+1F3FB..U+1F3FF
EMOJI_PRESENTATION = "\ufe0f"  # variation selector 16, which CLDR keys leave out
FONT_SIZE = 109  # Noto Color Emoji is a bitmap font whose only strike is 109 px
MARGIN = 8  # px of transparent border around a drawn glyph, so nothing is clipped
DEBIAN_PACKAGES = "fonts-noto-color-emoji unicode-cldr-core unicode-data"
DEFAULT_CACHE_DIR = Path("~/.cache/vlmerge/emoji")


@dataclass(frozen=True)
class EmojiSources:
    """The three source files, wherever this system keeps them."""

    font: Path
    cldr_dir: Path
    emoji_test: Path

    @classmethod
    def default(cls, font: str | os.PathLike | None = None, cldr_dir: str | os.PathLike | None = None,
                emoji_test: str | os.PathLike | None = None) -> "EmojiSources":
        """Each path from the argument, else its environment variable, else where Debian installs it."""
        return cls(_pick(font, "VLMERGE_EMOJI_FONT", "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
                   _pick(cldr_dir, "VLMERGE_CLDR_DIR", "/usr/share/unicode/cldr/common"),
                   _pick(emoji_test, "VLMERGE_EMOJI_TEST", "/usr/share/unicode/emoji/emoji-test.txt"))

    def files(self) -> dict[Path, str]:
        """Every file read, with the Debian package that provides it."""
        return {self.font: "fonts-noto-color-emoji", **dict.fromkeys(cldr_files(self.cldr_dir), "unicode-cldr-core"),
                self.emoji_test: "unicode-data"}

    def check(self) -> None:
        """Fail before any work, naming each missing file and the package to install."""
        missing = [f"{path} (Debian package {package})" for path, package in self.files().items() if not path.is_file()]
        if missing:
            raise ConfigError(f"emoji dataset source missing: {'; '.join(missing)}. Install with "
                              f"`apt-get install {DEBIAN_PACKAGES}`, or set VLMERGE_EMOJI_FONT, VLMERGE_CLDR_DIR, "
                              f"VLMERGE_EMOJI_TEST to other copies")

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


def assign_split(base: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """Split from a hash of the base emoji, so it depends on neither the order nor the set of emoji."""
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"split fractions must be {len(SPLITS)} non-negative numbers summing to 1, got {fractions}")
    position = int.from_bytes(hashlib.sha256(base.encode("utf-8")).digest()[:8], "big") / 2**64
    for split, bound in zip(SPLITS, itertools.accumulate(fractions)):
        if position < bound:
            return split
    return SPLITS[-1]  # fractions summing to just under 1


def emoji_records(sources: EmojiSources | None = None, limit: int | None = None) -> list[EmojiRecord]:
    """Every fully-qualified emoji (or the first `limit` in file order) with caption, labels and split."""
    sources = sources or EmojiSources.default()
    sources.check()
    cldr = parse_cldr(sources.cldr_dir)
    return [_record(entry, cldr) for entry in parse_emoji_test(sources.emoji_test)[:limit]]


def _record(entry: EmojiTestEntry, cldr: dict[str, tuple[str, tuple[str, ...]]]) -> EmojiRecord:
    name, keywords = lookup_cldr(cldr, entry.emoji) or ("", ())
    base = base_emoji(entry.emoji)
    return EmojiRecord(entry.emoji, entry.codepoints, name or entry.name, keywords, entry.group, entry.subgroup,
                       base, assign_split(base))


def load_font(path: str | os.PathLike) -> ImageFont.FreeTypeFont:
    """The emoji font at its one bitmap size; warns when Pillow cannot shape sequences."""
    if not features.check("raqm"):
        warnings.warn("Pillow has no libraqm: emoji sequences (ZWJ, flags, skin tones) are drawn as several "
                      "glyphs and will be skipped; install libraqm (and libfribidi) to keep them", stacklevel=2)
    try:
        return ImageFont.truetype(str(path), FONT_SIZE)
    except OSError as error:
        raise ConfigError(f"{path}: cannot load as a {FONT_SIZE} px font ({error})") from error


def render_emoji(font: ImageFont.FreeTypeFont, emoji: str, image_size: int) -> Image.Image | None:
    """The emoji alone, centred on white, image_size square (RGB); None when the font cannot draw it as one picture."""
    if font.getlength(emoji) > 1.5 * font.getlength(emoji[0]):
        return None  # not shaped into one glyph: its parts would be drawn side by side
    glyph = _draw_glyph(font, emoji)
    box = glyph.getbbox()  # bounds of the non-transparent pixels
    if box is None:
        return None  # blank: the font has nothing for it
    return _square_on_white(glyph.crop(box)).resize((image_size, image_size), Image.Resampling.LANCZOS)


def _draw_glyph(font: ImageFont.FreeTypeFont, emoji: str) -> Image.Image:
    left, top, right, bottom = font.getbbox(emoji)
    canvas = Image.new("RGBA", (right - left + 2 * MARGIN, bottom - top + 2 * MARGIN), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((MARGIN - left, MARGIN - top), emoji, font=font, embedded_color=True)
    return canvas


def _square_on_white(glyph: Image.Image) -> Image.Image:
    """Pad to a square so resizing keeps the aspect ratio (flags are wider than tall)."""
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB")


@dataclass(frozen=True, eq=False)  # tensors have no single truth value for ==
class EmojiDataset:
    """Rendered emoji with their records; `groups` and `subgroups` are the label vocabularies of the whole build."""

    records: tuple[EmojiRecord, ...]
    images: torch.Tensor  # (N, 3, S, S) uint8, RGB on white
    groups: tuple[str, ...]
    subgroups: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # emoji the font could not draw, left out of the whole build

    @classmethod
    def from_records(cls, records: Iterable[EmojiRecord], images: torch.Tensor,
                     skipped: Iterable[str] = ()) -> "EmojiDataset":
        records = tuple(records)
        if len(records) != len(images):
            raise ConfigError(f"{len(records)} emoji records but {len(images)} images")
        return cls(records, images, tuple(sorted({r.group for r in records})),
                   tuple(sorted({r.subgroup for r in records})), tuple(skipped))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def split(self, name: str) -> "EmojiDataset":
        """The records of one split, keeping the full label vocabularies so label indices agree across splits."""
        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; expected one of {SPLITS}")
        keep = [i for i, record in enumerate(self.records) if record.split == name]
        return replace(self, records=tuple(self.records[i] for i in keep), images=self.images[keep])

    def image_tensor(self, index: int) -> torch.Tensor:
        """(3, S, S) float in [0, 1]."""
        return self.images[index].float() / 255

    def caption(self, index: int) -> str:
        return self.records[index].name

    def labels(self, level: Literal["group", "subgroup"]) -> torch.Tensor:
        """Class indices into `groups` or `subgroups`, for classification."""
        vocabulary = {"group": self.groups, "subgroup": self.subgroups}[level]
        index = {label: i for i, label in enumerate(vocabulary)}
        return torch.tensor([index[getattr(record, level)] for record in self.records], dtype=torch.long)


def build_emoji_dataset(image_size: int = 32, cache_dir: str | os.PathLike | None = None,
                        sources: EmojiSources | None = None, limit: int | None = None,
                        progress: bool = False) -> EmojiDataset:
    """The dataset from its cache, rendered once when the sources, size, renderer or format version change."""
    if image_size < 1 or (limit is not None and limit < 1):
        raise ConfigError(f"image_size and limit must be positive, got {image_size} and {limit}")
    sources = sources or EmojiSources.default()
    sources.check()
    images_path, records_path = _cache_paths(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser(), sources,
                                             image_size, limit)
    if images_path.is_file() and records_path.is_file():
        return _load_cache(images_path, records_path)
    dataset = _render_dataset(sources, image_size, limit, progress)
    _save_cache(dataset, images_path, records_path, sources)
    return dataset


def _renderer() -> str:
    """Pillow's version and layout engine decide which sequences render, so they key the cache too."""
    return f"pillow-{PIL.__version__}-{'raqm' if features.check('raqm') else 'basic'}"


def _cache_paths(cache_dir: Path, sources: EmojiSources, image_size: int, limit: int | None) -> tuple[Path, Path]:
    key = hashlib.sha256(f"{sources.fingerprint()}|{_renderer()}".encode()).hexdigest()[:16]
    stem = f"emoji-v{FORMAT_VERSION}-{image_size}px-{'all' if limit is None else f'first{limit}'}-{key}"
    return cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"


def _render_dataset(sources: EmojiSources, image_size: int, limit: int | None, progress: bool) -> EmojiDataset:
    font = load_font(sources.font)
    kept, pictures, skipped = [], [], []
    for record in tqdm(emoji_records(sources, limit), desc="rendering emoji", unit="emoji", disable=not progress):
        picture = render_emoji(font, record.emoji, image_size)
        if picture is None:
            skipped.append(record.emoji)
            continue
        kept.append(record)
        pictures.append(torch.from_numpy(np.array(picture)).permute(2, 0, 1))  # (S, S, 3) -> (3, S, S)
    if not pictures:
        raise ConfigError(f"{sources.font}: none of the {len(skipped)} emoji could be rendered")
    return EmojiDataset.from_records(kept, torch.stack(pictures).contiguous(), skipped)


def _save_cache(dataset: EmojiDataset, images_path: Path, records_path: Path, sources: EmojiSources) -> None:
    """Images first, records last: the records file marks a complete cache entry."""
    with atomic_path(images_path) as tmp:
        save_file({"images": dataset.images}, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    manifest = {"format_version": FORMAT_VERSION, "image_size": dataset.image_size, "renderer": _renderer(),
                "sources": {str(path): package for path, package in sources.files().items()},
                "skipped": list(dataset.skipped), "records": [asdict(record) for record in dataset.records]}
    with atomic_path(records_path) as tmp:
        tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")


def _load_cache(images_path: Path, records_path: Path) -> EmojiDataset:
    manifest = json.loads(records_path.read_text(encoding="utf-8"))
    records = [EmojiRecord(**{**fields, "codepoints": tuple(fields["codepoints"]),
                              "keywords": tuple(fields["keywords"])}) for fields in manifest["records"]]
    images = load_file(str(images_path))["images"]
    if len(records) != len(images):
        raise ConfigError(f"{images_path}: {len(images)} images for {len(records)} records; delete the cache entry")
    return EmojiDataset.from_records(records, images, manifest["skipped"])
