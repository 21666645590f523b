"""Write-then-rename, so a crash never leaves a half-written artifact at the destination.

The temporary (`.NAME.RANDOM.tmp` beside the destination) is created with mode 0o666, so the
file gets the process umask like any other (mkstemp's 0o600 would not). Every OS error of the
write (no such directory, no permission, disk full, a directory in the way, an empty path) is
one `OutputError` naming the destination, and the temporary is removed. `check_output_path`
refuses, before any work is done, an output that could not be written or would overwrite an input.
"""

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlmerge.core.errors import ConfigError, OutputError

_NAME_TRIES = 100


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; rename it into place only on success."""
    destination = _file_name(destination, OutputError)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(destination)
    except OSError as error:
        raise OutputError(f"{destination}: cannot create the file ({_reason(error)})") from None
    try:
        try:
            yield tmp
        except OutputError:  # a nested write's own, already named
            raise
        except OSError as error:
            if error.filename is not None and Path(error.filename) != tmp:
                raise  # about another file (an input read while writing): not ours to rename
            raise OutputError(f"{destination}: cannot write ({_reason(error)})") from None
        try:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, destination)
        except OSError as error:
            raise OutputError(f"{destination}: cannot write ({_reason(error)})") from None
        _fsync_directory(destination.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse, before any work, an output path that cannot be written or would overwrite an input.

    Checks: not empty, not an existing directory, its directory (or, where that is still to be
    created, the nearest existing one) is a writable directory, and it is none of `inputs` (same
    resolved path, or the same file through another link). `None` inputs are skipped. Returns the path."""
    out = _file_name(path, ConfigError)
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:  # atomic_path creates missing directories
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{out}: the directory {parent} is not writable")
    if out.exists() and not out.is_file():
        raise ConfigError(f"{out}: exists and is not a regular file")
    for source in inputs:
        if source is not None and _same_file(out, Path(source)):
            raise ConfigError(f"{out}: is the input {source}; writing it would overwrite that input")
    return out


def _file_name(path: str | os.PathLike, error: type[Exception]) -> Path:
    text = os.fspath(path)
    if not text:
        raise error("the output path is empty; give a file name")
    result = Path(text)
    if text.endswith(("/", os.sep)) or result.name in ("", ".", "..") or result.is_dir():
        raise error(f"{text}: is a directory; give the output a file name")
    return result


def _same_file(out: Path, source: Path) -> bool:
    if out.resolve() == source.resolve():
        return True
    try:
        return os.path.samefile(out, source)  # hard links: the same (st_dev, st_ino)
    except OSError:  # one of them does not exist
        return False


def _create_temporary(destination: Path) -> Path:
    for _ in range(_NAME_TRIES):
        tmp = destination.parent / f".{destination.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {destination} after {_NAME_TRIES} tries")


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; skipped where directories cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__
