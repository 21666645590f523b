"""Readers for the public formats of the paper's downstream data, from local files only.

- COCO / Flickr30k captions in Karpathy's split JSON (`dataset_coco.json`),
- VQAv2 questions + annotations JSON,
- NLVR2 JSONL (two images per statement, `{identifier stem}-img0.png` / `-img1.png`),
- images from a local folder.
Malformed files fail with one error naming the file and what is wrong.
"""

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmerge.core.errors import ConfigError


@dataclass(frozen=True)
class CaptionExample:
    image: Path
    captions: tuple[str, ...]
    split: str


@dataclass(frozen=True)
class VqaExample:
    image: Path
    question: str
    question_id: int
    answers: tuple[str, ...]  # every annotator's answer (10 in VQAv2)


@dataclass(frozen=True)
class Nlvr2Example:
    left: Path
    right: Path
    sentence: str
    label: bool
    identifier: str


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from error


def _field(record: dict, key: str, path: Path) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise ConfigError(f"{path}: an entry lacks the field {key!r}")
    return record[key]


def load_karpathy_captions(
    path: str | os.PathLike, image_root: str | os.PathLike, split: str | None = None
) -> list[CaptionExample]:
    """Karpathy split JSON; `restval` counts as train, as is customary."""
    path, root = Path(path), Path(image_root)
    images = _field(_read_json(path), "images", path)
    examples = []
    for entry in images:
        entry_split = "train" if _field(entry, "split", path) == "restval" else entry["split"]
        if split is not None and entry_split != split:
            continue
        captions = tuple(_field(s, "raw", path) for s in _field(entry, "sentences", path))
        examples.append(
            CaptionExample(root / entry.get("filepath", "") / _field(entry, "filename", path), captions, entry_split)
        )
    return examples


def load_vqav2(
    questions_path: str | os.PathLike,
    annotations_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    image_name: str = "COCO_{subset}_{image_id:012d}.jpg",
    subset: str = "val2014",
) -> list[VqaExample]:
    qpath, apath = Path(questions_path), Path(annotations_path)
    questions = _field(_read_json(qpath), "questions", qpath)
    annotations = {_field(a, "question_id", apath): a for a in _field(_read_json(apath), "annotations", apath)}
    examples = []
    for question in questions:
        qid = _field(question, "question_id", qpath)
        if qid not in annotations:
            raise ConfigError(f"{apath}: no annotation for question {qid}")
        answers = tuple(_field(a, "answer", apath) for a in _field(annotations[qid], "answers", apath))
        image = Path(image_dir) / image_name.format(subset=subset, image_id=_field(question, "image_id", qpath))
        examples.append(VqaExample(image, _field(question, "question", qpath), qid, answers))
    return examples


def load_nlvr2(path: str | os.PathLike, image_dir: str | os.PathLike) -> list[Nlvr2Example]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{number}: not valid JSON ({error})") from error
        identifier = _field(record, "identifier", path)
        label = str(_field(record, "label", path)).lower()
        if label not in ("true", "false"):
            raise ConfigError(f"{path}:{number}: label must be True or False, got {record['label']!r}")
        stem = identifier.rsplit("-", 1)[0]  # train-10171-0-3 -> images train-10171-0-img{0,1}.png
        examples.append(
            Nlvr2Example(
                Path(image_dir) / f"{stem}-img0.png",
                Path(image_dir) / f"{stem}-img1.png",
                _field(record, "sentence", path),
                label == "true",
                identifier,
            )
        )
    return examples


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An RGB image (transparency composited onto white), resized to size x size, float in [0, 1]."""
    return read_image(path, size).float() / 255.0


def read_image(path: str | os.PathLike, size: int, square: bool = False) -> torch.Tensor:
    """An RGB image (transparency composited onto white), resized to size x size, uint8 (3, size, size).
    `square` centres it on a white square first, so resizing keeps its aspect ratio (clip art, stamps)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
    except OSError as error:
        raise ConfigError(f"{path}: not a readable image ({error})") from error
    side = max(rgba.size)
    canvas = (side, side) if square else rgba.size
    white = Image.new("RGBA", canvas, (255, 255, 255, 255))
    white.alpha_composite(rgba, ((canvas[0] - rgba.width) // 2, (canvas[1] - rgba.height) // 2))
    rgb = white.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class FileImages:
    """An image store over files, read and resized when indexed: large datasets stay on disk."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        indices = range(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).reshape(-1).tolist()
        if not len(indices):
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return torch.stack([read_image(self.paths[i], self.size) for i in indices])


class ResizedImages:
    """An image store over small images held in memory at their own size (uint8 (n, 1 or 3, h, w)), resized
    when indexed: 60,000 Fashion-MNIST pictures stay 47 MB instead of 2.2 GB at 112 px. Bicubic
    (`torch.nn.functional.interpolate`, antialiased when shrinking), rounded and clamped to uint8; grey
    images are repeated over three channels."""

    def __init__(self, images: torch.Tensor, size: int) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"expected uint8 images (n, 1 or 3, h, w), got {images.dtype} {tuple(images.shape)}")
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        chosen = self.images[rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long).reshape(-1)]
        if not len(chosen):
            chosen = chosen.new_empty(0, chosen.shape[1], self.size, self.size)
        elif chosen.shape[-2:] != (self.size, self.size):
            resized = torch.nn.functional.interpolate(
                chosen.float(),
                size=(self.size, self.size),
                mode="bicubic",
                align_corners=False,
                antialias=self.size < chosen.shape[-1],
            )
            chosen = resized.round_().clamp_(0, 255).to(torch.uint8)
        return chosen.expand(-1, 3, -1, -1).contiguous()


def image_folder(
    directory: str | os.PathLike, extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg")
) -> Iterator[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such image folder")
    yield from sorted(p for p in directory.rglob("*") if p.suffix.lower() in extensions)
