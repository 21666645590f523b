"""Datasets and public data formats: readers, tokenizer, data sources, transforms."""

from vlmerge.data import (easy_vqa, emoji_source, fashion_mnist, paper_sources, tuxpaint,  # noqa: F401  (registration)
                          wordnet)
from vlmerge.data.config import DataConfig
from vlmerge.data.sources import SOURCES, DataSource, load_pairs, load_source

__all__ = ["SOURCES", "DataConfig", "DataSource", "load_pairs", "load_source"]
