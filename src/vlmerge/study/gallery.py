"""A few retrieval results to look at: query images and the captions the model ranks first."""

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmerge.models.checkpoint import load_head_state
from vlmerge.tasks.finetune import TASK_HEAD, load_task
from vlmerge.training.config import DataConfig

TOP = 3
UPSCALE = 3


def retrieval_gallery(checkpoint: str | os.PathLike, data: DataConfig, size: int, study_dir: Path,
                      split: str = "test") -> list[dict[str, Any]]:
    """`size` evenly spaced test queries: their picture (PNG under study_dir/gallery) and top captions."""
    model, task = load_task("retrieval", checkpoint, data)
    head = task.make_head(model.config)
    head.load_state_dict(load_head_state(checkpoint, TASK_HEAD), strict=True)
    similarity = task.similarity(model, head, split)
    dataset = task.dataset.split(split)
    out = study_dir / "gallery"
    out.mkdir(parents=True, exist_ok=True)
    gallery = []
    for rank, query in enumerate(torch.linspace(0, len(dataset) - 1, min(size, len(dataset))).round().long().tolist()):
        path = out / f"query-{rank}.png"
        picture = Image.fromarray(dataset.images[query].permute(1, 2, 0).numpy())
        picture.resize((picture.width * UPSCALE, picture.height * UPSCALE), Image.NEAREST).save(path)
        scores, indices = similarity[query].topk(min(TOP, similarity.shape[1]))
        gallery.append({"image": str(path.relative_to(study_dir)), "caption": dataset.caption(query),
                        "top": [{"caption": dataset.caption(i), "score": round(s, 4), "correct": i == query}
                                for s, i in zip(scores.tolist(), indices.tolist())]})
    return gallery
