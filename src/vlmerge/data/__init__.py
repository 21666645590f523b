"""Datasets and public data formats: readers, tokenizer, data sources, transforms."""

from vlmerge.data import emoji_source, paper_sources  # noqa: F401  (registration)
from vlmerge.data.config import DataConfig
from vlmerge.data.sources import SOURCES, DataSource, load_pairs, load_source

__all__ = ["SOURCES", "DataConfig", "DataSource", "load_pairs", "load_source"]
