"""Time of one segmentation training step, our model and UperNet head next to a same-size plain-PyTorch anchor.

Usage: python benchmarks/segmentation_step.py [--size micro] [--image-size 64] [--batch-size 16] [--device cpu|cuda]
Goal: our step <= 1.2x the anchor's.
A step is what `vlmerge train finetune` with `task: segmentation` runs: images through the vision experts,
patch tokens of four blocks into the UperNet head (plus its auxiliary FCN), cross-entropy with ignored
pixels, backward, AdamW. The anchor is a ViT written from torch.nn alone (`nn.TransformerEncoderLayer`,
pre-norm, GELU, no dropout) of our width, depth, heads, MLP width, patch and image size, with the same head
and loss, so the ratio measures our backbone and its feature taps. Figures are medians of --repeats timed
steps after --warmup untimed ones, the two models taking turns.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from vlmerge.models import ModelConfig, create_model, model_config
from vlmerge.models.heads import UperNetHead, segmentation_blocks
from vlmerge.tasks.segmentation import AUX_WEIGHT, patch_features, segmentation_loss

GOAL = 1.2
CLASSES = 17  # background and the 16 stamp categories of stamp_scenes


class AnchorViT(nn.Module):
    """A plain ViT returning the (B, D, h, w) patch grids after the given blocks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width, self.side = config.width, config.image_size // config.patch_size
        self.patch = nn.Conv2d(config.channels, width, config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, self.side**2 + 1, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                config.heads,
                int(width * config.mlp_ratio),
                dropout=0.0,
                activation="gelu",
                layer_norm_eps=config.norm_eps,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.depth)
        )

    def forward(self, images: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        found = {}
        for index, block in enumerate(self.blocks[: max(taps) + 1]):
            x = block(x)
            found[index] = x
        return [found[i][:, 1:].transpose(1, 2).reshape(len(x), -1, self.side, self.side) for i in taps]


def train_step(modules: nn.Module, features: Callable, head: UperNetHead, images, labels) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = head(features(images))
        loss = segmentation_loss(logits["decode"], labels) + AUX_WEIGHT * segmentation_loss(logits["aux"], labels)
        loss.backward()
        optimizer.step()

    return step


def medians(runs: dict[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device) -> dict:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(warmup + repeats):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="micro")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = model_config(args.size, image_size=args.image_size)
    blocks, grid = segmentation_blocks(config.depth), config.image_size // config.patch_size
    images = torch.randn(args.batch_size, config.channels, config.image_size, config.image_size, device=device)
    labels = torch.randint(CLASSES, (args.batch_size, config.image_size, config.image_size), device=device)
    labels[:, :4] = 255  # some ignored pixels, as in real masks

    ours, anchor = create_model(config).to(device), AnchorViT(config).to(device)
    ours_head, anchor_head = (UperNetHead(config.width, CLASSES, blocks, grid).to(device) for _ in range(2))
    runs = {
        "ours + UperNet": train_step(
            nn.ModuleList([ours, ours_head]),
            lambda x: patch_features(ours, x, blocks, False),
            ours_head,
            images,
            labels,
        ),
        "anchor: plain ViT + UperNet": train_step(
            nn.ModuleList([anchor, anchor_head]), lambda x: anchor(x, blocks), anchor_head, images, labels
        ),
    }
    times = medians(runs, args.warmup, args.repeats, device)
    reference = times["anchor: plain ViT + UperNet"]
    print(f"{args.size} at {config.image_size}px, batch {args.batch_size}, {args.device}")
    for name, seconds in times.items():
        ratio = seconds / reference
        flag = "" if name.startswith("anchor") else ("  ok" if ratio <= GOAL else f"  > {GOAL}x goal")
        print(f"  {name:<28} {seconds * 1e3:9.1f} ms/step {ratio:6.2f}x{flag}")


if __name__ == "__main__":
    main()
