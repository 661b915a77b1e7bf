"""Keeping a store healthy: ``verify`` it, ``remove`` what a user names, ``gc`` the rest.

``verify`` re-hashes every blob and checks every snapshot, ref and weight
against the records written at install. ``remove`` drops refs and snapshots;
``gc`` then deletes what nothing references any more: never a blob that a
remaining snapshot or weight still uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Set, Tuple, TypeVar

from .errors import MirrorError, NotInstalledError, StoreError
from .hashing import sha256_bytes, sha256_file
from .ids import short
from .layout import TEMP_PREFIX, RepoLayout, listing
from .links import decode, refused
from .locking import locked
from .model import MODE_LINK, JsonObject, Manifest, SnapshotRecord
from .proof import ObjectDatabase, ProofError
from .refs import RepoSpec
from .store import RefHead, Store, read_record
from .tree import walk

T = TypeVar("T")


def _records(store: Store, repo: RepoLayout) -> Dict[str, SnapshotRecord]:
    """Snapshot records of a repo whose snapshot directory exists, by commit."""
    out = {}
    for commit in store.commits(repo):
        record = store.snapshot_record(repo, commit)
        if record is not None:
            out[commit] = record
    return out


# --- verify ------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What ``verify`` checked, and every problem found (none means the store is sound)."""

    home: str
    blobs: int = 0
    bytes: int = 0
    snapshots: int = 0
    files: int = 0
    refs: int = 0
    weights: int = 0
    proven: int = 0  # snapshots whose git ids were recomputed from their bytes
    seeds: int = 0  # paths the store seeded into MegEngine's cache, checked
    unproven: int = 0  # snapshots of format 1 bundles, which carry no git objects
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> JsonObject:
        return dict(dataclasses.asdict(self), ok=self.ok)


def verify(store: Store, progress: bool = False) -> VerifyReport:
    """Re-hash every blob; check every snapshot file, ref, record and weight pin.

    Whatever is unreadable or malformed is a problem in the report, not a crash.
    """
    report = VerifyReport(store.home)
    good = _verify_blobs(store, report, progress)
    for repo in store.layout.all_repos():
        with _problem(report, f"repo {repo.repo_json}"):
            _verify_repo(store, repo, good, report)
    layout = store.layout
    for name in listing(layout.bundles):
        path = os.path.join(layout.bundles, name)
        with _problem(report, f"bundle record {path}"):
            if sha256_file(path)[0] != name[:-5]:
                report.problems.append(f"bundle record {path} was changed: its digest no "
                                       f"longer matches its name")
    with _problem(report, f"seed ledgers in {layout.seeds}"):
        from .megengine_cache import check, ledgers

        report.seeds = sum(len(ledger.seeds) for ledger in ledgers(store))
        report.problems += check(store)
    return report


def _verify_blobs(store: Store, report: VerifyReport, progress: bool) -> Dict[str, int]:
    """Re-hash every blob; return sha256 -> inode of those whose content matches their
    name (a snapshot file hard-linked to one needs no second hash)."""
    from tqdm import tqdm  # here, as in bundle.read: other commands start sooner

    good: Dict[str, int] = {}
    names = listing(store.layout.blobs)
    for name in tqdm(names, desc="blobs", unit="blob", disable=not progress or None,
                     leave=False):
        path = store.layout.blob(name)
        report.blobs += 1
        with _problem(report, f"blob {path}"):
            report.bytes += os.path.getsize(path)
            actual = sha256_file(path)[0]
            if actual != name:
                report.problems.append(f"blob {path} has sha256 {actual}: it was changed")
            else:
                good[name] = os.stat(path).st_ino
    return good


def _verify_repo(store: Store, repo: RepoLayout, good: Dict[str, int],
                 report: VerifyReport) -> None:
    label = store.repo_id(repo).label
    commits = set(store.commits(repo))
    for commit in sorted(commits):
        report.snapshots += 1
        with _problem(report, f"snapshot {label}@{short(commit)}"):
            _verify_snapshot(store, repo, commit, f"{label}@{short(commit)}", good, report)
            record = store.snapshot_record(repo, commit)
            report.weights += len(record.weight_digests) if record else 0
    for head in store.ref_entries(repo):
        report.refs += 1
        if head.commit not in commits:
            report.problems.append(f"{head.kind} {label}:{head.name} points at "
                                   f"{short(head.commit) or '?'}, which is not installed")


