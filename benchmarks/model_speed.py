"""Train-step, inference and Gram-collection speed of our models next to a same-size ViT.

Usage: python benchmarks/model_speed.py [--size tiny] [--batch-size 32] [--repeats 3] [--device cpu|cuda]
Goal (issue): our train step and inference <= 1.2x the anchor's.
The anchor is Hugging Face `transformers.ViTModel` (SDPA attention) with our width, depth, heads,
MLP width, patch and image size. The issue names timm's ViT, but timm cannot be installed here
(it pulls torchvision and a CUDA torch), so HF ViT of the same size stands in for it.
Images only for train and inference (the multiway model then uses its v experts alone);
image-text pairs (random token ids, all-ones mask) for Gram collection vs. a plain forward.
Each figure is the median of --repeats timed runs after --warmup untimed ones.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from vlmerge.merging.grams import collect_grams
from vlmerge.models import ModelConfig, count_parameters, create_model, model_config

GOAL = 1.2


def anchor_vit(config: ModelConfig) -> nn.Module:
    from transformers import ViTConfig, ViTModel  # optional dependency: the `bench` extra

    vit = ViTConfig(
        hidden_size=config.width,
        num_hidden_layers=config.depth,
        num_attention_heads=config.heads,
        intermediate_size=int(config.width * config.mlp_ratio),
        patch_size=config.patch_size,
        image_size=config.image_size,
        num_channels=config.channels,
        layer_norm_eps=config.norm_eps,
        attn_implementation="sdpa",
    )
    return ViTModel(vit, add_pooling_layer=False)


def image_encoders(config: ModelConfig) -> dict[str, tuple[nn.Module, Callable]]:
    """name -> (model, images -> final hidden states)."""
    agnostic = create_model(config.agnostic())
    specific = create_model(config.with_placement("all"))
    anchor = anchor_vit(config)
    return {
        "ours, agnostic": (agnostic, lambda x: agnostic(images=x).hidden),
        "ours, specific (all)": (specific, lambda x: specific(images=x).hidden),
        "anchor: HF ViT": (anchor, lambda x: anchor(pixel_values=x).last_hidden_state),
    }


def interleaved_medians(
    runs: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per run; each repeat times every run once in turn, so background load hits all alike."""

    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    samples: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(warmup + repeats):
        for name, fn in runs.items():
            seconds = timed(fn)
            if repeat >= warmup:
                samples[name].append(seconds)
    return {name: statistics.median(times) for name, times in samples.items()}


def train_step(model: nn.Module, forward: Callable, images: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward(images).float().pow(2).mean().backward()
        optimizer.step()

    return step


def inference(forward: Callable, images: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            forward(images)

    return run


def pair_batches(config: ModelConfig, batch_size: int, count: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, config.channels, config.image_size, config.image_size)
    return [
        {
            "images": torch.randn(shape, generator=generator).to(device),
            "text_ids": torch.randint(config.vocab_size, (batch_size, config.max_text_len), generator=generator).to(
                device
            ),
            "text_mask": torch.ones(batch_size, config.max_text_len, dtype=torch.long, device=device),
        }
        for _ in range(count)
    ]


def print_table(title: str, times: dict[str, float], batch_size: int) -> None:
    anchor = times["anchor: HF ViT"]
    print(f"\n{title}")
    print(f"  {'model':<22} {'ms / batch':>11} {'images / s':>11} {'vs anchor':>10}")
    for name, seconds in times.items():
        flag = "" if name.startswith("anchor") else ("  ok" if seconds / anchor <= GOAL else f"  > {GOAL}x goal")
        print(f"  {name:<22} {seconds * 1e3:11.1f} {batch_size / seconds:11.1f} {seconds / anchor:9.2f}x{flag}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pair-batches", type=int, default=2, help="batches per Gram-collection run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = model_config(args.size)
    images = torch.randn(args.batch_size, config.channels, config.image_size, config.image_size, device=device)
    encoders = {name: (model.to(device), forward) for name, (model, forward) in image_encoders(config).items()}

    print(
        f"size {args.size}: width {config.width}, depth {config.depth}, heads {config.heads}, "
        f"{config.image_size}px / patch {config.patch_size} ({config.num_patches + 1} tokens); "
        f"batch {args.batch_size}; {args.device}, {torch.get_num_threads()} threads; "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    print("anchor: transformers.ViTModel (sdpa) of the same size, standing in for timm's ViT (not installable here)")
    for name, (model, _) in encoders.items():
        blocks = (
            f", {count_parameters(model, backbone_only=True) / 1e6:.2f} M in blocks" if hasattr(model, "blocks") else ""
        )
        print(f"  {name:<22} {count_parameters(model) / 1e6:6.2f} M parameters{blocks}")
    print("  (ours also hold text embeddings and l/vl experts, which images never reach)")

    for model, _ in encoders.values():
        model.train()
    train = interleaved_medians(
        {name: train_step(model, forward, images) for name, (model, forward) in encoders.items()},
        args.warmup,
        args.repeats,
        device,
    )
    for model, _ in encoders.values():
        model.eval()
    infer = interleaved_medians(
        {name: inference(forward, images) for name, (_, forward) in encoders.items()}, args.warmup, args.repeats, device
    )
    print_table("train step (forward + backward + AdamW), images only", train, args.batch_size)
    print_table("inference (no_grad forward), images only", infer, args.batch_size)

    specific = encoders["ours, specific (all)"][0]
    batches = pair_batches(config, args.batch_size, args.pair_batches, device)

    def plain() -> None:
        with torch.no_grad():
            for batch in batches:
                specific(**batch)

    gram_runs = interleaved_medians(
        {"forward": plain, "grams": lambda: collect_grams(specific, batches)}, args.warmup, args.repeats, device
    )
    forward_s, grams_s = gram_runs["forward"], gram_runs["grams"]
    pairs = args.pair_batches * args.batch_size
    print(
        f"\nGram collection, specific model, {args.pair_batches} batches of {args.batch_size} image-text pairs "
        f"({config.max_text_len} text tokens)"
    )
    print(f"  plain forward    {forward_s * 1e3:9.1f} ms  ({pairs / forward_s:6.1f} pairs / s)")
    print(f"  collect_grams    {grams_s * 1e3:9.1f} ms  ({pairs / grams_s:6.1f} pairs / s)")
    print(f"  ratio grams / forward {grams_s / forward_s:.2f}x")
    print(
        f"\nratios vs anchor: train {train['ours, agnostic'] / train['anchor: HF ViT']:.2f}x agnostic, "
        f"{train['ours, specific (all)'] / train['anchor: HF ViT']:.2f}x specific; "
        f"inference {infer['ours, agnostic'] / infer['anchor: HF ViT']:.2f}x agnostic, "
        f"{infer['ours, specific (all)'] / infer['anchor: HF ViT']:.2f}x specific (goal <= {GOAL}x)"
    )


if __name__ == "__main__":
    main()
