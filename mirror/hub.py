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

While a repo's code runs, ``megengine.hub`` itself is pointed at the store: its
weight download (``load_serialized_obj_from_url``, which ``@hub.pretrained``
looks up at call time) and its ``load``/``list``/``help``/``import_module``, so
a repo that loads itself or another repo from inside its code stays offline and
verified too.
"""

from __future__ import annotations

import builtins
import difflib
import functools
import importlib
import importlib.util
import os
import sys
import threading
import types
from typing import Any, Callable, Dict, List, Tuple

from .config import settings
from .errors import (
    DependencyError,
    EntrypointNotFoundError,
    IntegrityError,
    MirrorError,
    NotInstalledError,
    RefusedWeightError,
    SignatureError,
    SnapshotRemovedError,
    SpecError,
    StoreError,
    WeightNotInstalledError,
)
from .hashing import sha256_file
from .hubconf import HUBCONF, entrypoints, exec_hubconf
from .ids import short
from .importer import SnapshotCode
from .refs import DEFAULT_HOST, check_host, parse_repo_info
from .store import SnapshotRef, Store
from .tree import walk

SOURCES = ("local", "remote", "auto")
MIN_COMMIT_PREFIX = 7
# The names mirror answers for while it redirects megengine.hub.
REDIRECTED = ("load", "list", "help", "import_module", "load_serialized_obj_from_url")
PATCHED = REDIRECTED + ("pretrained",)  # and the decorator, while a Redirect is applied
_verified: Dict[str, Tuple[int, int]] = {}  # blob path -> (size, mtime_ns) checked this process
_originals: Dict[str, Callable[..., Any]] = {}  # megengine.hub's own functions, before any patch
_hubconf_cache: Dict[Tuple[str, int], types.ModuleType] = {}  # (snapshot dir, inode) -> hubconf
_patch_lock = threading.RLock()


def _source(source: str, store: Store) -> str:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    # Offline mode, or a trust policy (only signed code may run), keep everything local.
    if settings().offline or store.policy.required:
        return "local"
    return source


def _megengine_hub() -> Dict[str, Callable[..., Any]]:
    """megengine.hub's own functions, even while mirror has them redirected.

    The first call also puts a dispatcher under them (see :func:`_bound_caller`), so
    snapshot code that calls ``megengine.hub`` at any later time is answered from the
    store it came from.
    """
    with _patch_lock:
        if not _originals:
            modules = (importlib.import_module("megengine.hub.hub"),
                       importlib.import_module("megengine.hub"))
            _originals.update({n: getattr(modules[0], n) for n in REDIRECTED})
            _originals["pretrained"] = modules[0].pretrained
            for n in REDIRECTED:
                dispatch = _dispatcher(n)  # one object under both names, as MegEngine has
                for m in modules:
                    if getattr(m, n) is _originals[n]:
                        setattr(m, n, dispatch)
        return _originals


# --- snapshot code stays bound to its store ----------------------------------
#
# A hubconf module outlives the call that imported it (import_module returns it), and
# its code may call megengine.hub whenever it runs: a constructor that downloads, a
# factory that loads another repo. Such a call is answered from the snapshot's store
# when snapshot code is on the call stack, and by megengine.hub itself otherwise.

_stores: Dict[str, Tuple[Store, SnapshotRef]] = {}  # snapshot dir + os.sep -> its store


def _bind(root: str, store: Store, snap: SnapshotRef) -> None:
    _stores[root + os.sep] = (store, snap)


def _bound_caller() -> Tuple[Store, SnapshotRef] | None:
    """The store and snapshot of the innermost snapshot code on the call stack.
    Snapshot code is compiled with its file's path in the store as its file name."""
    if not _stores:
        return None
    prefixes = tuple(_stores)
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(prefixes):
            return next(_stores[p] for p in prefixes if filename.startswith(p))
        frame = frame.f_back
    return None


def _dispatcher(name: str) -> Callable[..., Any]:
    original = _originals[name]

    @functools.wraps(original)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        bound = _bound_caller()
        if bound is None:
            return original(*args, **kwargs)
        return _answer(name, *bound)(*args, **kwargs)

    return dispatch


def _answer(name: str, store: Store, snap: SnapshotRef | None) -> Callable[..., Any]:
    """What ``megengine.hub.<name>`` is, pointed at ``store`` (for ``snap``'s code)."""
    if name == "load_serialized_obj_from_url":
        return lambda url, model_dir=None: _load_weight(url, store, snap)
    if name == "pretrained":
        return _store_pretrained(store, snap)
    return functools.partial(globals()[name], source="local", store=store)


