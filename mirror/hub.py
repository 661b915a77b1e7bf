"""MegEngine Hub's API, answered from the local store.

``load``, ``list``, ``help`` and ``import_module`` take MegEngine's arguments and
resolve ``owner/name[:branch_or_tag]`` and ``commit=`` as ``megengine.hub``
would online, plus ``source``:

- ``"local"`` (the default): only the store, never the network. The default is
  local because mirror exists for hosts where a network attempt is at best a
  long timeout and at worst a policy violation.
- ``"remote"``: hand the call to ``megengine.hub`` unchanged.
- ``"auto"``: the store first, then ``megengine.hub`` when the store lacks it,
  unless ``MGE_MIRROR_OFFLINE=1``.

While a repo's code runs, ``megengine.hub``'s weight download
(``load_serialized_obj_from_url``, which ``@hub.pretrained`` looks up at call
time) is pointed at the store, so the weights loaded are the verified ones.
"""

from __future__ import annotations

import builtins
import contextlib
import difflib
import hashlib
import importlib.util
import os
import sys
import threading
import types
from typing import Any, Dict, Iterator, List, Tuple

from .errors import (
    EntrypointNotFoundError,
    IntegrityError,
    MirrorError,
    NotInstalledError,
    WeightNotInstalledError,
)
from .refs import DEFAULT_HOST, parse_repo_info
from .store import SnapshotRef, Store

HUBCONF = "hubconf.py"
SOURCES = ("local", "remote", "auto")
_verified: Dict[str, Tuple[int, int]] = {}  # blob path -> (size, mtime_ns) checked this process
_patch_lock = threading.RLock()


def _offline() -> bool:
    return os.environ.get("MGE_MIRROR_OFFLINE", "") not in ("", "0")


def _source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    return "local" if _offline() else source


def _remote():
    import megengine.hub

    return megengine.hub


# --- weights -----------------------------------------------------------------


