"""The SVD family: merge each 2-D weight's modality vectors through the singular bases they span.

theta = theta_0 + lam * merged, with merged built from the SVDs of the modality vectors
tau_m = theta_m - theta_0 (TSV-M) or of their sum (Iso-C, Iso-CTS). Tensors that are not 2-D
(biases, norms, layer scales) have no singular basis: they combine by `non_matrix`, the sum (task
arithmetic, the default) or the mean (what the papers' code does), then are scaled by the same lam.

Everything runs in float64 on the tensor's device (Iso-C's `precision=float32` aside), and the result comes
back in the experts' dtype. The decompositions come from Gram matrices (an (in, in) or (out, out)
eigendecomposition costs a third of an SVD of the vector) wherever the singular values kept are resolved by
them (above 1e-6 of the largest, squared), and the polar factors of the stacked bases from the small blocks
that couple them (TSV's two bases, Iso-CTS's task-specific ones beside the common one). A polar factor (Iso-C's,
a stack's) is also taken from its Gram matrix below that, down to 1e-10, where its own departure from
orthonormality, which bounds its error, is below 1e-10 of it; elsewhere everything comes from the full SVD.
All of them give the same merge to about 1e-10. A polar factor is kept as the stack times a small matrix
of coefficients, so that TSV's merged weight costs one product the size of the weight, not three.
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
# The fast path decomposes the Gram matrix (float64), whose eigenvalues carry rounding of about 1e-16 of the
# largest: squaring the condition number, it costs digits the SVD keeps, so it is taken only where the
# eigenvalues kept lie above 1e-6 of the largest (singular values within 1e3 of it, resolved to about 1e-10
# relative, as the exact SVD resolves them); below that the exact SVD is taken.
RESOLVED = 1e-6
# A polar factor P = a (a^T a)^(-1/2) of k columns is still taken from the Gram matrix below RESOLVED, down to
# eigenvalues of CHECKED of the largest, where ||P^T P - I||_F / sqrt(2 k) <= DEFECT. Rounding E in the Gram
# matrix moves the factor by U X V^T (a = U diag(s) V^T), X's symmetric part -E_ij / (2 s_i s_j) and its skew
# part that times (s_i - s_j) / (s_i + s_j), no larger: to first order ||X||_F <= ||P^T P - I||_F / sqrt(2),
# so that quotient bounds the factor's error relative to its norm, sqrt(k), for one product.
CHECKED = 1e-10
DEFECT = 1e-10
# Columns per strip of a Gram matrix's upper triangle: eight strips of a 768-wide matrix, each product large
# enough to run at the full rate of the matrix multiply.
GRAM_STRIP = 96
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


def linalg_error(target: str, what: str, matrix: torch.Tensor, error: Exception) -> MergeError:
    return MergeError(f"{target}: {what} of a {list(matrix.shape)} modality vector failed ({error})")


def eigh_descending(gram: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of a symmetric matrix."""
    try:
        values, vectors = torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError as error:
        raise linalg_error(target, "eigendecomposition", gram, error) from None
    return values.flip(0), vectors.flip(1)


def gram(tall: torch.Tensor) -> torch.Tensor:
    """tall^T tall from its upper block triangle, mirrored: exactly symmetric, for about 0.6 of the
    multiplications of the whole product (0.65 of its time on a 3072 x 768 float64 matrix, one thread)."""
    n = tall.shape[1]
    product = tall.new_empty(n, n)
    for start in range(0, n, GRAM_STRIP):
        stop = min(start + GRAM_STRIP, n)
        strip = tall[:, start:stop].mT @ tall[:, start:]  # (stop - start, n - start)
        product[start:stop, start:] = strip
        product[start:, start:stop] = strip.mT
    return product


