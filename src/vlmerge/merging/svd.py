"""The SVD family: merge each 2-D weight's modality vectors through the singular bases they span.

theta = theta_0 + lam * merged, with merged built from the SVDs of the modality vectors
tau_m = theta_m - theta_0 (TSV-M) or of their sum (Iso-C, Iso-CTS). Tensors that are not 2-D
(biases, norms, layer scales) have no singular basis: they combine by `non_matrix`, the sum (task
arithmetic, the default) or the mean (what the papers' code does), then are scaled by the same lam.

Every SVD runs in float64 on the tensor's device, and the result comes back in the experts' dtype.
A singular direction whose singular value is numerically zero carries no weight and its basis is
whatever LAPACK picks, so it is dropped everywhere: a rank-deficient vector keeps only its rank, and
a stacked basis that repeats a direction (identical experts) is orthogonalised on its range. On
full-rank inputs this is exactly the papers' computation (FusionBench's); on the rest it stays
defined, where the papers' code adds a term as large as the vectors in directions LAPACK chose.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

import torch
from pydantic import Field

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import MergeError
from vlmerge.core.modality import Modality
from vlmerge.merging.registry import MergeInputs, register_method

COMPUTE_DTYPE = torch.float64
# A singular value below this fraction of the largest is zero: far below float32's rounding of any stored
# weight (6e-8), far above float64's rounding of an exact zero, so duplicated directions are found reliably.
ZERO_SINGULAR_VALUE = 1e-10
NonMatrix = Literal["sum", "mean"]
NON_MATRIX = "how tensors that are not 2-D combine: sum (task arithmetic) or mean (the papers' code)"
LAM = "scale of the merged modality vector"


class Components(NamedTuple):
    """Singular triplets of one matrix, u (out, k) * s (k) * vh (k, in); k may be 0."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def top(self, k: int) -> "Components":
        return Components(self.u[:, :k], self.s[:k], self.vh[:k])


def singular_components(matrix: torch.Tensor, target: str) -> Components:
    """The thin SVD of `matrix`, without the directions whose singular value is numerically zero.
    A wide matrix is decomposed as its transpose (LAPACK is about 3x faster on a tall 3072 x 768)."""
    wide = matrix.shape[0] < matrix.shape[1]
    try:
        u, s, vh = torch.linalg.svd(matrix.mT if wide else matrix, full_matrices=False)
        if wide:
            u, vh = vh.mT, u.mT
    except torch.linalg.LinAlgError as error:
        raise MergeError(f"{target}: SVD of a {list(matrix.shape)} modality vector failed ({error})") from None
    largest = s[:1].sum()  # s is sorted, descending; 0 for an empty matrix
    rank = int((s > largest * ZERO_SINGULAR_VALUE).sum())
    return Components(u, s, vh).top(rank)


def orthonormal_factor(basis: torch.Tensor, target: str) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows) on `basis`'s range: P Q^T for basis = P S Q^T,
    as TSV orthogonalises its stacked bases (the polar factor)."""
    p, _, qh = singular_components(basis, target)
    return p @ qh


def recombine(parts: Sequence[Components], s: torch.Tensor | None, target: str) -> torch.Tensor:
    """Stack the parts' bases, orthogonalise both, and put back the stacked singular values (or `s`, one
    value for all of them): U_perp diag(s) V_perp^T."""
    u = torch.cat([part.u for part in parts], dim=1)  # (out, sum k)
    vh = torch.cat([part.vh for part in parts], dim=0)  # (sum k, in)
    values = torch.cat([part.s for part in parts]) if s is None else s
    if values.numel() == 0:  # every modality vector is zero
        return torch.zeros(u.shape[0], vh.shape[1], dtype=u.dtype, device=u.device)
    return (orthonormal_factor(u, target) * values) @ orthonormal_factor(vh, target)


def combine_non_matrix(vectors: Sequence[torch.Tensor], how: NonMatrix) -> torch.Tensor:
    total = torch.stack(list(vectors)).sum(dim=0)
    return total / len(vectors) if how == "mean" else total


def svd_merge(
    inputs: MergeInputs,
    lam: float | Mapping[Modality, float],
    how: NonMatrix,
    merge_matrix: Callable[[Sequence[torch.Tensor]], torch.Tensor],
) -> torch.Tensor:
    """theta_0 + lam * merged: `merge_matrix` for 2-D weights, `non_matrix` for the rest; the SVD in float64.
    With lam per expert, each modality vector is scaled by its own lam_m before the merge (theta_0 +
    merged(lam_m tau_m)); the merges are homogeneous, so one value for all is the scalar form."""
    dtype = next(iter(inputs.experts.values())).dtype
    origin = inputs.origin.to(COMPUTE_DTYPE)
    vectors = [w.to(COMPUTE_DTYPE) - origin for w in inputs.experts.values()]  # subtracted in float64 too
    if isinstance(lam, Mapping):
        vectors = [lam[m] * v for m, v in zip(inputs.experts, vectors)]
    merged = merge_matrix(vectors) if origin.ndim == 2 else combine_non_matrix(vectors, how)
    if isinstance(lam, Mapping):
        return (origin + merged).to(dtype)
    return (origin + lam * merged).to(dtype)


# --------------------------------------------------------------------------- TSV-M
class TsvOptions(StrictConfig):
    share: float | None = Field(
        None, gt=0.0, le=1.0, description="fraction of each modality vector's singular components kept (1/M if unset)"
    )
    lam: float = Field(1.0, description=LAM)
    non_matrix: NonMatrix = Field("sum", description=NON_MATRIX)


def kept_components(rank: int, share: float) -> int:
    """floor(share * rank), at least 1: TSV keeps the top 1/M of each vector's min(out, in) components."""
    return max(1, math.floor(share * rank + 1e-9))


