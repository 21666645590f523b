"""NLVR2-style: two emoji and a statement about them -> true or false.

Each image is fused with the statement; the two pooled outputs, concatenated, feed the
classifier (as in the paper's NLVR2 head).
"""

import torch
from torch import nn

from vlmerge.data.emoji import EmojiDataset
from vlmerge.data.emoji_tasks import build_nlvr2
from vlmerge.models.config import ModelConfig
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks.base import TASKS, ClassifierTask, Examples, accuracy, encode_text, mlp_head


@TASKS.register("nlvr2")
class VisualReasoning(ClassifierTask):
    name = "nlvr2"

    def build_examples(self, split: EmojiDataset) -> Examples:
        pairs = build_nlvr2(split, seed=self.seed)
        return {
            "left": self.images(split, [pair.left for pair in pairs]),
            "right": self.images(split, [pair.right for pair in pairs]),
            **encode_text(self.tokenizer, [pair.statement for pair in pairs]),
            "labels": torch.tensor([int(pair.label) for pair in pairs]),
        }

    def make_head(self, config: ModelConfig) -> nn.Module:
        return mlp_head(2 * config.width, 2)

    def logits(self, model: VLTransformer, head: nn.Module, batch: Examples) -> torch.Tensor:
        pooled = [model.pool(model(images=batch[side], text_ids=batch["text_ids"], text_mask=batch["text_mask"]))
                  for side in ("left", "right")]
        return head(torch.cat(pooled, dim=-1))

    def metrics(self, logits: torch.Tensor, examples: Examples) -> dict[str, float]:
        return {"accuracy": accuracy(logits, examples["labels"])}
