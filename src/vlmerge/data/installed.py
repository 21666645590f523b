"""Datasets that ship as Debian or PyPI packages: where their files are, and one error naming the package."""

from dataclasses import dataclass
from pathlib import Path

from vlmerge.core.errors import ConfigError
from vlmerge.data.emoji import assign_split

VAL_FRACTION = 0.1  # of a dataset's train files, carved out as val where the package ships no val split


@dataclass(frozen=True)
class Package:
    """The package that provides a dataset's files, and the command that installs it."""

    name: str
    manager: str  # "Debian" or "PyPI"
    install: str

    def missing(self, dataset: str, what: str, path_key: str | None = None) -> ConfigError:
        elsewhere = f" (or point data.paths.{path_key} at a copy)" if path_key else ""
        return ConfigError(f"dataset {dataset!r} needs the {self.manager} package {self.name} ({what}): "
                           f"{self.install}{elsewhere}")

    def require(self, dataset: str, path: Path, path_key: str | None = None) -> Path:
        """`path` when it exists, else an error naming the package, the command and the override."""
        if not path.exists():
            raise self.missing(dataset, f"{path} not found", path_key)
        return path


def debian(name: str) -> Package:
    return Package(name, "Debian", f"apt-get install {name}")


def train_or_val(key: str) -> str:
    """'train' or 'val' from a hash of `key` (e.g. the file's name), so it depends on neither order nor set."""
    return assign_split(key, (1 - VAL_FRACTION, VAL_FRACTION, 0.0))
