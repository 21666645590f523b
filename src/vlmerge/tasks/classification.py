"""Single-modality tasks: an image's class from the image alone (emoji subgroup, ImageNet
class), a text's class from the text alone (emoji group from its name)."""

import torch
from torch import nn

from vlmerge.data.sources import ImageStore
from vlmerge.models.config import ModelConfig
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks.base import TASKS, ClassifierTask, Examples, accuracy, encode_text


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).float().mean().item()


@TASKS.register_class
class ImageClassification(ClassifierTask):
    """Vision-only: which class a picture belongs to."""

    name = "classify_image"
    use = "image_classes"
    primary_metric = "accuracy"

    def build_examples(self, split: str) -> tuple[ImageStore, Examples]:
        labelled = self.source.image_classes(split)
        return labelled.images, {"images": torch.arange(len(labelled)), "labels": labelled.labels}

    def make_head(self, config: ModelConfig) -> nn.Module:
        return nn.Linear(config.width, len(self.source.image_classes("train").classes))

    def logits(self, model: VLTransformer, head: nn.Module, batch: Examples) -> torch.Tensor:
        return head(model.pool(model(images=batch["images"])))

    def metrics(self, logits: torch.Tensor, split: str) -> dict[str, float]:
        labels = self.examples(split)["labels"]
        return {"accuracy": accuracy(logits, labels), "top5_accuracy": top_k_accuracy(logits, labels, 5)}


@TASKS.register_class
class TextClassification(ClassifierTask):
    """Text-only: which class a text belongs to."""

    name = "classify_text"
    use = "text_classes"
    primary_metric = "accuracy"
    image_fields = ()

    def build_examples(self, split: str) -> tuple[None, Examples]:
        labelled = self.source.text_classes(split)
        return None, {**encode_text(self.tokenizer, list(labelled.texts)), "labels": labelled.labels}

    def make_head(self, config: ModelConfig) -> nn.Module:
        return nn.Linear(config.width, len(self.source.text_classes("train").classes))

    def logits(self, model: VLTransformer, head: nn.Module, batch: Examples) -> torch.Tensor:
        return head(model.pool(model(text_ids=batch["text_ids"], text_mask=batch["text_mask"])))

    def metrics(self, logits: torch.Tensor, split: str) -> dict[str, float]:
        return {"accuracy": accuracy(logits, self.examples(split)["labels"])}
