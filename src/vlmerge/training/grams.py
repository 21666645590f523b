"""Gram matrices of a checkpoint over image-text data, for RegMean (`vlmerge grams`).

Each data batch runs three ways, so that every expert sees the inputs it serves: images
alone and text alone (v and l experts in every layer) and image-text pairs (vl experts).
Below the fusion layer the pair pass repeats the unimodal activations, which scales the v
and l Gram matrices of those layers by the same factor, a factor RegMean's solve cancels.
Under torchrun each rank takes every world_size-th batch and the sums are all-reduced.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from vlmerge.data.config import DataConfig
from vlmerge.data.sources import load_pairs
from vlmerge.io.atomic import check_output_path
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.io.grams import save_grams
from vlmerge.merging.grams import collect_grams
from vlmerge.models.checkpoint import load_model
from vlmerge.training.distributed import DistributedContext, init_distributed
from vlmerge.training.setup import PairData, checkpoint_data, checkpoint_tokenizer


def gram_batches(pairs: PairData, batch_size: int, dist: DistributedContext) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of the model inputs, in order: images, text, pairs per data batch."""
    starts = range(0, len(pairs), batch_size)
    for start in list(starts)[dist.rank :: dist.world_size]:
        batch = pairs[slice(start, start + batch_size)].to(dist.device)
        text = {"text_ids": batch.text.ids, "text_mask": batch.text.mask}
        yield {"images": batch.images}
        yield text
        yield {"images": batch.images, **text}


def collect_checkpoint_grams(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    data: DataConfig | None = None,
    split: str = "train",
    batch_size: int = 64,
    normalize: bool = False,
    progress: bool = True,
    dist: DistributedContext | None = None,
) -> Path:
    """Collect and save the Gram file, recording where it came from (checkpoint and data).

    `out` is checked before any work (not the checkpoint, not a directory, writable); the file
    appears only once the pass is complete. The recorded hash is of the checkpoint's open file,
    and a checkpoint replaced while the model was loaded from it is an error, not a mismatch.
    """
    check_output_path(out, [checkpoint])
    dist = dist or init_distributed()
    reader = open_checkpoint(checkpoint)
    model = load_model(checkpoint).to(dist.device)
    reader.check_unchanged()  # load_model read the file `reader` holds open
    data = data or checkpoint_data(reader)
    pairs = PairData.of(
        load_pairs(data, split, progress=progress and dist.is_main),
        checkpoint_tokenizer(reader, model.config.max_text_len),
    )
    grams, info = collect_grams(
        model, gram_batches(pairs, batch_size, dist), normalize=normalize, progress=progress and dist.is_main
    )
    provenance = {
        "checkpoint": {"path": str(checkpoint), "sha256": reader.sha256()},
        "data": {**data.model_dump(mode="json"), "split": split, "examples": len(pairs)},
        "inputs": "images, text and image-text pairs of each batch",
    }
    if dist.is_main:
        save_grams(out, grams, info, provenance)
    dist.barrier()
    return Path(out)
