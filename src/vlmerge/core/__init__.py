"""Vocabulary shared by every layer of vlmerge: modalities, registries, errors."""

from vlmerge.core.errors import CheckpointError, ConfigError, MergeError, VlmergeError
from vlmerge.core.modality import Modality
from vlmerge.core.registry import Registry

__all__ = ["CheckpointError", "ConfigError", "MergeError", "Modality", "Registry", "VlmergeError"]
