"""Relative position bias as BEiT and VLMo index it: one table shared by all layers.

The table has one row per relative distance and `heads x depth` columns (layer i uses columns
[i*heads, (i+1)*heads)). Its rows are, in order:
- image distances: (2w-1)^2 patch-to-patch offsets on a w x w grid, then three rows for the
  cls token (cls->patch, patch->cls, cls->cls);
- two rows for text->image and image->text (every pair of a text and an image token);
- 2 * span rows for text (span = VLMo's `max_text_len_of_initckpt`): token distances, then the
  text cls rows as the last three of the table.
So a checkpoint trained at one text length keeps its table at another (`span` fixes the rows).
"""

import torch

from vlmerge.core.modality import Modality

CLS_ROWS = 3  # cls->token, token->cls, cls->cls


def image_distances(window: int) -> int:
    """Rows of the image part: the patch offsets and the three cls rows."""
    return (2 * window - 1) ** 2 + CLS_ROWS


def table_rows(window: int, span: int) -> int:
    return image_distances(window) + 2 + 2 * span


def _with_cls(inner: torch.Tensor, first_row: int) -> torch.Tensor:
    """`inner` (tokens after cls) bordered by cls rows: [0, j] = first, [i, 0] = first+1, [0, 0] = first+2."""
    size = inner.shape[0] + 1
    index = torch.empty(size, size, dtype=torch.long)
    index[1:, 1:] = inner
    index[0, :] = first_row
    index[:, 0] = first_row + 1
    index[0, 0] = first_row + 2
    return index


def image_index(window: int) -> torch.Tensor:
    """(w^2 + 1, w^2 + 1): row of the table for each (query, key) pair of an image's tokens."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + window - 1  # in [0, 2w-2]
    d_col = cols[:, None] - cols[None, :] + window - 1
    return _with_cls(d_row * (2 * window - 1) + d_col, image_distances(window) - CLS_ROWS)


def text_index(length: int, window: int, span: int) -> torch.Tensor:
    """(length, length) for a text of `length` tokens, its first (cls) token apart."""
    positions = torch.arange(length - 1)
    inner = positions[None, :] - positions[:, None] + span + image_distances(window)
    return _with_cls(inner, table_rows(window, span) - CLS_ROWS)


def relative_index(tokens: tuple[tuple[Modality, int], ...], window: int, span: int) -> torch.Tensor:
    """The index of a sequence made of an image, a text, or a text followed by an image."""
    kinds = tuple(modality for modality, _ in tokens)
    if kinds == (Modality.V,):
        return image_index(window)
    if kinds == (Modality.L,):
        return text_index(tokens[0][1], window, span)
    if kinds == (Modality.L, Modality.V):
        text, image = text_index(tokens[0][1], window, span), image_index(window)
        to_image = torch.full((text.shape[0], image.shape[0]), image_distances(window), dtype=torch.long)
        to_text = torch.full((image.shape[0], text.shape[0]), image_distances(window) + 1, dtype=torch.long)
        return torch.cat([torch.cat([text, to_image], 1), torch.cat([to_text, image], 1)], 0)
    raise ValueError(f"no relative positions for a sequence of {kinds}")
