"""Write-then-rename, so a crash never leaves a half-written artifact at the destination.

The temporary, `.NAME.PID-RANDOM.tmp` beside the destination, names its owner process, so a later
run can tell one a killed process left behind (`remove_stale_temporaries`) from one still being
written. Files are created with mode 0o666, so they get the process umask like any other (mkstemp's
0o600 would not). Every OS error of the write (no such directory, no permission, disk full, a
directory in the way, an empty path) is one `OutputError` naming the destination, and the temporary
is removed, with any directory the write created that is still empty. A destination's directory is
resolved before it is created, so `a/sub/../x` is `a/x` and never creates `a/sub/`.
`check_output_path` refuses, before any work is done, an output that could not be written or would
overwrite an input.
"""

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlmerge.core.errors import ConfigError, OutputError

_NAME_TRIES = 100


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; rename it into place only on success."""
    destination = _file_name(destination, OutputError)
    location = write_location(destination)
    created = []
    try:
        created = make_directories(location.parent)
        tmp = _create_temporary(location)
    except OSError as error:
        remove_empty(created)
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
            os.replace(tmp, location)
        except OSError as error:
            raise OutputError(f"{destination}: cannot write ({_reason(error)})") from None
        _fsync_directory(location.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        remove_empty(created)


@contextlib.contextmanager
def atomic_folder(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `destination`, renamed into place only when the body succeeds
    (its files fsynced first); an empty folder in the way is replaced. Any OS error is one
    `OutputError` and the temporary goes. Its files get the process umask, like any file the process
    creates, whatever mode their writer chose (transformers writes 0o600)."""
    destination = Path(destination)
    location = write_location(destination)
    with scratch_folder(destination) as tmp:
        try:
            yield tmp
            mode = 0o666 & ~_umask()
            for file in tmp.iterdir():
                file.chmod(mode)
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
            os.replace(tmp, location)
        except OutputError:
            raise
        except OSError as error:
            raise OutputError(f"{destination}: cannot write ({_reason(error)})") from None
        _fsync_directory(location.parent)


@contextlib.contextmanager
def scratch_folder(destination: str | os.PathLike) -> Iterator[Path]:
    """A private temporary folder beside `destination`, removed when the body ends, however it ends.

    Beside the output rather than in the system's temporary directory, so that the folder a
    SIGKILL leaves is found and removed by the next run writing that output."""
    destination = Path(destination)
    location = write_location(destination)
    created = []
    try:
        created = make_directories(location.parent)
        tmp = _create_temporary(location, folder=True)
    except OSError as error:
        remove_empty(created)
        raise OutputError(f"{destination}: cannot create a temporary folder ({_reason(error)})") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)


def remove_stale_temporaries(destination: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (files or folders) of `destination` whose owner process no longer runs:
    what a killed run left. Those of running processes, this one included, are left alone."""
    location = write_location(Path(destination))
    pattern = re.compile(re.escape(f".{location.name}.") + r"([0-9]+)-[0-9a-f]{8}\.tmp")
    try:
        entries = list(os.scandir(location.parent))
    except OSError:  # no directory yet: nothing left behind
        return []
    removed = []
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is not None and not _running(int(found[1])):
            _remove(Path(entry.path), entry.is_dir(follow_symlinks=False))
            removed.append(Path(entry.path))
    return removed


def write_location(destination: Path) -> Path:
    """Where a write to `destination` goes: its directory resolved (links and `..`), its name kept,
    so `a/sub/../x` is `a/x` (`mkdir -p a/sub/..` would create `a/sub`) and a link named as the
    destination is replaced, not written through."""
    return Path(os.path.realpath(destination.parent)) / destination.name


def make_directories(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; return those created, outermost first."""
    missing = []
    while not directory.is_dir() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    created = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    raise
                continue
            created.append(folder)
    except OSError:
        remove_empty(created)
        raise
    return created


def remove_empty(created: list[Path]) -> None:
    """Remove directories a write created that are still empty, innermost first: a failed write leaves nothing."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse, before any work, an output path that cannot be written or would overwrite an input.

    Checks: not empty, not an existing directory, its directory (or, where that is still to be
    created, the nearest existing one) is a writable directory, and it is none of `inputs` (same
    resolved path, or the same file through another link). `None` inputs are skipped. Returns the path."""
    out = _file_name(path, ConfigError)
    location = write_location(out)
    parent = nearest_directory(location.parent)
    if not parent.is_dir():
        raise ConfigError(f"{out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{out}: the directory {parent} is not writable")
    if location.exists() and not location.is_file():
        raise ConfigError(f"{out}: exists and is not a regular file")
    for source in inputs:
        if source is not None and _same_file(location, Path(source)):
            raise ConfigError(f"{out}: is the input {source}; writing it would overwrite that input")
    return out


def nearest_directory(directory: Path) -> Path:
    """`directory`, or its nearest parent that exists: where a write would create the missing ones."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory


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


def _create_temporary(location: Path, folder: bool = False) -> Path:
    for _ in range(_NAME_TRIES):
        tmp = location.parent / f".{location.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            if folder:
                tmp.mkdir(0o777)  # the process umask applies, as to any folder
            else:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
                os.close(fd)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {location} after {_NAME_TRIES} tries")


def _running(pid: int) -> bool:
    """Whether process `pid` still runs; where that cannot be asked safely, assume it does."""
    if pid == os.getpid() or os.name != "posix":  # on Windows, os.kill(pid, 0) would terminate it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it runs
        return True
    return True


def _remove(path: Path, is_folder: bool) -> None:
    with contextlib.suppress(OSError):
        if is_folder:
            shutil.rmtree(path)
        else:
            path.unlink()


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; skipped where directories cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    current = os.umask(0o022)  # the only portable read of the umask is a set and a reset
    os.umask(current)
    return current


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__