def tsv_matrix(vectors: Sequence[torch.Tensor], share: float | None, target: str) -> torch.Tensor:
    """Each vector's top singular components, stacked, both bases orthogonalised, the singular values kept."""
    k = kept_components(min(vectors[0].shape), share if share is not None else 1.0 / len(vectors))
    return recombine([singular_components(v, target).top(k) for v in vectors], None, target)


@register_method("tsv", TsvOptions, needs_origin=True, per_expert=("lam",))
def tsv(inputs: MergeInputs, options: TsvOptions) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025, Task Singular Vectors): each vector's top 1/M singular components, decorrelated."""
    return svd_merge(
        inputs, options.lam, options.non_matrix, lambda vectors: tsv_matrix(vectors, options.share, inputs.target)
    )


# --------------------------------------------------------------------------- Iso-C
class IsoCOptions(StrictConfig):
    lam: float = Field(1.0, description=LAM)
    non_matrix: NonMatrix = Field("sum", description=NON_MATRIX)


def iso_c_matrix(vectors: Sequence[torch.Tensor], target: str) -> torch.Tensor:
    """U diag(mean sigma) V^T of the summed vector: every singular direction of the sum gets the same weight."""
    u, s, vh = singular_components(torch.stack(list(vectors)).sum(dim=0), target)
    if s.numel() == 0:
        return torch.zeros_like(vectors[0])
    return (u * s.mean()) @ vh


@register_method("iso_c", IsoCOptions, needs_origin=True, per_expert=("lam",))
def iso_c(inputs: MergeInputs, options: IsoCOptions) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025, No Task Left Behind): the summed vector with a flat spectrum."""
    return svd_merge(inputs, options.lam, options.non_matrix, lambda vectors: iso_c_matrix(vectors, inputs.target))


# --------------------------------------------------------------------------- Iso-CTS
class IsoCtsOptions(StrictConfig):
    common_share: float = Field(
        0.8, ge=0.0, le=1.0, description="fraction of the rank given to the summed vector's top subspace"
    )
    lam: float = Field(1.0, description=LAM)
    non_matrix: NonMatrix = Field("sum", description=NON_MATRIX)


def subspace_sizes(rank: int, experts: int, common_share: float) -> tuple[int, int]:
    """(common, per expert) with common + experts * per_expert = rank: the common part floor(share * rank),
    then the remainder split evenly, rounded as Python rounds (FusionBench's), the common part taking the rest."""
    common = math.floor(common_share * rank + 1e-9)
    per_expert = min(round((rank - common) / experts), rank // experts)
    return rank - experts * per_expert, per_expert


def iso_cts_matrix(vectors: Sequence[torch.Tensor], common_share: float, target: str) -> torch.Tensor:
    """The sum's top subspace plus each vector's top components outside its column space, orthogonalised
    together, every direction with the mean of their singular values."""
    common_size, per_expert = subspace_sizes(min(vectors[0].shape), len(vectors), common_share)
    common = singular_components(torch.stack(list(vectors)).sum(dim=0), target).top(common_size)
    specific = [
        singular_components(v - common.u @ (common.u.T @ v), target).top(per_expert) for v in vectors
    ]  # each (out, <= per_expert), orthogonal to the common column space
    parts = [*specific, common]
    values = torch.cat([part.s for part in parts])
    return recombine(parts, values.mean().expand_as(values), target)


@register_method("iso_cts", IsoCtsOptions, needs_origin=True, per_expert=("lam",))
def iso_cts(inputs: MergeInputs, options: IsoCtsOptions) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025, No Task Left Behind): common and task-specific subspaces, flat spectrum."""
    return svd_merge(
        inputs,
        options.lam,
        options.non_matrix,
        lambda vectors: iso_cts_matrix(vectors, options.common_share, inputs.target),
    )
