"""What a merge reads and how it writes, beside the method and its options: one frozen object that
`merge_checkpoint`, `vlmerge tune` and `vlmerge inspect --plan` take, and whose fields are the
command line's flags (`vlmerge.cli.options`), so that a new input is declared once."""

import os
from typing import Any, Self

from pydantic import Field, field_validator

from vlmerge.core.config import StrictConfig
from vlmerge.core.errors import ConfigError
from vlmerge.io.layout import Layout
from vlmerge.merging.plan import ExpertSelection


class MergeRequest(StrictConfig):
    """The source checkpoint and the files beside it, the experts merged and the key layouts in and out.

    Not `MergeInputs`: that name is taken by what a method receives for one merged tensor. A field
    without a default is a positional argument of `vlmerge merge` and `vlmerge tune`, every other
    field a flag (`seed_checkpoint` -> `--seed-checkpoint`) whose help is the field's description."""

    source: str = Field(description="modality-specific checkpoint (.safetensors, or weights-only .pt/.pth/.ckpt)")
    seed_checkpoint: str | None = Field(
        None, description="seed (modality-agnostic) checkpoint: the origin of modality vectors"
    )
    grams: str | None = Field(None, description="Gram matrices for RegMean (vlmerge or the paper's layout)")
    allow_foreign_grams: bool = Field(
        False,
        description="use a Gram file that records another checkpoint than the source (a warning, not an error)",
    )
    fisher: str | None = Field(None, description="Fisher statistics for Fisher merging (`vlmerge fisher`)")
    allow_foreign_fisher: bool = Field(
        False,
        description="use a Fisher file that records another checkpoint than the source (a warning, not an error)",
    )
    selection: ExpertSelection = Field(ExpertSelection.ALL, description="which experts to merge, by task")
    input_layout: Layout | None = Field(
        None,
        description="key names of the source (default: detected from them; `vlmerge inspect` says which and why)",
    )
    layout: Layout = Field(
        Layout.NATIVE,
        description="key names of the output: native, or a family's (a multiway layout holds the merged weights "
        "under every expert's name, tied)",
    )
    image_size: int | None = Field(
        None,
        description="image size of a released paper/VLMo file, which its shapes do not tell (default: 224 where it fits)",
    )
    heads: int | None = Field(None, description="head count of a released file whose shapes do not tell it")

    @field_validator("source", "seed_checkpoint", "grams", "fisher", mode="before")
    @classmethod
    def _path_as_given(cls, value: object) -> object:
        """Paths stay the text the user gave (messages name them so); a `Path` is taken as its text."""
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("selection", mode="before")
    @classmethod
    def _known_selection(cls, value: object) -> object:
        """An unknown selection gets the engine's own error (with a suggestion), not pydantic's."""
        return ExpertSelection.parse(value) if isinstance(value, str) else value

    @classmethod
    def of(cls, source: "MergeRequest | str | os.PathLike", **fields: Any) -> Self:
        """A request given whole, or as the source's path and the other fields by keyword."""
        if isinstance(source, MergeRequest):
            if fields:
                raise ConfigError(f"give {', '.join(fields)} in the MergeRequest, not beside it")
            return source
        return cls.parse({"source": source, **fields}, where="merge")

    @property
    def overrides(self) -> dict[str, int]:
        """The fields of the source's model config given here (`image_size`, `heads`)."""
        return {name: value for name in ("image_size", "heads") if (value := getattr(self, name)) is not None}

    @property
    def inputs(self) -> list[str | None]:
        """Every file the merge reads (None where not given), which its output must not be."""
        return [self.source, self.seed_checkpoint, self.grams, self.fisher]
