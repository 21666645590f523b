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