def _prove_again(store: Store, record: SnapshotRecord, label: str, good: Dict[str, int],
                 report: VerifyReport) -> None:
    """Recompute the snapshot's git ids from its stored objects and blobs."""
    if not record.proven:
        report.unproven += 1
        return
    blobs = [record.snapshot.objects.sha256] + [f.sha256 for f in record.snapshot.files]
    if not all(b in good for b in blobs):
        return  # a changed or missing blob: already a problem of its own
    with tempfile.TemporaryDirectory(prefix="mirror-verify-") as work:
        db = ObjectDatabase(os.path.join(work, "objects.git"))
        with open(store.layout.blob(record.snapshot.objects.sha256), "rb") as fh:
            objects = fh.read()
        try:
            db.prove(record.snapshot, objects, lambda f: store.layout.blob(f.sha256))
        except ProofError as e:
            report.problems.append(f"snapshot {label}: {e}")
            return
    report.proven += 1


@contextlib.contextmanager
def _problem(report: VerifyReport, what: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, MirrorError) as e:
        report.problems.append(f"{what} cannot be checked: {type(e).__name__}: {e}")


def _verify_snapshot(store: Store, repo: RepoLayout, commit: str, label: str,
                     good: Dict[str, int], report: VerifyReport) -> None:
    root = repo.snapshot(commit)
    record = store.snapshot_record(repo, commit)
    if record is None:
        report.problems.append(f"snapshot {label} ({root}) has no record")
        return
    _prove_again(store, record, label, good, report)
    expected = {f.path: f for f in record.snapshot.files}
    actual = set(walk(root))
    for path in sorted(actual - set(expected)):
        report.problems.append(f"snapshot {label}: {path} was added by hand ({root}/{path})")
    for path in sorted(set(expected) - actual):
        report.problems.append(f"snapshot {label}: {path} is missing ({root}/{path})")
    targets: Dict[str, str] = {}  # link -> its target, as installed
    for path in sorted(actual & set(expected)):
        report.files += 1
        f, full = expected[path], os.path.join(root, path)
        if f.mode == MODE_LINK:
            target = os.readlink(full) if os.path.islink(full) else None
            same = target is not None and sha256_bytes(os.fsencode(target)) == f.sha256
            if same:
                targets[path] = target
        elif os.path.islink(full):
            same = False
        elif good.get(f.sha256) == os.stat(full).st_ino:
            same = True  # a hard link to a blob that was just verified
        else:
            same = sha256_file(full)[0] == f.sha256
        if not same:
            report.problems.append(f"snapshot {label}: {path} was changed ({full})")
    links = [f for f in record.snapshot.files if f.is_link]
    for f in links:  # a link changed or missing: its target as installed, from its blob
        if f.path not in targets and f.sha256 in good:
            with open(store.layout.blob(f.sha256), "rb") as fh:
                targets[f.path] = decode(fh.read())
    # Installed by a mirror that checked each link alone: one may lead another out.
    bad = refused(commit, record.snapshot.files, targets) \
        if len(targets) == len(links) else None
    if bad is not None:
        report.problems.append(f"snapshot {label}: {bad.message}")
    for url, pin in record.weight_digests.items():
        if pin.sha256 not in good:
            report.problems.append(f"snapshot {label}: weight {url} (blob "
                                   f"{store.layout.blob(pin.sha256)}) is missing or wrong")


# --- remove and gc -----------------------------------------------------------


@dataclass
class Plan:
    """What ``remove`` or ``gc`` deletes (or, in a dry run, would delete)."""

    refs: List[str] = field(default_factory=list)
    snapshots: List[str] = field(default_factory=list)
    blobs: List[str] = field(default_factory=list)
    other: List[str] = field(default_factory=list)  # records, abandoned work
    seeds: List[str] = field(default_factory=list)  # in MegEngine's cache, the store's own
    # On disk, as the filesystem counts it: a blob still linked from elsewhere frees
    # nothing. A dry run counts every blob: what it would free at most.
    bytes_freed: int = 0
    dry_run: bool = False


def remove(store: Store, spec: str, dry_run: bool = False) -> Plan:
    """Remove a repo (``owner/name``), a ref (``owner/name:ref``) or a commit
    (``owner/name@commit``), then collect what nothing references any more.

    A ref's snapshot goes with it unless another ref still points at it. The plan
    is made under the store lock, so no install can change refs in between.
    """
    parsed = RepoSpec.parse(spec)
    if dry_run:
        return _remove(store, parsed, dry_run=True)
    with _exclusive(store, "remove"):
        return _remove(store, parsed, dry_run=False)


