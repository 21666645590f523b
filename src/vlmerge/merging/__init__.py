"""Merging modality-specific experts into one modality-agnostic model."""

from vlmerge.merging.engine import MergeResult, merge, merge_checkpoint, merge_state_dict
from vlmerge.merging.methods import MERGE_METHODS, MergeInputs, MergeMethod, MergeWarning, register_method
from vlmerge.merging.plan import ExpertSelection, MergeGroup, MergePlan, build_merge_plan

__all__ = [
    "ExpertSelection", "MERGE_METHODS", "MergeGroup", "MergeInputs", "MergeMethod", "MergePlan", "MergeResult",
    "MergeWarning", "build_merge_plan", "merge", "merge_checkpoint", "merge_state_dict", "register_method",
]
