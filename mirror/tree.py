"""Snapshot trees on disk: written from blobs (install, seeding) or from bytes in
memory (tracing), and walked back (verify).

One place decides how each git mode lands on disk: a symlink is made from its
target (its content), an executable is a read-only copy with the execute bits
(a hard link would share the blob's mode), any other file a hard link to its
blob where the filesystem allows.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Iterable, Iterator

from .atomic import link_or_copy
from .model import MODE_EXEC, MODE_LINK, FileEntry


def materialize(root: str, files: Iterable[FileEntry], blob: Callable[[str], str]) -> None:
    """Write ``files`` below ``root``, each from the blob file ``blob(sha256)``.

    The caller has verified every blob, and the manifest's symlinks (checked when
    the bundle was read) stay inside the snapshot.
    """
    for f in files:
        dest = os.path.join(root, f.path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        src = blob(f.sha256)
        if f.mode == MODE_LINK:
            with open(src, "rb") as fh:
                os.symlink(fh.read().decode("utf-8", "surrogateescape"), dest)
        elif f.mode == MODE_EXEC:
            shutil.copyfile(src, dest)
            os.chmod(dest, 0o555)
        else:
            link_or_copy(src, dest)


def write_bytes(root: str, files: Iterable[tuple]) -> None:
    """Write ``(path, mode, data)`` files below ``root`` (a scratch tree: writable)."""
    for path, mode, data in files:
        dest = os.path.join(root, path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if mode == MODE_LINK:
            os.symlink(data.decode("utf-8", "surrogateescape"), dest)
        else:
            with open(dest, "wb") as fh:
                fh.write(data)


def walk(root: str) -> Iterator[str]:
    """Every file and symlink below ``root``, as relative POSIX paths."""
    for dirpath, dirnames, filenames in os.walk(root):
        # os.walk lists a symlink to a directory among the directories.
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            yield os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