def _remove(store: Store, parsed: RepoSpec, dry_run: bool) -> Plan:
    repo = store.find_repo(parsed.host, parsed.owner, parsed.name)
    entries = store.ref_entries(repo)
    commits = store.commits(repo)
    if not commits and not entries:
        raise NotInstalledError(parsed.repo, parsed.ref, parsed.commit, store=store.home)
    doomed_refs, doomed = _doomed(store, repo, parsed, entries, commits)
    plan = Plan(dry_run=dry_run)
    plan.refs = sorted(f"{parsed.repo}:{h.name}" for h in doomed_refs)
    plan.snapshots = sorted(f"{parsed.repo}@{c}" for c in doomed)
    if dry_run:
        _collect(store, plan, gone={(repo.path, c) for c in doomed}, act=False)
        return plan
    # Refs first: from here on no load resolves to what is being deleted.
    for head in doomed_refs:
        _unlink(repo.ref(head.kind, head.name))
        _prune(os.path.dirname(repo.ref(head.kind, head.name)), repo.ref_folder(head.kind))
    trash = tempfile.mkdtemp(prefix="remove-", dir=_tmp(store))
    for commit in doomed:
        if os.path.isdir(repo.snapshot(commit)):
            os.rename(repo.snapshot(commit), os.path.join(trash, commit))  # whole, at once
        _unlink(repo.snapshot_record(commit))
    shutil.rmtree(trash, ignore_errors=True)
    _collect(store, plan, gone=set(), act=True)
    _drop_seeds(store, plan)
    return plan


def _drop_seeds(store: Store, plan: Plan) -> None:
    """The seeds in MegEngine's cache of what is gone: after the records and blobs
    that called for them, so a blob's bytes, linked from a seed, are counted freed
    when the seed, their last link, goes."""
    from .megengine_cache import reconcile_all

    for report in reconcile_all(store):
        plan.seeds += report.removed
        plan.bytes_freed += report.bytes_freed


def _doomed(store: Store, repo: RepoLayout, parsed: RepoSpec, entries: List[RefHead],
            commits: List[str]) -> Tuple[List[RefHead], Set[str]]:
    """The refs and commits that ``parsed`` names for removal. A ref's snapshot goes
    with it unless another ref still points at it."""
    if parsed.commit:
        snap = store.resolve(parsed.owner, parsed.name, None, parsed.commit, host=parsed.host)
        return [h for h in entries if h.commit == snap.commit], {snap.commit}
    if parsed.ref:
        head = store.refs(repo).get(parsed.ref)  # what ":ref" names: a branch first
        if head is None:
            raise NotInstalledError(parsed.repo, parsed.ref, None,
                                    [f"{h.kind} {h.name}" for h in entries], store.home)
        others = [h for h in entries if h != head]
        return [head], set() if any(h.commit == head.commit for h in others) else {head.commit}
    return list(entries), set(commits)


def gc(store: Store, dry_run: bool = False) -> Plan:
    """Delete blobs, records and abandoned work that nothing references."""
    plan = Plan(dry_run=dry_run)
    if dry_run:
        _collect(store, plan, gone=set(), act=False)
        return plan
    with _exclusive(store, "gc", wait=False):
        _collect(store, plan, gone=set(), act=True)
        _drop_seeds(store, plan)
    return plan


@contextlib.contextmanager
def _exclusive(store: Store, what: str, wait: bool = True) -> Iterator[None]:
    """The store lock, alone; OSErrors as one-line StoreErrors."""
    try:
        with locked(store.layout.lock, wait=wait):
            yield
    except BlockingIOError:
        raise StoreError(store.home, f"an install is running; run {what} when it has "
                                     f"finished") from None
    except OSError as e:
        raise StoreError(e.filename or store.home, f"{what} failed: {e.strerror or e}") \
            from None


