"""Datasets and public data formats: readers, tokenizer, the emoji image-text set, transforms."""
