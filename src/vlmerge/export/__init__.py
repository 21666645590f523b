"""Writers of merged models in other libraries' formats (readers of foreign formats live in `io`)."""

from vlmerge.export.huggingface import HFExport, export_hf

__all__ = ["HFExport", "export_hf"]
