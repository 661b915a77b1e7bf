"""The local store on the isolated host, laid out like the Hugging Face cache::

    <home>/
      blobs/<sha256>                          every file, once, read-only
      repos/<host>/<owner>/<name>/            owner and name lower-cased, as GitHub matches them
        repo.json                             host, owner, name as packed
        refs/heads/<branch>, refs/tags/<tag>  a commit id each
        refs.log                              every ref change: old, new, which bundle
        snapshots/<commit>/...                the tree, hard links into blobs/
        snapshots/<commit>.json               what the snapshot holds and which bundle brought it
      weights/<sha256(url)>.json              URL -> blob
      bundles/<sha256(manifest)>.json         the manifest of every bundle installed
      tmp/install-*/                          one per running install, never read

Integrity never depends on a lock: everything is written under a unique
temporary name, verified, fsynced and renamed into place; refs flip last, so a
crash at any instant leaves a store whose visible parts are whole. Two advisory
locks (``flock``, released by the kernel when a process dies, so never stale)
only order decisions: installs share ``.lock`` and ``gc`` takes it alone, so gc
never deletes a blob an install is about to use and everything in ``tmp/`` is
abandoned when it runs; a repo's ``.refs.lock`` is held while refs are
compared and moved, so concurrent installs never move a branch backwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Dict, Iterator, List, Sequence, Tuple

from . import bundle
from .atomic import (
    WritebackFile,
    exchange,
    fsync_dir,
    fsync_path,
    link_or_copy,
    make_temp_dir,
    sync_filesystem,
    write_atomic,
)
from .errors import AmbiguousCommitError, NotInstalledError, StoreError, UnsafePickleError
from .refs import DEFAULT_HOST
from .safety import unsafe_globals
from .signing import check


def default_home() -> str:
    """``$MGE_MIRROR_HOME``, else ``$MGE_HOME/mirror``, else the XDG cache, else ``~/.cache``."""
    if os.environ.get("MGE_MIRROR_HOME"):
        return os.path.expanduser(os.environ["MGE_MIRROR_HOME"])
    if os.environ.get("MGE_HOME"):
        return os.path.join(os.path.expanduser(os.environ["MGE_HOME"]), "mirror")
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return os.path.join(os.path.expanduser(cache), "megengine", "mirror")


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot in the store: the repo it belongs to, its commit and directory."""

    repo: str  # host/owner/name as packed
    commit: str
    path: str


@dataclass(frozen=True)
class StoredWeight:
    """A weight file in the store, found by the URL the code asks for."""

    url: str
    path: str
    size: int
    sha256: str


@dataclass
class InstallReport:
    """What one ``install`` verified and changed."""

    bundle: str
    bundle_sha256: str = ""
    verified_files: int = 0
    verified_bytes: int = 0
    bytes_written: int = 0
    snapshots_installed: List[str] = field(default_factory=list)
    snapshots_present: List[str] = field(default_factory=list)
    weights: List[str] = field(default_factory=list)
    refs_set: List[str] = field(default_factory=list)
    refs_kept: List[str] = field(default_factory=list)
    megengine_cache: List[str] = field(default_factory=list)
    signed_by: str | None = None  # the trusted key that signed the bundle, if checked
    bundle_file_sha256: str = ""  # of the bundle file, as it was read and verified
    members: List[Dict[str, Any]] = field(default_factory=list)  # name, sha256: verified

    @property
    def changed(self) -> bool:
        return bool(self.snapshots_installed or self.refs_set or self.bytes_written)


