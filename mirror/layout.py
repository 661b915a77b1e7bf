"""Where everything lives: every path of the store, and of MegEngine Hub's own cache.

No other module joins a store path by hand. The store, laid out like the
Hugging Face cache::

    <home>/
      .lock                                   installs share it, gc and remove hold it alone
      config.toml, trusted-keys/              the store's trust policy (mirror.config)
      blobs/<sha256>                          every file, once, read-only
      repos/<host>/<owner>/<name>/            owner and name lower-cased, as GitHub matches them
        repo.json                             host, owner, name and URL as packed
        .refs.lock                            held while refs are compared and moved
        refs/heads/<branch>, refs/tags/<tag>  a commit id each
        refs.log                              every ref change: old, new, which bundle
        snapshots/<commit>/...                the tree, hard links into blobs/
        snapshots/<commit>.json               its record (mirror.model.SnapshotRecord)
      weights/                                an earlier mirror's URL index: unread; gc removes it
      bundles/<bundle id>.json                the manifest of every bundle installed, verbatim
      signatures/<bundle id>.sig              its signature document, if it had one
      seeds/<id>.json, seeds/.lock            what the store seeded into each MegEngine home
                                              (mirror.model.SeedLedger), and its lock
      pycache/                                an earlier mirror's bytecode: unread; gc removes it
      tmp/install-*/, tmp/remove-*/           work in progress, never read; gc clears it

MegEngine Hub 1.13 (``megengine/hub``) looks for repo code in
``MGE_HOME/hub/<v>_<h>`` and for weights in
``MGE_HOME/serialized/<sha256(url)[:6]>_<basename of the URL path>``; see
:func:`megengine_repo_key`.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from dataclasses import dataclass
from typing import Iterator, List

from .hashing import sha256_bytes

REF_FOLDERS = (("heads", "branch"), ("tags", "tag"))
TEMP_PREFIX = ".tmp-"  # atomic_file's temporary names: an interrupted write


def listing(path: str) -> List[str]:
    """Names in a store folder, sorted, without the dot-files of interrupted writes."""
    return sorted(n for n in os.listdir(path) if not n.startswith(".")) \
        if os.path.isdir(path) else []


@dataclass(frozen=True)
class RepoLayout:
    """The paths of one repo in the store."""

    path: str

    @property
    def repo_json(self) -> str:
        return os.path.join(self.path, "repo.json")

    @property
    def refs_lock(self) -> str:
        return os.path.join(self.path, ".refs.lock")

    @property
    def refs_log(self) -> str:
        return os.path.join(self.path, "refs.log")

    @property
    def refs(self) -> str:
        return os.path.join(self.path, "refs")

    @property
    def snapshots(self) -> str:
        return os.path.join(self.path, "snapshots")

    def snapshot(self, commit: str) -> str:
        return os.path.join(self.snapshots, commit)

    def snapshot_record(self, commit: str) -> str:
        return os.path.join(self.snapshots, commit + ".json")

    def ref_folder(self, kind: str) -> str:
        return os.path.join(self.refs, "heads" if kind == "branch" else "tags")

    def ref(self, kind: str, name: str) -> str:
        return os.path.join(self.ref_folder(kind), name)


@dataclass(frozen=True)
class StoreLayout:
    """The paths of a store rooted at ``home``."""

    home: str

    @property
    def lock(self) -> str:
        """Installs hold this shared and gc exclusive, so gc never sees half an install."""
        return os.path.join(self.home, ".lock")

    @property
    def config(self) -> str:
        """The store's own settings (see :class:`mirror.config.StoreConfig`)."""
        return os.path.join(self.home, "config.toml")

    @property
    def trusted_keys(self) -> str:
        """Public keys the store trusts when nothing else names any."""
        return os.path.join(self.home, "trusted-keys")

    @property
    def blobs(self) -> str:
        return os.path.join(self.home, "blobs")

    @property
    def repos(self) -> str:
        return os.path.join(self.home, "repos")

    @property
    def weights(self) -> str:
        return os.path.join(self.home, "weights")

    @property
    def bundles(self) -> str:
        return os.path.join(self.home, "bundles")

    @property
    def tmp(self) -> str:
        return os.path.join(self.home, "tmp")

    @property
    def pycache(self) -> str:
        return os.path.join(self.home, "pycache")

    @property
    def seeds(self) -> str:
        return os.path.join(self.home, "seeds")

    @property
    def seeds_lock(self) -> str:
        """Held while seeds are made, moved or removed, and their ledger written."""
        return os.path.join(self.seeds, ".lock")

    def seed_ledger(self, megengine_home: str) -> str:
        """The ledger of what the store seeded into MegEngine's cache at ``megengine_home``."""
        key = sha256_bytes(os.path.abspath(megengine_home).encode())[:16]
        return os.path.join(self.seeds, key + ".json")

    def blob(self, sha256: str) -> str:
        return os.path.join(self.blobs, sha256)

    def bundle_record(self, bundle_id: str) -> str:
        return os.path.join(self.bundles, bundle_id + ".json")

    def bundle_signature(self, bundle_id: str) -> str:
        """The signature document the bundle carried (or had beside it), if any: kept
        so that ``mirror export`` can hand the same signed bundle on."""
        return os.path.join(self.signatures, bundle_id + ".sig")

    @property
    def signatures(self) -> str:
        return os.path.join(self.home, "signatures")

    def repo(self, host: str, owner: str, name: str) -> RepoLayout:
        # GitHub matches owner/name case-insensitively; so does the store.
        return RepoLayout(os.path.join(self.repos, host.lower(), owner.lower(), name.lower()))

    def repo_hosts(self, owner: str, name: str) -> List[RepoLayout]:
        """``owner/name`` as installed from any host."""
        found = []
        for host in listing(self.repos):
            candidate = self.repo(host, owner, name)
            if os.path.exists(candidate.repo_json):  # a folder alone: a failed install's lock
                found.append(candidate)
        return found

    def all_repos(self) -> Iterator[RepoLayout]:
        """Every installed repo (a folder with a ``repo.json``)."""
        for dirpath, dirnames, filenames in os.walk(self.repos):
            if "repo.json" in filenames:
                dirnames[:] = []
                yield RepoLayout(dirpath)
            else:
                dirnames.sort()


