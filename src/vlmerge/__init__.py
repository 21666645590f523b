"""vlmerge: merge modality-specific vision-language experts into one modality-agnostic transformer."""

from vlmerge.core.errors import VlmergeError
from vlmerge.core.modality import Modality

__all__ = ["Modality", "VlmergeError"]
__version__ = "0.1.0"
