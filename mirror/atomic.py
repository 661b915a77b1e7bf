"""Crash-safe file writes: a unique temporary name, fsync, then rename into place.

A reader (or a crash) sees either the old file or the whole new one, never a
part of it; this is what the store's and the bundle writer's safety rest on.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)  # Linux only
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                 ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_BYTES = 32 << 20


class WritebackFile:
    """A file being written whose bytes the kernel starts putting on disk every
    WRITEBACK_BYTES (``sync_file_range``), while the writer goes on: the fsync that
    makes it durable then finds little left to do, and dirty pages do not pile up
    (docs/benchmarks.md has the measurements)."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.written, self.started = fh, 0, 0

    def write(self, data: Any) -> int:
        n = self.fh.write(data)
        self.written += n
        if self.written - self.started >= WRITEBACK_BYTES:
            self.fh.flush()
            if _sync_file_range is not None:  # only a hint: fsync reports any error
                _sync_file_range(self.fh.fileno(), self.started,
                                 self.written - self.started, SYNC_FILE_RANGE_WRITE)
            self.started = self.written
        return n

    def flush(self) -> None:
        self.fh.flush()

    def truncate(self, size: int) -> None:
        """Drop what was written after the first ``size`` bytes; go on writing there."""
        self.fh.flush()
        self.fh.truncate(size)
        self.fh.seek(size)
        self.written, self.started = size, min(self.started, size)

    def fileno(self) -> int:
        return self.fh.fileno()


@contextlib.contextmanager
def atomic_file(path: str, mode: int = 0o644) -> Iterator[WritebackFile]:
    """Yield a file to write; it appears at ``path`` (with ``mode``) only if the block
    completes. The store is shared, so files are readable by every user by default."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path) + ".")
    except OSError as e:  # named by the file asked for, not the temporary name tried
        raise OSError(e.errno, e.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield WritebackFile(fh)
            fh.flush()
            os.fchmod(fh.fileno(), mode)  # mkstemp makes 0600 files
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_file(path) as fh:
        fh.write(data)


def fsync_path(path: str) -> None:
    """fsync a file that is already closed (Linux allows it on a read-only descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap(a: str, b: str) -> None:
    """Exchange the names of directories ``a`` and ``b`` in one step
    (``renameat2(RENAME_EXCHANGE)``): readers never see ``b`` missing. Where the
    kernel or filesystem cannot exchange, three renames, which leave a short gap."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                     rename_exchange) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), b)
    aside = os.path.join(os.path.dirname(b), f".{os.path.basename(b)}.swap-{os.getpid()}")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


SYNC_THREADS = 8  # fsyncs in flight: a journaling filesystem commits them together
OTHERS_DIRTY_MAX = 64 << 20  # others' dirty bytes that one syncfs may wait for


def sync_files(path: str, files: list[str], size: int) -> None:
    """Make ``files`` (all on ``path``'s filesystem, ``size`` bytes in all) durable.

    One ``syncfs`` is the cheapest way for thousands of small files, but it waits for
    every dirty page of the filesystem, other programs' too: after another program
    wrote gigabytes, that wait is theirs. So ``syncfs`` only while the system holds
    little else that is dirty; otherwise each file is fsynced, several at once.
    """
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is not None and _dirty_bytes() - size <= OTHERS_DIRTY_MAX:
        fd = os.open(path, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    with ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="mirror-fsync") \
            as pool:
        list(pool.map(fsync_path, files))  # raises what an fsync raised


def _dirty_bytes() -> int:
    """Bytes the kernel holds dirty or under writeback, system-wide (0 if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return sum(int(fields[k].split()[0]) << 10 for k in ("Dirty", "Writeback"))
    except (OSError, KeyError, ValueError):
        return 0


def fsync_dir(path: str) -> None:
    """Make renames into ``path`` durable."""
    fsync_path(path)


def make_temp_dir(parent: str, prefix: str) -> str:
    """A new directory under ``parent`` to build in, readable by all once renamed."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o755)  # mkdtemp makes 0700 directories
    return path


def link_or_copy(src: str, dest: str) -> None:
    """Hard-link ``src`` to ``dest`` (a new name for the same read-only bytes), else copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o444)
