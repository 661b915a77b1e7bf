"""Keeping a store healthy: ``verify`` it, ``remove`` what a user names, ``gc`` the rest.

``verify`` re-hashes every blob and checks every snapshot, ref and weight
against the records written at install. ``remove`` drops refs and snapshots;
``gc`` then deletes what nothing references any more: never a blob that a
remaining snapshot or weight still uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Set, Tuple

from .errors import MirrorError, NotInstalledError, StoreError
from .refs import RepoSpec
from .store import Store, locked

CHUNK = 1 << 20


def _hash_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _repo_dirs(store: Store) -> Iterator[Tuple[str, Dict[str, Any]]]:
    for dirpath, dirnames, filenames in os.walk(os.path.join(store.home, "repos")):
        if "repo.json" in filenames:
            dirnames[:] = []
            with open(os.path.join(dirpath, "repo.json")) as fh:
                yield dirpath, json.load(fh)


def _records(store: Store, rdir: str) -> Dict[str, Dict[str, Any]]:
    """Snapshot records of a repo whose snapshot directory exists, by commit."""
    out = {}
    for commit in store.commits(rdir):
        record = store.snapshot_record(rdir, commit)
        if record is not None:
            out[commit] = record
    return out


def _files(root: str) -> Iterator[str]:
    """Every file and symlink below ``root``, as relative POSIX paths."""
    for dirpath, dirnames, filenames in os.walk(root):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            yield os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")


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
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: Store, progress: bool = False) -> VerifyReport:
    """Re-hash every blob; check every snapshot file, ref, record and weight index entry.

    Whatever is unreadable or malformed is a problem in the report, not a crash.
    """
    from tqdm import tqdm  # here, as in bundle.read: other commands start sooner

    report = VerifyReport(store.home)
    good: Dict[str, int] = {}  # sha256 -> inode of a blob whose content matches its name
    blobs_dir = os.path.join(store.home, "blobs")
    names = _listing(blobs_dir)
    for name in tqdm(names, desc="blobs", unit="blob", disable=not progress or None,
                     leave=False):
        path = os.path.join(blobs_dir, name)
        report.blobs += 1
        with _problem(report, f"blob {path}"):
            report.bytes += os.path.getsize(path)
            actual = _hash_file(path)
            if actual != name:
                report.problems.append(f"blob {path} has sha256 {actual}: it was changed")
            else:
                good[name] = os.stat(path).st_ino

    for rdir, ident in _repo_dirs(store):
        label = f"{ident['owner']}/{ident['name']}"
        commits = set(store.commits(rdir))
        for commit in sorted(commits):
            report.snapshots += 1
            with _problem(report, f"snapshot {label}@{commit[:12]}"):
                _verify_snapshot(store, rdir, commit, f"{label}@{commit[:12]}", good, report)
        for kind, ref, commit in store.ref_entries(rdir):
            report.refs += 1
            if commit not in commits:
                report.problems.append(f"{kind} {label}:{ref} points at {commit[:12] or '?'}, "
                                       f"which is not installed")

    bundles_dir = os.path.join(store.home, "bundles")
    for name in _listing(bundles_dir):
        path = os.path.join(bundles_dir, name)
        with _problem(report, f"bundle record {path}"):
            if _hash_file(path) != name[:-5]:
                report.problems.append(f"bundle record {path} was changed: its digest no "
                                       f"longer matches its name")

    weights_dir = os.path.join(store.home, "weights")
    for name in _listing(weights_dir):
        report.weights += 1
        path = os.path.join(weights_dir, name)
        with _problem(report, f"weight index entry {path}"):
            rec = _load_json(path)
            blob = store.blob(rec["sha256"])
            if rec["sha256"] not in good or os.path.getsize(blob) != rec["size"]:
                report.problems.append(f"weight {rec['url']}: blob {blob} is missing or wrong")
    return report


@contextlib.contextmanager
def _problem(report: VerifyReport, what: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, MirrorError) as e:
        report.problems.append(f"{what} cannot be checked: {type(e).__name__}: {e}")


def _listing(path: str) -> List[str]:
    """Names in a store folder, without the dot-files of interrupted writes."""
    return sorted(n for n in os.listdir(path) if not n.startswith(".")) \
        if os.path.isdir(path) else []


def _load_json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)


def _verify_snapshot(store: Store, rdir: str, commit: str, label: str, good: Dict[str, int],
                     report: VerifyReport) -> None:
    root = os.path.join(rdir, "snapshots", commit)
    record = store.snapshot_record(rdir, commit)
    if record is None:
        report.problems.append(f"snapshot {label} ({root}) has no record")
        return
    expected = {f["path"]: f for f in record["files"]}
    actual = set(_files(root))
    for path in sorted(actual - set(expected)):
        report.problems.append(f"snapshot {label}: {path} was added by hand ({root}/{path})")
    for path in sorted(set(expected) - actual):
        report.problems.append(f"snapshot {label}: {path} is missing ({root}/{path})")
    for path in sorted(actual & set(expected)):
        report.files += 1
        f, full = expected[path], os.path.join(root, path)
        if f["mode"] == 0o120000:
            same = os.path.islink(full) and hashlib.sha256(
                os.fsencode(os.readlink(full))).hexdigest() == f["sha256"]
        elif os.path.islink(full):
            same = False
        elif good.get(f["sha256"]) == os.stat(full).st_ino:
            same = True  # a hard link to a blob that was just verified
        else:
            same = _hash_file(full) == f["sha256"]
        if not same:
            report.problems.append(f"snapshot {label}: {path} was changed ({full})")
    for url, pinned in (record.get("weight_digests") or {}).items():
        if pinned["sha256"] not in good:
            report.problems.append(f"snapshot {label}: weight {url} (blob "
                                   f"{store.blob(pinned['sha256'])}) is missing or wrong")


# --- remove and gc -----------------------------------------------------------


@dataclass
class Plan:
    """What ``remove`` or ``gc`` deletes (or, in a dry run, would delete)."""

    refs: List[str] = field(default_factory=list)
    snapshots: List[str] = field(default_factory=list)
    blobs: List[str] = field(default_factory=list)
    other: List[str] = field(default_factory=list)  # records, index entries, abandoned work
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
    rdir = store.find_repo(parsed.host, parsed.owner, parsed.name)
    entries = store.ref_entries(rdir)
    commits = store.commits(rdir)
    if not commits and not entries:
        raise NotInstalledError(parsed.repo, parsed.ref, parsed.commit, store=store.home)
    doomed_refs: List[Tuple[str, str, str]] = []
    doomed: Set[str] = set()
    if parsed.commit:
        snap = store.resolve(parsed.owner, parsed.name, None, parsed.commit, host=parsed.host)
        doomed.add(snap.commit)
        doomed_refs = [e for e in entries if e[2] == snap.commit]
    elif parsed.ref:
        resolved = store.refs(rdir).get(parsed.ref)  # what ":ref" names: a branch first
        if resolved is None:
            raise NotInstalledError(parsed.repo, parsed.ref, None,
                                    [f"{k} {n}" for k, n, _ in entries], store.home)
        doomed_refs = [(resolved[0], parsed.ref, resolved[1])]
        others = [e for e in entries if e not in doomed_refs]
        if not any(commit == resolved[1] for _, _, commit in others):
            doomed.add(resolved[1])
    else:
        doomed.update(commits)
        doomed_refs = list(entries)

    plan = Plan(dry_run=dry_run)
    plan.refs = sorted(f"{parsed.repo}:{n}" for _, n, _ in doomed_refs)
    plan.snapshots = sorted(f"{parsed.repo}@{c}" for c in doomed)
    if dry_run:
        _collect(store, plan, gone={(rdir, c) for c in doomed}, act=False)
        return plan
    # Refs first: from here on no load resolves to what is being deleted.
    for kind, name, _ in doomed_refs:
        _unlink(_ref_file(rdir, kind, name))
    trash = tempfile.mkdtemp(prefix="remove-", dir=_tmp(store))
    for commit in doomed:
        snap_dir = os.path.join(rdir, "snapshots", commit)
        if os.path.isdir(snap_dir):
            os.rename(snap_dir, os.path.join(trash, commit))  # gone whole, in one step
        _unlink(snap_dir + ".json")
    shutil.rmtree(trash, ignore_errors=True)
    _collect(store, plan, gone=set(), act=True)
    return plan


def gc(store: Store, dry_run: bool = False) -> Plan:
    """Delete blobs, index entries, records and abandoned work that nothing references."""
    plan = Plan(dry_run=dry_run)
    if dry_run:
        _collect(store, plan, gone=set(), act=False)
        return plan
    with _exclusive(store, "gc", wait=False):
        _collect(store, plan, gone=set(), act=True)
    return plan


@contextlib.contextmanager
def _exclusive(store: Store, what: str, wait: bool = True) -> Iterator[None]:
    """The store lock, alone; OSErrors as one-line StoreErrors."""
    try:
        with locked(store.lock_path, wait=wait):
            yield
    except BlockingIOError:
        raise StoreError(store.home, f"an install is running; run {what} when it has "
                                     f"finished") from None
    except OSError as e:
        raise StoreError(e.filename or store.home, f"{what} failed: {e.strerror or e}") \
            from None


def _collect(store: Store, plan: Plan, gone: Set[Tuple[str, str]], act: bool) -> None:
    """Find (and with ``act``, delete) everything unreferenced once ``gone`` (repo
    directory, commit) snapshots are removed."""
    live_blobs: Set[str] = set()
    live_urls: Set[str] = set()
    installed: Set[str] = set()  # commits with a snapshot directory, that stay
    for repo_dir, _ in _repo_dirs(store):
        for commit, record in _records(store, repo_dir).items():
            if (repo_dir, commit) in gone:
                continue
            installed.add(commit)
            live_blobs.update(f["sha256"] for f in record["files"])
            live_blobs.update(w["sha256"] for w in (record.get("weight_digests") or {}).values())
            live_urls.update(record.get("weights", []))
        # A record whose snapshot directory is gone is left from a crash or a remove;
        # a dot-file is a write that a crash interrupted.
        snaps = os.path.join(repo_dir, "snapshots")
        for name in os.listdir(snaps) if os.path.isdir(snaps) else []:
            if name.startswith(".") or (name.endswith(".json") and not os.path.isdir(
                    os.path.join(snaps, name[:-5]))):
                _drop(os.path.join(snaps, name), plan.other, plan, act)
        for dirpath, _, names in os.walk(os.path.join(repo_dir, "refs")):
            for name in names:
                if name.startswith(".tmp-"):
                    _drop(os.path.join(dirpath, name), plan.other, plan, act)

    for path, manifest in _records_in(store, "bundles", plan, act):
        # A bundle stays while any snapshot it brought is installed (or it brought only
        # weights), and with it every weight it brought, pack --weights extras included.
        commits = {s["commit"] for r in manifest["repos"] for s in r["snapshots"]}
        if not commits or commits & installed:
            live_urls.update(w["url"] for w in manifest["weights"])
        else:
            _drop(path, plan.other, plan, act)

    for path, rec in _records_in(store, "weights", plan, act):
        if rec["url"] in live_urls:
            live_blobs.add(rec["sha256"])
        else:
            _drop(path, plan.other, plan, act)

    blobs_dir = os.path.join(store.home, "blobs")
    for name in sorted(os.listdir(blobs_dir)) if os.path.isdir(blobs_dir) else []:
        if name not in live_blobs:
            path = os.path.join(blobs_dir, name)
            plan.bytes_freed += os.path.getsize(path) if os.path.isfile(path) else 0
            _drop(path, plan.blobs, plan, act)

    if act:  # under the exclusive lock, so no install is running: all of tmp/ is abandoned
        for name in os.listdir(_tmp(store)):
            _drop(os.path.join(_tmp(store), name), plan.other, plan, act)


def _records_in(store: Store, folder: str, plan: Plan, act: bool) \
        -> Iterator[Tuple[str, Dict[str, Any]]]:
    """The JSON records in a store folder; leftovers of interrupted writes are dropped.

    An unreadable record stops gc: what it keeps alive cannot be known, and
    guessing would delete what it protects.
    """
    base = os.path.join(store.home, folder)
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        path = os.path.join(base, name)
        if name.startswith("."):
            _drop(path, plan.other, plan, act)
            continue
        try:
            yield path, _load_json(path)
        except (OSError, ValueError):
            raise StoreError(path, "this record is unreadable, so gc cannot tell what it "
                                   "keeps alive; run 'mirror verify'") from None


def _drop(path: str, listing: List[str], plan: Plan, act: bool) -> None:
    listing.append(path)
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
    path = os.path.join(store.home, "tmp")
    os.makedirs(path, exist_ok=True)
    return path


def _ref_file(rdir: str, kind: str, name: str) -> str:
    return os.path.join(rdir, "refs", "heads" if kind == "branch" else "tags", name)
