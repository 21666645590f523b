"""A walk over a pickle's opcodes, before `torch.load` unpickles it, for what would crash or flood it.

torch's weights-only unpickler builds whatever the stream says. Some of that is harmful before any
code of the file could run: a dict key that is a tuple nested 10^6 deep crashes CPython when the
key is hashed (tuple hashing recurses without a depth check); a string or storage length past the
end of the data makes it allocate that much. This module mirrors the unpickler's stack over the
opcodes it reads (torch's subset of protocol 2; anything else is refused here, by name, instead
of failing inside torch), holding no object the file describes: atoms as values, every container
or object as a `_Node` that knows how deeply it nests. It refuses:

- nesting deeper than `MAX_DEPTH` (state dicts, optimizer states and config objects are a few
  levels deep), a containment cycle included, counted through containers filled after they were
  nested;
- dict keys that are lists, dicts or sets;
- strings, lines and memo entries that do not fit the data;
- persistent ids other than torch's storage records, each with its key and size in bytes
  (`ScanResult.storages`), which the caller checks against the file;
- torch's rebuild functions of tensors that are not dense (sparse, quantized, meta, nested,
  subclass wrappers, device copies): vlmerge merges dense CPU tensors only.
"""

import pickle
import pickletools
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import BinaryIO

import torch

MAX_DEPTH = 100  # the released layouts nest 6 levels, a Lightning file with optimizer states about 10
MAX_LINE_BYTES = 1024  # a GLOBAL's module or name
MAX_DEEPENING_STEPS = 200_000  # updates through containers filled after they were nested
NOT_DENSE = {
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch._utils._rebuild_qtensor": "a quantized tensor",
    "torch._utils._rebuild_meta_tensor_no_storage": "a meta tensor (a shape without data)",
    "torch._utils._rebuild_nested_tensor": "a nested tensor",
    "torch._utils._rebuild_wrapper_subclass": "a tensor subclass",
    "torch._utils._rebuild_device_tensor_from_numpy": "a tensor of another device",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": "a tensor of another device",
}


class PickleRefused(Exception):
    """Why a pickle is not handed to `torch.load`; the caller names the file."""


@dataclass
class ScanResult:
    """What a scanned pickle asks torch to load: storage key -> its size in bytes (the largest asked)."""

    storages: dict[str, int] = field(default_factory=dict)
    protocol: int = 0


class _Node:
    """A container or object the pickle builds; `depth` counts the levels of nesting under it."""

    __slots__ = ("kind", "depth", "parents", "items", "name")

    def __init__(self, kind: str, depth: int = 1, items: tuple = (), name: str = "") -> None:
        self.kind = kind  # tuple, list, dict, set, object, global, storage
        self.depth = depth
        self.parents: list[_Node] = []
        self.items = items  # a tuple's items, kept to read persistent ids
        self.name = name  # a global's dotted name


def _depth(value: object) -> int:
    return value.depth if type(value) is _Node else 0


_FIXED = ("global",)  # classes and functions: never filled, so nothing records what holds them
_FILLED = ("list", "dict", "set", "object", "storage")  # what APPEND, SETITEM and BUILD may fill


@lru_cache(maxsize=1)
def storage_itemsizes() -> dict[str, int]:
    """Bytes per element of each storage class a torch file may name (`torch.FloatStorage`: 4)."""
    sizes = {"torch.storage.UntypedStorage": 1, "torch.UntypedStorage": 1}
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        sizes[f"torch.{name}"] = torch._utils._element_size(dtype)
    return sizes


