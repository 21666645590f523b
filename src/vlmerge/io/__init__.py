"""Reading and writing checkpoints and Gram files: safetensors first, atomic, lazy, inputs opened once."""

from vlmerge.io.atomic import atomic_path, check_output_path
from vlmerge.io.checkpoint import CheckpointReader, file_sha256, open_checkpoint, save_checkpoint
from vlmerge.io.input_file import InputFile
from vlmerge.io.layout import Layout, from_reference_key, to_reference_key

__all__ = [
    "CheckpointReader",
    "InputFile",
    "Layout",
    "atomic_path",
    "check_output_path",
    "file_sha256",
    "from_reference_key",
    "open_checkpoint",
    "save_checkpoint",
    "to_reference_key",
]
