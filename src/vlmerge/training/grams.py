"""Gram matrices of a checkpoint over image-text data, for RegMean (`vlmerge grams`).

Each data batch runs three ways, so that every expert sees the inputs it serves: images
alone and text alone (v and l experts in every layer) and image-text pairs (vl experts).
Below the fusion layer the pair pass repeats the unimodal activations, which scales the v
and l Gram matrices of those layers by the same factor, a factor RegMean's solve cancels.
Under torchrun each rank takes every world_size-th batch and the sums are all-reduced.

With `sequential` options the pass is RegMean++'s (merging/regmean_pp.py): each layer's matrices
come from the output of the layers below, merged with those options, and the file records them.
"""

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmerge.data.config import DataConfig
from vlmerge.data.sources import load_pairs
from vlmerge.io.atomic import check_output_path
from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.io.grams import save_grams
from vlmerge.merging.grams import collect_grams
from vlmerge.merging.regmean_pp import SEQUENTIAL, SequentialOptions, collect_sequential_grams
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


@dataclass(frozen=True, eq=False)
class GramBatches:
    """`gram_batches` as an iterable that starts over each time (the sequential pass reads it per layer)."""

    pairs: PairData
    batch_size: int
    dist: DistributedContext

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return gram_batches(self.pairs, self.batch_size, self.dist)


def data_files(data_file: str | os.PathLike | None, data: DataConfig | None) -> list[Path]:
    """The files a pass reads its data from: the data config file (`--data x.yaml`; a dataset's name
    names no file) and the local files its datasets read. An output written over one would destroy it."""
    named = [Path(data_file)] if data_file is not None and Path(data_file).is_file() else []
    return named + [Path(path) for path in (data.paths.values() if data is not None else ())]


def collect_checkpoint_grams(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    data: DataConfig | None = None,
    split: str = "train",
    batch_size: int = 64,
    normalize: bool = False,
    progress: bool = True,
    dist: DistributedContext | None = None,
    sequential: SequentialOptions | None = None,
    data_file: str | os.PathLike | None = None,
) -> Path:
    """Collect and save the Gram file, recording where it came from (checkpoint and data) and, for
    RegMean++ (`sequential`), with which merge of the lower layers.

    `out` is checked before any work (not the checkpoint, not the data config file `data_file` or a
    file its datasets read, not a directory, writable); the file appears only once the pass is
    complete. The recorded hash is of the checkpoint's open file, and a checkpoint replaced while
    the model was loaded from it is an error, not a mismatch.
    """
    check_output_path(out, [checkpoint, *data_files(data_file, data)])
    dist = dist or init_distributed()
    reader = open_checkpoint(checkpoint)
    model = load_model(checkpoint).to(dist.device)
    reader.check_unchanged()  # load_model read the file `reader` holds open
    data = data or checkpoint_data(reader)
    pairs = PairData.of(
        load_pairs(data, split, progress=progress and dist.is_main),
        checkpoint_tokenizer(reader, model.config.max_text_len),
    )
    batches, show = GramBatches(pairs, batch_size, dist), progress and dist.is_main
    inputs = "images, text and image-text pairs of each batch"
    if sequential is None:
        grams, info = collect_grams(model, batches, normalize=normalize, progress=show)
    else:
        grams, info = collect_sequential_grams(model, batches, sequential, normalize=normalize, progress=show)
        inputs += "; each layer's from the output of the layers below merged by RegMean (RegMean++)"
    provenance = {
        "checkpoint": {"path": str(checkpoint), "sha256": reader.sha256()},
        "data": {**data.model_dump(mode="json"), "split": split, "examples": len(pairs)},
        "inputs": inputs,
    }
    if sequential is not None:
        provenance[SEQUENTIAL] = sequential.model_dump(mode="json")
    with dist.together():  # a write that fails on the main process ends the others too
        if dist.is_main:
            save_grams(out, grams, info, provenance)
    return Path(out)
