"""Strict config objects: validated once at the edge, unknown fields named with a suggestion."""

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from vlmerge.core.errors import ConfigError
from vlmerge.core.registry import suggest


class StrictConfig(BaseModel):
    """A frozen pydantic model that rejects unknown fields with the nearest valid name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, data: dict[str, Any], where: str = "config") -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(f"{where}: {describe_validation_error(cls, error)}") from None


def describe_validation_error(cls: type[BaseModel], error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            field = str(item["loc"][-1])
            problems.append(f"unknown field {field!r}{suggest(field, list(cls.model_fields))}")
        else:
            problems.append(f"{location}: {item['msg']}")
    return "; ".join(problems)
