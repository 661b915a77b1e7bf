"""Keeping a store healthy: ``verify`` it, ``remove`` what a user names, ``gc`` the rest.

``verify`` re-hashes every blob and checks every snapshot, ref and weight
against the records written at install. ``remove`` drops refs and snapshots;
``gc`` then deletes what nothing references any more: never a blob that a
remaining snapshot or weight still uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Set, Tuple

from tqdm import tqdm

from .errors import NotInstalledError, StoreError
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
    """Re-hash every blob; check every snapshot file, ref and weight index entry."""
    report = VerifyReport(store.home)
    blobs_dir = os.path.join(store.home, "blobs")
    good: Dict[str, int] = {}  # sha256 -> inode of a blob whose content matches its name
    names = sorted(n for n in os.listdir(blobs_dir) if not n.startswith(".")) \
        if os.path.isdir(blobs_dir) else []
    for name in tqdm(names, desc="blobs", unit="blob", disable=not progress or None,
                     leave=False):
        path = os.path.join(blobs_dir, name)
        report.blobs += 1
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
            _verify_snapshot(store, rdir, commit, f"{label}@{commit[:12]}", good, report)
        for ref, (kind, commit) in sorted(store.refs(rdir).items()):
            report.refs += 1
            if commit not in commits:
                report.problems.append(f"{kind} {label}:{ref} points at {commit[:12] or '?'}, "
                                       f"which is not installed")

    bundles_dir = os.path.join(store.home, "bundles")
    for name in sorted(os.listdir(bundles_dir)) if os.path.isdir(bundles_dir) else []:
        if not name.startswith(".") and _hash_file(os.path.join(bundles_dir, name)) != name[:-5]:
            report.problems.append(f"bundle record {os.path.join(bundles_dir, name)} was "
                                   f"changed: its digest no longer matches its name")

    weights_dir = os.path.join(store.home, "weights")
    for name in sorted(os.listdir(weights_dir)) if os.path.isdir(weights_dir) else []:
        if name.startswith("."):
            continue
        report.weights += 1
        with open(os.path.join(weights_dir, name)) as fh:
            rec = json.load(fh)
        blob = store.blob(rec["sha256"])
        if rec["sha256"] not in good or os.path.getsize(blob) != rec["size"]:
            report.problems.append(f"weight {rec['url']}: blob {blob} is missing or wrong")
    return report


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
            with open(store.blob(f["sha256"]), "rb") as fh:
                same = os.path.islink(full) and os.readlink(full).encode() == fh.read()
        elif os.path.islink(full):
            same = False
        elif good.get(f["sha256"]) == os.stat(full).st_ino:
            same = True  # a hard link to a blob that was just verified
        else:
            same = _hash_file(full) == f["sha256"]
        if not same:
            report.problems.append(f"snapshot {label}: {path} was changed ({full})")


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

    A ref's snapshot goes with it unless another ref still points at it.
    """
    parsed = RepoSpec.parse(spec)
    rdir = store.find_repo(parsed.host, parsed.owner, parsed.name)
    refs = store.refs(rdir)
    commits = store.commits(rdir)
    if not commits and not refs:
        raise NotInstalledError(parsed.repo, parsed.ref, parsed.commit, store=store.home)
    ref_paths: List[Tuple[str, str]] = []  # (label, file)
    doomed: Set[str] = set()
    if parsed.commit:
        snap = store.resolve(parsed.owner, parsed.name, None, parsed.commit, host=parsed.host)
        doomed.add(snap.commit)
        ref_paths += [(n, _ref_file(rdir, k, n)) for n, (k, c) in refs.items()
                      if c == snap.commit]
    elif parsed.ref:
        if parsed.ref not in refs:
            raise NotInstalledError(parsed.repo, parsed.ref, None,
                                    [f"{k} {n}" for n, (k, _) in sorted(refs.items())],
                                    store.home)
        kind, commit = refs[parsed.ref]
        ref_paths.append((parsed.ref, _ref_file(rdir, kind, parsed.ref)))
        if not any(c == commit for n, (_, c) in refs.items() if n != parsed.ref):
            doomed.add(commit)
    else:
        doomed.update(commits)
        ref_paths += [(n, _ref_file(rdir, k, n)) for n, (k, _) in refs.items()]

    plan = Plan(dry_run=dry_run)
    plan.refs = sorted(f"{parsed.repo}:{n}" for n, _ in ref_paths)
    plan.snapshots = sorted(f"{parsed.repo}@{c}" for c in doomed)
    if dry_run:
        _collect(store, plan, exclude=doomed, rdir=rdir, act=False)
        return plan
    with locked(store.lock_path):
        # Refs first: from here on no load resolves to what is being deleted.
        for _, path in ref_paths:
            _unlink(path)
        trash = tempfile.mkdtemp(prefix="remove-", dir=_tmp(store))
        for commit in doomed:
            snap = os.path.join(rdir, "snapshots", commit)
            if os.path.isdir(snap):
                os.rename(snap, os.path.join(trash, commit))  # gone whole, in one step
            _unlink(snap + ".json")
        shutil.rmtree(trash, ignore_errors=True)
        _collect(store, plan, exclude=set(), rdir=None, act=True)
    return plan


