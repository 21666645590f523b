"""Image-text retrieval with the dual encoder: recall@1/5/10 both ways.

An image may have several captions (five in COCO): image-to-text counts a hit when any of
its captions is among the top k, text-to-image when the caption's image is.

The primary metric, `mean_recall`, is the mean of the six recalls. Its samples are, per
image query ("i2t") and per caption query ("t2i"), the mean of the query's three hit
indicators (at 1, 5, 10): the mean of each array is the mean of its direction's three
recalls, so (mean(i2t) + mean(t2i)) / 2 is `mean_recall`. The two arrays differ in length
(images, captions) and are resampled each on its own."""

import math

import numpy as np
import torch
from torch import nn

from vlmerge.data.sources import ImageStore
from vlmerge.data.transforms import model_images
from vlmerge.models.config import ModelConfig
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks.base import (
    TASKS,
    Evaluation,
    Examples,
    Samples,
    Task,
    encode_text,
    evaluation_mode,
    num_examples,
    sample_mean,
    take,
    to_device,
)
from vlmerge.training.distributed import SINGLE_PROCESS, DistributedContext
from vlmerge.training.objectives import contrastive_logits, contrastive_loss

RECALL_AT = (1, 5, 10)


class RetrievalHead(nn.Module):
    """The contrastive projections; names match the pre-training heads so they load from them."""

    def __init__(self, width: int, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.itc_image = nn.Linear(width, width)
        self.itc_text = nn.Linear(width, width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def embed_images(self, model: VLTransformer, images: torch.Tensor) -> torch.Tensor:
        return self.itc_image(model(images=images).cls)

    def embed_text(self, model: VLTransformer, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.itc_text(model(text_ids=text_ids, text_mask=text_mask).cls)


def hits_at_k(similarity: torch.Tensor, image_of: torch.Tensor, k: int, direction: str) -> torch.Tensor:
    """(images x captions) similarities; (queries,) whether each query has a match among its top k."""
    if direction == "i2t":
        k = min(k, similarity.shape[1])
        top = similarity.topk(k, dim=1).indices  # (images, k) caption indices
        hits = image_of[top] == torch.arange(similarity.shape[0])[:, None]
    else:
        k = min(k, similarity.shape[0])
        top = similarity.T.topk(k, dim=1).indices  # (captions, k) image indices
        hits = top == image_of[:, None]
    return hits.any(dim=1)


def recall_at_k(similarity: torch.Tensor, image_of: torch.Tensor, k: int, direction: str) -> float:
    """(images x captions) similarities; the fraction of queries with a match among their top k."""
    return hits_at_k(similarity, image_of, k, direction).float().mean().item()


def retrieval_metrics(similarity: torch.Tensor, image_of: torch.Tensor | None = None) -> dict[str, float]:
    """(images x captions) similarities; caption j describes image image_of[j] (default: image j)."""
    image_of = torch.arange(similarity.shape[1]) if image_of is None else image_of
    metrics = {
        f"{direction}_r{k}": recall_at_k(similarity, image_of, k, direction)
        for direction in ("i2t", "t2i")
        for k in RECALL_AT
    }
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def retrieval_samples(similarity: torch.Tensor, image_of: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Per query of each direction, the mean of its hit indicators at 1, 5 and 10."""
    image_of = torch.arange(similarity.shape[1]) if image_of is None else image_of
    return {
        direction: torch.stack([hits_at_k(similarity, image_of, k, direction) for k in RECALL_AT])
        .double()
        .mean(dim=0)
        .tolist()
        for direction in ("i2t", "t2i")
    }


@TASKS.register_class
class Retrieval(Task):
    """Trained on (image, caption) pairs, one row per caption."""

    name = "retrieval"
    use = "pairs"
    primary_metric = "mean_recall"

    def build_examples(self, split: str) -> tuple[ImageStore, Examples]:
        pairs = self.source.pairs(split)
        return pairs.images, {"images": pairs.image_of, **encode_text(self.tokenizer, list(pairs.captions))}

    def make_head(self, config: ModelConfig) -> nn.Module:
        return RetrievalHead(config.width)

    def init_head(self, head: nn.Module, pretraining_heads: dict[str, torch.Tensor] | None) -> None:
        if pretraining_heads is not None:
            head.load_state_dict({key: pretraining_heads[key] for key in head.state_dict()}, strict=True)

    def loss(
        self, model: VLTransformer, head: nn.Module, batch: Examples, dist: DistributedContext = SINGLE_PROCESS
    ) -> dict[str, torch.Tensor]:
        image = dist.gather(head.embed_images(model, batch["images"]))
        text = dist.gather(head.embed_text(model, batch["text_ids"], batch["text_mask"]))
        return {"loss": contrastive_loss(contrastive_logits(image, text, head.logit_scale))}

    def evaluate(self, model: VLTransformer, head: nn.Module, split: str = "test", batch_size: int = 128) -> Evaluation:
        similarity, image_of = self.similarity(model, head, split, batch_size), self.examples(split)["images"]
        return Evaluation(retrieval_metrics(similarity, image_of), retrieval_samples(similarity, image_of))

    @staticmethod
    def primary_statistic(samples: Samples, axis: int = -1) -> float | np.ndarray:
        """Mean recall: the mean of the two directions' mean per-query hit rates."""
        return (sample_mean(samples["i2t"], axis) + sample_mean(samples["t2i"], axis)) / 2

    @torch.no_grad()
    def similarity(
        self, model: VLTransformer, head: nn.Module, split: str = "test", batch_size: int = 128
    ) -> torch.Tensor:
        """(images x captions) cosine similarities over a whole split, each image embedded once."""
        store, examples = self.image_store(split), self.examples(split)
        device = next(model.parameters()).device
        with evaluation_mode(model, head):
            images = [
                head.embed_images(model, model_images(store[slice(start, start + batch_size)]).to(device)).cpu()
                for start in range(0, len(store), batch_size)
            ]
            texts = []
            for start in range(0, num_examples(examples), batch_size):
                batch = to_device(take(examples, slice(start, start + batch_size)), device)
                texts.append(head.embed_text(model, batch["text_ids"], batch["text_mask"]).cpu())
        image, text = (nn.functional.normalize(torch.cat(parts), dim=-1) for parts in (images, texts))
        return image @ text.T
