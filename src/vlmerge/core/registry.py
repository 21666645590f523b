"""A small name -> object registry, used for model sizes, merge methods, datasets and tasks."""

from collections.abc import Callable, Iterator
from difflib import get_close_matches
from typing import Generic, TypeVar

from vlmerge.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects registered by name; unknown names fail with the nearest valid one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def register_class(self, cls: T) -> T:
        """Class decorator: registers `cls` under its own `name` attribute, so the name is written once."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str):
            raise TypeError(f"{cls!r} has no `name` to be registered as a {self.kind} under")
        self.add(name, cls)
        return cls

    def add(self, name: str, obj: T) -> None:
        if name in self._entries:
            raise ConfigError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def remove(self, name: str) -> None:
        """Unregister `name` (tests that register their own entries clean up with this)."""
        self.get(name)  # unknown names fail as everywhere else
        del self._entries[name]

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}{suggest(name, self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


def suggest(name: str, valid: "Iterator[str] | dict | list") -> str:
    """A ' (did you mean X?; valid: ...)' suffix for error messages."""
    options = sorted(valid)
    close = get_close_matches(name, options, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (valid: {', '.join(options)})"