def _store_pretrained(store: Store, snap: SnapshotRef | None) -> type:
    """``megengine.hub.pretrained`` whose factories in ``snap``'s code load their weights
    from ``store``.

    Decorators run while hubconf is imported (under a Redirect), so such a factory
    keeps this binding whoever calls it later: MegEngine's own wrapper would look its
    downloader up at call time, when nothing may redirect it. Any other code
    decorated meanwhile (a library the repo imports) gets MegEngine's own wrapper.
    """
    base = _megengine_hub()["pretrained"]

    class pretrained(base):  # noqa: N801 - the name MegEngine's users know
        __doc__ = base.__doc__

        def __call__(self, func: Callable[..., Any]) -> Callable[..., Any]:
            filename = getattr(getattr(func, "__code__", None), "co_filename", "")
            if snap is None or not filename.startswith(snap.path + os.sep):
                return base.__call__(self, func)
            url = self.url

            @functools.wraps(func)  # as MegEngine's: pretrained=False, then the factory
            def pretrained_model_func(pretrained: bool = False, **kwargs: Any) -> Any:
                model = func(**kwargs)
                if pretrained:
                    model.load_state_dict(_load_weight(url, store, snap))
                return model

            return pretrained_model_func

    return pretrained


# --- weights -----------------------------------------------------------------


def load_serialized_obj_from_url(url: str, model_dir: str | None = None, *,
                                 store: Store | None = None) -> Any:
    """Load the weights that were packed for ``url``.

    Each file's size and sha256 are checked the first time it is used in a
    process (every time with ``MGE_MIRROR_PARANOID=1``). ``model_dir`` is
    accepted for MegEngine compatibility and ignored: weights come from the store.
    """
    return _load_weight(url, store or Store(), None)


def _load_weight(url: str, store: Store, snap: SnapshotRef | None) -> Any:
    try:
        return _load_stored_weight(url, store, snap)
    except FileNotFoundError:
        # 'mirror remove' or 'gc' took it while it was being loaded.
        if snap is not None and not os.path.isdir(snap.path):
            raise SnapshotRemovedError(snap.repo, snap.commit, snap.path) from None
        raise WeightNotInstalledError(url, store.home) from None


def _load_stored_weight(url: str, store: Store, snap: SnapshotRef | None) -> Any:
    # What megengine.load gives, by a restricted unpickler: a weight that passed the
    # install scan is still never trusted to run code or hand numpy bad pointers.
    from .unpickler import Refused, load

    weight = store.weight(url, snap)
    if weight is None:
        if snap is not None and not os.path.isdir(snap.path):
            raise SnapshotRemovedError(snap.repo, snap.commit, snap.path)
        raise WeightNotInstalledError(url, store.home, _locate(snap, url) if snap else None,
                                      f"{snap.repo}@{snap.commit}" if snap else None)
    st = os.stat(weight.path)
    if settings().paranoid or _verified.get(weight.path) != (st.st_size, st.st_mtime_ns):
        actual, size = sha256_file(weight.path)
        if actual != weight.sha256 or size != weight.size:
            raise IntegrityError(weight.path, weight.sha256, actual, url)
        _verified[weight.path] = (st.st_size, st.st_mtime_ns)
    try:
        return load(weight.path)
    except Refused as e:
        raise RefusedWeightError(url, weight.path, str(e)) from None


def _locate(snap: SnapshotRef, url: str) -> str | None:
    """Where the snapshot's code names ``url``, found as pack finds it (statically)."""
    from .discovery import discover

    files = []
    for path in walk(snap.path):
        if path.endswith(".py"):
            with open(os.path.join(snap.path, path), "rb") as fh:
                files.append(types.SimpleNamespace(path=path, data=fh.read()))
    found = {w.url: w for w in discover(files)[0]}
    return str(found[url].locations[0]) if url in found else None


# --- redirecting megengine.hub -----------------------------------------------


