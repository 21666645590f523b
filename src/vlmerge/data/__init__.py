"""Datasets and public data formats: readers, tokenizer, data sources, transforms.

The shared base (sources, splits, the image cache, installed packages, format readers) sits here; each dataset
is a module or package under `datasets/`, imported below so SOURCES knows every one.
"""

from vlmerge.data import datasets  # noqa: F401  (registration)
from vlmerge.data.config import DataConfig
from vlmerge.data.sources import SOURCES, DataSource, load_pairs, load_source

__all__ = ["SOURCES", "DataConfig", "DataSource", "load_pairs", "load_source"]
