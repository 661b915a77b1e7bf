"""Snapshot code, run only from the source that was verified.

Python's import system caches compiled bytecode (beside the source, or under
``sys.pycache_prefix``) and later runs that cache instead of the source when its
timestamp or hash of the *source* matches. Nothing verifies the compiled code
itself, so whoever can write the cache changes what runs while ``mirror verify``
still says OK. Here each module of a snapshot is read, checked against the
sha256 its install recorded, and compiled in memory: no bytecode is read or
written for snapshot code, and the interpreter's caching of everything else is
left as it is.

It works as a path hook: for every ``sys.path`` entry or package folder inside a
snapshot that was bound (:func:`bind`), the import system asks a
:class:`SnapshotFinder` instead of its own, for the life of the process, so
imports that happen late (inside a factory, after ``hubconf.py`` has run, or
through a folder the repo put on ``sys.path`` itself) are checked too, and
``sys.path`` order is kept exactly as the interpreter has it.

Only ``.py`` source runs from a snapshot. A native extension or a bytecode-only
module (``x.so``, ``x.pyc``, ``pkg/__init__.pyc``) is refused rather than loaded:
it would be run from a path, after its check, by a loader that cannot be given
the checked bytes. Not covered: code the repo loads by file path itself
(``importlib.util.spec_from_file_location``), which Python's own loader runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import types
from typing import Dict, Mapping

from .errors import CodeIntegrityError, SnapshotRemovedError, StoreError

SOURCE = ".py"
# What the standard finders would run that is not source.
NATIVE = tuple(importlib.machinery.EXTENSION_SUFFIXES) + tuple(
    importlib.machinery.BYTECODE_SUFFIXES)


class SnapshotCode:
    """One snapshot's code: where it is, what it is called in messages, and (for an
    installed snapshot) the sha256 of each file and symlink as installed."""

    def __init__(self, root: str, repo: str, commit: str,
                 files: Mapping[str, str] | None = None, links: Mapping[str, str] = {}):
        self.root, self.repo, self.commit = root, repo, commit
        self.files = files  # path -> sha256; None: code being packed, nothing recorded yet
        self.links = links  # path -> sha256 of the link's target text

    def inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def refuse(self, path: str, reason: str) -> CodeIntegrityError:
        return CodeIntegrityError(self.repo, self.commit, path, reason)

    def source(self, path: str) -> bytes:
        """The bytes of ``path``, checked against the snapshot's record."""
        try:
            if self.files is not None:
                path_ok = self._check_path(path)
            with open(path, "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, NotADirectoryError):
            if not os.path.isdir(self.root):
                raise SnapshotRemovedError(self.repo, self.commit, self.root) from None
            raise
        except OSError as e:
            raise StoreError(path, f"cannot read the code of {self.repo}: "
                                   f"{e.strerror or e}") from None
        if self.files is not None:
            expected, actual = self.files[path_ok], hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise self.refuse(path, f"has sha256 {actual}, installed as {expected}")
        return data

    def _check_path(self, path: str) -> str:
        """The recorded file that ``path`` reaches, each symlink on the way being one
        the snapshot holds, leading where it was installed to lead."""
        parts = os.path.relpath(path, self.root).split(os.sep)
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            at = os.path.join(self.root, *parts[:i])
            if os.path.islink(at):
                target = os.readlink(at)
                if self.links.get(rel) != hashlib.sha256(target.encode()).hexdigest():
                    raise self.refuse(path, f"goes through {rel}, a symlink the snapshot "
                                            f"as installed does not hold")
            elif rel in self.links:
                raise self.refuse(path, f"goes through {rel}, installed as a symlink")
        real = os.path.relpath(os.path.realpath(path), os.path.realpath(self.root))
        rel = real.replace(os.sep, "/")
        if rel.startswith("../") or rel not in self.files:
            raise self.refuse(path, "is not a file of the snapshot as installed")
        return rel

    def compile(self, path: str) -> types.CodeType:
        return compile(self.source(path), path, "exec", dont_inherit=True)


class VerifiedSourceLoader(importlib.machinery.SourceFileLoader):
    """A source loader whose code is always compiled from checked source in memory."""

    def __init__(self, fullname: str, path: str, code: SnapshotCode):
        super().__init__(fullname, path)
        self.code = code

    def get_code(self, fullname: str) -> types.CodeType:
        return self.code.compile(self.get_filename(fullname))


class SnapshotFinder(importlib.machinery.FileFinder):
    """The finder of one folder inside a snapshot: it finds ``.py`` source (and
    namespace folders) as the standard finder would, and refuses native code."""

    def __init__(self, path: str, code: SnapshotCode):
        super().__init__(path, (functools.partial(VerifiedSourceLoader, code=code), [SOURCE]))
        self.code = code

    def find_spec(self, fullname: str, target: types.ModuleType | None = None):  # noqa: ANN201
        leaf = fullname.rpartition(".")[2]
        spec = super().find_spec(fullname, target)
        if spec is not None and spec.loader is not None:
            return spec
        for candidate in (leaf, os.path.join(leaf, "__init__")):
            for suffix in NATIVE:
                path = os.path.join(self.path, candidate + suffix)
                if os.path.exists(path):
                    raise self.code.refuse(path, "is not Python source; only .py source "
                                                 "of a snapshot is run")
        return spec


_bound: Dict[str, SnapshotCode] = {}  # snapshot folder -> its code, for the process
_lock = threading.Lock()


def _hook(path: str) -> SnapshotFinder:
    code = _bound_code(path)
    if code is None:
        raise ImportError("not a snapshot folder")  # the next hook's, as usual
    return SnapshotFinder(path, code)


def _bound_code(path: str) -> SnapshotCode | None:
    path = os.path.abspath(path) if path else os.getcwd()
    with _lock:
        codes = list(_bound.values())
    return next((code for code in codes if code.inside(path)), None)


def bind(code: SnapshotCode) -> None:
    """From now on, every import from a folder inside ``code.root`` runs checked
    source only (replacing what an earlier binding of the same folder said)."""
    with _lock:
        if _hook not in sys.path_hooks:
            sys.path_hooks.insert(0, _hook)
        _bound[code.root] = code
        # Finders the import system made for these folders before: theirs, or an
        # earlier binding's (a reinstall with --force has new contents).
        for cached in [p for p in sys.path_importer_cache if p and code.inside(p)]:
            del sys.path_importer_cache[cached]


def spec_for(code: SnapshotCode, name: str, path: str) -> importlib.machinery.ModuleSpec:
    """A spec that runs the source file ``path`` (hubconf.py) under module ``name``."""
    return importlib.util.spec_from_file_location(
        name, path, loader=VerifiedSourceLoader(name, path, code))
