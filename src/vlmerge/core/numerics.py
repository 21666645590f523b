"""Numeric checks on tensors, cheap enough to run on every tensor a merge reads or writes."""

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf: one pass that allocates nothing (min and max propagate both), where
    `isfinite(t).all()` writes a mask as large as the tensor first."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))
