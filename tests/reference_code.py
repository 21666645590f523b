"""The peers' own code where it installs (FusionBench, mergekit: `make` installs them with --no-deps).

Under CI a peer's absence is a failure, elsewhere a skip. FusionBench's files are loaded one by one by
path: `import fusion_bench` pulls in omegaconf and lightning at package level, which its pure-torch
functions never use, so the package modules a file imports are replaced by stubs while it loads.
"""

import importlib.util
import os
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import pytest

FUSION_BENCH = "fusion-bench==0.2.33"
# What FusionBench's SVD-family files import from the package (TSVM_utils.py, iso_utils.py).
SVD_STUBS = {
    "fusion_bench": {},
    "fusion_bench.utils": {"timeit_context": lambda *args, **kwargs: nullcontext()},
    "fusion_bench.utils.type": {"StateDictType": dict},
}


def missing(package: str):
    message = f"{package} is not installed (the Makefile installs it with --no-deps)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def stub_class(name: str) -> type:
    return type(name, (), {})


def load_by_path(package: str, relative: str, stubs: dict[str, dict]) -> types.ModuleType | None:
    """`relative` inside the installed `package`, run with `stubs` (module name -> attributes) standing in
    for the modules it imports; None where the package is not installed."""
    spec = importlib.util.find_spec(package)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    modules = {}
    for name, attributes in stubs.items():
        modules[name] = types.ModuleType(name)
        for attribute, value in attributes.items():
            setattr(modules[name], attribute, value)
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        path = Path(spec.submodule_search_locations[0]) / relative
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(path.stem, path))
        module.__spec__.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


def fusion_bench_module(relative: str, stubs: dict[str, dict] = SVD_STUBS) -> types.ModuleType:
    """One of FusionBench's files (skipped, or failed under CI, where it is not installed)."""
    module = load_by_path("fusion_bench", relative, stubs)
    if module is None:
        missing(FUSION_BENCH)
    return module