class _SyncedFile:
    """A staged blob, read-only once written. The kernel starts writing it to disk as
    it grows; a large one is then fsynced on a background thread while the next
    member is decompressed and hashed; small ones are made durable together at the
    end (one fsync each took seconds for thousands)."""

    LARGE = 1 << 20

    def __init__(self, path: str, syncer: ThreadPoolExecutor):
        self.path, self.syncer = path, syncer
        self.fh: IO[bytes] = open(path, "wb")
        self.out = WritebackFile(self.fh)
        self.synced: Future | None = None

    @property
    def size(self) -> int:
        return self.out.written

    def write(self, block: bytes) -> None:
        self.out.write(block)

    def close(self) -> None:
        os.fchmod(self.fh.fileno(), 0o444)
        self.fh.close()  # a close reports a full disk that writes did not
        if self.size >= self.LARGE:
            self.synced = self.syncer.submit(fsync_path, self.path)


class Store:
    """A local store of snapshots and weights rooted at ``home``."""

    def __init__(self, home: str | None = None):
        self.home = os.path.abspath(home or default_home())

    # --- paths --------------------------------------------------------------

    @property
    def lock_path(self) -> str:
        """Installs hold this shared and gc exclusive, so gc never sees half an install."""
        return os.path.join(self.home, ".lock")

    def blob(self, sha256: str) -> str:
        return os.path.join(self.home, "blobs", sha256)

    def repo_dir(self, host: str, owner: str, name: str) -> str:
        # GitHub matches owner/name case-insensitively; so does the store.
        return os.path.join(self.home, "repos", host.lower(), owner.lower(), name.lower())

    def _weight_index(self, url: str) -> str:
        key = hashlib.sha256(url.encode()).hexdigest()
        return os.path.join(self.home, "weights", key + ".json")

    # --- install ------------------------------------------------------------

    def install(self, bundle_path: str, force: bool = False,
                megengine_versions: Sequence[str] = (),
                megengine_home: str | None = None, progress: bool = False,
                allow_unsafe_pickle: bool = False,
                trusted: Dict[str, Any] | None = None,
                digest_file: bool = False) -> InstallReport:
        """Verify every byte of a bundle, then make its snapshots, weights and refs visible.

        Nothing becomes visible until the whole bundle has verified; on any error
        the store is left as it was (temporary files are removed). With
        ``megengine_versions``, MegEngine Hub's own caches are seeded last, so
        unmodified ``megengine.hub.load`` calls of those versions work offline.
        """
        report = InstallReport(bundle=bundle_path)
        try:
            os.makedirs(os.path.join(self.home, "tmp"), exist_ok=True)
            with locked(self.lock_path, shared=True):
                txn = tempfile.mkdtemp(prefix="install-", dir=os.path.join(self.home, "tmp"))
                try:
                    return self._install(bundle_path, txn, report, force, megengine_versions,
                                         megengine_home, progress, allow_unsafe_pickle,
                                         trusted, digest_file)
                finally:
                    shutil.rmtree(txn, ignore_errors=True)
        except OSError as e:
            raise StoreError(e.filename or self.home, f"cannot write here: {e.strerror}") \
                from None

    def _install(self, bundle_path: str, txn: str, report: InstallReport, force: bool,
                 megengine_versions: Sequence[str], megengine_home: str | None,
                 progress: bool, allow_unsafe_pickle: bool,
                 trusted: Dict[str, Any] | None, digest_file: bool) -> InstallReport:
        staged: Dict[str, _SyncedFile] = {}
        syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror-fsync")

        def sink(member: bundle.Member) -> _SyncedFile | None:
            report.verified_files += 1
            report.verified_bytes += member.size
            report.members.append({"name": member.name, "sha256": member.sha256,
                                   "size": member.size})
            if os.path.exists(self.blob(member.sha256)) or member.sha256 in staged:
                return None  # content-addressed: already stored, only verified
            staged[member.sha256] = _SyncedFile(os.path.join(txn, member.sha256), syncer)
            return staged[member.sha256]

        heads: List[bundle.Head] = []
        try:
            def on_head(head: bundle.Head) -> None:
                heads.append(head)
                # With trusted keys, the signature decides before any member is read.
                if trusted is not None:
                    report.signed_by = check(head.signature, head.manifest_bytes, trusted,
                                             bundle_path).key_id

            file_digest = hashlib.sha256() if digest_file else None
            manifest = bundle.read(bundle_path, sink, on_head=on_head, progress=progress,
                                   file_digest=file_digest)
            report.bundle_file_sha256 = file_digest.hexdigest() if file_digest else ""
            for f in staged.values():
                if f.synced is not None:
                    f.synced.result()  # raises what fsync raised
            small = [f.path for f in staged.values() if f.synced is None]
            if small:
                sync_filesystem(txn, small)
            if not allow_unsafe_pickle:
                self._check_pickles(bundle_path, manifest, staged)
            manifest_bytes = heads[0].manifest_bytes  # as signed, and as the bundle holds it
            report.bundle_sha256 = bundle.bundle_id(manifest_bytes)
            # The bundle has verified: from here on, publish in an order that never
            # shows a part whose dependencies are missing: blobs, snapshots, weights, refs.
            blobs_dir = os.path.join(self.home, "blobs")
            os.makedirs(blobs_dir, exist_ok=True)
            for sha, f in staged.items():
                if not os.path.exists(self.blob(sha)):
                    os.replace(f.path, self.blob(sha))
                    report.bytes_written += f.size
            fsync_dir(blobs_dir)
            for repo in manifest["repos"]:
                self._install_repo(repo, manifest["weights"], report, txn, force)
            for w in manifest["weights"]:
                record = {"url": w["url"], "sha256": w["sha256"], "size": w["size"]}
                write_atomic(self._weight_index(w["url"]),
                              json.dumps(record, sort_keys=True).encode())
                report.weights.append(w["url"])
            self._set_refs(manifest, report, force)
            write_atomic(os.path.join(self.home, "bundles", report.bundle_sha256 + ".json"),
                         manifest_bytes)
            if megengine_versions:
                report.megengine_cache = self._seed_megengine(
                    manifest, megengine_versions, megengine_home,
                    set(trusted) if trusted is not None else None)
        except OSError as e:
            raise StoreError(e.filename or self.home,
                             f"install of {bundle_path} failed: {e.strerror or e}") from None
        finally:
            syncer.shutdown(wait=True)
            for f in staged.values():
                f.fh.close()
        return report

    def _check_pickles(self, bundle_path: str, manifest: Dict[str, Any],
                       staged: Dict[str, _SyncedFile]) -> None:
        """Refuse, before anything is published, weights that would run foreign code."""
        for w in manifest["weights"]:
            path = staged[w["sha256"]].path if w["sha256"] in staged else self.blob(w["sha256"])
            unsafe = unsafe_globals(path)
            if unsafe:
                raise UnsafePickleError(f"weight {w['url']} in {bundle_path}", unsafe)

    def _seed_megengine(self, manifest: Dict[str, Any], versions: Sequence[str],
                        home: str | None, trusted: set | None) -> List[str]:
        # The store is complete at this point; a cache that cannot be written is a
        # warning about stock megengine.hub, not a failed install.
        from .megengine_cache import seed

        try:
            return seed(self, manifest, versions, home, trusted)
        except OSError as e:
            return [f"warning: not seeded ({e.filename or home}: {e.strerror or e}); "
                    f"stock megengine.hub will not find this bundle offline"]

    def _install_repo(self, repo: Dict[str, Any], manifest_weights: List[Dict[str, Any]],
                      report: InstallReport, txn: str, force: bool) -> None:
        rdir = self.repo_dir(repo["host"], repo["owner"], repo["name"])
        ident = {k: repo[k] for k in ("host", "owner", "name", "url")}
        if not os.path.exists(os.path.join(rdir, "repo.json")):
            write_atomic(os.path.join(rdir, "repo.json"), json.dumps(ident, indent=1).encode())
        snaps = os.path.join(rdir, "snapshots")
        os.makedirs(snaps, exist_ok=True)
        sizes = {w["url"]: (w["sha256"], w["size"]) for w in manifest_weights}
        for snap in repo["snapshots"]:
            target = os.path.join(snaps, snap["commit"])
            label = f"{repo['owner']}/{repo['name']}@{snap['commit'][:12]}"
            if os.path.isdir(target) and not force:
                report.snapshots_present.append(label)
                continue
            # Built inside the install's own directory, so an abandoned build is
            # plainly garbage (gc), then renamed into place whole.
            building = make_temp_dir(txn, f"snapshot-{snap['commit'][:12]}-")
            for f in snap["files"]:
                self._materialize(f, os.path.join(building, f["path"]))
            # The weights this snapshot's code asks for, pinned to their bytes: a later
            # bundle with other bytes under the same URL cannot change what it loads.
            digests = {u: {"sha256": sizes[u][0], "size": sizes[u][1]}
                       for u in snap.get("weights", []) if u in sizes}
            record = dict(snap, weight_digests=digests, bundle=report.bundle_sha256,
                          signed_by=report.signed_by,
                          bundle_file=os.path.basename(report.bundle),
                          installed_at=int(time.time()))
            if force or not os.path.exists(target + ".json"):
                # Compact: json's C encoder does not indent, and a record lists every
                # file (the indenting Python encoder took 0.1 s per 5,000 files).
                write_atomic(target + ".json", json.dumps(record, separators=(",", ":"),
                                                          sort_keys=True).encode())
            if os.path.isdir(target):  # only with --force: one atomic swap, no gap
                exchange(building, target)
            else:
                try:
                    os.rename(building, target)
                except OSError:
                    if not os.path.isdir(target):
                        raise
                    # Another installer published the same snapshot first: the same bytes.
            fsync_dir(snaps)
            report.snapshots_installed.append(label)

    def _materialize(self, f: Dict[str, Any], dest: str) -> None:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        src = self.blob(f["sha256"])
        if f["mode"] == 0o120000:
            with open(src, "rb") as fh:  # bundle.read refused targets outside the snapshot
                os.symlink(fh.read().decode("utf-8", "surrogateescape"), dest)
        elif f["mode"] == 0o100755:
            shutil.copyfile(src, dest)  # a hard link would share the blob's read-only mode
            os.chmod(dest, 0o555)
        else:
            link_or_copy(src, dest)

    def _set_refs(self, manifest: Dict[str, Any], report: InstallReport, force: bool) -> None:
        times = {s["commit"]: s["commit_time"] for r in manifest["repos"] for s in r["snapshots"]}
        for repo in manifest["repos"]:
            rdir = self.repo_dir(repo["host"], repo["owner"], repo["name"])
            with locked(os.path.join(rdir, ".refs.lock")):
                self._set_repo_refs(rdir, repo, times, report, force)

    def _set_repo_refs(self, rdir: str, repo: Dict[str, Any], times: Dict[str, int],
                       report: InstallReport, force: bool) -> None:
        for ref in repo["refs"]:
            folder = "heads" if ref["kind"] == "branch" else "tags"
            path = os.path.join(rdir, "refs", folder, ref["name"])
            label = f"{repo['owner']}/{repo['name']}:{ref['name']}"
            current = _read_text(path)
            if current == ref["commit"]:
                continue
            if current and not force:
                if ref["kind"] == "tag":
                    report.refs_kept.append(f"{label} stays at {current[:12]} (tags never "
                                            f"move without --force)")
                    continue
                old = self.snapshot_record(rdir, current)
                if old and old.get("commit_time", 0) > times.get(ref["commit"], 0):
                    report.refs_kept.append(f"{label} stays at newer {current[:12]} "
                                            f"(use --force to move it back)")
                    continue
            write_atomic(path, (ref["commit"] + "\n").encode())
            # Which bundle set which ref, and from what: appended under the refs lock.
            with open(os.path.join(rdir, "refs.log"), "a") as log:
                log.write(json.dumps({"ref": ref["name"], "kind": ref["kind"], "old": current,
                                      "new": ref["commit"], "bundle": report.bundle_sha256,
                                      "bundle_file": os.path.basename(report.bundle),
                                      "time": int(time.time())}) + "\n")
            moved = f" (was {current[:12]})" if current else ""
            report.refs_set.append(f"{label} -> {ref['commit'][:12]}{moved}")

    # --- queries ------------------------------------------------------------

    def snapshot_record(self, rdir: str, commit: str) -> Dict[str, Any] | None:
        """What install recorded about a snapshot, or None if there is no record."""
        path = os.path.join(rdir, "snapshots", commit + ".json")
        text = _read_text(path)
        try:
            return json.loads(text) if text else None
        except ValueError:
            # Never treated as "no record": gc would then free the snapshot's blobs.
            raise StoreError(path, "this snapshot record is unreadable; run 'mirror verify' "
                                   "and reinstall its bundle with --force") from None

    def commits(self, rdir: str) -> List[str]:
        snaps = os.path.join(rdir, "snapshots")
        if not os.path.isdir(snaps):
            return []
        return sorted(c for c in os.listdir(snaps)
                      if not c.startswith(".") and not c.endswith(".json")
                      and os.path.isdir(os.path.join(snaps, c)))

    def ref_entries(self, rdir: str) -> List[Tuple[str, str, str]]:
        """``(kind, name, commit)`` of every branch and tag of a repo, both kept when a
        branch and a tag share a name."""
        out = []
        for folder, kind in (("heads", "branch"), ("tags", "tag")):
            base = os.path.join(rdir, "refs", folder)
            for dirpath, _, names in os.walk(base):
                for n in names:
                    if not n.startswith(".tmp-"):
                        full = os.path.join(dirpath, n)
                        out.append((kind, os.path.relpath(full, base), _read_text(full) or ""))
        return sorted(out)

    def refs(self, rdir: str) -> Dict[str, Tuple[str, str]]:
        """``name -> (kind, commit)``, as ``:name`` resolves: a branch wins over a tag."""
        out: Dict[str, Tuple[str, str]] = {}
        for kind, name, commit in sorted(self.ref_entries(rdir), key=lambda e: e[0] != "tag"):
            out[name] = (kind, commit)
        return out

    def resolve(self, owner: str, name: str, ref: str | None = None,
                commit: str | None = None, host: str = DEFAULT_HOST) -> SnapshotRef:
        """The snapshot that ``owner/name[:ref]`` or ``commit=`` names, as MegEngine Hub would.

        ``commit`` (full or a unique abbreviation) wins over ``ref``, as in MegEngine.
        """
        rdir = self.find_repo(host, owner, name)
        label = f"{owner}/{name}" if host == DEFAULT_HOST else f"{host}/{owner}/{name}"
        refs = self.refs(rdir)
        commits = self.commits(rdir)
        if commit:
            matches = [c for c in commits if c.startswith(commit.lower())]
            if len(matches) > 1:
                raise AmbiguousCommitError(label, commit, matches)
            if not matches:
                raise NotInstalledError(label, None, commit, self._describe(rdir, refs, commits),
                                        self.home)
            return SnapshotRef(label, matches[0], os.path.join(rdir, "snapshots", matches[0]))
        if not ref or ref not in refs or refs[ref][1] not in commits:
            raise NotInstalledError(label, ref, None, self._describe(rdir, refs, commits),
                                    self.home)
        found = refs[ref][1]
        return SnapshotRef(label, found, os.path.join(rdir, "snapshots", found))

    def find_repo(self, host: str, owner: str, name: str) -> str:
        """The repo's directory; for the default host, also a repo packed from one other host.

        MegEngine's own cache key ignores ``git_host``, so ``load("owner/name")`` finds
        code fetched from any host; the store does the same when only one host has it.
        """
        rdir = self.repo_dir(host, owner, name)
        if os.path.isdir(rdir) or host != DEFAULT_HOST:
            return rdir
        pattern = os.path.join(glob.escape(self.home), "repos", "*",
                               glob.escape(owner.lower()), glob.escape(name.lower()))
        others = sorted(d for d in glob.glob(pattern) if os.path.isdir(d))
        if len(others) > 1:
            hosts = ", ".join(os.path.basename(os.path.dirname(os.path.dirname(d)))
                              for d in others)
            raise NotInstalledError(f"{owner}/{name}", store=self.home, available=[
                f"copies from several hosts ({hosts}): pass git_host= to choose"])
        return others[0] if others else rdir

    def _describe(self, rdir: str, refs: Dict[str, Tuple[str, str]],
                  commits: List[str]) -> List[str]:
        def when(commit: str) -> str:
            record = self.snapshot_record(rdir, commit) or {}
            stamp = record.get("installed_at")
            return time.strftime(" (installed %Y-%m-%d %H:%M UTC)", time.gmtime(stamp)) \
                if stamp else ""

        named = [f"{kind} {n} -> {c[:12]}{when(c)}" for n, (kind, c) in sorted(refs.items())]
        pointed = {c for _, c in refs.values()}
        return named + [f"commit {c[:12]}{when(c)}" for c in commits if c not in pointed]

    def weight(self, url: str, snap: SnapshotRef | None = None) -> StoredWeight | None:
        """The stored file for a weight URL, or None if no installed bundle brought it.

        With ``snap``, the bytes that snapshot was installed with for ``url``; else
        (or for a URL its code was not known to use) the latest bundle's.
        """
        rec = None
        if snap is not None:
            text = _read_text(snap.path + ".json")
            rec = (json.loads(text).get("weight_digests") or {}).get(url) if text else None
        if rec is None:
            text = _read_text(self._weight_index(url))
            if not text:
                return None
            rec = json.loads(text)
        return StoredWeight(url, self.blob(rec["sha256"]), rec["size"], rec["sha256"])

    def _describe_snapshot(self, rdir: str, commit: str) -> Dict[str, Any]:
        record = self.snapshot_record(rdir, commit) or {"files": []}
        weights = []
        for url in record.get("weights", []):
            w = self.weight(url)
            weights.append({"url": url, "size": w.size if w else None,
                            "sha256": w.sha256 if w else None})
        return {"commit": commit, "files": len(record["files"]),
                "size": sum(f["size"] for f in record["files"]),
                "entrypoints": record.get("entrypoints", []), "weights": weights,
                "bundle": record.get("bundle"), "bundle_file": record.get("bundle_file"),
                "installed_at": record.get("installed_at")}

    def repos(self) -> List[Dict[str, Any]]:
        """Every installed repo with its refs and commits, for ``mirror list``."""
        out = []
        base = os.path.join(self.home, "repos")
        for dirpath, dirnames, filenames in os.walk(base):
            if "repo.json" in filenames:
                dirnames[:] = []
                with open(os.path.join(dirpath, "repo.json")) as fh:
                    ident = json.load(fh)
                refs, commits = self.refs(dirpath), self.commits(dirpath)
                out.append(dict(ident, refs={n: {"kind": k, "commit": c}
                                             for n, (k, c) in sorted(refs.items())},
                                commits=commits,
                                snapshots=[self._describe_snapshot(dirpath, c)
                                           for c in commits]))
        return sorted(out, key=lambda r: (r["host"], r["owner"].lower(), r["name"].lower()))


@contextlib.contextmanager
def locked(path: str, shared: bool = False, wait: bool = True) -> Iterator[None]:
    """An advisory ``flock`` on ``path``; the kernel drops it when the process dies.

    Raises BlockingIOError when ``wait`` is False and another process holds it.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as fh:
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        fcntl.flock(fh.fileno(), flags)
        yield  # closing the file releases the lock


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None