class Redirect:
    """``megengine.hub`` pointed at a store from :meth:`apply` until :meth:`undo`
    (or the end of a ``with`` block).

    A plain object rather than a generator-based context manager: ``patch_megengine``
    keeps one alive for the life of a process, and a collected generator would run
    its ``finally`` and silently undo the patch. Nested redirects stack: each
    restores what it found.
    """

    def __init__(self, store: Store, snap: SnapshotRef | None = None):
        self.store, self.snap = store, snap
        self._saved: builtins.list = []
        self.active = False

    def __enter__(self) -> Redirect:
        if not self.active:
            self.apply()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()

    def functions(self) -> Dict[str, Callable[..., Any]]:
        """What each patched name of ``megengine.hub`` answers with."""
        # @hub.pretrained looks load_serialized_obj_from_url up in megengine.hub.hub at
        # call time; code that calls it directly uses the package's name: both are set.
        return {name: _answer(name, self.store, self.snap) for name in PATCHED}

    def apply(self) -> Redirect:
        """Redirect now (once: applying again changes nothing); returns this object,
        to undo later."""
        if self.active:
            return self
        # By name, not attribute: under `mirror run` this runs while megengine itself
        # is still being imported, before megengine.hub is set on the package.
        modules = (importlib.import_module("megengine.hub.hub"),
                   importlib.import_module("megengine.hub"))
        _megengine_hub()
        functions = self.functions()
        with _patch_lock:
            self._saved = [(m, {n: getattr(m, n) for n in PATCHED}) for m in modules]
            for m in modules:
                for n, fn in functions.items():
                    setattr(m, n, fn)
            self.active = True
        return self

    def undo(self) -> None:
        """Give ``megengine.hub`` back what it had before :meth:`apply`."""
        with _patch_lock:
            if not self.active:
                return
            for m, names in self._saved:
                for n, fn in names.items():
                    setattr(m, n, fn)
            self._saved, self.active = [], False


# --- code --------------------------------------------------------------------


def _resolve(repo_info: str, git_host: str, commit: str | None, store: Store) -> SnapshotRef:
    owner, name, branch = parse_repo_info(repo_info)
    check_host(git_host, "git_host=")  # the store keeps repos under it: never a path
    if commit is not None and (len(commit) < MIN_COMMIT_PREFIX or not all(
            c in "0123456789abcdefABCDEF" for c in commit)):
        raise SpecError(commit, f"commit= takes a full commit id or at least "
                                f"{MIN_COMMIT_PREFIX} of its hex digits")
    return store.resolve(owner, name, branch, commit, host=git_host)


def _top_level_names(root: str) -> List[str]:
    """The importable names a snapshot provides (packages and modules at its root)."""
    names = []
    for entry in os.listdir(root):
        stem = entry[:-3] if entry.endswith(".py") else entry
        if stem.isidentifier() and (entry.endswith(".py") or os.path.isdir(
                os.path.join(root, entry))):
            names.append(stem)
    return names


def _import_hubconf(snap: SnapshotRef, store: Store, entry: str | None = None) \
        -> types.ModuleType:
    """The snapshot's hubconf, imported once per process: a snapshot never changes
    (a --force reinstall swaps in a new directory, which is imported afresh)."""
    try:
        key = (snap.path, os.stat(snap.path).st_ino)
    except OSError:
        key = None
    module = _hubconf_cache.get(key) if key else None
    if module is None:
        module = _exec_hubconf(snap, store, entry)
        if key:
            _hubconf_cache[key] = module
    return module


def _check_trust(snap: SnapshotRef, store: Store) -> None:
    """With a trust policy (trusted keys configured), run only code from bundles that a
    trusted key signed."""
    policy = store.policy
    if not policy.required:
        return
    record = store.snapshot_record(snap.repo_layout, snap.commit)
    signer = record.signed_by if record else None
    if signer not in policy.keys():
        why = f"its bundle was signed by {signer}, not a trusted key" if signer else \
            "its bundle was not signed"
        raise SignatureError(f"{snap.repo}@{short(snap.commit)}",
                             f"a trust policy is configured and {why}; hubconf.py is not run")


def _snapshot_code(snap: SnapshotRef, store: Store) -> SnapshotCode:
    """The snapshot's code as its install recorded it, checked as each file is run."""
    record = store.snapshot_record(snap.repo_layout, snap.commit)
    if not os.path.isdir(snap.path):
        raise SnapshotRemovedError(snap.repo, snap.commit, snap.path)
    if record is None:  # remove takes the folder first: this is no race, but damage
        raise StoreError(snap.repo_layout.snapshot_record(snap.commit),
                         f"{snap.repo}@{short(snap.commit)} has no install record to check "
                         f"its code against, so it is not run. Run 'mirror verify' and "
                         f"reinstall its bundle with --force")
    files = record.snapshot.files
    return SnapshotCode(snap.path, snap.repo, snap.commit,
                        {f.path: f.sha256 for f in files if not f.is_link},
                        {f.path: f.sha256 for f in files if f.is_link})


