"""Strict config objects: validated once at the edge, unknown fields named with a suggestion."""

import math
from types import UnionType
from typing import Annotated, Any, Self, Union, get_args, get_origin

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from vlmerge.core.errors import ConfigError
from vlmerge.core.registry import suggest


def _a_finite_number(value: Any) -> Any:
    """YAML's `true` is not 1.0 and `.inf` / `.nan` are no learning rate: refused before pydantic's
    float conversion (which takes both); ints and numeric strings still convert as usual."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return value


FiniteFloat = Annotated[float, BeforeValidator(_a_finite_number), AllowInfNan(False)]
"""A config float: finite, and not a bool (YAML ints are accepted)."""


class StrictConfig(BaseModel):
    """A frozen pydantic model that rejects unknown fields with the nearest valid name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's `true` is no step count: pydantic's lax ints would take it as 1."""
        if isinstance(value, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value

    @classmethod
    def parse(cls, data: dict[str, Any], where: str = "config") -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(f"{where}: {describe_validation_error(cls, error)}") from None


def _numeric(annotation: Any) -> bool:
    """An int or float field (also optional), where a bool cannot be meant."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return any(option in (int, float) for option in options) and bool not in options


def describe_validation_error(cls: type[BaseModel], error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            field = str(item["loc"][-1])
            valid = list(_model_at(cls, item["loc"][:-1]).model_fields)
            problems.append(f"unknown field {location!r}{suggest(field, valid)}")
        else:
            message = item["msg"].removeprefix("Value error, ")  # a validator's own words need no prefix
            problems.append(f"{location}: {message}" if location else message)
    return "; ".join(problems)


def _model_at(cls: type[BaseModel], path: tuple) -> type[BaseModel]:
    """The (nested) config class that owns the fields at `path`, for suggestions; the path may run
    through list items and dict values (`merges.0.optoins` is a field of the merge spec)."""
    annotation: Any = cls
    for part in path:
        if _is_config(annotation):
            field = annotation.model_fields.get(str(part))
            annotation = field.annotation if field else None
        else:  # a list index or dict key: the container's element type
            annotation = get_args(annotation)[-1] if get_args(annotation) else None
        options = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType) and len(options) == 1:  # X | None
            annotation = options[0]
    return annotation if _is_config(annotation) else cls


def _is_config(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
