"""The undo log of one publish: every change an install makes that readers can see,
and how to take it back, so that an error half way leaves the store as it was.

A crash (a kill, a power cut) is covered by the order of the steps and by
atomic renames (:mod:`mirror.atomic`): the store then holds part of an install,
but only whole parts. An error that is raised (``EPERM``, ``ENAMETOOLONG``,
``EXDEV``, a full disk) is covered here: :meth:`Journal.rollback` undoes, newest
first, every step that completed. Undoing needs no new data blocks: a replaced
file is kept as a hard link in the install's work folder and renamed back, a
replaced folder swapped back, an appended log truncated.

Blobs are not journaled: content-addressed and named by no record until a
snapshot is published, they are invisible to readers, and another install may
already rely on one that this install put there; ``gc`` collects those left.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, List, Tuple

from .atomic import fsync_path, swap, write_atomic


class Journal:
    """The visible changes of one publish, in order, each with its undo. Files kept
    for undoing live in ``work`` (the install's own folder under ``tmp/``)."""

    def __init__(self, work: str):
        self.work = work
        self._undo: List[Tuple[str, Callable[[], None]]] = []  # (path, undo), oldest first
        self._kept = 0

    def makedirs(self, path: str) -> None:
        """Create ``path`` and any missing parents; undo removes those it created."""
        missing = []
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for folder in reversed(missing):
            os.mkdir(folder)
            self._undo.append((folder, lambda f=folder: os.rmdir(f)))

    def write(self, path: str, data: bytes) -> None:
        """Create or replace the file ``path`` with ``data`` atomically; undo puts back
        what was there (or removes it)."""
        self.makedirs(os.path.dirname(path))
        kept = self._keep(path)
        write_atomic(path, data)
        self._undo.append((path, lambda: os.replace(kept, path) if kept else _unlink(path)))

    def append(self, path: str, data: bytes) -> None:
        """Append ``data`` to the file ``path`` (created if missing) and make it durable;
        undo cuts the file back to its old length (or removes it)."""
        self.makedirs(os.path.dirname(path))
        size = os.path.getsize(path) if os.path.exists(path) else None
        # Registered first: a write or fsync that fails may have changed the file.
        self._undo.append((path, lambda: os.truncate(path, size) if size is not None
                           else _unlink(path)))
        with open(path, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def put_dir(self, building: str, target: str) -> None:
        """Put the finished folder ``building`` at ``target`` whole: renamed there, or
        swapped in one step with the folder already there (which ``building`` then
        holds, for undo; the work folder's removal deletes it after success)."""
        if os.path.isdir(target):
            swap(building, target)
            self._undo.append((target, lambda: swap(building, target)))
        else:
            os.rename(building, target)
            self._undo.append((target, lambda: os.rename(target, building)))
        fsync_path(os.path.dirname(target))  # after the undo is known: this may fail too

    def rollback(self) -> List[str]:
        """Undo every completed step, newest first. Returns what could not be undone
        (path and reason), after trying every step."""
        failed = []
        for path, undo in reversed(self._undo):
            try:
                undo()
            except OSError as e:
                failed.append(f"{path}: {e.strerror or e}")
        self._undo.clear()
        return failed

    def _keep(self, path: str) -> str | None:
        """A second name for the file at ``path`` in the work folder, or None if none."""
        if not os.path.lexists(path):
            return None
        self._kept += 1
        kept = os.path.join(self.work, f"undo-{self._kept}")
        try:
            os.link(path, kept)
        except OSError:  # a filesystem without hard links: a copy, made before any change
            shutil.copy2(path, kept, follow_symlinks=False)
        return kept


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
