"""Read released torch files that carry pickled config objects, without running code from them.

`torch.load(weights_only=True)` refuses the paper's Lightning `.ckpt` files (config objects such
as `vilt.moe.config.MOEConfig` in `hyper_parameters`), BEiT-3's argparse `args` and the paper's
`defaultdict` Gram files. This module lists a file's pickle globals before anything is unpickled
(`torch.serialization.get_unsafe_globals_in_checkpoint`, a static scan) and sorts each into:

- a container the weights need: `collections.defaultdict` becomes a plain `dict` (its default
  factory is dropped; the factories `builtins.list`, `int`, ... become inert markers that refuse
  to be called), `argparse.Namespace` is the real class (its unpickling only fills `__dict__`);
  `collections.OrderedDict` is allowed by torch already;
- an inert stand-in, for a name that looks like a class of a config module: every dotted part an
  identifier, the last one starting with an upper-case letter, the top-level module neither part
  of Python's standard library (`sys.stdlib_module_names`: builtins, os, posix, nt, subprocess,
  runpy, importlib, pickle, copyreg, functools, ...) nor in `DENIED_PACKAGES` (torch and numpy
  objects outside torch's own weights-only set would hide tensors; pickle helpers run code). The
  stand-in is a class made here and named after the global; it records the name and the
  arguments and state it was unpickled with and has no other behaviour. The module the file names
  is never imported;
- refused, everything else: functions, methods, builtins, any standard-library or system name.
  One `CheckpointError` names the first refused global, before the file is unpickled.

A Python 2 name is judged as the name plain `pickle.loads` maps it to (`_compat_pickle`): the file's
`commands.Popen` is `subprocess.Popen`, refused, not a stand-in for a config class `Popen`.

Why this runs no code from the file: torch's weights-only unpickler resolves a global only to an
object on its allow-list and calls (REDUCE), constructs (NEWOBJ: `cls.__new__`) or builds (BUILD:
`__setstate__`) only such objects. Here that list holds torch's own entries plus the objects made
above, whose calls store their arguments and nothing else.
"""

import _compat_pickle
import argparse
import re
import sys
import warnings
from collections.abc import Iterable
from typing import Any, BinaryIO

import torch

# Top-level modules never stood in, besides the standard library.
DENIED_PACKAGES = frozenset({"torch", "numpy", "dill", "cloudpickle", "joblib", "_pickle", "pickle"})
# `defaultdict` default factories read as inert markers (the factory is never called).
FACTORY_NAMES = frozenset(f"builtins.{name}" for name in ("list", "dict", "int", "float", "str", "tuple", "bool"))
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class RefusedGlobal(Exception):
    """A pickle global that could run code; `name` is the global as the file spells it."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} ({reason})")
        self.name = name
        self.reason = reason


class StandIn:
    """An inert stand-in for a pickled object of a class vlmerge does not import.

    `qualified_name` is the class the file names; `args` and `state` are what it was unpickled with."""

    qualified_name = "<stand-in>"

    def __new__(cls, *args: Any) -> "StandIn":
        instance = object.__new__(cls)
        instance.__dict__["args"] = args
        instance.__dict__["state"] = None
        return instance

    def __init__(self, *args: Any) -> None:  # REDUCE calls the class; the arguments are already stored
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __reduce_ex__(self, protocol: int):  # a stand-in is never written back as if it were the real class
        raise TypeError(f"a stand-in for {self.qualified_name} cannot be pickled")

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualified_name}>"


class InertMarker:
    """Where a file names a harmless builtin (a `defaultdict` factory): kept as a name, never called."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RefusedGlobal(self.name, "the file calls it; vlmerge calls nothing a file names")

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _plain_dict(*args: Any) -> dict:
    """`collections.defaultdict(factory)` read as a plain dict (the factory is dropped)."""
    return {}


def stand_in_class(name: str) -> type[StandIn]:
    """A fresh stand-in class for the global `name` (`module.Class`); the module is not imported."""
    module, _, qualname = name.rpartition(".")
    return type(qualname, (StandIn,), {"qualified_name": name, "__module__": f"vlmerge.stand_in.{module}"})


def classify(name: str) -> Any:
    """The object admitted for global `name`, or `RefusedGlobal` raised saying why not.

    A Python 2 name (`commands.Popen`) is judged as the name pickle maps it to (`subprocess.Popen`):
    what the file means, whatever it spells."""
    mapped = python3_names(name)
    for python3_name in mapped:
        try:
            admitted = _classify(python3_name)
        except RefusedGlobal as refused:
            raise RefusedGlobal(name, f"Python 2's name for {python3_name}; {refused.reason}") from None
        if isinstance(admitted, type) and issubclass(admitted, StandIn):  # pickle maps only standard-library names
            raise RefusedGlobal(
                name, f"Python 2's name for {python3_name}, of the standard library; not a config class"
            )
    return _classify(mapped[0] if mapped else name)


def python3_names(name: str) -> list[str]:
    """What pickle's Python 2 name mapping (`_compat_pickle`) makes of `module.attribute`, for every
    place the module may end (the file gives the two apart; a dotted name joins them)."""
    parts = name.split(".")
    names = []
    for split in range(1, len(parts)):
        module, attribute = ".".join(parts[:split]), ".".join(parts[split:])
        if (module, attribute) in _compat_pickle.NAME_MAPPING:
            names.append(".".join(_compat_pickle.NAME_MAPPING[module, attribute]))
        elif module in _compat_pickle.IMPORT_MAPPING:
            names.append(f"{_compat_pickle.IMPORT_MAPPING[module]}.{attribute}")
    return names


def _classify(name: str) -> Any:
    if name == "collections.defaultdict":
        return _plain_dict
    if name == "argparse.Namespace":
        return argparse.Namespace
    if name in FACTORY_NAMES:
        return InertMarker(name)
    parts = name.split(".")
    if len(parts) < 2 or not all(_IDENTIFIER.match(part) for part in parts):
        raise RefusedGlobal(name, "not a plain module.Class name")
    top = parts[0]
    if top in sys.stdlib_module_names or top in DENIED_PACKAGES:
        raise RefusedGlobal(name, f"{top} is a standard-library or system module; only config classes are stood in")
    if not parts[-1][0].isupper():
        raise RefusedGlobal(name, "a function or other callable, not a class")
    return stand_in_class(name)


def admitted_globals(names: Iterable[str]) -> list[tuple[Any, str]]:
    """`(object, name)` pairs for `torch.serialization.safe_globals`; `RefusedGlobal` for the first refused name."""
    return [(classify(name), name) for name in sorted(names)]


def unsafe_globals(handle: BinaryIO) -> list[str]:
    """The globals of a torch file that torch's weights-only unpickler does not allow (a static scan)."""
    handle.seek(0)
    names = torch.serialization.get_unsafe_globals_in_checkpoint(handle)
    handle.seek(0)
    return sorted(names)


def load_with_stand_ins(handle: BinaryIO, names: Iterable[str]) -> Any:
    """`torch.load(weights_only=True)` with `names` admitted as `classify` says (raises `RefusedGlobal` first)."""
    admitted = admitted_globals(names)
    handle.seek(0)
    with torch.serialization.safe_globals(admitted), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warnings of pickle protocols and storage types: not the user's
        return torch.load(handle, map_location="cpu", weights_only=True)


def is_stand_in(value: object) -> bool:
    return isinstance(value, StandIn)
