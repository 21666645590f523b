"""The layering as a checked contract: imports inside `vlmerge` point one way, from a layer to the
layers below it, and never between siblings of one layer.

Every module under src/vlmerge is parsed with `ast` (nothing is imported), and every `import` and
`from ... import` in it counts: module level, inside functions, under `if TYPE_CHECKING`.
A module belongs to its top-level package (`vlmerge.merging.plan` -> `merging`); the loose
top-level modules are placed at the lowest layer above everything they import.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmerge"

# Lowest first. A unit may import any unit of a lower layer; units of one layer are independent.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("vlmerge",),  # the root package: `__version__` and re-exports of core
    ("io",),
    ("models",),
    # export (`vlmerge export-hf`) reads checkpoints into models and writes them in other libraries' formats.
    ("merging", "metrics", "export"),
    ("data",),
    ("training",),
    ("tasks",),
    # tuning (`vlmerge tune`, `vlmerge adamerge`) merges in memory and scores with tasks and training.
    ("tuning",),
    # the study plans and runs every stage, learnt merge coefficients included.
    ("study",),
    ("cli",),
    ("__main__",),
)

# Imports the contract does not want, each listed with why it is still there (importer, imported).
ALLOWED: dict[tuple[str, str], str] = {
    # metrics/distances.py uses merging.methods.trim_to_top_k (TSSD trims as TIES does) and
    # metrics/mergeability.py uses merging.plan (which tensors are merged, and from which experts).
    # The plan and the top-k trim would belong below both siblings (e.g. in models or a shared module).
    ("metrics", "merging"): "metrics/distances.py, metrics/mergeability.py use merging's plan and top-k trim",
}

UNITS = {unit: depth for depth, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """`vlmerge.merging.plan` -> `merging`; `vlmerge` -> `vlmerge`; `vlmerge.tuning` -> `tuning`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = SRC) -> list[tuple[str, int]]:
    """Every vlmerge module `path` imports, with its line, at any depth of the file."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "vlmerge":  # `from vlmerge import tuning` imports the module, else the root package
                found += [
                    (f"vlmerge.{alias.name}" if alias.name in UNITS else "vlmerge", node.lineno) for alias in node.names
                ]
            else:
                found.append((target, node.lineno))
    return [(name, line) for name, line in found if name == "vlmerge" or name.startswith("vlmerge.")]


def import_edges() -> list[tuple[str, str, str]]:
    """(importer unit, imported unit, where) for every import that crosses units."""
    edges = []
    for path in sorted(SRC.rglob("*.py")):
        importer = unit_of(module_name(path))
        for target, line in imported_modules(path):
            imported = unit_of(target)
            if imported != importer:
                edges.append((importer, imported, f"{path.relative_to(SRC)}:{line} imports {target}"))
    return edges


def test_every_module_is_in_a_layer():
    units = {unit_of(module_name(path)) for path in SRC.rglob("*.py")}
    assert sorted(units - set(UNITS)) == [], "place the new top-level package or module in LAYERS"


def test_imports_point_down_the_layers():
    wrong = [
        f"{where} ({importer} is {'below' if UNITS[importer] < UNITS[imported] else 'beside'} {imported})"
        for importer, imported, where in import_edges()
        if UNITS[importer] <= UNITS[imported] and (importer, imported) not in ALLOWED
    ]
    assert wrong == [], "imports against the layering:\n" + "\n".join(wrong)


def test_allowed_exceptions_are_still_needed():
    """An exception whose import is gone is removed from ALLOWED, so the contract stays exact."""
    crossing = {(importer, imported) for importer, imported, _ in import_edges()}
    assert sorted(set(ALLOWED) - crossing) == []


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {unit: set() for unit in UNITS}
    for importer, imported, _ in import_edges():
        graph[importer].add(imported)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for nxt in sorted(graph[unit]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The parser itself: an import inside a function and relative imports are found."""
    package = tmp_path / "vlmerge" / "models"
    package.mkdir(parents=True)
    (package / "late.py").write_text(
        "def f():\n    from vlmerge.merging import plan\n\nfrom ..study import recipe\nfrom . import layers\n"
    )
    found = {name for name, _ in imported_modules(package / "late.py", root=tmp_path / "vlmerge")}
    assert found == {"vlmerge.merging", "vlmerge.study", "vlmerge.models"}