# --- MegEngine Hub's own cache ------------------------------------------------------


def megengine_repo_key(version: str, owner: str, name: str, branch: str,
                       commit: str | None = None) -> str:
    """The directory name MegEngine gives ``owner/name:branch`` (and ``commit=``):
    ``<v>_<h>``, ``<v>`` its version with dots as underscores and ``<h> =
    sha1(f"{owner}_{name}_{branch with / as _}" + (f"_{commit}" if commit))[:16]``."""
    raw = f"{owner}_{name}_{branch.replace('/', '_')}" + (f"_{commit}" if commit else "")
    return "_".join(version.split(".")) + "_" + hashlib.sha1(raw.encode()).hexdigest()[:16]


def megengine_weight_file(url: str) -> str:
    """The file name MegEngine caches ``url`` under."""
    base = os.path.basename(urllib.parse.urlparse(url).path)
    return sha256_bytes(url.encode())[:6] + "_" + base


@dataclass(frozen=True)
class MegEngineLayout:
    """The paths of MegEngine Hub's cache at ``home`` (``MGE_HOME``)."""

    home: str

    @property
    def hub(self) -> str:
        return os.path.join(self.home, "hub")

    @property
    def serialized(self) -> str:
        return os.path.join(self.home, "serialized")

    def repo(self, version: str, owner: str, name: str, branch: str,
             commit: str | None = None) -> str:
        return os.path.join(self.hub, megengine_repo_key(version, owner, name, branch, commit))

    def weight(self, url: str) -> str:
        return os.path.join(self.serialized, megengine_weight_file(url))