def _exec_hubconf(snap: SnapshotRef, store: Store, entry: str | None) -> types.ModuleType:
    # As megengine.hub does: the snapshot is importable only while hubconf runs.
    _check_trust(snap, store)
    code = _snapshot_code(snap, store)
    if not os.path.exists(os.path.join(snap.path, HUBCONF)):
        raise MirrorError(f"{snap.repo}@{short(snap.commit)} has no {HUBCONF}")
    # Modules of the same names from elsewhere (another commit, another repo, the
    # user's own) step aside while this snapshot's are imported, then come back.
    own = set(_top_level_names(snap.path)) - {"hubconf"}
    stashed = {}
    if any(name in sys.modules for name in own):  # a scan of sys.modules only when needed
        stashed = {k: sys.modules.pop(k) for k in builtins.list(sys.modules)
                   if k.partition(".")[0] in own}
    before = set(sys.modules)
    _bind(code.root, store, snap)
    try:
        with Redirect(store, snap):
            module = exec_hubconf(code)
    except ImportError as e:
        if not os.path.isdir(snap.path):
            raise SnapshotRemovedError(snap.repo, snap.commit, snap.path) from None
        raise DependencyError(snap.repo, snap.commit, e.name or str(e), entry) from None
    finally:
        _forget_modules_from(snap.path, before)
        sys.modules.update(stashed)
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
    source = _source(source, store)
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
        return _megengine_hub()["import_module"](repo_info, git_host, use_cache, commit,
                                                 protocol)
    return _import_hubconf(snap, store)


def _entry(module: types.ModuleType, entry: str) -> Any:
    if entry.startswith("__") or not callable(getattr(module, entry, None)):
        snap: SnapshotRef = module.__mirror_snapshot__
        names = entrypoints(module)
        close = difflib.get_close_matches(entry, names, n=1)
        raise EntrypointNotFoundError(snap.repo, snap.commit, entry, names,
                                      close[0] if close else None)
    return getattr(module, entry)


def _check_dependencies(module: types.ModuleType, entry: str) -> None:
    snap: SnapshotRef = module.__mirror_snapshot__
    for name in getattr(module, "dependencies", None) or []:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise DependencyError(snap.repo, snap.commit, name, entry, declared=True)


def list(repo_info: str, git_host: str = DEFAULT_HOST, use_cache: bool = True,  # noqa: A001
         commit: str | None = None, protocol: str = "HTTPS", *, source: str = "local",
         store: Store | None = None) -> builtins.list:
    """Entrypoint names of the repo's hubconf, as ``megengine.hub.list``."""
    store = store or Store()
    snap = _snapshot(repo_info, git_host, commit, source, store)
    if snap is None:
        return _megengine_hub()["list"](repo_info, git_host, use_cache, commit, protocol)
    return entrypoints(_import_hubconf(snap, store))


def help(repo_info: str, entry: str, git_host: str = DEFAULT_HOST,  # noqa: A001
         use_cache: bool = True, commit: str | None = None, protocol: str = "HTTPS", *,
         source: str = "local", store: Store | None = None) -> str | None:
    """The docstring of an entrypoint, as ``megengine.hub.help``."""
    store = store or Store()
    snap = _snapshot(repo_info, git_host, commit, source, store)
    if snap is None:
        return _megengine_hub()["help"](repo_info, entry, git_host, use_cache, commit, protocol)
    return _entry(_import_hubconf(snap, store, entry), entry).__doc__


def load(repo_info: str, entry: str, *args: Any, git_host: str = DEFAULT_HOST,
         use_cache: bool = True, commit: str | None = None, protocol: str = "HTTPS",
         source: str = "local", store: Store | None = None, **kwargs: Any) -> Any:
    """Build ``entry`` from the repo's hubconf, as ``megengine.hub.load``, from the store.

    ``use_cache`` is accepted and ignored: the store is never deleted or refetched.
    """
    store = store or Store()
    snap = _snapshot(repo_info, git_host, commit, source, store)
    if snap is None:
        return _megengine_hub()["load"](repo_info, entry, *args, git_host=git_host,
                                        use_cache=use_cache, commit=commit, protocol=protocol,
                                        **kwargs)
    module = _import_hubconf(snap, store, entry)
    factory = _entry(module, entry)
    _check_dependencies(module, entry)
    with Redirect(store, snap):
        return factory(*args, **kwargs)


def __getattr__(name: str) -> Any:
    # ``pretrained`` is MegEngine's own decorator: it calls the downloader that
    # load() points at the store. Looked up lazily so importing mirror stays light.
    if name == "pretrained":
        return _megengine_hub()["pretrained"]
    raise AttributeError(name)
