"""Mergeability metrics: distances between the weights to be merged, before merging."""

from vlmerge.metrics.distances import METRICS, metric_fn
from vlmerge.metrics.mergeability import MergeabilityReport, TensorDistances, mergeability

__all__ = ["METRICS", "MergeabilityReport", "TensorDistances", "mergeability", "metric_fn"]
