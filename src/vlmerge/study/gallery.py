"""A few retrieval results to look at: query images and the captions the model ranks first."""

import os
from pathlib import Path

import torch
from PIL import Image

from vlmerge.data.config import DataConfig
from vlmerge.models.checkpoint import load_head_state
from vlmerge.study.results import GalleryEntry, GalleryHit
from vlmerge.tasks.finetune import TASK_HEAD, load_task

TOP = 3
UPSCALE = 3


def retrieval_gallery(
    checkpoint: str | os.PathLike, data: DataConfig, size: int, out: Path, split: str = "test"
) -> tuple[GalleryEntry, ...]:
    """`size` evenly spaced test queries: their picture (a PNG in `out`, named relative to it) and top captions."""
    model, task = load_task("retrieval", checkpoint, data)
    head = task.make_head(model.config)
    head.load_state_dict(load_head_state(checkpoint, TASK_HEAD), strict=True)
    similarity = task.similarity(model, head, split)
    pairs = task.source.pairs(split)
    gallery = []
    count = len(pairs.images)
    for rank, query in enumerate(torch.linspace(0, count - 1, min(size, count)).round().long().tolist()):
        path = out / f"query-{rank}.png"
        picture = Image.fromarray(pairs.images[torch.tensor([query])][0].permute(1, 2, 0).numpy())
        picture.resize((picture.width * UPSCALE, picture.height * UPSCALE), Image.NEAREST).save(path)
        own = (pairs.image_of == query).nonzero().squeeze(1).tolist()
        scores, indices = similarity[query].topk(min(TOP, similarity.shape[1]))
        top = tuple(
            GalleryHit(pairs.captions[i], round(s, 4), i in own) for s, i in zip(scores.tolist(), indices.tolist())
        )
        gallery.append(GalleryEntry(path.name, pairs.captions[own[0]] if own else "", top))
    return tuple(gallery)