def load_serialized_obj_from_url(url: str, model_dir: str | None = None, *,
                                 store: Store | None = None) -> Any:
    """Load the weights that were packed for ``url``, verifying them once per process.

    ``model_dir`` is accepted for MegEngine compatibility and ignored: the store
    is the only place weights come from.
    """
    from megengine.serialization import load as mge_load

    store = store or Store()
    weight = store.weight(url)
    if weight is None or not os.path.exists(weight.path):
        raise WeightNotInstalledError(url, store.home)
    st = os.stat(weight.path)
    if _verified.get(weight.path) != (st.st_size, st.st_mtime_ns):
        digest = hashlib.sha256()
        with open(weight.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != weight.sha256 or st.st_size != weight.size:
            raise IntegrityError(weight.path, weight.sha256, digest.hexdigest(), url)
        _verified[weight.path] = (st.st_size, st.st_mtime_ns)
    return mge_load(weight.path)


@contextlib.contextmanager
def _weights_from_store(store: Store) -> Iterator[None]:
    """Point megengine.hub's downloader at the store while a repo's code runs."""
    import megengine.hub
    import megengine.hub.hub

    def from_store(url: str, model_dir: str | None = None) -> Any:
        return load_serialized_obj_from_url(url, model_dir, store=store)

    # @hub.pretrained looks the downloader up in megengine.hub.hub; code that calls
    # megengine.hub.load_serialized_obj_from_url directly uses the package's name.
    modules = (megengine.hub.hub, megengine.hub)
    with _patch_lock:
        saved = [m.load_serialized_obj_from_url for m in modules]
        for m in modules:
            m.load_serialized_obj_from_url = from_store
        try:
            yield
        finally:
            for m, original in zip(modules, saved):
                m.load_serialized_obj_from_url = original


# --- code --------------------------------------------------------------------


def _resolve(repo_info: str, git_host: str, commit: str | None, store: Store) -> SnapshotRef:
    owner, name, branch = parse_repo_info(repo_info)
    return store.resolve(owner, name, branch, commit, host=git_host)


def _import_hubconf(snap: SnapshotRef, store: Store) -> types.ModuleType:
    # As megengine.hub does: the snapshot is importable only while hubconf runs.
    path = os.path.join(snap.path, HUBCONF)
    if not os.path.exists(path):
        raise MirrorError(f"{snap.repo}@{snap.commit[:12]} has no {HUBCONF}")
    spec = importlib.util.spec_from_file_location(HUBCONF, path)
    module = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    # No __pycache__ inside the store: a snapshot stays exactly the bytes installed.
    saved_bytecode_flag, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    sys.path.insert(0, snap.path)
    try:
        with _weights_from_store(store):
            spec.loader.exec_module(module)
    finally:
        sys.path.remove(snap.path)
        sys.dont_write_bytecode = saved_bytecode_flag
        _forget_modules_from(snap.path, before)
    module.__mirror_snapshot__ = snap
    return module


def _forget_modules_from(root: str, before: set) -> None:
    """Drop the repo's packages from ``sys.modules`` once hubconf has them.

    MegEngine leaves them there, so a second commit (or another repo with a
    package of the same name) silently reuses the first one's code. The loaded
    hubconf keeps its own references, so nothing it needs goes away.
    """
    prefix = root + os.sep
    for name in set(sys.modules) - before:
        origin = getattr(sys.modules[name], "__file__", None) or ""
        if origin.startswith(prefix):
            del sys.modules[name]


def _snapshot(repo_info: str, git_host: str, commit: str | None, source: str,
              store: Store) -> SnapshotRef | None:
    """The store's snapshot for the request, or None when ``megengine.hub`` should answer."""
    source = _source(source)
    if source == "remote":
        return None
    try:
        return _resolve(repo_info, git_host, commit, store)
    except NotInstalledError:
        if source == "auto":
            return None
        raise


def import_module(repo_info: str, git_host: str = DEFAULT_HOST, use_cache: bool = True,
                  commit: str | None = None, protocol: str = "HTTPS", *,
                  source: str = "local", store: Store | None = None) -> types.ModuleType:
    """The repo's ``hubconf`` module, imported from the store (see module docs for ``source``)."""
    store = store or Store()
    snap = _snapshot(repo_info, git_host, commit, source, store)
    if snap is None:
        return _remote().import_module(repo_info, git_host, use_cache, commit, protocol)
    return _import_hubconf(snap, store)


def _entrypoints(module: types.ModuleType) -> List[str]:
    # The same rule as megengine.hub.list.
    return [n for n in dir(module) if not n.startswith("__") and callable(getattr(module, n))]


def _entry(module: types.ModuleType, entry: str) -> Any:
    if entry.startswith("__") or not callable(getattr(module, entry, None)):
        snap: SnapshotRef = module.__mirror_snapshot__
        names = _entrypoints(module)
        err = EntrypointNotFoundError(snap.repo, snap.commit, entry, names)
        close = difflib.get_close_matches(entry, names, n=1)
        if close:
            err.args = (f"{err.args[0]}; did you mean {close[0]!r}?",)
        raise err
    return getattr(module, entry)


def _check_dependencies(module: types.ModuleType, entry: str) -> None:
    missing = [m for m in getattr(module, "dependencies", None) or []
               if importlib.util.find_spec(m) is None]
    if missing:
        snap: SnapshotRef = module.__mirror_snapshot__
        raise MirrorError(f"{snap.repo}@{snap.commit[:12]}: entrypoint {entry!r} needs "
                          f"{', '.join(missing)}, which cannot be imported here")


def list(repo_info: str, git_host: str = DEFAULT_HOST, use_cache: bool = True,  # noqa: A001
         commit: str | None = None, protocol: str = "HTTPS", *, source: str = "local",
         store: Store | None = None) -> builtins.list:
    """Entrypoint names of the repo's hubconf, as ``megengine.hub.list``."""
    store = store or Store()
    snap = _snapshot(repo_info, git_host, commit, source, store)
    if snap is None:
        return _remote().list(repo_info, git_host, use_cache, commit, protocol)
    return _entrypoints(_import_hubconf(snap, store))


def help(repo_info: str, entry: str, git_host: str = DEFAULT_HOST,  # noqa: A001
         use_cache: bool = True, commit: str | None = None, protocol: str = "HTTPS", *,
         source: str = "local", store: Store | None = None) -> str | None:
    """The docstring of an entrypoint, as ``megengine.hub.help``."""
    store = store or Store()
    snap = _snapshot(repo_info, git_host, commit, source, store)
    if snap is None:
        return _remote().help(repo_info, entry, git_host, use_cache, commit, protocol)
    return _entry(_import_hubconf(snap, store), entry).__doc__


def load(repo_info: str, entry: str, *args: Any, git_host: str = DEFAULT_HOST,
         use_cache: bool = True, commit: str | None = None, protocol: str = "HTTPS",
         source: str = "local", store: Store | None = None, **kwargs: Any) -> Any:
    """Build ``entry`` from the repo's hubconf, as ``megengine.hub.load``, from the store."""
    store = store or Store()
    snap = _snapshot(repo_info, git_host, commit, source, store)
    if snap is None:
        return _remote().load(repo_info, entry, *args, git_host=git_host, use_cache=use_cache,
                              commit=commit, protocol=protocol, **kwargs)
    module = _import_hubconf(snap, store)
    factory = _entry(module, entry)
    _check_dependencies(module, entry)
    with _weights_from_store(store):
        return factory(*args, **kwargs)


def __getattr__(name: str) -> Any:
    # ``pretrained`` is MegEngine's own decorator: it calls the downloader that
    # load() points at the store. Looked up lazily so importing mirror stays light.
    if name == "pretrained":
        return _remote().pretrained
    raise AttributeError(name)
