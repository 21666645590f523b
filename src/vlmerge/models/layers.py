"""Transformer layers that know nothing of modality."""

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention, fused or separate q/k/v projections, optional sub-LN.

    Fused (BEiT/VLMo): one bias-free `qkv` Linear plus q and v biases (k bias zero unless
    `k_bias`), so forward hooks on qkv see exactly its input (for RegMean). Separate (BEiT-3):
    `q_proj`, `k_proj`, `v_proj` with biases (k's if `k_bias`). `sub_ln` normalises the attended
    values before the output projection `proj` (BEiT-3's inner_attn_ln). The three steps are
    separate methods so a pair whose tokens use different experts can project and output per
    expert and attend once over the whole sequence.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        separate: bool = False,
        k_bias: bool = False,
        sub_ln: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.separate = separate
        if separate:
            self.q_proj = nn.Linear(width, width)
            self.k_proj = nn.Linear(width, width, bias=k_bias)
            self.v_proj = nn.Linear(width, width)
        else:
            self.qkv = nn.Linear(width, 3 * width, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(width))
            if k_bias:
                self.k_bias = nn.Parameter(torch.zeros(width))
            self.v_bias = nn.Parameter(torch.zeros(width))
        self.norm = nn.LayerNorm(width, eps=eps) if sub_ln else None
        self.proj = nn.Linear(width, width)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v, each (B, N, D)."""
        if self.separate:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        k_bias = getattr(self, "k_bias", None)
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias) if k_bias is None else k_bias, self.v_bias])
        return (self.qkv(x) + bias).chunk(3, dim=-1)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        return self.proj(attended if self.norm is None else self.norm(attended))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(attend(*self.project(x), self.heads, attn_mask))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over (B, N, D) tensors split into `heads`; `attn_mask` is a
    bool mask (True = attend) or an additive float one, broadcastable to (B, heads, N, N)."""
    batch, tokens, width = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, width // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(batch, tokens, width)


class Mlp(nn.Module):
    """fc1, GELU, fc2; `sub_ln` normalises the hidden activations before fc2 (BEiT-3's ffn_layernorm)."""

    def __init__(self, width: int, hidden: int, *, sub_ln: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden, eps=eps) if sub_ln else None
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.fc1(x))
        return self.fc2(hidden if self.norm is None else self.norm(hidden))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


class TextEmbed(nn.Module):
    """Word embeddings, plus (each optional) learned positions after `offset` unused rows, BERT's own
    token-type row 0 (VLMo), then LayerNorm (BERT style). `position_table` without `positions` keeps
    the table unused, as BERT's embeddings do beside a relative position bias (VLMo, the paper)."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        width: int,
        eps: float,
        *,
        positions: bool = True,
        position_table: bool | None = None,
        offset: int = 0,
        type_embedding: bool = False,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.offset = offset
        self.add_positions = positions
        self.word = nn.Embedding(vocab_size, width)
        has_table = positions if position_table is None else position_table
        self.position = nn.Embedding(max_len + offset, width) if has_table else None
        self.token_type = nn.Embedding(2, width) if type_embedding else None
        self.norm = nn.LayerNorm(width, eps=eps) if norm else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word(ids)
        if self.add_positions:
            x = x + self.position.weight[self.offset : self.offset + ids.shape[1]]
        if self.token_type is not None:
            x = x + self.token_type.weight[0]
        return x if self.norm is None else self.norm(x)


class Pooler(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))