class _Scan:
    """One pickle's opcodes from `source`, of which `size` bytes remain to be read."""

    def __init__(self, source: BinaryIO, size: int, result: ScanResult) -> None:
        self.source, self.result = source, result
        self.end = source.tell() + size
        self.stack: list = []
        self.marks: list[list] = []
        self.memo: dict[int, object] = {}
        self.deepening_left = MAX_DEEPENING_STEPS

    def fixed(self, count: int) -> bytes:
        """An opcode's argument of a fixed, small size."""
        data = self.source.read(count)
        if len(data) != count:
            raise PickleRefused("the pickle ends early")
        return data

    def read(self, count: int) -> bytes:
        """A length the file gives: checked against what remains before anything is read."""
        left = self.end - self.source.tell()
        if count > left:
            raise PickleRefused(f"the pickle asks for {count} bytes where {left} remain")
        return self.fixed(count)

    def line(self) -> str:
        data = self.source.readline(max(0, min(MAX_LINE_BYTES, self.end - self.source.tell())))
        if not data.endswith(b"\n"):
            raise PickleRefused(f"a global name longer than {MAX_LINE_BYTES} bytes, or none")
        return data[:-1].decode("utf-8", "replace")

    def pop(self) -> object:
        if not self.stack:
            raise PickleRefused("the pickle pops an empty stack (malformed)")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise PickleRefused("the pickle closes a mark it never opened (malformed)")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def top(self) -> object:
        if not self.stack:
            raise PickleRefused("the pickle reads an empty stack (malformed)")
        return self.stack[-1]

    def run(self) -> object:
        """Walk to STOP; the value the pickle returns."""
        read, handlers = self.source.read, _HANDLERS
        while True:
            code = read(1)
            handler = handlers.get(code)
            if handler is None:
                raise PickleRefused(_unsupported(code, self.result.protocol))
            if handler is _stop:
                return self.pop()
            handler(self)

    def new(self, kind: str, children: tuple, items: tuple = ()) -> _Node:
        """A node holding `children`, one level above the deepest of them."""
        node = _Node(kind, 1, items)
        for child in children:
            if type(child) is _Node:
                if child.depth >= node.depth:
                    node.depth = child.depth + 1
                if child.kind not in _FIXED:
                    child.parents.append(node)
        self.check_depth(node.depth)
        return node

    def attach(self, child: object, parent: object) -> None:
        """`child` put into `parent` (APPEND, SETITEM, BUILD): the parent, and what holds it, deepen."""
        if type(parent) is not _Node or parent.kind not in _FILLED:
            raise PickleRefused("the pickle fills a value that is not a container (malformed)")
        if type(child) is _Node and child.kind not in _FIXED:
            child.parents.append(parent)
        work = [(parent, _depth(child) + 1)]
        while work:
            node, depth = work.pop()
            if depth <= node.depth:
                continue
            self.check_depth(depth)
            node.depth = depth
            self.deepening_left -= len(node.parents)  # the pickler fills a container before it nests it
            if self.deepening_left < 0:
                raise PickleRefused("its containers are filled after they were nested, over and over")
            work.extend((holder, depth + 1) for holder in node.parents)

    def check_depth(self, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise PickleRefused(f"values nested more than {MAX_DEPTH} levels deep, or holding themselves")

    def set_items(self, pairs: list) -> None:
        if len(pairs) % 2:
            raise PickleRefused("a dict item without a value (malformed)")
        target = self.top()
        for index in range(0, len(pairs), 2):
            key = pairs[index]
            if isinstance(key, _Node) and key.kind in ("list", "dict", "set"):
                raise PickleRefused(f"a dict key that is a {key.kind}")
            self.attach(key, target)
            self.attach(pairs[index + 1], target)

    def storage(self, pid: object) -> _Node:
        """A persistent id: torch's `('storage', storage class, key, location, numel[, view])`."""
        items = pid.items if isinstance(pid, _Node) and pid.kind == "tuple" else ()
        if len(items) not in (5, 6) or items[0] not in ("storage", b"storage"):
            raise PickleRefused("a persistent id that is not a torch storage")
        storage_class, key, numel = items[1], items[2], items[4]
        itemsize = storage_itemsizes().get(storage_class.name if isinstance(storage_class, _Node) else "")
        if itemsize is None or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise PickleRefused("a storage record without a known storage class, a key and a size")
        storages = self.result.storages
        storages[key] = max(storages.get(key, 0), numel * itemsize)
        return _Node("storage")


def _unsupported(code: bytes, protocol: int) -> str:
    if not code:
        return "the pickle ends before its STOP"
    try:
        name = pickletools.code2op[code.decode("latin-1")].name
    except KeyError:
        return f"byte {code!r} where a pickle opcode belongs (not a pickle, or a corrupt one)"
    return (
        f"it uses the pickle opcode {name} (pickle protocol {protocol}), which torch.load(weights_only=True) "
        "does not read; re-save it with torch.save's default pickle protocol or as safetensors"
    )


def _global(scan: _Scan) -> None:
    name = f"{scan.line()}.{scan.line()}"
    if name in NOT_DENSE:
        raise PickleRefused(f"it holds {NOT_DENSE[name]}; vlmerge reads dense tensors only")
    scan.stack.append(_Node("global", 0, name=name))


def _reduce(scan: _Scan) -> None:  # REDUCE and NEWOBJ: a call's result is an object made of its arguments
    args = scan.pop()
    scan.stack.append(scan.new("object", (scan.pop(), args)))


def _build(scan: _Scan) -> None:
    state = scan.pop()
    scan.attach(state, scan.top())


def _append(scan: _Scan) -> None:
    item = scan.pop()
    scan.attach(item, scan.top())


def _appends(scan: _Scan) -> None:
    items = scan.pop_mark()
    target = scan.top()
    for item in items:
        scan.attach(item, target)


def _setitem(scan: _Scan) -> None:
    value = scan.pop()
    key = scan.pop()
    scan.set_items([key, value])


def _setitems(scan: _Scan) -> None:
    scan.set_items(scan.pop_mark())


def _mark(scan: _Scan) -> None:
    scan.marks.append(scan.stack)
    scan.stack = []


def _tuple_of(count: int):
    def build(scan: _Scan) -> None:
        items = tuple(scan.stack[-count:]) if count else ()
        if len(items) != count:
            raise PickleRefused("the pickle pops an empty stack (malformed)")
        del scan.stack[len(scan.stack) - count :]
        scan.stack.append(scan.new("tuple", items, items))

    return build


def _tuple(scan: _Scan) -> None:
    items = tuple(scan.pop_mark())
    scan.stack.append(scan.new("tuple", items, items))


def _constant(value: object):
    def push(scan: _Scan) -> None:
        scan.stack.append(value)

    return push


def _empty(kind: str):
    def push(scan: _Scan) -> None:
        scan.stack.append(_Node(kind))

    return push


def _unpacked(layout: str):
    size = struct.calcsize(layout)

    def push(scan: _Scan) -> None:
        scan.stack.append(struct.unpack(layout, scan.fixed(size))[0])

    return push


def _binunicode(scan: _Scan) -> None:
    (length,) = struct.unpack("<I", scan.fixed(4))
    scan.stack.append(scan.read(length).decode("utf-8", "surrogatepass"))


def _short_binstring(scan: _Scan) -> None:
    scan.stack.append(scan.read(scan.fixed(1)[0]).decode("latin-1"))


def _long1(scan: _Scan) -> None:
    scan.stack.append(pickle.decode_long(scan.read(scan.fixed(1)[0])))


def _binpersid(scan: _Scan) -> None:
    scan.stack.append(scan.storage(scan.pop()))


def _get(layout: str):
    size = struct.calcsize(layout)

    def push(scan: _Scan) -> None:
        (index,) = struct.unpack(layout, scan.fixed(size))
        if index not in scan.memo:
            raise PickleRefused(f"the pickle reads memo entry {index}, which it never wrote (malformed)")
        scan.stack.append(scan.memo[index])

    return push


def _put(layout: str):
    size = struct.calcsize(layout)

    def store(scan: _Scan) -> None:
        (index,) = struct.unpack(layout, scan.fixed(size))
        scan.memo[index] = scan.top()

    return store


def _proto(scan: _Scan) -> None:
    scan.result.protocol = scan.fixed(1)[0]


def _stop(scan: _Scan) -> None:  # handled in `_Scan.run`
    pass


# The opcodes torch's weights-only unpickler reads, and nothing more.
_HANDLERS = {
    pickle.GLOBAL: _global,
    pickle.NEWOBJ: _reduce,
    pickle.REDUCE: _reduce,
    pickle.BUILD: _build,
    pickle.APPEND: _append,
    pickle.APPENDS: _appends,
    pickle.SETITEM: _setitem,
    pickle.SETITEMS: _setitems,
    pickle.MARK: _mark,
    pickle.TUPLE: _tuple,
    pickle.TUPLE1: _tuple_of(1),
    pickle.TUPLE2: _tuple_of(2),
    pickle.TUPLE3: _tuple_of(3),
    pickle.NONE: _constant(None),
    pickle.NEWFALSE: _constant(False),
    pickle.NEWTRUE: _constant(True),
    pickle.EMPTY_TUPLE: _tuple_of(0),
    pickle.EMPTY_LIST: _empty("list"),
    pickle.EMPTY_DICT: _empty("dict"),
    pickle.EMPTY_SET: _empty("set"),
    pickle.BININT: _unpacked("<i"),
    pickle.BININT1: _unpacked("<B"),
    pickle.BININT2: _unpacked("<H"),
    pickle.BINFLOAT: _unpacked(">d"),
    pickle.BINUNICODE: _binunicode,
    pickle.SHORT_BINSTRING: _short_binstring,
    pickle.BINPERSID: _binpersid,
    pickle.BINGET: _get("<B"),
    pickle.LONG_BINGET: _get("<I"),
    pickle.BINPUT: _put("<B"),
    pickle.LONG_BINPUT: _put("<I"),
    pickle.LONG1: _long1,
    pickle.PROTO: _proto,
    pickle.STOP: _stop,
}


def scan_pickle(source: BinaryIO, size: int, result: ScanResult) -> object:
    """Walk one pickle from `source` (at most `size` bytes, read up to its STOP), gathering its storages
    into `result`; `PickleRefused` says what makes it unsafe to unpickle. Returns the pickle's value
    where it is an atom (an int, a string), else a stand-in that holds none of its content."""
    try:
        return _Scan(source, size, result).run()
    except UnicodeDecodeError:
        raise PickleRefused("a string that is not UTF-8") from None
