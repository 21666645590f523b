"""Checks of the statistics a merge weighs with (Gram matrices, Fisher files), before any expert is read.

A Gram matrix must fit the tensor it weighs and be one (finite, symmetric, positive
semi-definite); a Gram or Fisher file must say, by content hash, that it was collected from the source.
"""

import re
from collections.abc import Callable

import torch

from vlmerge.core.errors import MergeError
from vlmerge.io.checkpoint import PICKLE_SUFFIXES, CheckpointReader
from vlmerge.io.grams import GramSet
from vlmerge.io.statistics import FisherSet
from vlmerge.merging.plan import MergePlan

SHA256 = re.compile(r"[0-9a-fA-F]{64}")
GRAM_TOLERANCE = 1e-6  # relative to a Gram matrix's largest entry (symmetry) or eigenvalue (definiteness)


def validate_grams(plan: MergePlan, grams: GramSet) -> None:
    """The Gram file has matrices this merge needs, each square over its tensor's inputs (that they are
    floating point, `open_grams` checked)."""
    needed = [(g, m) for g in plan.groups if g.is_linear_weight and len(g.experts) > 1 for m in g.gram_keys().values()]
    if needed and not any(module in grams for _, module in needed):
        raise MergeError(f"Gram file {grams.path} has none of the matrices this merge needs (e.g. {needed[0][1]})")
    for group, module in needed:
        if module in grams:
            inputs = group.shape[1]
            if tuple(grams.shape(module)) != (inputs, inputs):
                raise MergeError(
                    f"Gram matrix {module} is {list(grams.shape(module))} but {group.target} "
                    f"takes {inputs} inputs (expected [{inputs}, {inputs}])"
                )


def validate_gram_values(plan: MergePlan, grams: GramSet) -> None:
    """Every Gram matrix the merge will use, read once, one at a time, and checked."""
    needed = [m for g in plan.groups if g.is_linear_weight and len(g.experts) > 1 for m in g.gram_keys().values()]
    for module in dict.fromkeys(module for module in needed if module in grams):
        _check_gram(grams, module)


def _check_gram(grams: GramSet, module: str) -> None:
    """A Gram matrix X^T X is finite, symmetric and positive semi-definite, within float rounding;
    one that is all zero (no token reached its expert) is left to the method's documented fallback."""
    gram = _read_gram(grams, module)  # NaN and Inf are named by GramSet.rows
    tokens = _recorded_tokens(grams, module)
    scale = _largest_magnitude(gram)
    if scale == 0.0:
        return
    where = f"{grams.path}: Gram matrix {module}"
    if tokens == 0:
        raise MergeError(f"{where} records 0 tokens but is not zero; the file is inconsistent")
    asymmetry = _largest_asymmetry(gram)
    if asymmetry > GRAM_TOLERANCE * scale:
        raise MergeError(
            f"{where} is not symmetric (largest |G - G^T| entry {asymmetry:.3g}, largest entry {scale:.3g}); "
            "a Gram matrix X^T X always is"
        )
    eigenvalues = _eigenvalue_range_if_not_psd(gram, lambda: _read_gram(grams, module))
    if eigenvalues is not None:
        low, high = eigenvalues
        raise MergeError(
            f"{where} is not positive semi-definite: it is {_definiteness(low, high)} (eigenvalues from "
            f"{low:.3g} to {high:.3g}); a Gram matrix X^T X has no eigenvalue below zero"
        )


def _read_gram(grams: GramSet, module: str, rows: int = 256) -> torch.Tensor:
    """A Gram matrix as a float64 matrix of its own (the checks change it), read a band of rows at a
    time: the matrix and one band are all that is held."""
    shape = grams.shape(module)
    gram = torch.empty(shape, dtype=torch.float64)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        gram[start:stop] = grams.rows(module, start, stop)
    return gram


def _largest_magnitude(gram: torch.Tensor) -> float:
    """max |G| (0 for an empty matrix), without a temporary the size of G."""
    if gram.numel() == 0:
        return 0.0
    low, high = torch.aminmax(gram)
    return max(-float(low), float(high))


def _largest_asymmetry(gram: torch.Tensor, rows: int = 256) -> float:
    """max |G - G^T|, a band of rows at a time: no temporary the size of G."""
    bands = range(0, len(gram), rows)
    return max(float((gram[i : i + rows] - gram[:, i : i + rows].mT).abs_().max()) for i in bands)


