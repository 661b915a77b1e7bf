"""The local store on the isolated host, read: which snapshot a repo, ref or commit
names, which bytes a weight URL stands for, and what is installed.

Its paths are :mod:`mirror.layout`'s, its records :mod:`mirror.model`'s; it is
written by :mod:`mirror.installer` and kept by :mod:`mirror.housekeeping`.
Integrity never depends on a lock: everything is written under a unique
temporary name, verified, fsynced and renamed into place, and refs flip last,
so a crash at any instant leaves a store whose visible parts are whole.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Set, Tuple, TypeVar

from .config import TrustPolicy, settings, trust_policy
from .errors import (
    AmbiguousCommitError,
    AmbiguousWeightError,
    NoStoreError,
    NotInstalledError,
    StoreError,
)
from .ids import is_hex, short
from .layout import REF_FOLDERS, TEMP_PREFIX, RepoLayout, StoreLayout, listing
from .model import JsonObject, Manifest, Pin, RefLogEntry, RepoId, SnapshotRecord, WeightFile
from .refs import DEFAULT_BRANCH, DEFAULT_HOST

T = TypeVar("T")


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot in the store: the repo it belongs to (as messages name it), its
    commit, and the repo's paths."""

    repo: str
    commit: str
    repo_layout: RepoLayout

    @property
    def path(self) -> str:
        return self.repo_layout.snapshot(self.commit)


@dataclass(frozen=True)
class RefHead:
    """A branch or tag in the store and the commit it names."""

    kind: str  # "branch" or "tag"
    name: str
    commit: str


@dataclass(frozen=True)
class SnapshotSummary:
    """An installed snapshot, as ``mirror list`` shows it."""

    commit: str
    files: int
    size: int
    entrypoints: Tuple[str, ...]
    weights: Tuple[Tuple[str, Pin | None], ...]  # URL and the bytes installed for it
    bundle: str | None
    bundle_file: str | None
    installed_at: int | None
    proven: bool = False  # its git ids recomputed from its bytes at install
    readable: bool = True  # False: its record could not be read (see problems)

    def to_json(self) -> JsonObject:
        return {"commit": self.commit, "proven": self.proven, "files": self.files,
                "size": self.size,
                "entrypoints": list(self.entrypoints),
                "weights": [{"url": u, "size": p.size if p else None,
                             "sha256": p.sha256 if p else None} for u, p in self.weights],
                "bundle_id": self.bundle, "bundle_file": self.bundle_file,
                "installed_at": self.installed_at, "readable": self.readable}


@dataclass(frozen=True)
class RepoSummary:
    """An installed repo with its refs and snapshots, as ``mirror list`` shows it."""

    id: RepoId
    refs: Tuple[RefHead, ...]  # as ``:name`` resolves: one per name, a branch first
    snapshots: Tuple[SnapshotSummary, ...]
    problems: Tuple[str, ...] = ()  # records that could not be read ('mirror verify')

    @property
    def commits(self) -> List[str]:
        return [s.commit for s in self.snapshots]

    def to_json(self) -> JsonObject:
        return dict(self.id.to_json(), repo=self.id.full,
                    refs=[{"kind": r.kind, "name": r.name, "commit": r.commit}
                          for r in self.refs],
                    snapshots=[s.to_json() for s in self.snapshots],
                    problems=list(self.problems))


