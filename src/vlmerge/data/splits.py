"""Splits from a hash of each example's key, so an example's split depends on neither the order nor the set of
examples around it: adding an emoji, a stamp or a package version moves nothing else."""

import hashlib
import itertools

from vlmerge.core.errors import ConfigError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
VAL_FRACTION = 0.1  # of a dataset's train files, carved out as val where the dataset ships no val split


def assign_split(key: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The split of `key`: the first 8 bytes of its sha256, as a fraction of 2**64, against the cumulative fractions."""
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"split fractions must be {len(SPLITS)} non-negative numbers summing to 1, got {fractions}")
    position = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    for split, bound in zip(SPLITS, itertools.accumulate(fractions)):
        if position < bound:
            return split
    return SPLITS[-1]  # fractions summing to just under 1


def train_or_val(key: str) -> str:
    """'train' or 'val' for an example of a dataset's train files (e.g. its name or index there)."""
    return assign_split(key, (1 - VAL_FRACTION, VAL_FRACTION, 0.0))
