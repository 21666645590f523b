"""VQA: questions about an image (VQAv2, or emoji: group, subgroup, whether a keyword
applies), answered by a classifier over the dataset's answer vocabulary from the fused
image-question output.

Targets are soft (a score per valid answer), trained with soft-target cross-entropy; the
VQA score of a prediction is the target score of the predicted answer, which equals
accuracy when one answer is valid.
"""

import numpy as np
import torch
from torch import nn

from vlmerge.data.sources import ImageStore
from vlmerge.models.config import ModelConfig
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks.base import TASKS, ClassifierTask, Examples, Samples, encode_text, mlp_head, sample_mean
from vlmerge.training.distributed import SINGLE_PROCESS, DistributedContext


def answer_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) the VQA score of each question's predicted answer: its soft target."""
    return targets.gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1)


def vqa_metrics(
    logits: torch.Tensor, targets: torch.Tensor, kinds: torch.Tensor, kind_names: tuple[str, ...]
) -> dict[str, float]:
    scores = answer_scores(logits, targets)
    metrics = {"vqa_score": scores.mean().item(), "accuracy": (scores > 0).float().mean().item()}
    for index, kind in enumerate(kind_names):
        chosen = kinds == index
        if chosen.any():
            metrics[f"accuracy_{kind}"] = (scores[chosen] > 0).float().mean().item()
    return metrics


def soft_targets(answers: tuple[dict[str, float], ...], vocabulary: tuple[str, ...]) -> torch.Tensor:
    """(N, A): each answer's soft score at its index. Answers outside the vocabulary are
    dropped, as usual for VQAv2 (whose vocabulary keeps the frequent answers only)."""
    index, targets = {answer: i for i, answer in enumerate(vocabulary)}, torch.zeros(len(answers), len(vocabulary))
    for row, scores in enumerate(answers):
        for answer, score in scores.items():
            if answer in index:
                targets[row, index[answer]] = score
    return targets


@TASKS.register_class
class VisualQuestionAnswering(ClassifierTask):
    name = "vqa"
    use = "questions"
    primary_metric = "vqa_score"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kind_names: dict[str, tuple[str, ...]] = {}  # per split: the question kinds, for per-kind accuracy

    def build_examples(self, split: str) -> tuple[ImageStore, Examples]:
        questions = self.source.questions(split, seed=self.seed)
        kind_names = self.kind_names[split] = tuple(sorted(set(questions.kinds)))
        return questions.images, {
            "images": questions.image_of,
            **encode_text(self.tokenizer, list(questions.questions)),
            "targets": soft_targets(questions.answers, self.source.answer_vocabulary()),
            "kinds": torch.tensor([kind_names.index(kind) for kind in questions.kinds], dtype=torch.long),
        }

    def make_head(self, config: ModelConfig) -> nn.Module:
        return mlp_head(config.width, len(self.source.answer_vocabulary()))

    def logits(self, model: VLTransformer, head: nn.Module, batch: Examples) -> torch.Tensor:
        fused = model(images=batch["images"], text_ids=batch["text_ids"], text_mask=batch["text_mask"])
        return head(model.pool(fused))

    def loss(
        self, model: VLTransformer, head: nn.Module, batch: Examples, dist: DistributedContext = SINGLE_PROCESS
    ) -> dict[str, torch.Tensor]:
        targets = batch["targets"] / batch["targets"].sum(dim=-1, keepdim=True).clamp(min=1e-6)
        log_probs = self.logits(model, head, batch).log_softmax(dim=-1)
        return {"loss": -(targets * log_probs).sum(dim=-1).mean()}

    def metrics(self, logits: torch.Tensor, split: str) -> dict[str, float]:
        examples = self.examples(split)
        return vqa_metrics(logits, examples["targets"], examples["kinds"], self.kind_names[split])

    def samples(self, logits: torch.Tensor, split: str) -> dict[str, list[float]]:
        return {"score": answer_scores(logits, self.examples(split)["targets"]).tolist()}

    @staticmethod
    def primary_statistic(samples: Samples, axis: int = -1) -> float | np.ndarray:
        """The VQA score: the mean over questions of the predicted answer's score."""
        return sample_mean(samples["score"], axis)
