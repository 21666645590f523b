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
            valid = list(_model_at(cls, item["loc"][:-1]).model_fields)
            problems.append(f"unknown field {location!r}{suggest(field, valid)}")
        else:
            problems.append(f"{location}: {item['msg']}")
    return "; ".join(problems)


def _model_at(cls: type[BaseModel], path: tuple) -> type[BaseModel]:
    """The (nested) config class that owns the fields at `path`, for suggestions."""
    for part in path:
        field = cls.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return cls
        cls = annotation
    return cls
