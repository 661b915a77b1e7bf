"""Snapshot code, run only from the source that was verified.

Python's import system caches compiled bytecode (beside the source, or under
``sys.pycache_prefix``) and later runs that cache instead of the source when its
timestamp or hash of the *source* matches. Nothing verifies the compiled code
itself, so whoever can write the cache changes what runs while ``mirror verify``
still says OK. Here each module of a snapshot is read, checked against the
sha256 its install recorded, and compiled in memory: no bytecode is read or
written for snapshot code, and the interpreter's caching of everything else is
left as it is.

Only ``.py`` source runs from a snapshot. A native extension or a bytecode-only
module in a snapshot is refused rather than loaded: it would be run from a path,
after its check, by a loader that cannot be given the checked bytes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Mapping, Sequence

from .errors import CodeIntegrityError, SnapshotRemovedError

SOURCE = ".py"
# What the standard finders would run that is not source.
NATIVE = tuple(importlib.machinery.EXTENSION_SUFFIXES) + tuple(
    importlib.machinery.BYTECODE_SUFFIXES)


class SnapshotCode:
    """One snapshot's code: where it is, what it is called in messages, and (for an
    installed snapshot) the sha256 of each regular file as installed."""

    def __init__(self, root: str, repo: str, commit: str,
                 digests: Mapping[str, str] | None = None):
        self.root, self.repo, self.commit = root, repo, commit
        self.digests = digests  # None: code being packed, nothing recorded yet
        self._real_root = os.path.realpath(root)

    def inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def source(self, path: str) -> bytes:
        """The bytes of ``path``, checked against the snapshot's record."""
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, NotADirectoryError):
            if not os.path.isdir(self.root):
                raise SnapshotRemovedError(self.repo, self.commit, self.root) from None
            raise
        if self.digests is not None:
            # Symlinks were checked at install to stay inside the snapshot: the
            # file that runs is the regular file they lead to.
            rel = os.path.relpath(os.path.realpath(path), self._real_root)
            expected = self.digests.get(rel.replace(os.sep, "/"))
            actual = hashlib.sha256(data).hexdigest()
            if expected is None:
                raise CodeIntegrityError(self.repo, self.commit, path,
                                         "is not a file of the snapshot as installed")
            if actual != expected:
                raise CodeIntegrityError(self.repo, self.commit, path,
                                         f"has sha256 {actual}, installed as {expected}")
        return data

    def compile(self, path: str) -> types.CodeType:
        return compile(self.source(path), path, "exec", dont_inherit=True)


class VerifiedSourceLoader(importlib.machinery.SourceFileLoader):
    """A source loader whose code is always compiled from checked source in memory."""

    def __init__(self, fullname: str, path: str, code: SnapshotCode):
        super().__init__(fullname, path)
        self.code = code

    def get_code(self, fullname: str) -> types.CodeType:
        return self.code.compile(self.get_filename(fullname))


class SnapshotFinder(importlib.abc.MetaPathFinder):
    """Finds a snapshot's modules before the standard finders do.

    Claims the snapshot's top-level modules and packages, and every submodule whose
    package lies in the snapshot; what it claims is found as the standard path finder
    would find it, but only ever run from source.
    """

    def __init__(self, code: SnapshotCode):
        self.code = code
        self._finders: dict = {}

    def _top_level(self, name: str) -> bool:
        root = self.code.root
        return (os.path.isfile(os.path.join(root, name + SOURCE))
                or os.path.isfile(os.path.join(root, name, "__init__" + SOURCE))
                or any(os.path.exists(os.path.join(root, name + s)) for s in NATIVE))

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None):  # noqa: ANN201
        if not os.path.isdir(self.code.root):  # removed while loading: say so, not "no module"
            raise SnapshotRemovedError(self.code.repo, self.code.commit, self.code.root)
        if path is None:
            # A folder without __init__.py is a namespace portion, which a regular
            # module anywhere on sys.path outranks: left to the standard finder, which
            # asks again here for its submodules.
            if "." in fullname or not self._top_level(fullname):
                return None
            path = [self.code.root]
        else:
            path = [p for p in path if self.code.inside(p)]
            if not path:
                return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            spec = self._finder(entry).find_spec(fullname, target)
            if spec is not None and spec.loader is not None:
                return spec
            native = [os.path.join(entry, leaf + s) for s in NATIVE
                      if os.path.exists(os.path.join(entry, leaf + s))]
            if native:
                raise CodeIntegrityError(self.code.repo, self.code.commit, native[0],
                                         "is not Python source; only .py source of a "
                                         "snapshot is run")
        return None

    def _finder(self, entry: str) -> importlib.machinery.FileFinder:
        finder = self._finders.get(entry)
        if finder is None:
            loader = functools.partial(VerifiedSourceLoader, code=self.code)
            finder = self._finders[entry] = importlib.machinery.FileFinder(
                entry, (loader, [SOURCE]))
        return finder


def spec_for(code: SnapshotCode, name: str, path: str) -> importlib.machinery.ModuleSpec:
    """A spec that runs the source file ``path`` (hubconf.py) under module ``name``."""
    return importlib.util.spec_from_file_location(
        name, path, loader=VerifiedSourceLoader(name, path, code))


def install(code: SnapshotCode) -> SnapshotFinder:
    """Put a finder for the snapshot in front of the standard ones; remove it from
    ``sys.meta_path`` to end it."""
    finder = SnapshotFinder(code)
    sys.meta_path.insert(0, finder)
    return finder
