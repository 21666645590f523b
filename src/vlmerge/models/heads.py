"""Pre-training heads: contrastive projections and temperatures, image-text matching, MLM."""

import math

import torch
from torch import nn


class PretrainingHeads(nn.Module):
    def __init__(
        self, width: int, vocab_size: int, embed_dim: int | None = None, init_temperature: float = 0.07
    ) -> None:
        super().__init__()
        embed_dim = embed_dim or width
        self.itc_image = nn.Linear(width, embed_dim)
        self.itc_text = nn.Linear(width, embed_dim)
        # The vl experts' own contrastive loss (unimodal input through the fusion layers).
        self.itc_vl_image = nn.Linear(width, embed_dim)
        self.itc_vl_text = nn.Linear(width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.vl_logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.itm = nn.Linear(width, 2)
        self.mlm = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, vocab_size))


def segmentation_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
    """Blocks spread by depth whose patch tokens feed a dense head: at 1/3, 1/2, 2/3 and all of the
    depth, as BEiT takes them (3, 5, 7, 11 of 12; 7, 11, 15, 23 of 24); `count=1` is the last block."""
    fractions = (1.0,) if count == 1 else (1 / 3, 1 / 2, 2 / 3, 1.0)
    if count not in (1, len(fractions)):
        raise ValueError(f"count must be 1 or 4, got {count}")
    return tuple(max(round(depth * fraction), 1) - 1 for fraction in fractions)


def conv_norm_act(width_in: int, width_out: int, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(width_in, width_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(width_out),
        nn.ReLU(inplace=True),
    )


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return x if x.shape[-2:] == size else nn.functional.interpolate(x, size, mode="bilinear", align_corners=False)


class LinearSegmentationHead(nn.Module):
    """DINOv2's linear evaluation: BatchNorm and a 1x1 convolution over the patch tokens of one or more
    blocks (concatenated); the logits are upsampled to the labels by the task."""

    normed = True  # takes block outputs through the model's final norm

    def __init__(self, width: int, classes: int, blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = blocks
        self.norm = nn.BatchNorm2d(width * len(blocks))
        self.classify = nn.Conv2d(width * len(blocks), classes, 1)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`features`: (B, D, h, w) per block; logits (B, classes, h, w) under 'decode'."""
        return {"decode": self.classify(self.norm(torch.cat(features, dim=1)))}


class UperNetHead(nn.Module):
    """BEiT's fine-tuning head: four blocks' patch grids as a x4 / x2 / x1 / x1/2 pyramid, a pyramid
    pooling module on the coarsest level, a top-down feature pyramid fused at the finest level, and an
    auxiliary FCN on the third level (its loss weighted by the task). Pool scales larger than the
    coarsest grid are dropped, so small models keep the scales that fit. No dropout before the
    classifiers (BEiT has 0.1): a step's randomness must come from (seed, step) for resume to be exact."""

    normed = False  # raw block outputs, as BEiT takes them

    def __init__(
        self,
        width: int,
        classes: int,
        blocks: tuple[int, ...],
        grid: int,
        channels: int | None = None,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"UperNet takes four blocks, got {blocks}")
        channels = channels or width
        self.blocks = blocks

        def up() -> nn.ConvTranspose2d:
            return nn.ConvTranspose2d(width, width, 2, stride=2)

        self.pyramid = nn.ModuleList(
            [
                nn.Sequential(up(), nn.BatchNorm2d(width), nn.GELU(), up()),  # x4
                up(),  # x2
                nn.Identity(),
                nn.MaxPool2d(2),  # x1/2
            ]
        )
        self.pool_scales = tuple(scale for scale in pool_scales if scale <= max(grid // 2, 1))
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_norm_act(width, channels)) for scale in self.pool_scales
        )
        self.ppm_bottleneck = conv_norm_act(width + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_norm_act(width, channels) for _ in range(3))
        self.fpn = nn.ModuleList(conv_norm_act(channels, channels, 3) for _ in range(3))
        self.fuse = conv_norm_act(4 * channels, channels, 3)
        self.classify = nn.Conv2d(channels, classes, 1)
        self.aux = nn.Sequential(conv_norm_act(width, channels, 3), nn.Conv2d(channels, classes, 1))

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`features`: (B, D, h, w) for each of the four blocks; logits at 4h x 4w under 'decode' and, in
        training, the auxiliary head's at h x w under 'aux'."""
        levels = [level(x) for level, x in zip(self.pyramid, features)]  # 4h, 2h, h, h/2
        coarsest = levels[3]
        pooled = [resize(branch(coarsest), coarsest.shape[-2:]) for branch in self.ppm]
        laterals = [lateral(x) for lateral, x in zip(self.lateral, levels)]
        laterals.append(self.ppm_bottleneck(torch.cat([coarsest, *pooled], dim=1)))
        for i in range(3, 0, -1):  # top-down: each level plus the coarser one upsampled
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [fpn(x) for fpn, x in zip(self.fpn, laterals[:3])] + [laterals[3]]
        fused = self.fuse(torch.cat([resize(x, outs[0].shape[-2:]) for x in outs], dim=1))
        logits = {"decode": self.classify(fused)}
        if self.training:
            logits["aux"] = self.aux(features[2])
        return logits
