"""A small pre-training run for the kill-and-resume test:
python train_script.py RUN_DIR STEPS TOKENIZER_JSON [DELAY]. The tokenizer is trained once by
the caller: HF WordPiece training is not deterministic across processes."""

import sys
import time

import torch

from vlmerge.data.tokenizer import TextTokenizer
from vlmerge.models import VLTransformer, model_config
from vlmerge.models.heads import PretrainingHeads
from vlmerge.training.objectives import ObjectiveWeights, PairBatch, pretraining_losses
from vlmerge.training.trainer import Trainer, batch_indices, step_generator

CAPTIONS = [
    "grinning face",
    "red heart",
    "slice of pizza",
    "smiling cat",
    "blue car",
    "green tree",
    "yellow sun",
    "dog",
]


def main(run_dir: str, steps: int, tokenizer_path: str, delay: float) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = model_config("micro", vocab_size=64)
    tokenizer = TextTokenizer.load(tokenizer_path, max_len=config.max_text_len)
    model, heads = VLTransformer(config), PretrainingHeads(config.width, config.vocab_size)
    images = torch.rand(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = tokenizer.encode(CAPTIONS)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))

    def step_fn(step: int) -> dict:
        time.sleep(delay)
        rows = batch_indices(len(CAPTIONS), 4, step, seed=0)
        batch = PairBatch(images[rows], type(text)(text.ids[rows], text.mask[rows], text.word_ids[rows]))
        return pretraining_losses(model, heads, batch, ObjectiveWeights(), tokenizer.mask_id, step_generator(0, step))

    Trainer(
        run_dir,
        {"model": model, "heads": heads},
        optimizer,
        steps,
        checkpoint_every=3,
        scheduler=scheduler,
        progress=False,
    ).fit(step_fn)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