def gc(store: Store, dry_run: bool = False) -> Plan:
    """Delete blobs, index entries, records and abandoned work that nothing references."""
    plan = Plan(dry_run=dry_run)
    if dry_run:
        _collect(store, plan, exclude=set(), rdir=None, act=False)
        return plan
    try:
        with locked(store.lock_path, wait=False):
            _collect(store, plan, exclude=set(), rdir=None, act=True)
    except BlockingIOError:
        raise StoreError(store.home, "an install is running; run gc when it has finished") \
            from None
    return plan


def _collect(store: Store, plan: Plan, exclude: Set[str], rdir: str | None, act: bool) -> None:
    """Find (and with ``act``, delete) everything unreferenced once ``exclude`` is gone."""
    live_blobs: Set[str] = set()
    live_urls: Set[str] = set()
    live_bundles: Set[str] = set()
    for repo_dir, _ in _repo_dirs(store):
        for commit, record in _records(store, repo_dir).items():
            if repo_dir == rdir and commit in exclude:
                continue
            live_blobs.update(f["sha256"] for f in record["files"])
            live_urls.update(record.get("weights", []))
            live_bundles.add(record.get("bundle", ""))
        # A record whose snapshot directory is gone is left from a crash or a remove;
        # a ".tmp-" file is a write that a crash interrupted.
        snaps = os.path.join(repo_dir, "snapshots")
        for name in os.listdir(snaps) if os.path.isdir(snaps) else []:
            if name.startswith(".") or (name.endswith(".json") and not os.path.isdir(
                    os.path.join(snaps, name[:-5]))):
                _drop(os.path.join(snaps, name), plan.other, plan, act)
        for dirpath, _, names in os.walk(os.path.join(repo_dir, "refs")):
            for name in names:
                if name.startswith(".tmp-"):
                    _drop(os.path.join(dirpath, name), plan.other, plan, act)

    bundles_dir = os.path.join(store.home, "bundles")
    for name in sorted(os.listdir(bundles_dir)) if os.path.isdir(bundles_dir) else []:
        path = os.path.join(bundles_dir, name)
        if name.startswith("."):
            _drop(path, plan.other, plan, act)
            continue
        with open(path) as fh:
            manifest = json.load(fh)
        # Weights a bundle brought beyond its snapshots' own (pack --weights) live as
        # long as the bundle does: until none of its snapshots remains.
        if name[:-5] in live_bundles or not manifest["repos"]:
            live_urls.update(w["url"] for w in manifest["weights"])
        else:
            _drop(path, plan.other, plan, act)

    weights_dir = os.path.join(store.home, "weights")
    for name in sorted(os.listdir(weights_dir)) if os.path.isdir(weights_dir) else []:
        path = os.path.join(weights_dir, name)
        if name.startswith("."):
            _drop(path, plan.other, plan, act)
            continue
        with open(path) as fh:
            rec = json.load(fh)
        if rec["url"] in live_urls:
            live_blobs.add(rec["sha256"])
        else:
            _drop(path, plan.other, plan, act)

    blobs_dir = os.path.join(store.home, "blobs")
    for name in sorted(os.listdir(blobs_dir)) if os.path.isdir(blobs_dir) else []:
        if name not in live_blobs:
            path = os.path.join(blobs_dir, name)
            plan.bytes_freed += os.path.getsize(path)
            _drop(path, plan.blobs, plan, act)

    if act:  # under the exclusive lock, so no install is running: all of tmp/ is abandoned
        for name in os.listdir(_tmp(store)):
            _drop(os.path.join(_tmp(store), name), plan.other, plan, act)


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
