"""An input file opened once: every read, and its hash, come from that one open file.

A training run writes its next checkpoint by renaming a new file over the old path. A reader
that reopened the path for each tensor would then mix tensors of two files, and a hash taken
of the path would describe neither. Here the file is opened once; reads go by offset
(`os.preadv`, so threads may read and hash it at once), the hash is of the same open file, and
`check_unchanged` tells whether the path still names the file that was opened.

The handle is a raw descriptor closed by `close()`, on leaving a `with` block, or when the
object is collected (a finalizer, so no ResourceWarning for readers kept alive to the end).
"""

import hashlib
import os
import stat
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

from vlmerge.core.errors import CheckpointError

HASH_CHUNK_BYTES = 1 << 20  # read and hashed while it is still in the CPU's cache


class FileIdentity(NamedTuple):
    """What names one version of a file: replaced or rewritten, one of these changes."""

    st_dev: int
    st_ino: int
    st_size: int
    st_mtime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> "FileIdentity":
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


class InputFile:
    """A regular file opened for reading by offset; `sha256()` hashes the open file, not the path."""

    def __init__(self, path: str | os.PathLike, *, fd: int | None = None) -> None:
        """Open `path`; given `fd`, a descriptor already open on it, use a duplicate of that instead."""
        self.path = Path(path)
        try:
            if fd is not None:
                fd = os.dup(fd)
            else:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as error:
            raise CheckpointError(f"{self.path}: cannot open ({error.strerror or error})") from None
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)
        self._lock = threading.Lock()  # only for the seek-and-read fallback where os.pread is absent
        self._sha256: str | None = None
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            self.close()
            raise CheckpointError(f"{self.path}: not a regular file")
        self.identity = FileIdentity.of(status)

    @property
    def size(self) -> int:
        return self.identity.st_size

    @property
    def closed(self) -> bool:
        return not self._close.alive

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "InputFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def fileno(self) -> int:
        if self.closed:
            raise CheckpointError(f"{self.path}: read after the file was closed")
        return self._fd

    def readinto(self, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the bytes at `offset`; a file that ends first is a named error."""
        fd, filled = self.fileno(), 0
        while filled < len(buffer):
            count = self._pread(fd, buffer[filled:], offset + filled)
            if not count:
                raise CheckpointError(
                    f"{self.path}: truncated: ends before byte {offset + len(buffer)} ({offset + filled} read)"
                )
            filled += count

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(offset, memoryview(buffer))
        return bytes(buffer)

    def sha256(self) -> str:
        """SHA-256 of the open file's bytes (computed once); an error if it was rewritten meanwhile."""
        if self._sha256 is None:
            fd, digest, offset = self.fileno(), hashlib.sha256(), 0
            chunk = memoryview(bytearray(HASH_CHUNK_BYTES))
            while count := self._pread(fd, chunk, offset):
                digest.update(chunk[:count])
                offset += count
            self._check_not_rewritten()
            self._sha256 = digest.hexdigest()
        return self._sha256

    def check_unchanged(self) -> None:
        """Raise if the path now names another file, or the open file was rewritten in place."""
        try:
            now = FileIdentity.of(os.stat(self.path))
        except OSError as error:
            raise CheckpointError(
                f"{self.path}: removed or renamed while it was being read ({error.strerror or error})"
            ) from None
        if (now.st_dev, now.st_ino) != (self.identity.st_dev, self.identity.st_ino):
            raise CheckpointError(
                f"{self.path}: replaced by another file while it was being read; "
                "what was read comes from the file opened before, not from the new one"
            )
        self._check_not_rewritten(now)

    def _check_not_rewritten(self, now: FileIdentity | None = None) -> None:
        now = now or FileIdentity.of(os.fstat(self.fileno()))
        if (now.st_size, now.st_mtime_ns) != (self.identity.st_size, self.identity.st_mtime_ns):
            raise CheckpointError(
                f"{self.path}: modified while it was being read ({self.identity.st_size} -> {now.st_size} bytes); "
                "write checkpoints to a new file and rename it into place"
            )

    def _pread(self, fd: int, buffer: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(fd, [buffer], offset)
        if hasattr(os, "pread"):
            data = os.pread(fd, len(buffer), offset)
        else:
            with self._lock:
                os.lseek(fd, offset, os.SEEK_SET)
                data = os.read(fd, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def __repr__(self) -> str:
        return f"InputFile({str(self.path)!r}{', closed' if self.closed else ''})"
