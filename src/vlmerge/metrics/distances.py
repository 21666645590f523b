"""Mergeability metrics: how far apart are the weights we are about to merge?

Merging modality-specific experts into one shared weight works best when the experts are
already close (Sung et al. 2023, "An Empirical Study of Multimodal Model Merging"). Each
metric here is a small pure function over a pair of same-shape tensors (x, y) that returns a
Python float, is computed in float64 and never modifies its inputs.

- `l2_distance`, `normalized_l2_distance`: how far apart in Euclidean terms (the normalized
  one is scale-free, in [0, 1]).
- `cosine_dissimilarity`: 1 - cos(x, y), in [0, 2]; it ignores the overall scale.
- `soft_sign_dissimilarity` (SSD) and `truncated_soft_sign_dissimilarity` (TSSD): how much the
  entries disagree in sign, soft-weighted by magnitude. These are *our reconstruction* of the
  paper's sign-based metrics, whose exact text was not available to us: per entry,
  1 - |x_i + y_i| / (|x_i| + |y_i|) is 0 when the signs agree (or one entry is 0) and 1 when the
  entries are exactly opposite; SSD is its mean over the entries that are not both zero. TSSD
  first trims each tensor to its top-k entries by magnitude, the way TIES-merging does, so
  that only the entries which would survive a TIES merge are compared.

`METRICS` registers them by name; `metric_fn(name, top_k)` binds TSSD's `top_k`.
"""

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from vlmerge.core.errors import ConfigError, MergeError
from vlmerge.core.registry import Registry
from vlmerge.merging.methods import trim_to_top_k

Metric = Callable[[Tensor, Tensor], float]

METRICS: Registry[Metric] = Registry("metric")

DEFAULT_TOP_K = 0.2


def as_float64_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Flattened float64 copies, so metrics are exact enough and never touch the inputs."""
    if x.shape != y.shape:
        raise MergeError(f"cannot compare tensors of different shapes {tuple(x.shape)} and {tuple(y.shape)}")
    x64, y64 = (v.detach().flatten().to(torch.float64, copy=True) for v in (x, y))
    return x64, y64


def peak(x: Tensor) -> Tensor:
    """Largest magnitude (1 for all-zero input): dividing by it keeps squares from under/overflowing."""
    top = x.abs().max() if x.numel() else x.new_tensor(0.0)
    return torch.where(top > 0, top, torch.ones_like(top))


def check_top_k(top_k: float) -> None:
    """TSSD keeps a fraction of each tensor: it must lie in (0, 1]."""
    if not 0.0 < top_k <= 1.0:
        raise ConfigError(f"TSSD top_k must be a fraction in (0, 1], got {top_k!r}")


def l2_distance(x: Tensor, y: Tensor) -> float:
    """||x - y||_2: the plain distance between the two weights."""
    x, y = as_float64_pair(x, y)
    diff = x - y
    scale = peak(diff)
    return (scale * torch.linalg.vector_norm(diff / scale)).item()


def normalized_l2_distance(x: Tensor, y: Tensor) -> float:
    """||x - y|| / (||x|| + ||y||): a scale-free distance in [0, 1] (0.0 when both are zero)."""
    x, y = as_float64_pair(x, y)
    scale = torch.maximum(peak(x), peak(y))
    x, y = x / scale, y / scale
    total = torch.linalg.vector_norm(x) + torch.linalg.vector_norm(y)
    if total == 0:
        return 0.0
    return min(1.0, (torch.linalg.vector_norm(x - y) / total).item())


def cosine_dissimilarity(x: Tensor, y: Tensor) -> float:
    """1 - cos(x, y) in [0, 2]: direction only; 0.0 if both are zero, 1.0 if exactly one is."""
    x, y = as_float64_pair(x, y)
    x_zero, y_zero = not x.any(), not y.any()
    if x_zero or y_zero:
        return 0.0 if x_zero and y_zero else 1.0
    x, y = x / peak(x), y / peak(y)
    cos = torch.dot(x, y) / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))
    return 1.0 - cos.clamp(-1.0, 1.0).item()


def sign_disagreement(x: Tensor, y: Tensor) -> float:
    """Mean of 1 - |x_i + y_i| / (|x_i| + |y_i|) over entries not both zero (0.0 if none)."""
    magnitude = x.abs() + y.abs()
    live = magnitude > 0
    if not live.any():
        return 0.0
    return (1.0 - (x[live] + y[live]).abs() / magnitude[live]).mean().item()


def soft_sign_dissimilarity(x: Tensor, y: Tensor) -> float:
    """SSD in [0, 1]: how much the entries disagree in sign, weighted by magnitude."""
    return sign_disagreement(*as_float64_pair(x, y))


def truncated_soft_sign_dissimilarity(x: Tensor, y: Tensor, top_k: float = DEFAULT_TOP_K) -> float:
    """TSSD in [0, 1]: SSD of the top-k entries each tensor keeps under TIES trimming."""
    check_top_k(top_k)
    x, y = as_float64_pair(x, y)
    return sign_disagreement(trim_to_top_k(x, top_k), trim_to_top_k(y, top_k))


def metric_fn(name: str, top_k: float = DEFAULT_TOP_K) -> Metric:
    """The metric registered as `name`, as a function of (x, y), with `top_k` bound for TSSD."""
    metric = METRICS.get(name)
    if name != "tssd":
        return metric
    check_top_k(top_k)  # fail when configured, not at the first comparison
    return partial(metric, top_k=top_k)


METRICS.add("l2", l2_distance)
METRICS.add("l2_normalized", normalized_l2_distance)
METRICS.add("cosine", cosine_dissimilarity)
METRICS.add("ssd", soft_sign_dissimilarity)
METRICS.add("tssd", truncated_soft_sign_dissimilarity)
