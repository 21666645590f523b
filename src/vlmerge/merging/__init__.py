"""Merging modality-specific experts into one modality-agnostic model."""

from vlmerge.merging import fisher, geometric, methods, regmean_pp, selection, svd, wudi  # noqa: F401  (register the built-in methods)
from vlmerge.merging.engine import MergeResult, merge, merge_checkpoint, merge_state_dict
from vlmerge.merging.plan import ExpertSelection, MergeGroup, MergePlan, build_merge_plan
from vlmerge.merging.registry import (
    MERGE_METHODS,
    MergeInputs,
    MergeMethod,
    MergeWarning,
    MethodOption,
    method_options,
    register_method,
    unregister_method,
)
from vlmerge.merging.request import MergeRequest

__all__ = [
    "ExpertSelection",
    "MERGE_METHODS",
    "MergeGroup",
    "MergeInputs",
    "MergeMethod",
    "MergePlan",
    "MergeRequest",
    "MergeResult",
    "MergeWarning",
    "MethodOption",
    "build_merge_plan",
    "merge",
    "merge_checkpoint",
    "merge_state_dict",
    "method_options",
    "register_method",
    "unregister_method",
]
