"""Which data a stage reads: dataset names, image size, and the local files a dataset needs."""

from typing import Self

from pydantic import Field, field_validator

from vlmerge.core.config import StrictConfig


class DataConfig(StrictConfig):
    """`dataset` names one registered data source, or several whose image-text pairs are
    pooled for pre-training. `paths` holds the local files of datasets that read them
    (e.g. COCO's Karpathy JSON and image folder); each dataset checks its own keys. When
    several datasets are pooled, each key says whose it is: `coco.karpathy_json`."""

    dataset: str | tuple[str, ...] = "emoji"
    image_size: int = Field(32, ge=8)
    limit: int | None = Field(None, ge=1, description="use only the first N records of each dataset (tests)")
    cache_dir: str | None = None
    paths: dict[str, str] = {}

    @field_validator("dataset")
    @classmethod
    def _single_name_or_several(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if isinstance(value, tuple):
            if not value:
                raise ValueError("name at least one dataset")
            if len(set(value)) != len(value):
                raise ValueError(f"datasets are named twice in {list(value)}")
            return value[0] if len(value) == 1 else value
        return value

    @property
    def names(self) -> tuple[str, ...]:
        return (self.dataset,) if isinstance(self.dataset, str) else self.dataset

    def key(self) -> str:
        """A stable identity for caching loaded sources (the config holds a dict, so it is unhashable)."""
        return self.model_dump_json()

    def part(self, name: str) -> Self:
        """The config of one of the pooled datasets, its own paths unprefixed."""
        if len(self.names) == 1:
            return self
        prefix = f"{name}."
        return self.model_copy(
            update={
                "dataset": name,
                "paths": {key[len(prefix) :]: path for key, path in self.paths.items() if key.startswith(prefix)},
            }
        )
