"""NLVR2 from local files: its JSONL statements with their image folders, images read from disk when a batch
needs them (`FileImages`)."""

import torch

from vlmerge.data.formats import FileImages, load_nlvr2
from vlmerge.data.sources import SOURCES, DataSource, Statements


@SOURCES.register_class
class NLVR2(DataSource):
    """NLVR2 JSONL with its image folders; `val` is dev and `test` is test1. `data.limit` keeps the first N
    statements of each split."""

    name = "nlvr2"
    path_keys = ("train_json", "train_images", "val_json", "val_images", "test_json", "test_images")

    def statements(self, split: str, seed: int = 0) -> Statements:
        self.check_split(split)
        examples = load_nlvr2(self.config.paths[f"{split}_json"], self.config.paths[f"{split}_images"])[
            : self.config.limit
        ]
        images = sorted({path for example in examples for path in (example.left, example.right)})
        row = {path: index for index, path in enumerate(images)}
        return Statements(
            FileImages(images, self.config.image_size),
            torch.tensor([row[e.left] for e in examples], dtype=torch.long),
            torch.tensor([row[e.right] for e in examples], dtype=torch.long),
            tuple(e.sentence for e in examples),
            torch.tensor([e.label for e in examples]),
        )
