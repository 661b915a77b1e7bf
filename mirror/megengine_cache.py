"""Seed MegEngine Hub's own caches, so unmodified ``megengine.hub.load`` works offline.

MegEngine (megengine/hub/fetcher.py and hub.py, 1.13) looks for:

- repo code in ``MGE_HOME/hub/<v>_<h>``, ``<v>`` its version with dots as
  underscores and ``<h> = sha1(f"{owner}_{name}_{branch with / as _}" +
  (f"_{commit}" if commit else ""))[:16]``; with ``use_cache=True`` (its
  default) an existing directory is used as is, with no network;
- weights in ``MGE_HOME/serialized/<sha256(url)[:6]>_<basename of the URL>``.

Seeded entries are hard links to the store's blobs where the filesystem allows,
and carry a ``.mirror-seed`` mark (which commit). A directory without the mark,
which MegEngine fetched itself, is left alone; one mirror seeded earlier is
swapped in one step when the ref it stands for has moved.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Dict, List, Sequence, Set, Tuple

from .atomic import link_or_copy, make_temp_dir, publish_dir, write_atomic
from .errors import StoreError
from .ids import short
from .layout import MegEngineLayout, RepoLayout
from .model import Manifest, SnapshotRecord
from .refs import DEFAULT_BRANCH
from .store import Store
from .tree import materialize

MARK = ".mirror-seed"  # inside a seeded directory: which commit (and bundle) mirror put there


def installed_megengine_version() -> str | None:
    """The installed MegEngine's version, read without importing it (a slow import)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # Python < 3.8
        return None
    try:
        return version("megengine")
    except PackageNotFoundError:
        return None


def seed(store: Store, manifest: Manifest, versions: Sequence[str], megengine_home: str,
         trusted: Set[str] | None = None) -> List[str]:
    """Seed MegEngine's caches at ``megengine_home`` for every ref, commit and weight
    ``manifest`` installed into ``store``, for each MegEngine version in ``versions``.

    With ``trusted`` key ids (a trust policy), only snapshots a trusted key signed are
    seeded: stock megengine.hub runs whatever it finds there, unchecked.
    Returns one line per entry seeded or deliberately left alone.
    """
    cache = MegEngineLayout(megengine_home)
    os.makedirs(cache.hub, exist_ok=True)
    done: List[str] = []
    for repo in manifest.repos:
        paths = store.repo_dir(repo.id.host, repo.id.owner, repo.id.name)
        owner, name = repo.id.owner, repo.id.name
        for target, (commit, label) in sorted(_wanted(store, paths, repo.snapshots, versions,
                                                      cache, owner, name).items()):
            try:
                record = store.snapshot_record(paths, commit)
            except StoreError as e:
                done.append(f"not seeding {label}: {e}")
                continue
            if trusted is not None and (record.signed_by if record else None) not in trusted:
                done.append(f"not seeding {label}: its bundle was not signed by a trusted key")
                continue
            done.append(_seed_repo(store, record, target, label))
    os.makedirs(cache.serialized, exist_ok=True)
    for w in manifest.weights:
        target = cache.weight(w.url)
        if not os.path.exists(target):
            tmp = target + f".mirror-{os.getpid()}"
            link_or_copy(store.layout.blob(w.sha256), tmp)
            os.replace(tmp, target)
            done.append(f"seeded weight {w.url}")
    return done


def _wanted(store: Store, paths: RepoLayout, snapshots: Sequence, versions: Sequence[str],
            cache: MegEngineLayout, owner: str, name: str) -> Dict[str, Tuple[str, str]]:
    """MegEngine cache directory -> (commit, what it stands for): every ref of the repo
    as ``owner/name:ref``, and each snapshot as ``commit=`` under each branch that
    names it (and the default branch)."""
    wanted: Dict[str, Tuple[str, str]] = {}
    refs = store.refs(paths)
    for version in versions:
        for ref, head in refs.items():
            wanted[cache.repo(version, owner, name, ref)] = (head.commit, f"{owner}/{name}:{ref}")
        for snap in snapshots:
            branches = {r for r, h in refs.items() if h.commit == snap.commit} | {DEFAULT_BRANCH}
            for branch in branches:
                wanted[cache.repo(version, owner, name, branch, snap.commit)] = (
                    snap.commit, f"{owner}/{name}:{branch} commit={short(snap.commit)}")
    return wanted


def _seed_repo(store: Store, record: SnapshotRecord | None, target: str, label: str) -> str:
    # The mark lives inside the seeded directory, so it appears and goes with it.
    seeded = _read_mark(target)
    # The bundle too: a snapshot replaced in the store (a proven commit taking an
    # unproven one's place, or --force) is seeded again, never left stale.
    wanted = (record.commit, record.bundle) if record else None
    if os.path.exists(target):
        if seeded is None:
            return f"left {label} alone: {target} was not made by mirror"
        if seeded == wanted:
            return f"{label} already seeded"
    if record is None:
        return f"not seeding {label}: its snapshot has no record"
    building = make_temp_dir(os.path.dirname(target), ".mirror-")
    try:
        materialize(building, record.snapshot.files, store.layout.blob)
        write_atomic(os.path.join(building, MARK), json.dumps(
            {"commit": record.commit, "bundle": record.bundle, "for": label}).encode())
        # An older seed of a ref that moved is swapped in one step, with no gap.
        if not publish_dir(building, target, replace=seeded is not None):
            if _read_mark(target) != wanted:  # MegEngine made it meanwhile: not ours
                raise FileExistsError(errno.EEXIST, "made meanwhile by another program",
                                      target)
            return f"{label} already seeded"  # another install, a moment ago: same files
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return f"seeded {label} -> {os.path.basename(target)}"


def _read_mark(directory: str) -> Tuple[str, str | None] | None:
    """(commit, bundle id) of a directory mirror seeded; None if it did not (or the
    mark is unreadable). Marks of before the bundle was kept have None for it."""
    try:
        with open(os.path.join(directory, MARK)) as fh:
            mark = json.load(fh)
        return mark["commit"], mark.get("bundle")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