def _eigenvalue_range_if_not_psd(
    gram: torch.Tensor, read_again: Callable[[], torch.Tensor]
) -> tuple[float, float] | None:
    """None when the smallest eigenvalue is >= -GRAM_TOLERANCE x the largest, else (smallest, largest).
    A Cholesky factorisation of G shifted by that tolerance (of its largest diagonal entry, which the
    largest eigenvalue is at least) settles almost every matrix at a fraction of an eigendecomposition's
    cost; eigvalsh (float64) decides the rest. `gram` is shifted and factored in place (through its
    column-major transposed view, the same symmetric matrix: no copy); where the factorisation fails,
    eigvalsh gets the matrix `read_again`."""
    largest_diagonal = float(gram.diagonal().max())
    if largest_diagonal > 0:
        gram.diagonal().add_(GRAM_TOLERANCE * largest_diagonal)
        factor, info = gram.mT, torch.empty((), dtype=torch.int32)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if int(info) == 0:
            return None
        gram = read_again()
    eigenvalues = torch.linalg.eigvalsh(gram)
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    return None if high > 0 and low >= -GRAM_TOLERANCE * high else (low, high)


def _definiteness(low: float, high: float) -> str:
    """What a symmetric matrix that is not positive semi-definite is, from its extreme eigenvalues."""
    if high > GRAM_TOLERANCE * abs(low):
        return "indefinite"
    return "negative definite" if high < 0 else "negative semi-definite"


def _recorded_tokens(grams: GramSet, module: str) -> int | None:
    """The token count a native Gram file records for `module`; None where it records none."""
    record = grams.info.get(module)
    tokens = record.get("tokens") if isinstance(record, dict) else None
    if tokens is None:
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise MergeError(f"{grams.path}: Gram matrix {module} records token count {tokens!r}, not a count")
    return tokens


def check_statistics_source(
    reader: CheckpointReader,
    statistics: GramSet | FisherSet,
    source_sha256: Callable[[], str],
    allow_foreign: bool,
    kind: str,
    flag: str,
) -> list[str]:
    """Statistics must come from the source, by content: a file that records another checkpoint's hash,
    or none that can be checked (no record, a null or a string that is no SHA-256, a torch file such as
    the paper's, which has no metadata), would weigh the merge with another model's data without a word.
    `kind` names the file in messages, `flag` the option that lets it through. Returns the warning to
    record when `allow_foreign` lets such a file through."""
    problem = _unverified_source(statistics, kind) or _foreign_source(reader, statistics, source_sha256, kind)
    if problem is None:
        return []
    if not allow_foreign:
        raise MergeError(f"{problem}; collect them for this checkpoint, or pass {flag}")
    return [f"{problem}; used anyway ({flag})"]


def _unverified_source(statistics: GramSet | FisherSet, kind: str) -> str | None:
    """Why the checkpoint a statistics file was collected from cannot be checked; None where it can."""
    recorded = statistics.provenance.get("checkpoint")
    sha = recorded.get("sha256") if isinstance(recorded, dict) else None
    if isinstance(sha, str) and SHA256.fullmatch(sha):
        return None
    if statistics.path.suffix in PICKLE_SUFFIXES and not statistics.provenance:
        why = f"a {statistics.path.suffix} file records no provenance"
    elif not isinstance(recorded, dict):
        why = "its provenance records no checkpoint"
    elif sha is None:
        why = "its checkpoint record has no sha256"
    else:
        why = f"its recorded sha256 {str(sha)[:80]!r} is not a SHA-256 hash"
    return f"{kind} {statistics.path} does not say which checkpoint it was collected from ({why})"


def _foreign_source(
    reader: CheckpointReader, statistics: GramSet | FisherSet, source_sha256: Callable[[], str], kind: str
) -> str | None:
    """Why a statistics file's recorded checkpoint is not the source; None where it is."""
    recorded = statistics.provenance["checkpoint"]
    actual = source_sha256()
    if recorded["sha256"].lower() == actual:
        return None
    return (
        f"{kind} {statistics.path} was collected from checkpoint {recorded.get('path')} "
        f"(sha256 {recorded['sha256']}), not from {reader.path} (sha256 {actual})"
    )