def _collect(store: Store, plan: Plan, gone: Set[Tuple[str, str]], act: bool) -> None:
    """Find (and with ``act``, delete) everything unreferenced once ``gone`` (repo
    folder, commit) snapshots are removed."""
    live_blobs: Set[str] = set()
    installed: Set[str] = set()  # commits with a snapshot directory, that stay
    for repo in store.layout.all_repos():
        for commit, record in _records(store, repo).items():
            if (repo.path, commit) not in gone:
                installed.add(commit)
                live_blobs.update(record.blobs())
        _collect_leftovers(repo, plan, act)
    _collect_bundles(store, plan, installed, live_blobs, act)
    # The URL index of earlier mirrors (weights/<sha256(url)>.json): nothing reads it
    # any more, as an older bundle installed again could roll it back.
    for path in _record_paths(store.layout.weights, plan, act):
        _drop(path, plan.other, plan, act)
    # Bytecode an earlier mirror cached for snapshot code: snapshot code is now always
    # compiled from its checked source (mirror.importer), so this is never run.
    if os.path.isdir(store.layout.pycache):
        _drop(store.layout.pycache, plan.other, plan, act)
    blobs = store.layout.blobs
    for name in sorted(os.listdir(blobs)) if os.path.isdir(blobs) else []:
        if name not in live_blobs:
            path = os.path.join(blobs, name)
            st = os.lstat(path)
            # On disk, as du counts it: the last link of the blob's bytes frees them.
            plan.bytes_freed += st.st_blocks * 512 if st.st_nlink == 1 or not act else 0
            _drop(path, plan.blobs, plan, act)
    if act:  # under the exclusive lock, so no install is running: all of tmp/ is abandoned
        for name in os.listdir(_tmp(store)):
            _drop(os.path.join(_tmp(store), name), plan.other, plan, act)
        for folder in _orphan_repo_folders(store):
            _drop(folder, plan.other, plan, act)


def _collect_leftovers(repo: RepoLayout, plan: Plan, act: bool) -> None:
    """A record whose snapshot directory is gone is left from a crash or a remove; a
    dot-file is a write that a crash interrupted."""
    snaps = repo.snapshots
    for name in os.listdir(snaps) if os.path.isdir(snaps) else []:
        if name.startswith(".") or (name.endswith(".json") and not os.path.isdir(
                os.path.join(snaps, name[:-5]))):
            _drop(os.path.join(snaps, name), plan.other, plan, act)
    for dirpath, dirnames, names in os.walk(repo.refs, topdown=False):
        for name in names:
            if name.startswith(TEMP_PREFIX):
                _drop(os.path.join(dirpath, name), plan.other, plan, act)
        # An empty folder of refs (release/ once release/1.0 went) would stop a branch
        # named release from ever being installed.
        if dirpath not in (repo.refs, repo.ref_folder("branch"), repo.ref_folder("tag")) \
                and not names and not dirnames and act:
            _prune(dirpath, repo.refs)


def _collect_bundles(store: Store, plan: Plan, installed: Set[str], live_blobs: Set[str],
                     act: bool) -> None:
    """A bundle record stays while any snapshot it brought is installed (or it brought
    only weights), and with it every weight it brought, pack --weights extras included."""
    kept: Set[str] = set()  # bundle ids whose record stays
    for path in _record_paths(store.layout.bundles, plan, act):
        manifest = read_record(path, Manifest.from_stored, _UNREADABLE)
        commits = {s.commit for r in manifest.repos for s in r.snapshots}
        if not commits or commits & installed:
            live_blobs.update(w.sha256 for w in manifest.weights)
            kept.add(os.path.basename(path)[:-len(".json")])
        else:
            _drop(path, plan.other, plan, act)
    # A signature goes with its bundle's record.
    for path in _record_paths(store.layout.signatures, plan, act):
        if os.path.basename(path)[:-len(".sig")] not in kept:
            _drop(path, plan.other, plan, act)


def _record_paths(folder: str, plan: Plan, act: bool) -> Iterator[str]:
    """The records in a store folder; leftovers of interrupted writes are dropped."""
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name.startswith("."):
            _drop(path, plan.other, plan, act)
        else:
            yield path


# An unreadable record stops gc: what it keeps alive cannot be known, and guessing
# would delete what it protects.
_UNREADABLE = "this record is unreadable, so gc cannot tell what it keeps alive; run " \
              "'mirror verify'"


def _prune(folder: str, top: str) -> None:
    """Remove ``folder`` and its parents up to (not including) ``top`` while empty."""
    while folder != top and folder.startswith(top + os.sep):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (or gone): stop
            return
        folder = os.path.dirname(folder)


def _orphan_repo_folders(store: Store) -> Iterator[str]:
    """Repo folders with no repo.json and nothing but a lock in them: left by an
    install that failed under the repo's lock (no reader counts them as a repo)."""
    for host in listing(store.layout.repos):
        for owner in listing(os.path.join(store.layout.repos, host)):
            for name in listing(os.path.join(store.layout.repos, host, owner)):
                folder = os.path.join(store.layout.repos, host, owner, name)
                if not os.path.exists(os.path.join(folder, "repo.json")) and \
                        set(os.listdir(folder)) <= {".refs.lock"}:
                    yield folder


def _drop(path: str, items: List[str], plan: Plan, act: bool) -> None:
    items.append(path)
    if act:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _tmp(store: Store) -> str:
    os.makedirs(store.layout.tmp, exist_ok=True)
    return store.layout.tmp
