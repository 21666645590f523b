"""Single-modality tasks: subgroup from the image alone, group from the name alone."""

import torch
from torch import nn

from vlmerge.data.emoji import EmojiDataset
from vlmerge.models.config import ModelConfig
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks.base import TASKS, ClassifierTask, Examples, accuracy, encode_text


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).float().mean().item()


@TASKS.register("classify_image")
class ImageClassification(ClassifierTask):
    """Vision-only: which of the ~100 emoji subgroups a picture belongs to."""

    name = "classify_image"

    def build_examples(self, split: EmojiDataset) -> Examples:
        return {"images": self.images(split), "labels": split.labels("subgroup")}

    def make_head(self, config: ModelConfig) -> nn.Module:
        return nn.Linear(config.width, len(self.dataset.subgroups))

    def logits(self, model: VLTransformer, head: nn.Module, batch: Examples) -> torch.Tensor:
        return head(model.pool(model(images=batch["images"])))

    def metrics(self, logits: torch.Tensor, examples: Examples) -> dict[str, float]:
        labels = examples["labels"]
        return {"accuracy": accuracy(logits, labels), "top5_accuracy": top_k_accuracy(logits, labels, 5)}


@TASKS.register("classify_text")
class TextClassification(ClassifierTask):
    """Text-only: which of the emoji groups a CLDR name belongs to."""

    name = "classify_text"

    def build_examples(self, split: EmojiDataset) -> Examples:
        names = [split.caption(i) for i in range(len(split))]
        return {**encode_text(self.tokenizer, names), "labels": split.labels("group")}

    def make_head(self, config: ModelConfig) -> nn.Module:
        return nn.Linear(config.width, len(self.dataset.groups))

    def logits(self, model: VLTransformer, head: nn.Module, batch: Examples) -> torch.Tensor:
        return head(model.pool(model(text_ids=batch["text_ids"], text_mask=batch["text_mask"])))

    def metrics(self, logits: torch.Tensor, examples: Examples) -> dict[str, float]:
        return {"accuracy": accuracy(logits, examples["labels"])}