class Store:
    """A local store of snapshots and weights rooted at ``home`` (default: the
    configured one, see :mod:`mirror.config`)."""

    def __init__(self, home: str | None = None):
        self.home = os.path.abspath(home or settings().store_home)
        self.layout = StoreLayout(self.home)

    @classmethod
    def existing(cls, home: str | None = None) -> Store:
        """The store at ``home``, which must exist (install made it): what every
        command but install works on. Raises :class:`NoStoreError`."""
        store = cls(home)
        if not store.exists():
            raise NoStoreError(store.home)
        return store

    def exists(self) -> bool:
        """Whether an install has made a store here."""
        return os.path.isdir(self.layout.repos) or os.path.isdir(self.layout.blobs)

    @property
    def policy(self) -> TrustPolicy:
        """The trust policy this store is under (its config, trusted keys, environment)."""
        return trust_policy(self.home)

    # --- records -------------------------------------------------------------

    def repo_dir(self, host: str, owner: str, name: str) -> RepoLayout:
        return self.layout.repo(host, owner, name)

    def repo_id(self, repo: RepoLayout) -> RepoId:
        return read_record(repo.repo_json, RepoId.from_record, UNREADABLE)

    def snapshot_record(self, repo: RepoLayout, commit: str) -> SnapshotRecord | None:
        """What install recorded about a snapshot, or None if there is no record."""
        if not is_hex(commit, (40, 64)):  # a damaged ref names no snapshot
            return None
        path = repo.snapshot_record(commit)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        # A record is replaced only by a rename (a new inode): parsed once per version.
        key = (path, st.st_ino, st.st_mtime_ns, st.st_size)
        record = _RECORDS.get(key)
        if record is None:
            # Never treated as "no record": gc would then free the snapshot's blobs.
            record = read_record(path, SnapshotRecord.from_json, "this snapshot record is "
                                 "unreadable; run 'mirror verify' and reinstall its bundle "
                                 "with --force")
            if len(_RECORDS) >= _RECORDS_KEPT:
                _RECORDS.pop(next(iter(_RECORDS)))
            _RECORDS[key] = record
        return record

    def ref_commit(self, repo: RepoLayout, kind: str, name: str) -> str | None:
        """The commit a branch or tag names, or None if there is no such ref."""
        return _read_text(repo.ref(kind, name))

    def last_move(self, repo: RepoLayout, kind: str, name: str) -> RefLogEntry | None:
        """The newest ``refs.log`` entry that moved this ref, if the log has one (lines
        that do not parse, from a crash in the middle of an append, are passed over)."""
        try:
            with open(repo.refs_log, "rb") as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            return None
        for line in reversed(lines):
            try:
                entry = RefLogEntry.from_json(json.loads(line))
            except (ValueError, RecursionError):  # InvalidRecordError is a ValueError
                continue
            if (entry.kind, entry.ref) == (kind, name):
                return entry
        return None

    def commits(self, repo: RepoLayout) -> List[str]:
        """Commits with a snapshot directory."""
        return [c for c in listing(repo.snapshots)
                if not c.endswith(".json") and os.path.isdir(repo.snapshot(c))]

    def ref_entries(self, repo: RepoLayout) -> List[RefHead]:
        """Every branch and tag of a repo, both kept when a branch and a tag share a name."""
        out = []
        for folder, kind in REF_FOLDERS:
            base = os.path.join(repo.refs, folder)
            for dirpath, _, names in os.walk(base):
                for n in names:
                    if not n.startswith(TEMP_PREFIX):
                        full = os.path.join(dirpath, n)
                        out.append(RefHead(kind, os.path.relpath(full, base),
                                           _read_text(full) or ""))
        return sorted(out, key=lambda r: (r.kind, r.name))

    def refs(self, repo: RepoLayout) -> Dict[str, RefHead]:
        """``name -> head``, as ``:name`` resolves: a branch wins over a tag."""
        out: Dict[str, RefHead] = {}
        for head in sorted(self.ref_entries(repo), key=lambda e: e.kind != "tag"):
            out[head.name] = head
        return out

    # --- resolving -----------------------------------------------------------

    def resolve(self, owner: str, name: str, ref: str | None = None,
                commit: str | None = None, host: str = DEFAULT_HOST) -> SnapshotRef:
        """The snapshot that ``owner/name[:ref]`` or ``commit=`` names, as MegEngine Hub would.

        ``commit`` (full or a unique abbreviation) wins over ``ref``, as in MegEngine.
        Raises :class:`NotInstalledError` (naming what the store has instead) or
        :class:`AmbiguousCommitError`.
        """
        repo = self.find_repo(host, owner, name)
        label = f"{owner}/{name}" if host == DEFAULT_HOST else f"{host}/{owner}/{name}"
        refs, commits = self.refs(repo), self.commits(repo)
        if commit:
            matches = [c for c in commits if c.startswith(commit.lower())]
            if len(matches) > 1:
                raise AmbiguousCommitError(label, commit, matches)
            if not matches:
                raise NotInstalledError(label, None, commit, self._describe(repo, refs, commits),
                                        self.home)
            return SnapshotRef(label, matches[0], repo)
        if not ref or ref not in refs or refs[ref].commit not in commits:
            raise NotInstalledError(label, ref, None, self._describe(repo, refs, commits),
                                    self.home)
        return SnapshotRef(label, refs[ref].commit, repo)

    def find_repo(self, host: str, owner: str, name: str) -> RepoLayout:
        """The repo's paths; for the default host, also a repo packed from one other host.

        MegEngine's own cache key ignores ``git_host``, so ``load("owner/name")`` finds
        code fetched from any host; the store does the same when only one host has it.
        """
        repo = self.layout.repo(host, owner, name)
        if os.path.exists(repo.repo_json) or host != DEFAULT_HOST:
            return repo
        others = self.layout.repo_hosts(owner, name)
        if len(others) > 1:
            hosts = ", ".join(os.path.basename(os.path.dirname(os.path.dirname(r.path)))
                              for r in others)
            raise NotInstalledError(f"{owner}/{name}", store=self.home, available=[
                f"copies from several hosts ({hosts}): pass git_host= to choose"])
        return others[0] if others else repo

    def _describe(self, repo: RepoLayout, refs: Dict[str, RefHead],
                  commits: List[str]) -> List[str]:
        def when(commit: str) -> str:
            record = self.snapshot_record(repo, commit)
            stamp = record.installed_at if record else 0
            return time.strftime(" (installed %Y-%m-%d %H:%M UTC)", time.gmtime(stamp)) \
                if stamp else ""

        named = [f"{h.kind} {n} -> {short(h.commit)}{when(h.commit)}"
                 for n, h in sorted(refs.items())]
        pointed = {h.commit for h in refs.values()}
        return named + [f"commit {short(c)}{when(c)}" for c in commits if c not in pointed]

    def weight(self, url: str, snap: SnapshotRef | None = None) -> WeightFile | None:
        """The stored file for a weight URL, or None if no installed bundle brought it.

        With ``snap``, the bytes that snapshot was installed with for ``url``; else
        (or for a URL its code was not known to use) those of :meth:`url_pin`.
        """
        pin = None
        if snap is not None:
            record = self.snapshot_record(snap.repo_layout, snap.commit)
            pin = record.weight_digests.get(url) if record else None
        if pin is None:
            pin = self.url_pin(url)
        if pin is None:
            return None
        return WeightFile(url, self.layout.blob(pin.sha256), pin.size, pin.sha256)

    def url_pin(self, url: str) -> Pin | None:
        """The bytes ``url`` stands for outside any snapshot's code (a bare
        ``load_serialized_obj_from_url``, and MegEngine's one cached file for the URL),
        by one rule that installing an older bundle again cannot roll back:

        1. what the default branch (``master``) of the installed repos pins for it;
        2. else what the installed snapshots that pin it pin, if they agree;
        3. else, for a weight no snapshot pins (``pack --weights``), what the newest
           bundle that brought it says, by the time the bundle was made.

        Raises :class:`AmbiguousWeightError` when a step finds different bytes.
        """
        found = self.url_pins({url}).get(url)
        if isinstance(found, AmbiguousWeightError):
            raise found
        return found

    def url_pins(self, urls: Set[str] | None = None
                 ) -> Dict[str, Pin | AmbiguousWeightError]:
        """:meth:`url_pin` for every URL in ``urls`` (default: every URL a snapshot or a
        bundle record pins), in one pass over the records."""
        heads: Dict[str, Dict[Pin, List[str]]] = {}  # url -> pin -> snapshots on master
        others: Dict[str, Dict[Pin, List[str]]] = {}
        for repo in self.layout.all_repos():
            master = self.ref_commit(repo, "branch", DEFAULT_BRANCH)
            for commit in self.commits(repo):
                try:
                    record = self.snapshot_record(repo, commit)
                except StoreError:  # 'mirror verify' reports it; it pins nothing here
                    continue
                for url, pin in (record.weight_digests.items() if record else ()):
                    if urls is None or url in urls:
                        found = heads if commit == master else others
                        found.setdefault(url, {}).setdefault(pin, []).append(
                            f"{self._label(repo)}@{short(commit)}")
        out: Dict[str, Pin | AmbiguousWeightError] = {}
        for url in set(heads) | set(others):
            by_pin = heads.get(url) or others[url]
            out[url] = next(iter(by_pin)) if len(by_pin) == 1 else AmbiguousWeightError(
                url, {p.sha256: who for p, who in by_pin.items()})
        if urls is None or set(urls) - set(out):
            for url, pin in self._newest_bundle_pins(urls).items():
                out.setdefault(url, pin)
        return out

    def _newest_bundle_pins(self, urls: Set[str] | None
                            ) -> Dict[str, Pin | AmbiguousWeightError]:
        newest: Dict[str, Tuple[int, Set[Pin]]] = {}  # url -> (created, pins then)
        for name in listing(self.layout.bundles):
            try:
                manifest = read_record(os.path.join(self.layout.bundles, name),
                                       Manifest.from_stored)
            except StoreError:
                continue
            for w in manifest.weights:
                if urls is not None and w.url not in urls:
                    continue
                created, pins = newest.get(w.url, (manifest.created, set()))
                if manifest.created > created:
                    created, pins = manifest.created, set()
                if manifest.created == created:
                    pins.add(Pin(w.sha256, w.size))
                newest[w.url] = (created, pins)
        return {url: next(iter(pins)) if len(pins) == 1 else AmbiguousWeightError(
            url, {p.sha256: ["bundles made at the same time"] for p in pins})
            for url, (_, pins) in newest.items()}

    def _label(self, repo: RepoLayout) -> str:
        try:
            return self.repo_id(repo).label
        except StoreError:
            return repo.path

    # --- listing -------------------------------------------------------------

    def repos(self) -> List[RepoSummary]:
        """Every installed repo with its refs and snapshots, for ``mirror list``. A
        record that cannot be read is named in its repo's ``problems``: listing what
        is installed never fails because of one record."""
        out = []
        for repo in self.layout.all_repos():
            problems = []
            try:
                ident = self.repo_id(repo)
            except StoreError as e:
                problems.append(str(e))
                host, owner, name = repo.path.split(os.sep)[-3:]
                ident = RepoId(host, owner, name, "")
            snapshots = []
            for commit in self.commits(repo):
                try:
                    record = self.snapshot_record(repo, commit)
                except StoreError as e:
                    problems.append(str(e))
                    record = None
                snapshots.append(self._summary(commit, record))
            refs = []
            for head in self.ref_entries(repo):  # a branch and a tag of one name: both
                if is_hex(head.commit, (40,)):
                    refs.append(head)
                else:
                    problems.append(f"{head.kind} {head.name} of {ident.label} holds "
                                    f"{head.commit[:40]!r}, not a commit id; run 'mirror "
                                    f"verify'")
            out.append(RepoSummary(ident, tuple(sorted(refs, key=lambda h: (h.name, h.kind))),
                                   tuple(snapshots), tuple(problems)))
        return sorted(out, key=lambda r: (r.id.host, r.id.owner.lower(), r.id.name.lower()))

    def _summary(self, commit: str, record: SnapshotRecord | None) -> SnapshotSummary:
        if record is None:
            return SnapshotSummary(commit, 0, 0, (), (), None, None, None, readable=False)
        snap = record.snapshot
        weights = tuple((url, record.weight_digests.get(url)) for url in snap.weights)
        return SnapshotSummary(commit, len(snap.files), snap.size, snap.entrypoints,
                               weights, record.bundle, record.bundle_file,
                               record.installed_at, record.proven)


UNREADABLE = "this record is unreadable; run 'mirror verify'"
_RECORDS: Dict[Tuple[str, int, int, int], SnapshotRecord] = {}  # see snapshot_record
_RECORDS_KEPT = 1024


def read_record(path: str, parse: Callable[[Any], T], message: str = UNREADABLE) -> T:
    """The JSON record at ``path``, parsed by ``parse`` (a ``from_json``); a missing,
    unreadable or malformed one is a :class:`StoreError` naming it, with ``message``."""
    try:
        with open(path, "rb") as fh:
            return parse(json.loads(fh.read()))
    except (OSError, ValueError, RecursionError):  # InvalidRecordError is a ValueError
        raise StoreError(path, message) from None


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            # A damaged ref shows as what it holds (and names no snapshot), never a crash.
            return fh.read(4096).decode("utf-8", "replace").strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None  # IsADirectory: refs/heads/master/ holds a branch master/x
