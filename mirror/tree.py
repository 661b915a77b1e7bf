"""Snapshot trees on disk: written from blobs (install, seeding) or from bytes in
memory (tracing), and walked back (verify).

One place decides how each git mode lands on disk: a symlink is made from its
target (its content), an executable is a read-only copy with the execute bits
(a hard link would share the blob's mode), any other file a hard link to its
blob where the filesystem allows.

Each file is written only where the kernel resolves its folder inside the tree
being written, and only where nothing is yet: on a case- or normalization-
insensitive filesystem, ``m/f`` may be below a link ``M`` and ``readme`` may be
``README``. :mod:`mirror.links` refuses a snapshot where that could lead out; this
is the last guard, whatever the snapshot (:class:`OutsideTreeError`).
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Callable, Iterable, Iterator, Set

from .atomic import link_or_copy
from .model import MODE_EXEC, MODE_LINK, FileEntry


class OutsideTreeError(OSError):
    """A file's folder leads outside the tree being written (through a symlink the
    filesystem takes for it), or its name is taken already: nothing is written there.
    An OSError naming the path, as a full disk is: install reports it and publishes
    nothing (it writes snapshots in its own folder first)."""


class _Writer:
    """Where a tree's files may go: below ``root`` as the kernel resolves it."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.inside: Set[str] = set()  # folders made and resolved inside: none changes

    def place(self, dest: str) -> None:
        """Make ``dest``'s folder, once it is known to resolve inside; refuse a ``dest``
        that exists (a name the filesystem takes for another one of the tree)."""
        folder = os.path.dirname(dest)
        if folder not in self.inside:
            real = os.path.realpath(folder)  # what exists resolved, the rest appended
            if real != self.root and not real.startswith(self.root + os.sep):
                raise OutsideTreeError(errno.EPERM, f"folder leads outside the tree being "
                                                    f"written {self.root}, to {real}", folder)
            os.makedirs(folder, exist_ok=True)
            self.inside.add(folder)  # materialize removes nothing: it stays a folder
        if os.path.lexists(dest):
            raise OutsideTreeError(errno.EEXIST, "written already, as another path of the "
                                                 "tree: the filesystem takes the two names "
                                                 "for one", dest)


def materialize(root: str, files: Iterable[FileEntry], blob: Callable[[str], str]) -> None:
    """Write ``files`` below ``root`` (a new folder), each from the blob file
    ``blob(sha256)``; :class:`OutsideTreeError` if one would land outside it.

    The caller has verified every blob, and the manifest's symlinks (checked when
    the bundle was read) stay inside the snapshot.
    """
    writer = _Writer(root)
    for f in files:
        dest = os.path.join(root, f.path)
        writer.place(dest)
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
    """Write ``(path, mode, data)`` files below ``root`` (a new scratch tree: writable),
    guarded as :func:`materialize` is."""
    writer = _Writer(root)
    for path, mode, data in files:
        dest = os.path.join(root, path)
        writer.place(dest)
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
