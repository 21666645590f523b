"""NLVR2-style: two images and a statement about them -> true or false.

Each image is fused with the statement; the two pooled outputs, concatenated, feed the
classifier (as in the paper's NLVR2 head).
"""

import torch
from torch import nn

from vlmerge.data.sources import ImageStore
from vlmerge.models.config import ModelConfig
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks.base import TASKS, ClassifierTask, Examples, accuracy, encode_text, mlp_head


@TASKS.register_class
class VisualReasoning(ClassifierTask):
    name = "nlvr2"
    use = "statements"
    primary_metric = "accuracy"
    image_fields = ("left", "right")

    def build_examples(self, split: str) -> tuple[ImageStore, Examples]:
        statements = self.source.statements(split, seed=self.seed)
        return statements.images, {
            "left": statements.left,
            "right": statements.right,
            **encode_text(self.tokenizer, list(statements.statements)),
            "labels": statements.labels.long(),
        }

    def make_head(self, config: ModelConfig) -> nn.Module:
        return mlp_head(2 * config.width, 2)

    def logits(self, model: VLTransformer, head: nn.Module, batch: Examples) -> torch.Tensor:
        pooled = [
            model.pool(model(images=batch[side], text_ids=batch["text_ids"], text_mask=batch["text_mask"]))
            for side in ("left", "right")
        ]
        return head(torch.cat(pooled, dim=-1))

    def metrics(self, logits: torch.Tensor, split: str) -> dict[str, float]:
        return {"accuracy": accuracy(logits, self.examples(split)["labels"])}
