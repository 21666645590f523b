"""Reading and writing checkpoints and Gram files: safetensors first, atomic, lazy."""

from vlmerge.io.atomic import atomic_path
from vlmerge.io.checkpoint import CheckpointReader, file_sha256, open_checkpoint, save_checkpoint
from vlmerge.io.layout import Layout, from_reference_key, to_reference_key

__all__ = [
    "CheckpointReader",
    "Layout",
    "atomic_path",
    "file_sha256",
    "from_reference_key",
    "open_checkpoint",
    "save_checkpoint",
    "to_reference_key",
]
