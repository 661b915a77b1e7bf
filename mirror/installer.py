"""``mirror install``: one bundle into the store, as a transaction in named steps.

1. **verify and stage** (:meth:`Transaction.verify_and_stage`): stream the bundle
   once; the signature is checked (under a trust policy) before any member is
   read; every member is hashed against the manifest while new blobs are written
   into the transaction's own folder under ``tmp/``; weights are scanned for
   pickled code. Nothing outside ``tmp/`` has changed yet.
2. **prove** (:meth:`Transaction.prove`): every git id of a format 2 bundle is
   recomputed from the verified bytes (:mod:`mirror.proof`).
3. **publish** (:meth:`Transaction.publish`): blobs, then, under the locks of
   every repo the bundle touches, snapshots, refs and the bundle's record, so no
   visible part ever names one that is missing; each visible change is journaled
   (:mod:`mirror.journal`), so an error at any step puts back what was there.
4. **seed** (:meth:`Transaction.seed`): MegEngine Hub's own cache, last, so
   unmodified ``megengine.hub.load`` works offline; a cache that cannot be
   written is a warning, never a failed install.

Locks only order decisions: installs share the store's ``.lock`` (gc takes it
alone), and a repo's ``.refs.lock`` is held while its snapshots are published and
its refs compared and moved, so concurrent installs never move a branch backwards
and an undo never takes back what another install relies on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import IO, Dict, List, Sequence, Tuple

from . import bundle
from .atomic import (
    WritebackFile,
    fsync_dir,
    fsync_path,
    make_temp_dir,
    sync_files,
)
from .config import TrustPolicy, settings, trust_policy
from .delta import check_prerequisites
from .errors import BundleError, MirrorError, RefConflictError, StoreError, UnsafePickleError
from .ids import short
from .journal import Journal
from .layout import RepoLayout
from .locking import locked
from .model import (
    JsonObject,
    Manifest,
    Member,
    Pin,
    RefEntry,
    RefLogEntry,
    RepoEntry,
    RepoId,
    SnapshotEntry,
    SnapshotRecord,
    canonical_json,
)
from .names import ref_conflict
from .parts import BundleInput, Parts, Remote, group
from .proof import Proof, ProofError, history, prove_manifest
from .reference import HTTPS, Connection, is_reference
from .safety import PickleScans, unsafe_globals
from .store import Store
from .tree import materialize


@dataclass(frozen=True)
class InstallOptions:
    """How to install; every field has the meaning of the ``mirror install`` flag of
    the same name."""

    force: bool = False  # reinstall snapshots; move refs back, and tags
    megengine_versions: Tuple[str, ...] = ()  # seed MegEngine's cache for these versions
    megengine_home: str | None = None  # default: the configured MGE_HOME
    allow_unsafe_pickle: bool = False
    # Key files or folders; like --trusted-key, they stand in for the store's configured
    # keys for this install (seeding still follows the store's own policy).
    trusted_keys: Tuple[str, ...] = ()
    require_signature: bool = False
    digest_file: bool = False  # also take the bundle file's sha256 (for a receipt)
    progress: bool = False
    registry: Connection = HTTPS  # how to reach an oci:// bundle's registry


@dataclass(frozen=True)
class SnapshotOutcome:
    """A snapshot of the bundle: installed by this install, or already in the store."""

    repo: RepoId
    commit: str

    def __str__(self) -> str:
        return f"{self.repo.label}@{short(self.commit)}"

    def to_json(self) -> JsonObject:
        return {"repo": self.repo.full, "commit": self.commit}


@dataclass(frozen=True)
class RefOutcome:
    """A ref of the bundle that names another commit than the store's: set (moved from
    ``previous``, or new), or kept at ``previous`` for ``reason``."""

    repo: RepoId
    kind: str  # "branch" or "tag"
    name: str
    commit: str  # what the bundle names
    previous: str | None  # what the store named before; None: a new ref
    reason: str | None = None  # why it stays at ``previous``; None: it was set

    def __str__(self) -> str:
        label = f"{self.repo.label}:{self.name}"
        if self.reason is not None:
            return f"{label} stays at {self.reason}"
        moved = f" (was {short(self.previous)})" if self.previous else ""
        return f"{label} -> {short(self.commit)}{moved}"

    def to_json(self) -> JsonObject:
        return {"repo": self.repo.full, "kind": self.kind, "name": self.name,
                "commit": self.commit, "previous": self.previous,
                "set": self.reason is None, "reason": self.reason}


@dataclass
class InstallReport:
    """What one install verified and changed."""

    bundle: str  # the bundle file's path
    bundle_id: str = ""
    verified_files: int = 0
    verified_bytes: int = 0
    bytes_written: int = 0
    snapshots_installed: List[SnapshotOutcome] = field(default_factory=list)
    snapshots_present: List[SnapshotOutcome] = field(default_factory=list)
    weights: List[str] = field(default_factory=list)
    refs_set: List[RefOutcome] = field(default_factory=list)
    refs_kept: List[RefOutcome] = field(default_factory=list)
    megengine_cache: List[str] = field(default_factory=list)
    signed_by: str | None = None  # the trusted key that signed the bundle, if checked
    file_sha256: str = ""  # of the bundle file, as it was read and verified
    members: List[Member] = field(default_factory=list)  # every member verified

    @property
    def changed(self) -> bool:
        return bool(self.snapshots_installed or self.refs_set or self.bytes_written)

    def to_json(self) -> JsonObject:
        """One bundle's entry in ``mirror install --json`` (docs/json.md; its members
        left out: ``--receipt`` lists them)."""
        return {"bundle": self.bundle, "ok": True, "bundle_id": self.bundle_id,
                "file_sha256": self.file_sha256 or None,
                "verified_files": self.verified_files, "verified_bytes": self.verified_bytes,
                "bytes_written": self.bytes_written, "changed": self.changed,
                "snapshots": [dict(s.to_json(), installed=True)
                              for s in self.snapshots_installed]
                + [dict(s.to_json(), installed=False) for s in self.snapshots_present],
                "refs": [r.to_json() for r in self.refs_set + self.refs_kept],
                "weights": list(self.weights), "megengine_cache": list(self.megengine_cache),
                "signed_by": self.signed_by, "error": None}


def install(bundle_path: BundleInput, home: str | None = None,
            options: InstallOptions = InstallOptions()) -> InstallReport:
    """Verify every byte of the bundle at ``bundle_path``, then make its snapshots,
    weights and refs visible in the store at ``home`` (default: the configured one).
    ``bundle_path`` may be every part of a bundle (:class:`mirror.parts.Parts`, from
    :func:`bundle_paths`), read in order without being put together anywhere.

    The store's trust policy applies whoever calls this: under one, a bundle no
    trusted key signed is refused before anything is written. Nothing becomes
    visible until the whole bundle has verified; on any error the store is as it
    was (temporary files are removed).

    Raises :class:`BundleError` or :class:`SignatureError` (exit code 3) for a bad
    bundle, :class:`UnsafePickleError` for a weight that would run code, and
    :class:`StoreError` when the store cannot be written.
    """
    store = Store(home)
    policy = trust_policy(store.home, options.trusted_keys, options.require_signature)
    # A delta onto a store that lacks its prerequisites: refused from its manifest
    # alone, before the store (or anything in it) is created; checked again under the
    # lock before any member is read, which for stdin (read once) is the only check.
    # Under a trust policy only then, after the signature: an unsigned manifest's words
    # are not shown as instructions.
    try:
        # (a pipe, named or not, is read once: by the install itself)
        head = bundle.read_manifest(bundle_path) if isinstance(bundle_path, Parts) or \
            isinstance(bundle_path, str) and os.path.isfile(bundle_path) else None
    except MirrorError:
        head = None  # the whole read below says what is wrong, in verify's words
    if head is not None and not policy.required:
        check_prerequisites(store, head, str(bundle_path))
    try:
        os.makedirs(store.layout.tmp, exist_ok=True)
        with locked(store.layout.lock, shared=True):
            work = tempfile.mkdtemp(prefix="install-", dir=store.layout.tmp)
            try:
                return Transaction(store, bundle_path, work, options, policy).run()
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except OSError as e:  # setting up: the store's own folders
        raise StoreError(e.filename or store.home, f"cannot write here: {e.strerror}") \
            from None


@dataclass(frozen=True)
class Outcome:
    """One bundle of :func:`install_all`: its report, or the error that refused it."""

    bundle: str  # its path, or its parts'
    report: InstallReport | None = None
    error: MirrorError | None = None


BUNDLE_SUFFIX = ".hub"
PART_NAME = re.compile(r"\.hub\.\d{3,}$")  # OUT.hub.001: a part (mirror.parts)


def bundle_paths(inputs: Sequence[str], registry: Connection = HTTPS
                 ) -> List[BundleInput]:
    """The bundles ``inputs`` name: each file as given, a folder as the ``*.hub`` files
    (and ``*.hub.001``, ... parts) in it by name; the part files of one bundle, in
    whatever order given, as one :class:`mirror.parts.Parts`; an ``oci://`` reference
    as the artifact it names (:class:`mirror.oci.RegistrySource`, reached through
    ``registry``); then whole bundles before deltas, so that a delta finds what it was
    made against wherever its name sorts."""
    paths: List[str] = []
    for given in inputs:
        if is_reference(given):
            paths.append(given)
        elif os.path.isdir(given):
            found = sorted(os.path.join(given, n) for n in os.listdir(given)
                           if n.endswith(BUNDLE_SUFFIX) or PART_NAME.search(n))
            if not found:
                raise MirrorError(f"{given}: a folder with no bundle in it (no *"
                                  f"{BUNDLE_SUFFIX} file)")
            paths += found
        else:
            paths.append(given)

    if paths.count(bundle.STREAM) > 1:
        raise MirrorError("stdin ('-') can be read once: name it once")
    if len(paths) < 2:
        return [_remote(p, registry) for p in paths]  # nothing to order
    # (group passes over what is not a part file: an oci:// reference stays in its place)
    grouped = [_remote(p, registry) if isinstance(p, str) else p for p in group(paths)]

    def is_delta(path: BundleInput) -> bool:
        if not isinstance(path, Parts) and (not isinstance(path, str) or
                                            not os.path.isfile(path)):
            return False  # stdin, a pipe or a registry: read once, in its turn
        try:
            return bundle.read_manifest(path).prerequisites is not None
        except MirrorError:
            return False  # its own install says what is wrong with it

    deltas = [is_delta(p) for p in grouped]
    return [p for p, d in zip(grouped, deltas) if not d] + \
        [p for p, d in zip(grouped, deltas) if d]


def _remote(path: str, registry: Connection) -> BundleInput:
    if not is_reference(path):
        return path
    from .oci import RegistrySource  # an HTTP client: only for a registry

    return RegistrySource(path, registry)


def install_all(inputs: Sequence[str], home: str | None = None,
                options: InstallOptions = InstallOptions()) -> List[Outcome]:
    """Install every bundle ``inputs`` name (:func:`bundle_paths`), each on its own and
    all of it verified: one that fails leaves the store as the others alone would,
    and its :class:`Outcome` carries the error. Raises only for inputs that cannot be
    read as bundles at all (an empty folder, stdin named twice)."""
    outcomes = []
    paths = bundle_paths(inputs, options.registry)
    layout = Store(home).layout
    # One shared lock across them all: gc and remove wait until the last is in, so
    # nothing one brought is collected before the next, which may need it, arrives
    held = locked(layout.lock, shared=True) if len(paths) > 1 and \
        os.path.isfile(layout.lock) else contextlib.nullcontext()
    with held:
        for path in paths:
            try:
                outcomes.append(Outcome(str(path), install(path, home, options)))
            except MirrorError as e:
                outcomes.append(Outcome(str(path), error=e))
    return outcomes


class _StagedBlob:
    """A staged blob, read-only once written. The kernel starts writing it to disk as
    it grows; a large one is then fsynced on a background thread while the next
    member is decompressed and hashed; small ones are made durable together at the
    end (:func:`mirror.atomic.sync_files`)."""

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


class Transaction:
    """One install in progress: its work folder under ``tmp/``, what it has staged,
    and the report of what it did."""

    def __init__(self, store: Store, source: BundleInput, work: str, options: InstallOptions,
                 policy: TrustPolicy):
        self.store, self.layout, self.work = store, store.layout, work
        self.source, self.options, self.policy = source, options, policy
        self.bundle_path = str(source)  # for messages: its path, or its parts'
        self.report = InstallReport(bundle=self.bundle_path)
        self.staged: Dict[str, _StagedBlob] = {}
        self.manifest: Manifest | None = None
        self.manifest_bytes = b""  # as signed, and as the bundle holds them
        self.signature: bytes | None = None  # the signature document, if any
        self.syncer: ThreadPoolExecutor | None = None
        self.trusted_ids: set | None = None  # under a policy: the key ids it trusts
        self.proofs: Dict[str, Proof] = {}  # commit -> what its git objects proved

    @property
    def file_name(self) -> str:
        """The name records keep: the file's, what its parts are the parts of, or (from
        a registry, once read) its first layer's title."""
        if isinstance(self.source, Remote):
            return self.source.file_name
        return os.path.basename(self.source if isinstance(self.source, str) else
                                self.source.paths[0].rsplit(".", 1)[0])

    def run(self) -> InstallReport:
        """The steps; an OSError on the way (a full disk) is a StoreError naming
        the path. mirror's own errors pass through with their message and exit code."""
        try:
            self.verify_and_stage()
            self.prove()
            self.publish()
            self.seed()
        except OSError as e:
            raise StoreError(e.filename or self.store.home,
                             f"install of {self.bundle_path} failed: {e.strerror or e}") \
                from None
        return self.report

    # --- 1. verify and stage ---------------------------------------------------

    def verify_and_stage(self) -> None:
        """Read the whole bundle once, verifying every byte and staging new blobs."""
        keys = self.policy.keys() if self.policy.required else None
        self.trusted_ids = set(keys) if keys is not None else None

        def on_head(head: bundle.Head) -> None:
            self.report.bundle_id, self.manifest_bytes = head.bundle_id, head.manifest_bytes
            self.signature = head.signature
            self.manifest = head.manifest
            if keys is not None:  # the signature decides before any member is read
                from .signing import check

                self.report.signed_by = check(head.signature, head.manifest_bytes, keys,
                                              self.bundle_path).key_id
            self._check_ref_names()  # before a long read; again before publishing
            # gc and remove wait for the shared lock held from here: what is there now
            # stays until this install is done.
            check_prerequisites(self.store, head.manifest, self.bundle_path)

        digest = hashlib.sha256() if self.options.digest_file else None
        self.syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror-fsync")
        try:
            # Weights are scanned for pickled code as they stream past, as verify does.
            scans = None if self.options.allow_unsafe_pickle else PickleScans(self.bundle_path)
            self.manifest = bundle.read(self.source, self._sink, on_head=on_head,
                                        progress=self.options.progress, file_digest=digest,
                                        scan=scans)
            self.report.file_sha256 = digest.hexdigest() if digest else ""
            self._make_durable()
        finally:
            self.syncer.shutdown(wait=True)
            for f in self.staged.values():
                f.fh.close()
        if scans is not None:  # before anything is published
            scans.check(self.manifest)
            self._scan_assumed()

    def _scan_assumed(self) -> None:
        """A delta's weights that the store holds are scanned from the store, as the
        whole bundle's would be as they streamed past: they may have come in under
        --allow-unsafe-pickle."""
        for w in self.manifest.weights:
            if w.sha256 in self.manifest.assumed:
                unsafe = unsafe_globals(self.layout.blob(w.sha256))
                if unsafe:
                    raise UnsafePickleError(f"weight {w.url} in {self.bundle_path} (left out "
                                            f"of it: the store's copy)", unsafe)

    def _sink(self, member: Member) -> _StagedBlob | None:
        self.report.verified_files += 1
        self.report.verified_bytes += member.size
        self.report.members.append(member)
        if os.path.exists(self.layout.blob(member.sha256)) or member.sha256 in self.staged:
            return None  # content-addressed: already stored, only verified
        self.staged[member.sha256] = _StagedBlob(os.path.join(self.work, member.sha256),
                                                 self.syncer)
        return self.staged[member.sha256]

    def _make_durable(self) -> None:
        for f in self.staged.values():
            if f.synced is not None:
                f.synced.result()  # raises what fsync raised
        small = [f for f in self.staged.values() if f.synced is None]
        if small:
            sync_files(self.work, [f.path for f in small], sum(f.size for f in small))

    # --- 2. prove ------------------------------------------------------------------

    def prove(self) -> None:
        """Recompute every git id of a format 2 bundle from the bytes just verified; a
        commit that does not match its content is refused before anything is written."""
        try:
            self.proofs = prove_manifest(self.manifest, self._verified_path, self.work)
        except ProofError as e:
            raise BundleError(self.bundle_path, str(e)) from None

    def _verified_path(self, sha256: str) -> str:
        staged = self.staged.get(sha256)
        return staged.path if staged else self.layout.blob(sha256)

    # --- 3. publish ----------------------------------------------------------------

    def publish(self) -> None:
        """Make the verified bundle visible, all or nothing: blobs, then snapshots,
        refs and the bundle's record under every repo's lock, journaled, so that an
        error at any step puts back what readers saw (:mod:`mirror.journal`)."""
        self._publish_blobs()
        built = self._build_snapshots()  # outside the locks: the slow part
        journal = Journal(self.work)
        with contextlib.ExitStack() as locks:
            # Sorted, so two installs of overlapping repos cannot deadlock.
            # A new repo's folder holds its lock, so it stays if the install fails:
            # without a repo.json, no reader sees it.
            for paths in sorted(set(self._repo_layouts()), key=lambda p: p.path):
                locks.enter_context(locked(paths.refs_lock))
            try:
                self._check_ref_names()
                for repo in self.manifest.repos:
                    self._publish_snapshots(repo, built, journal)
                self._set_refs(journal)
                self.report.weights = [w.url for w in self.manifest.weights]
                journal.write(self.layout.bundle_record(self.report.bundle_id),
                              self.manifest_bytes)
                if self.signature is not None:
                    journal.write(self.layout.bundle_signature(self.report.bundle_id),
                                  self.signature)
            except BaseException as error:
                failed = journal.rollback()
                if failed:
                    raise StoreError(self.store.home, f"install of {self.bundle_path} failed "
                                     f"({_reason(error)}), and {len(failed)} change(s) could "
                                     f"not be undone ({'; '.join(failed[:3])}); run 'mirror "
                                     f"verify'") from None
                raise

    def _publish_blobs(self) -> None:
        os.makedirs(self.layout.blobs, exist_ok=True)
        for sha, f in self.staged.items():
            if not os.path.exists(self.layout.blob(sha)):
                os.replace(f.path, self.layout.blob(sha))
                self.report.bytes_written += f.size
        fsync_dir(self.layout.blobs)

    def _repo_layouts(self) -> List[RepoLayout]:
        return [self.layout.repo(r.id.host, r.id.owner, r.id.name) for r in self.manifest.repos]

    def _build_snapshots(self) -> Dict[Tuple[str, str], str]:
        """(repo folder, commit) -> its tree, built in the install's own folder (an
        abandoned build is plainly garbage), for every snapshot that may go in (asked
        again under the lock)."""
        built = {}
        for repo, paths in zip(self.manifest.repos, self._repo_layouts()):
            for snap in repo.snapshots:
                key = (paths.path, snap.commit)
                if key not in built and self._should_publish(paths, snap):
                    built[key] = make_temp_dir(self.work, f"snapshot-{short(snap.commit)}-")
                    materialize(built[key], snap.files, self.layout.blob)
        return built

    def _publish_snapshots(self, repo: RepoEntry, built: Dict[Tuple[str, str], str],
                           journal: Journal) -> None:
        paths = self.layout.repo(repo.id.host, repo.id.owner, repo.id.name)
        if not os.path.exists(paths.repo_json):
            journal.write(paths.repo_json, canonical_json(repo.id.to_record()))
        journal.makedirs(paths.snapshots)
        pins = {w.url: Pin(w.sha256, w.size) for w in self.manifest.weights}
        for snap in repo.snapshots:
            label = SnapshotOutcome(repo.id, snap.commit)
            # Decided under the lock: another install must not publish in between (a
            # record and a folder of different contents).
            key = (paths.path, snap.commit)
            if key not in built or not self._should_publish(paths, snap):
                self.report.snapshots_present.append(label)
                continue
            journal.write(paths.snapshot_record(snap.commit),
                          canonical_json(self._record(snap, pins).to_json()))
            journal.put_dir(built.pop(key), paths.snapshot(snap.commit))
            self.report.snapshots_installed.append(label)

    def _should_publish(self, paths: RepoLayout, snap: SnapshotEntry) -> bool:
        """Whether this bundle's snapshot goes in: when the commit is not installed
        (folder or record missing), with --force, or when it is proven and what is
        there is not. An unproven snapshot never replaces a proven one, even with
        --force: a proven commit id has only one content."""
        proven = snap.commit in self.proofs
        try:
            old = self.store.snapshot_record(paths, snap.commit)
        except StoreError:  # unreadable: reinstalling repairs it
            return True
        if old is not None and old.proven and not proven:
            return False
        if old is None or not os.path.isdir(paths.snapshot(snap.commit)):
            return True
        return self.options.force or (proven and not old.proven)

    def _record(self, snap: SnapshotEntry, pins: Dict[str, Pin]) -> SnapshotRecord:
        # The weights this snapshot's code asks for, pinned to their bytes: a later
        # bundle with other bytes under the same URL cannot change what it loads.
        return SnapshotRecord(snap, {u: pins[u] for u in snap.weights if u in pins},
                              self.report.bundle_id, self.file_name,
                              self.report.signed_by, int(time.time()))

    def _check_ref_names(self) -> None:
        """Refuse a ref that cannot sit beside one the store has (``x`` and ``x/y``):
        git keeps refs as files, and one name cannot be both a file and a folder.
        Checked when the manifest is read (to fail before a long read) and again
        under the repos' locks, before anything is published."""
        for repo, paths in zip(self.manifest.repos, self._repo_layouts()):
            installed = self.store.ref_entries(paths)
            for ref in repo.refs:
                clash = ref_conflict((h.name for h in installed if h.kind == ref.kind),
                                     ref.name)
                if clash is not None:
                    raise RefConflictError(repo.id.label, ref.kind, ref.name, clash,
                                           self.bundle_path)

    def _set_refs(self, journal: Journal) -> None:
        for repo, paths in zip(self.manifest.repos, self._repo_layouts()):
            for ref in repo.refs:
                self._set_ref(paths, repo, ref, journal)

    def _set_ref(self, paths: RepoLayout, repo: RepoEntry, ref: RefEntry,
                 journal: Journal) -> None:
        current = self.store.ref_commit(paths, ref.kind, ref.name)
        if current == ref.commit:
            return
        kept = self._why_kept(paths, ref, current) if current else None
        if kept and not self.options.force:
            self.report.refs_kept.append(RefOutcome(repo.id, ref.kind, ref.name, ref.commit,
                                                    current, kept))
            return
        journal.write(paths.ref(ref.kind, ref.name), (ref.commit + "\n").encode())
        entry = RefLogEntry(ref.name, ref.kind, current, ref.commit, self.report.bundle_id,
                            self.file_name, int(time.time()),
                            self.manifest.created, forced=kept is not None)
        journal.append(paths.refs_log, canonical_json(entry.to_json()))
        self.report.refs_set.append(RefOutcome(repo.id, ref.kind, ref.name, ref.commit,
                                               current))

    def _why_kept(self, paths: RepoLayout, ref: RefEntry, current: str) -> str | None:
        """Which rule keeps a ref at ``current`` (None: it moves). A tag never moves;
        a branch moves only forward, when this bundle's verified history shows that
        ``current`` is an ancestor of the new commit, and only by a bundle made no
        earlier than the one that moved it last."""
        if ref.kind == "tag":
            return f"{short(current)} (tags never move without --force)"
        proof = self.proofs.get(ref.commit)
        if proof is not None and proof.has_ancestor(current):
            # Forward in history, but an old bundle installed again must not undo a move
            # that --force made against these rules (upstream moved the branch back,
            # say). Only then: a bundle's own clock never holds a branch back otherwise.
            last = self.store.last_move(paths, ref.kind, ref.name)
            if last is None or not last.forced or last.new != current or \
                    last.created <= self.manifest.created:
                return None
            return (f"{short(current)}: bundle {last.bundle_file}, which moved it there, was "
                    f"made {_date(last.created)}, after this one "
                    f"({_date(self.manifest.created)}); an older bundle never moves a ref "
                    f"(--force moves it)")
        old = self.store.snapshot_record(paths, current)
        if old is not None and old.proven:
            with open(self.layout.blob(old.snapshot.objects.sha256), "rb") as fh:
                back = history(fh.read(), current, self.work).has_ancestor(ref.commit)
        else:  # an unproven snapshot: its time is all there is to tell
            back = old is not None and old.snapshot.commit_time > self._time(ref.commit)
        if back:
            return f"newer {short(current)} (use --force to move it back)"
        return (f"{short(current)}: this bundle does not prove that {short(current)} is an "
                f"ancestor of {short(ref.commit)} (branches move only forward; --force "
                f"moves it)")

    def _time(self, commit: str) -> int:
        return next((s.commit_time for r in self.manifest.repos for s in r.snapshots
                     if s.commit == commit), 0)

    # --- 4. seed ------------------------------------------------------------------

    def seed(self) -> None:
        """Bring MegEngine Hub's cache in line with the store for the versions asked
        for (and those seeded there before); none asked: skipped."""
        versions = self.options.megengine_versions
        if not versions:
            return
        from .megengine_cache import reconcile

        home = self.options.megengine_home or settings().megengine_home
        # Stock megengine.hub runs whatever the cache holds, unchecked: under the store's
        # own policy only what its keys signed, else under this install's, if any.
        # The store is complete at this point; a cache that cannot be written (or a
        # record that cannot be read) is a warning about stock megengine.hub, not a
        # failed install.
        try:
            store_policy = self.store.policy
            trusted = set(store_policy.keys()) if store_policy.required else self.trusted_ids
            seeds = reconcile(self.store, home, versions, trusted)
            # What this bundle's repos and weights leave unseeded is said; the rest of
            # the store's is counted (`mirror seed` lists it).
            mine = {self.store.layout.repo(r.id.host, r.id.owner, r.id.name).path
                    for r in self.manifest.repos} | {w.url for w in self.manifest.weights}
            own = [u for u in seeds.unseeded if u.about in mine]
            others = len(seeds.unseeded) - len(own)
            self.report.megengine_cache = replace(seeds, unseeded=own).lines() + (
                [f"{others} other ref(s), commit(s) or weight(s) of the store stay unseeded "
                 f"('mirror seed' lists them)"] if others else [])
        except (OSError, MirrorError) as e:
            where = f"{e.filename or home}: {e.strerror or e}" if isinstance(e, OSError) \
                else str(e)
            self.report.megengine_cache = [
                f"warning: not seeded ({where}); stock megengine.hub will not find this "
                f"bundle offline"]


def _date(stamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        return f"{error.filename}: {error.strerror}" if error.filename else str(error)
    return str(error) or type(error).__name__


def installed_versions(asked: Sequence[str]) -> Tuple[str, ...]:
    """The MegEngine versions to seed for: those ``asked``, else the installed one."""
    if asked:
        return tuple(asked)
    from .megengine_cache import installed_megengine_version

    found = installed_megengine_version()
    return (found,) if found else ()

