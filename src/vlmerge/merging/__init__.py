"""Merging modality-specific experts into one modality-agnostic model."""

from vlmerge.merging import fisher, methods, regmean_pp, svd  # noqa: F401  (register the built-in methods)
from vlmerge.merging.engine import MergeResult, merge, merge_checkpoint, merge_state_dict
from vlmerge.merging.plan import ExpertSelection, MergeGroup, MergePlan, build_merge_plan
from vlmerge.merging.registry import (
    MERGE_METHODS,
    MergeInputs,
    MergeMethod,
    MergeWarning,
    MethodOption,
    describe_methods,
    method_options,
    options_from_text,
    register_method,
    unregister_method,
)

__all__ = [
    "ExpertSelection",
    "MERGE_METHODS",
    "MergeGroup",
    "MergeInputs",
    "MergeMethod",
    "MergePlan",
    "MergeResult",
    "MergeWarning",
    "MethodOption",
    "build_merge_plan",
    "describe_methods",
    "merge",
    "merge_checkpoint",
    "merge_state_dict",
    "method_options",
    "options_from_text",
    "register_method",
    "unregister_method",
]
