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

import hashlib
import json
import os
import shutil
import urllib.parse
from typing import TYPE_CHECKING, Any, Dict, List, Sequence

from .atomic import exchange, link_or_copy, make_temp_dir, write_atomic
from .refs import DEFAULT_BRANCH

MARK = ".mirror-seed"  # inside a seeded directory: which commit mirror put there

if TYPE_CHECKING:
    from .store import Store


def megengine_home() -> str:
    """``$MGE_HOME``, else ``$XDG_CACHE_HOME/megengine``, else ``~/.cache/megengine``."""
    cache = os.getenv("XDG_CACHE_HOME", "~/.cache")
    return os.path.expanduser(os.getenv("MGE_HOME", os.path.join(cache, "megengine")))


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


def repo_key(version: str, owner: str, name: str, branch: str,
             commit: str | None = None) -> str:
    """The directory name MegEngine gives ``owner/name:branch`` (and ``commit=``)."""
    raw = f"{owner}_{name}_{branch.replace('/', '_')}" + (f"_{commit}" if commit else "")
    return "_".join(version.split(".")) + "_" + hashlib.sha1(raw.encode()).hexdigest()[:16]


def weight_file(url: str) -> str:
    """The file name MegEngine caches ``url`` under."""
    base = os.path.basename(urllib.parse.urlparse(url).path)
    return hashlib.sha256(url.encode()).hexdigest()[:6] + "_" + base


def seed(store: Store, manifest: Dict[str, Any], versions: Sequence[str],
         mge_home: str | None = None, trusted: set | None = None) -> List[str]:
    """Seed MegEngine's caches for every ref, commit and weight ``manifest`` installed.

    With ``trusted`` key ids (a trust policy), only snapshots a trusted key signed are
    seeded: stock megengine.hub runs whatever it finds there, unchecked.
    Returns one line per entry seeded or deliberately left alone.
    """
    home = mge_home or megengine_home()
    hub_dir = os.path.join(home, "hub")
    os.makedirs(hub_dir, exist_ok=True)
    done: List[str] = []
    for repo in manifest["repos"]:
        rdir = store.repo_dir(repo["host"], repo["owner"], repo["name"])
        owner, name = repo["owner"], repo["name"]
        wanted: Dict[str, tuple] = {}  # key -> (commit, what it stands for)
        refs = store.refs(rdir)
        for version in versions:
            for ref, (_, commit) in refs.items():
                wanted[repo_key(version, owner, name, ref)] = (commit, f"{owner}/{name}:{ref}")
            for snap in repo["snapshots"]:
                commit = snap["commit"]
                branches = {r for r, (_, c) in refs.items() if c == commit} | {DEFAULT_BRANCH}
                for branch in branches:
                    wanted[repo_key(version, owner, name, branch, commit)] = (
                        commit, f"{owner}/{name}:{branch} commit={commit[:12]}")
        for key, (commit, label) in sorted(wanted.items()):
            if trusted is not None and (store.snapshot_record(rdir, commit) or {}).get(
                    "signed_by") not in trusted:
                done.append(f"not seeding {label}: its bundle was not signed by a trusted key")
                continue
            done.append(_seed_repo(rdir, commit, os.path.join(hub_dir, key), label))
    serialized = os.path.join(home, "serialized")
    os.makedirs(serialized, exist_ok=True)
    for w in manifest["weights"]:
        target = os.path.join(serialized, weight_file(w["url"]))
        if not os.path.exists(target):
            tmp = target + f".mirror-{os.getpid()}"
            link_or_copy(store.blob(w["sha256"]), tmp)
            os.replace(tmp, target)
            done.append(f"seeded weight {w['url']}")
    return done


def _seed_repo(rdir: str, commit: str, target: str, label: str) -> str:
    # The mark lives inside the seeded directory, so it appears and goes with it.
    seeded = _read_mark(target)
    if os.path.exists(target):
        if seeded is None:
            return f"left {label} alone: {target} was not made by mirror"
        if seeded == commit:
            return f"{label} already seeded"
    snapshot = os.path.join(rdir, "snapshots", commit)
    building = make_temp_dir(os.path.dirname(target), ".mirror-")
    try:
        for dirpath, dirs, files in os.walk(snapshot):
            rel = os.path.relpath(dirpath, snapshot)
            os.makedirs(os.path.join(building, rel), exist_ok=True)
            # os.walk lists a symlink to a directory among the directories.
            for f in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
                src = os.path.join(dirpath, f)
                dst = os.path.join(building, rel, f)
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                else:
                    link_or_copy(src, dst)
        write_atomic(os.path.join(building, MARK), json.dumps(
            {"commit": commit, "for": label}).encode())
        if seeded is not None:  # an older seed of a ref that moved: one swap, no gap
            exchange(building, target)
        else:
            try:
                os.rename(building, target)
            except OSError:
                if _read_mark(target) != commit:
                    raise
                # Another install seeded the same entry a moment ago: the same files.
                shutil.rmtree(building, ignore_errors=True)
                return f"{label} already seeded"
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return f"seeded {label} -> {os.path.basename(target)}"


def _read_mark(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, MARK)) as fh:
            return json.load(fh)["commit"]
    except (OSError, ValueError, KeyError):
        return None