def gram_eigh(tall: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of tall^T tall: the squared singular values and the right
    singular vectors of a (long, short) matrix, at a fraction of an SVD's cost."""
    return eigh_descending(gram(tall), target)


def resolved(values: torch.Tensor, count: int, scale: torch.Tensor | None = None, threshold: float = RESOLVED) -> bool:
    """Whether the first `count` Gram eigenvalues (descending) stand clear of the Gram's rounding (above
    `threshold` of the largest, or of `scale`)."""
    if count == 0:
        return True
    largest = values[0] if scale is None else scale
    return bool(values[count - 1] > threshold * largest)


def exact_components(matrix: torch.Tensor, target: str) -> Components:
    """The thin SVD of `matrix`, without the directions whose singular value is numerically zero.
    A wide matrix is decomposed as its transpose (LAPACK is about 3x faster on a tall 3072 x 768)."""
    wide = matrix.shape[0] < matrix.shape[1]
    try:
        u, s, vh = torch.linalg.svd(matrix.mT if wide else matrix, full_matrices=False)
        if wide:
            u, vh = vh.mT, u.mT
    except torch.linalg.LinAlgError as error:
        raise linalg_error(target, "SVD", matrix, error) from None
    largest = s[:1].sum()  # s is sorted, descending; 0 for an empty matrix
    rank = int((s > largest * ZERO_SINGULAR_VALUE).sum())
    return Components(u, s, vh).top(rank)


def singular_components(matrix: torch.Tensor, target: str, keep: int | None = None) -> Components:
    """The top `keep` (all if None) singular triplets of `matrix`, without the numerically zero ones.
    From the Gram matrix's eigendecomposition where the kept values are resolved (a third of an SVD's
    time), else from the SVD itself."""
    out, inp = matrix.shape
    k = min(out, inp) if keep is None else min(keep, out, inp)
    if k == 0:
        return Components(matrix.new_zeros(out, 0), matrix.new_zeros(0), matrix.new_zeros(0, inp))
    tall = out >= inp
    a = matrix if tall else matrix.mT  # (long, short)
    values, vectors = gram_eigh(a, target)
    if not resolved(values, k):
        return exact_components(matrix, target).top(k)
    s, v = values[:k].sqrt(), vectors[:, :k]
    u = (a @ v) / s  # (long, k)
    return Components(u, s, v.mT) if tall else Components(v, s, u.mT)


class Polar(NamedTuple):
    """A polar factor kept as basis @ coefficients, so that a product with it can start on its small side."""

    basis: torch.Tensor  # (d, r)
    coefficients: torch.Tensor  # (r, k)

    def matrix(self) -> torch.Tensor:
        return self.basis @ self.coefficients


def checked_polar(a: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor | None:
    """a (a^T a)^(-1/2) of a (long, short) matrix from its Gram eigenpairs, where they lie below RESOLVED but
    above CHECKED and the factor comes out orthonormal to DEFECT; else None."""
    if not resolved(values, len(values), threshold=CHECKED):
        return None
    factor = a @ ((vectors * values.rsqrt()) @ vectors.mT)
    k = factor.shape[1]
    defect = torch.linalg.matrix_norm(gram(factor) - torch.eye(k, dtype=factor.dtype, device=factor.device))
    return factor if bool(defect <= DEFECT * math.sqrt(2 * k)) else None


def polar_factor(basis: torch.Tensor, target: str) -> Polar:
    """The nearest matrix with orthonormal columns (or rows) on `basis`'s range: P Q^T for basis = P S Q^T,
    as TSV orthogonalises its stacked bases, here basis (basis^T basis)^(-1/2) (or (basis basis^T)^(-1/2) basis
    for a wide one) where the Gram matrix resolves it, or gives a factor that checks out (`checked_polar`)."""
    tall = basis.shape[0] >= basis.shape[1]
    b = basis if tall else basis.mT
    values, vectors = gram_eigh(b, target)
    if resolved(values, len(values)):
        inverse_root = (vectors * values.rsqrt()) @ vectors.mT
        return Polar(basis, inverse_root) if tall else Polar(inverse_root, basis)
    factor = checked_polar(b, values, vectors)
    if factor is not None:
        identity = torch.eye(factor.shape[1], dtype=factor.dtype, device=factor.device)
        return Polar(factor, identity) if tall else Polar(identity, factor.mT)
    p, _, qh = exact_components(basis, target)
    return Polar(p, qh)


def orthonormal_factor(basis: torch.Tensor, target: str) -> torch.Tensor:
    """`polar_factor` as one matrix."""
    return polar_factor(basis, target).matrix()


def chain(first: torch.Tensor, middle: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """first @ middle @ last, multiplied in the order that costs fewer operations."""
    rows, inner, cols = first.shape[0], middle.shape[0], last.shape[1]
    if rows * middle.shape[1] * (inner + cols) <= inner * cols * (middle.shape[1] + rows):
        return (first @ middle) @ last
    return first @ (middle @ last)


def rejoin(left: Polar, values: torch.Tensor, right: Polar) -> torch.Tensor:
    """P_left diag(values) P_right^T, the small factors multiplied first."""
    middle = (left.coefficients * values) @ right.coefficients.mT
    return chain(left.basis, middle, right.basis.mT)


def recombine(parts: Sequence[Components], s: torch.Tensor | None, target: str) -> torch.Tensor:
    """Stack the parts' bases, orthogonalise both, and put back the stacked singular values (or `s`, one
    value for all of them): U_perp diag(s) V_perp^T."""
    u = torch.cat([part.u for part in parts], dim=1)  # (out, sum k)
    v = torch.cat([part.vh for part in parts], dim=0).mT  # (in, sum k)
    values = torch.cat([part.s for part in parts]) if s is None else s
    if values.numel() == 0:  # every modality vector is zero
        return torch.zeros(u.shape[0], v.shape[0], dtype=u.dtype, device=u.device)
    return rejoin(polar_factor(u, target), values, polar_factor(v, target))


def summed(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The vectors' sum, added in order into one copy (no stacked copy of them all)."""
    total = vectors[0].clone()
    for vector in vectors[1:]:
        total += vector
    return total


def combine_non_matrix(vectors: Sequence[torch.Tensor], how: NonMatrix) -> torch.Tensor:
    total = summed(vectors)
    return total / len(vectors) if how == "mean" else total


Lam = float | Mapping[Modality, float]


def svd_merge(
    inputs: MergeInputs, lam: Lam, how: NonMatrix, merge_matrix: Callable[[Sequence[torch.Tensor]], torch.Tensor]
) -> torch.Tensor:
    """theta_0 + lam * merged: `merge_matrix` for 2-D weights, `non_matrix` for the rest; the SVD in float64.
    With lam per expert, each modality vector is scaled by its own lam_m before the merge (theta_0 +
    merged(lam_m tau_m)); the merges are homogeneous, so one value for all is the scalar form."""
    origin, vectors = modality_vectors(inputs, lam, COMPUTE_DTYPE)
    merged = merge_matrix(vectors) if origin.ndim == 2 else combine_non_matrix(vectors, how)
    return applied(inputs, origin, merged, lam)


def modality_vectors(inputs: MergeInputs, lam: Lam, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The seed and the modality vectors in `dtype` (subtracted in it too), each scaled by its lam if per expert."""
    origin = inputs.origin.to(dtype)
    vectors = [w.to(dtype) - origin for w in inputs.experts.values()]
    if isinstance(lam, Mapping):
        vectors = [lam[m] * v for m, v in zip(inputs.experts, vectors)]
    return origin, vectors


def applied(inputs: MergeInputs, origin: torch.Tensor, merged: torch.Tensor, lam: Lam) -> torch.Tensor:
    """theta_0 + lam * merged (lam already applied where per expert), in the experts' dtype."""
    dtype = next(iter(inputs.experts.values())).dtype
    return (origin + (merged if isinstance(lam, Mapping) else lam * merged)).to(dtype)


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
    parts = [singular_components(v, target, k) for v in vectors]
    if len(parts) == 2 and all(len(part.s) == k for part in parts):
        left = polar_of_two_orthonormal(parts[0].u, parts[1].u, target)
        right = polar_of_two_orthonormal(parts[0].vh.mT, parts[1].vh.mT, target)
        if left is not None and right is not None:
            return rejoin(left, torch.cat([part.s for part in parts]), right)
    return recombine(parts, None, target)


def polar_of_two_orthonormal(b: torch.Tensor, q: torch.Tensor, target: str) -> Polar | None:
    """The polar factor of the columns [b, q], each block orthonormal, as [b, q] K; None where the blocks
    (nearly) share a direction.

    The blocks meet at principal angles theta_i between unit vectors u_i = b h_i and w_i = q a_i, and the
    stack's Gram matrix is I except on each pair's plane, where it is [[1, c_i], [c_i, 1]] (c_i = cos theta_i),
    whose inverse square root is [[alpha_i, beta_i], [beta_i, alpha_i]], alpha, beta = ((1 + c)^(-1/2) +-
    (1 - c)^(-1/2)) / 2. So K = I + [[H (alpha - 1) H^T, H beta A^T], [A beta H^T, A (alpha - 1) A^T]]: no
    product of the size of the stack until the caller's own. The pairs come from the SVD of the cosines q^T b
    where the angle is large, and from the SVD of the sines, of b - q q^T b on the span of the small angles'
    vectors, where it is small (Knyazev and Argentati's split at 45 degrees): two bases of n / 2 directions
    each, as TSV stacks for two experts, meet at angles near 1 / n, whose cosines lie within 1 / n^2 of 1 and
    of each other, and only the sines tell them apart (and give 1 - c = s^2 / (1 + c) without cancellation)."""
    try:
        cosines = q.mT @ b  # (kq, kb)
        a_large, c, h_large = torch.linalg.svd(cosines, full_matrices=False)  # (kq, m), (m,), (m, kb)
        small = int((c > math.sqrt(0.5)).sum())  # angles below 45 degrees, taken from the sines
        if small:  # the sines of b's directions at those angles: b h - q q^T b h, for h in their span
            span = h_large[:small]  # (small, kb): the span is resolved, the vectors in it are not
            _, s, rotation = torch.linalg.svd((b - q @ cosines) @ span.mT, full_matrices=False)
    except torch.linalg.LinAlgError as error:
        raise linalg_error(target, "SVD", b, error) from None
    if small:
        if not bool(s.min() > RESOLVED):
            return None  # the blocks share a direction: the stack is (nearly) rank-deficient
        h_small, cos_small = rotation @ span, (1 - s.square()).sqrt()
        a_small = (cosines @ h_small.mT) / cos_small  # (kq, small): q a = q q^T b h / cos
        h, a = torch.cat([h_small, h_large[small:]]).mT, torch.cat([a_small, a_large[:, small:]], dim=1)
        cos = torch.cat([cos_small, c[small:]])
        one_minus_cos = torch.cat([s.square() / (1 + cos_small), 1 - c[small:]])
    else:
        h, a, cos, one_minus_cos = h_large.mT, a_large, c, 1 - c
    plus, minus = (1 + cos).rsqrt(), one_minus_cos.rsqrt()
    alpha, beta = (plus + minus) / 2 - 1, (plus - minus) / 2  # alpha less the identity's 1
    kb = b.shape[1]
    coefficients = torch.eye(kb + q.shape[1], dtype=b.dtype, device=b.device)
    coefficients[:kb, :kb] += (h * alpha) @ h.mT
    coefficients[kb:, kb:] += (a * alpha) @ a.mT
    coupling = (a * beta) @ h.mT  # (kq, kb)
    coefficients[kb:, :kb] += coupling
    coefficients[:kb, kb:] += coupling.mT
    return Polar(torch.cat([b, q], dim=1), coefficients)


@register_method("tsv", TsvOptions, needs_origin=True, per_expert=("lam",), compute_bound=True)
def tsv(inputs: MergeInputs, options: TsvOptions) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025, Task Singular Vectors): each vector's top 1/M singular components, decorrelated."""
    return svd_merge(
        inputs, options.lam, options.non_matrix, lambda vectors: tsv_matrix(vectors, options.share, inputs.target)
    )


# --------------------------------------------------------------------------- Iso-C
Precision = Literal["float64", "float32"]
# Iso-C's float32 route rounds its Gram matrix to float32's unit roundoff (6e-8) of the largest eigenvalue, so its
# error grows as largest / smallest: about 1.7e-6 of the merged vector (max |error| / max |merged|) on base-size
# weights at a ratio of 10. Within 20 it stays near 4e-6, as close to the exact merge as FusionBench's own float32
# function comes (6e-6); a sum less well conditioned is merged in float64.
FLOAT32_CONDITION = 1 / 20


class IsoCOptions(StrictConfig):
    lam: float = Field(1.0, description=LAM)
    non_matrix: NonMatrix = Field("sum", description=NON_MATRIX)
    precision: Precision = Field(
        "float64",
        description="arithmetic of the 2-D weights: float64 (the exact merge to about 1e-10), or float32 where the"
        " summed vector's squared singular values lie within 20x of each other (about 4e-6 of the merge, in half"
        " the time), float64 elsewhere",
    )


def flat_spectrum(a: torch.Tensor, values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean(sigma) a (a^T a)^(-1/2) of a (long, short) matrix, from its Gram matrix's eigenpairs."""
    s = values.sqrt()
    return a @ ((w * (s.mean() / s)) @ w.mT)


def iso_c_matrix(vectors: Sequence[torch.Tensor], target: str) -> torch.Tensor:
    """U diag(mean sigma) V^T of the summed vector: every singular direction of the sum gets the same weight.
    For a full-rank sum that is mean(sigma) times its polar factor, total (total^T total)^(-1/2)."""
    total = summed(vectors)
    tall = total.shape[0] >= total.shape[1]
    a = total if tall else total.mT  # (long, short)
    values, w = gram_eigh(a, target)
    if resolved(values, len(values)):
        merged = flat_spectrum(a, values, w)
        return merged if tall else merged.mT
    factor = checked_polar(a, values, w)
    if factor is not None:
        merged = factor * values.sqrt().mean()
        return merged if tall else merged.mT
    u, s, vh = exact_components(total, target)
    if s.numel() == 0:
        return torch.zeros_like(vectors[0])
    return (u * s.mean()) @ vh


def well_conditioned_iso_c(vectors: Sequence[torch.Tensor], target: str) -> torch.Tensor | None:
    """`iso_c_matrix`'s Gram route as is, in the vectors' (lower) precision; None where the sum is not
    conditioned for it (`FLOAT32_CONDITION`)."""
    total = summed(vectors)
    tall = total.shape[0] >= total.shape[1]
    a = total if tall else total.mT
    values, w = gram_eigh(a, target)
    if not bool(values[-1] > FLOAT32_CONDITION * values[0]):  # also refuses a zero sum
        return None
    merged = flat_spectrum(a, values, w)
    return merged if tall else merged.mT


@register_method("iso_c", IsoCOptions, needs_origin=True, per_expert=("lam",), compute_bound=True)
def iso_c(inputs: MergeInputs, options: IsoCOptions) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025, No Task Left Behind): the summed vector with a flat spectrum."""
    if options.precision == "float32" and inputs.origin.ndim == 2:
        origin, vectors = modality_vectors(inputs, options.lam, torch.float32)
        merged = well_conditioned_iso_c(vectors, inputs.target)
        if merged is not None:
            return applied(inputs, origin, merged, options.lam)
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
    total = summed(vectors)
    split = iso_cts_tall if total.shape[0] >= total.shape[1] else iso_cts_wide
    resolved_bases = split(total, vectors, common_size, per_expert, target)
    if resolved_bases is not None:
        left, values, right = resolved_bases
        return (left * values.mean()) @ right.mT
    common = singular_components(total, target, common_size)
    specific = [
        singular_components(v - common.u @ (common.u.T @ v), target, per_expert) for v in vectors
    ]  # each (out, <= per_expert), orthogonal to the common column space
    parts = [*specific, common]
    values = torch.cat([part.s for part in parts])
    return recombine(parts, values.mean().expand_as(values), target)


Bases = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # orthogonalised left (out, r), values (r,), right (in, r)


def iso_cts_tall(
    total: torch.Tensor, vectors: Sequence[torch.Tensor], common_size: int, per_expert: int, target: str
) -> Bases | None:
    """Iso-CTS's orthogonalised bases for out >= in, from (in, in) Gram matrices; None where a kept value is
    not resolved. Each vector's part outside the common column space, tau - u_c y with y = u_c^T tau, has
    the Gram matrix tau^T tau - y^T y; its left vectors are orthogonal to u_c, so the left stack is
    orthogonalised block by block."""
    values, w = gram_eigh(total, target)
    if not resolved(values, common_size):
        return None
    s_c, v_c = values[:common_size].sqrt(), w[:, :common_size]
    u_c = (total @ v_c) / s_c  # (out, kc)
    us, vs, ss = [], [], []
    for tau in vectors:
        y = u_c.mT @ tau  # (kc, in)
        tau_gram = gram(tau)
        scale = tau_gram.diagonal().sum()  # ||tau||^2: the subtraction's rounding is relative to it
        values_t, w_t = eigh_descending(tau_gram - gram(y), target)
        if not resolved(values_t, per_expert, scale):
            return None
        s, v = values_t[:per_expert].sqrt(), w_t[:, :per_expert]
        us.append((tau @ v - u_c @ (y @ v)) / s)  # (out, p)
        vs.append(v)
        ss.append(s)
    specific = torch.cat(us, dim=1)
    left = torch.cat([orthonormal_factor(specific, target), u_c], dim=1) if per_expert else u_c
    right = right_factor(torch.cat(vs, dim=1), v_c, target)
    return None if right is None else (left, torch.cat([*ss, s_c]), right)


def iso_cts_wide(
    total: torch.Tensor, vectors: Sequence[torch.Tensor], common_size: int, per_expert: int, target: str
) -> Bases | None:
    """Iso-CTS's orthogonalised bases for out < in, from (out, out) Gram matrices; None where a kept value is
    not resolved. The sum's left vectors past the common ones span the rest of the column space, u_perp
    (out, M p): each vector's part outside the common space is u_perp z with z = u_perp^T tau (M p, in)."""
    values, w = gram_eigh(total.mT, target)
    if not resolved(values, common_size):
        return None
    s_c, u_c, u_perp = values[:common_size].sqrt(), w[:, :common_size], w[:, common_size:]
    v_c = (total.mT @ u_c) / s_c  # (in, kc)
    coordinates, vs, ss = [], [], []
    for tau in vectors:
        z = u_perp.mT @ tau  # (M p, in)
        values_z, a = gram_eigh(z.mT, target)
        if not resolved(values_z, per_expert):
            return None
        s, a = values_z[:per_expert].sqrt(), a[:, :per_expert]
        coordinates.append(a)  # (M p, p): left vectors u_perp a
        vs.append((z.mT @ a) / s)  # (in, p)
        ss.append(s)
    if per_expert:
        left = torch.cat([u_perp @ orthonormal_factor(torch.cat(coordinates, dim=1), target), u_c], dim=1)
    else:
        left = u_c
    right = right_factor(torch.cat(vs, dim=1), v_c, target)
    return None if right is None else (left, torch.cat([*ss, s_c]), right)


def right_factor(b: torch.Tensor, q: torch.Tensor, target: str) -> torch.Tensor | None:
    """The polar factor of Iso-CTS's right stack [b, q]: from its small coupling blocks where they resolve it,
    else from the stack's own SVD where the stack has full rank (its columns fill the input space, as the
    task-specific and common directions do when they add up to the rank, and meet at small angles); None
    where it has not (repeated directions), which the whole exact path handles."""
    factor = polar_beside_orthonormal(b, q, target)
    if factor is not None:
        return factor
    stack = torch.cat([b, q], dim=1)
    p, s, qh = exact_components(stack, target)
    return p @ qh if len(s) == stack.shape[1] else None


def polar_beside_orthonormal(b: torch.Tensor, q: torch.Tensor, target: str) -> torch.Tensor | None:
    """The polar factor of the columns [b, q], q orthonormal (d, cq), b (d, cb) few: None where it is not
    resolved. Their Gram matrix is I + E with E = [[b^T b - I, c^T], [c, 0]], c = q^T b = a diag(sigma) h^T,
    of rank at most 2 cb: E = Z F Z^T on Z = diag(I, a), so (I + E)^(-1/2) = I + Z W ((1 + phi)^(-1/2) - 1) W^T Z^T
    from the eigendecomposition F = W diag(phi) W^T of size cb + min(cq, cb), not of the whole stack."""
    cb = b.shape[1]
    if cb == 0:
        return q
    if q.shape[1] == 0:
        return orthonormal_factor(b, target)
    try:
        a, sigma, h = torch.linalg.svd(q.mT @ b, full_matrices=False)  # (cq, m), (m,), (m, cb)
    except torch.linalg.LinAlgError as error:
        raise linalg_error(target, "SVD", b, error) from None
    m = sigma.numel()
    off = h.mT * sigma  # (cb, m)
    f = b.new_zeros(cb + m, cb + m)
    f[:cb, :cb] = b.mT @ b - torch.eye(cb, dtype=b.dtype, device=b.device)
    f[:cb, cb:] = off
    f[cb:, :cb] = off.mT
    phi, w = eigh_descending(f, target)
    gram_values = 1 + phi  # the stack's Gram eigenvalues on Z's range; 1 elsewhere
    if not bool(gram_values[-1] > RESOLVED * gram_values[0].clamp(min=1)):
        return None
    k = (w * (gram_values.rsqrt() - 1)) @ w.mT  # (cb + m, cb + m)
    correction = torch.cat([b, q @ a], dim=1) @ k  # [b, q] Z K: (d, cb + m)
    return torch.cat([b + correction[:, :cb], q + correction[:, cb:] @ a.mT], dim=1)


@register_method("iso_cts", IsoCtsOptions, needs_origin=True, per_expert=("lam",), compute_bound=True)
def iso_cts(inputs: MergeInputs, options: IsoCtsOptions) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025, No Task Left Behind): common and task-specific subspaces, flat spectrum."""
    return svd_merge(
        inputs,
        options.lam,
        options.non_matrix,
        lambda vectors: iso_cts_matrix(vectors, options.common_share, inputs.target),
    )
