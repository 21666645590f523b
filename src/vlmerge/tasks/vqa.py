"""VQA-style questions about an emoji (its group, its subgroup, whether a keyword applies),
answered by a classifier over the answer vocabulary from the fused image-question output.

Targets are soft (a score per valid answer), trained with soft-target cross-entropy; the
VQA score of a prediction is the target score of the predicted answer, which equals
accuracy when one answer is valid.
"""

import torch
from torch import nn

from vlmerge.data.emoji import EmojiDataset
from vlmerge.data.emoji_tasks import build_vqa, vqa_answers
from vlmerge.models.config import ModelConfig
from vlmerge.models.transformer import VLTransformer
from vlmerge.tasks.base import TASKS, ClassifierTask, Examples, encode_text, mlp_head
from vlmerge.training.distributed import SINGLE_PROCESS, DistributedContext

QUESTION_KINDS = ["group", "subgroup", "keyword"]


def vqa_metrics(logits: torch.Tensor, targets: torch.Tensor, kinds: torch.Tensor,
                kind_names: list[str]) -> dict[str, float]:
    scores = targets.gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1)
    metrics = {"vqa_score": scores.mean().item(), "accuracy": (scores > 0).float().mean().item()}
    for index, kind in enumerate(kind_names):
        chosen = kinds == index
        if chosen.any():
            metrics[f"accuracy_{kind}"] = (scores[chosen] > 0).float().mean().item()
    return metrics


@TASKS.register("vqa")
class VisualQuestionAnswering(ClassifierTask):
    name = "vqa"

    def build_examples(self, split: EmojiDataset) -> Examples:
        vqa = build_vqa(split, seed=self.seed)
        return {
            "images": self.images(split, [example.image for example in vqa.examples]),
            **encode_text(self.tokenizer, [example.question for example in vqa.examples]),
            "targets": vqa.targets(),
            "kinds": torch.tensor([QUESTION_KINDS.index(example.kind) for example in vqa.examples]),
        }

    def make_head(self, config: ModelConfig) -> nn.Module:
        return mlp_head(config.width, len(vqa_answers(self.dataset)))  # the whole build's answers

    def logits(self, model: VLTransformer, head: nn.Module, batch: Examples) -> torch.Tensor:
        fused = model(images=batch["images"], text_ids=batch["text_ids"], text_mask=batch["text_mask"])
        return head(model.pool(fused))

    def loss(self, model: VLTransformer, head: nn.Module, batch: Examples,
             dist: DistributedContext = SINGLE_PROCESS) -> dict[str, torch.Tensor]:
        targets = batch["targets"] / batch["targets"].sum(dim=-1, keepdim=True).clamp(min=1e-6)
        log_probs = self.logits(model, head, batch).log_softmax(dim=-1)
        return {"loss": -(targets * log_probs).sum(dim=-1).mean()}

    def metrics(self, logits: torch.Tensor, examples: Examples) -> dict[str, float]:
        return vqa_metrics(logits, examples["targets"], examples["kinds"], QUESTION_KINDS)
