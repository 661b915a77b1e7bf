"""``mirror export``: a bundle made from the store alone, with no network, that installs
on another host exactly as the bundle(s) that brought its content did.

What ``SPEC`` names is chosen as ``mirror remove`` chooses it: ``owner/name`` a whole
repo (every ref and snapshot), ``owner/name:ref`` one ref and its snapshot,
``owner/name@commit`` one snapshot and no ref.

When the selection is exactly what one installed bundle held (its repos, its refs at
the same commits, its snapshots, its weights), that bundle is made again: the
manifest's bytes as the store kept them (so the same bundle id) and the signature it
carried. Otherwise a new manifest is made from the store's records: the refs as the
bundle that last set them recorded them, the snapshots as installed, the weights their
code was installed with. Every member comes from the store's blobs, each checked to
be there before the bundle is written; the bundle appears only when it is complete.

:func:`select` builds the manifest and its sources without writing anything: a later
``--since`` can shrink what it returns before :func:`write_selection` writes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Set, Tuple

from . import __version__, bundle
from .config import settings
from .errors import MirrorError, NotInstalledError, StoreError
from .ids import short
from .layout import RepoLayout
from .locking import locked
from .model import (
    FORMAT_VERSION,
    STREAMED_VERSION,
    JsonObject,
    Manifest,
    Pin,
    Prerequisites,
    RefEntry,
    RepoEntry,
    RepoId,
    SnapshotEntry,
    SnapshotRecord,
    WeightEntry,
    code_member,
    objects_member,
    weight_member,
)
from .parts import split_size as split_size_of
from .proof import ProofError, decode
from .refs import RepoSpec
from .store import Store, read_record

RefKey = Tuple[str, str, str]  # kind, name, commit


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` wrote."""

    output: str
    bundle_id: str
    reemitted: bool  # an installed bundle made again: same manifest bytes, same id
    repos: Tuple[str, ...]  # owner/name (host/owner/name off the default host)
    snapshots: Tuple[str, ...]  # owner/name@commit
    weights: Tuple[str, ...]  # URLs
    bytes: int  # the bundle file's size; -1 when written to stdout
    signed: bool = False
    prerequisites: Prerequisites | None = None  # a delta's (--since), else None
    parts: Tuple[str, ...] = ()  # the part files written (split_size), else ()

    def to_json(self) -> JsonObject:
        return dataclasses.asdict(self)


@dataclass
class _Selected:
    """One repo's part of the selection."""

    layout: RepoLayout
    id: RepoId
    refs: Set[RefKey] = dataclasses.field(default_factory=set)
    commits: Set[str] = dataclasses.field(default_factory=set)

    @property
    def key(self) -> Tuple[str, str, str]:
        return _repo_key(self.id)


def _repo_key(ident: RepoId) -> Tuple[str, str, str]:
    """A repo as the store names its folder: host, owner and name in lower case."""
    return ident.host.lower(), ident.owner.lower(), ident.name.lower()


def export(store: Store, specs: Sequence[str], output: str,
           sign: str | None = None, since: str | None = None,
           split_size: str | None = None) -> ExportReport:
    """Write to ``output`` a bundle of what ``specs`` (``[host/]owner/name[:ref][@commit]``)
    name in ``store``; signed with the private key at ``sign``, if given (else an
    installed bundle made again keeps its own signature, and a new one is unsigned).
    With ``since`` (the target's inventory, a bundle it installed, or a lock file), a
    delta that leaves out what the target holds (:mod:`mirror.delta`). With
    ``split_size`` (``4G``, ``4700MB``), in parts of at most that size
    (:mod:`mirror.parts`); sign them (``sign``) for each part to be verifiable alone
    under a trust policy: a bundle made again keeps its signature, but its table of
    parts is new and unsigned.

    Raises :class:`NotInstalledError` for a spec that names nothing installed,
    :class:`StoreError` for a record or blob the store lacks, and :class:`MirrorError`
    for a selection that cannot be one bundle. Nothing is written then.
    """
    if isinstance(specs, str):  # one spec, not its characters
        specs = [specs]
    size = split_size_of(split_size, output)
    baseline = None
    if since is not None:
        from .delta import Baseline

        baseline = Baseline.load(since)  # before the store is read: a bad file fails fast
    if not os.path.isdir(store.home):
        raise StoreError(store.home, "there is no store here; nothing was exported")
    # Shared, as install's: gc and remove wait until every blob is copied out.
    with locked(store.layout.lock, shared=True):
        manifest, sources, manifest_bytes, signature = select(store, specs)
        if baseline is not None:
            from .delta import make_delta

            delta = make_delta(manifest, baseline)
            if delta is not manifest:  # a new manifest: neither the bytes nor the signature
                manifest, manifest_bytes, signature = delta, None, None
        return write_selection(store, manifest, sources, output, manifest_bytes, signature,
                               sign, size)


def write_selection(store: Store, manifest: Manifest, sources: Mapping[str, str],
                    output: str, manifest_bytes: bytes | None = None,
                    signature: bytes | None = None, sign: str | None = None,
                    split_size: int | None = None) -> ExportReport:
    """Write what :func:`select` chose (maybe shrunk since) to ``output`` (in parts of
    ``split_size`` bytes, if given)."""
    if manifest.format_version == STREAMED_VERSION and (output == bundle.STREAM or split_size):
        # The manifest last needs a whole file: to a pipe or in parts, a new bundle
        # (format 2), which keeps neither the id nor the signature of the one made again
        manifest = dataclasses.replace(manifest, format_version=FORMAT_VERSION)
        manifest_bytes = signature = None
    signer = None
    if sign is not None:
        from . import signing

        key = signing.load_private(sign)
        signer, signature = (lambda data, purpose=None: signing.sign(key, data, purpose)), None
    mtimes = {code_member(s.commit, f.path): s.commit_time
              for r in manifest.repos for s in r.snapshots for f in s.files}
    try:
        bundle_id, files = bundle.write_files(output, manifest, sources, mtimes, sign=signer,
                                              manifest_bytes=manifest_bytes,
                                              signature=signature, split_size=split_size)
    except bundle.SourceError as e:  # a blob gone or unreadable since it was checked
        raise StoreError(e.path, f"{e}; nothing was exported (run 'mirror verify')") \
            from None
    except OSError as e:
        raise MirrorError(f"cannot write {output}: {e.strerror or e}") from None
    return ExportReport(
        output, bundle_id, manifest_bytes is not None,
        tuple(r.id.spec for r in manifest.repos),
        tuple(f"{r.id.spec}@{s.commit}" for r in manifest.repos for s in r.snapshots),
        tuple(w.url for w in manifest.weights),
        sum(os.path.getsize(f) for f in files) if output != bundle.STREAM else -1,
        signed=signer is not None or signature is not None,
        prerequisites=manifest.prerequisites,
        parts=tuple(files) if split_size is not None else ())


def select(store: Store, specs: Sequence[str]
           ) -> Tuple[Manifest, Dict[str, str], bytes | None, bytes | None]:
    """What ``specs`` name in ``store``, as a bundle: its manifest, member name -> the
    blob holding it, and, when an installed bundle held exactly this, the manifest's
    bytes as it held them and its signature document (else both None). Every blob is
    checked to be in the store. Writes nothing."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise MirrorError("name at least one repo, ref or commit to export")
    chosen = _choose(store, specs)
    records = {(sel.key, commit): _record(store, sel, commit)
               for sel in chosen for commit in sorted(sel.commits)}
    pins = _pins(chosen, records)
    found = _installed_bundle(store, chosen, records, pins)
    if found is not None:
        manifest, manifest_bytes, signature = found
    else:
        manifest, manifest_bytes, signature = _new_manifest(store, chosen, records, pins), \
            None, None
    return manifest, _sources(store, manifest), manifest_bytes, signature


# --- what the specs name ------------------------------------------------------------


def _choose(store: Store, specs: Sequence[str]) -> List[_Selected]:
    """Each repo the specs name, with the refs and commits chosen in it, as ``mirror
    remove`` would choose them; in the order a pack writes repos."""
    chosen: Dict[str, _Selected] = {}
    for spec in specs:
        parsed = RepoSpec.parse(spec)
        repo = store.find_repo(parsed.host, parsed.owner, parsed.name)
        entries, commits = store.ref_entries(repo), store.commits(repo)
        if not os.path.exists(repo.repo_json) or (not entries and not commits):
            raise NotInstalledError(parsed.repo, parsed.ref, parsed.commit, store=store.home)
        sel = chosen.get(repo.path)
        if sel is None:
            sel = chosen[repo.path] = _Selected(repo, store.repo_id(repo))
        if parsed.commit:  # a commit wins over a ref, as in remove and load
            snap = store.resolve(parsed.owner, parsed.name, None, parsed.commit,
                                 host=parsed.host)
            sel.commits.add(snap.commit)
            continue
        if parsed.ref:
            head = store.refs(repo).get(parsed.ref)  # what ":ref" names: a branch first
            if head is None:
                raise NotInstalledError(parsed.repo, parsed.ref, None,
                                        [f"{h.kind} {h.name}" for h in entries], store.home)
            heads = [head]
        else:
            heads = list(entries)
            sel.commits.update(commits)
        for head in heads:
            if head.commit not in commits:
                raise StoreError(repo.ref(head.kind, head.name),
                                 f"{head.kind} {sel.id.spec}:{head.name} points at "
                                 f"{short(head.commit) or '?'}, which is not installed; run "
                                 f"'mirror verify'")
            sel.refs.add((head.kind, head.name, head.commit))
            sel.commits.add(head.commit)
    return sorted(chosen.values(), key=lambda s: s.key)


def _record(store: Store, sel: _Selected, commit: str) -> SnapshotRecord:
    record = store.snapshot_record(sel.layout, commit)
    if record is None:
        raise StoreError(sel.layout.snapshot_record(commit),
                         f"{sel.id.spec}@{short(commit)} has no record; run 'mirror "
                         f"verify' and install its bundle again with --force")
    return record


def _pins(chosen: List[_Selected], records: Mapping[Tuple[Tuple[str, str, str], str],
                                                  SnapshotRecord]) -> Dict[str, Pin]:
    """URL -> the bytes the chosen snapshots were installed with for it. A bundle lists
    a URL once, so snapshots that pin one URL to different bytes cannot go together."""
    pins: Dict[str, Pin] = {}
    by: Dict[str, str] = {}
    for sel in chosen:
        for commit in sorted(sel.commits):
            where = f"{sel.id.spec}@{short(commit)}"
            for url, pin in sorted(records[sel.key, commit].weight_digests.items()):
                if pins.setdefault(url, pin) != pin:
                    raise MirrorError(
                        f"cannot export {by[url]} and {where} in one bundle: they were "
                        f"installed with different bytes for {url} (sha256 "
                        f"{short(pins[url].sha256)} and {short(pin.sha256)}); export them "
                        f"separately")
                by.setdefault(url, where)
    return pins


def _selection(chosen: List[_Selected], records: Mapping[Tuple[Tuple[str, str, str], str],
                                                         SnapshotRecord],
               pins: Mapping[str, Pin]) -> tuple:
    """What an installed bundle must hold, exactly, to be made again for this."""
    return ({sel.key: (frozenset(sel.refs),
                       {c: records[sel.key, c].snapshot for c in sel.commits})
             for sel in chosen}, dict(pins))


def _holds(manifest: Manifest) -> tuple:
    return ({_repo_key(r.id): (frozenset((f.kind, f.name, f.commit) for f in r.refs),
                               {s.commit: s for s in r.snapshots})
             for r in manifest.repos},
            {w.url: Pin(w.sha256, w.size) for w in manifest.weights})


# --- an installed bundle, made again ------------------------------------------------


def _installed_bundle(store: Store, chosen: List[_Selected],
                      records: Mapping[Tuple[Tuple[str, str, str], str], SnapshotRecord],
                      pins: Mapping[str, Pin]
                      ) -> Tuple[Manifest, bytes, bytes | None] | None:
    """The manifest (and its bytes and signature) of the installed bundle that held
    exactly the selection, whole (not a delta): one that brought a chosen snapshot or
    set a chosen ref."""
    candidates: List[str] = []
    for record in records.values():
        if record.bundle and record.bundle not in candidates:
            candidates.append(record.bundle)
    for sel in chosen:
        for kind, name, _ in sorted(sel.refs):
            move = store.last_move(sel.layout, kind, name)
            if move is not None and move.bundle not in candidates:
                candidates.append(move.bundle)
    want = _selection(chosen, records, pins)
    for bundle_id in candidates:
        path = store.layout.bundle_record(bundle_id)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            manifest = Manifest.from_bytes(data)
        except (OSError, ValueError):  # gone, or of an earlier mirror: made anew instead
            continue
        # A delta leaves out what its prerequisites bring: an export carries it all.
        if bundle.bundle_id(data) != bundle_id or _holds(manifest) != want or \
                getattr(manifest, "prerequisites", None) is not None:
            continue
        try:
            with open(store.layout.bundle_signature(bundle_id), "rb") as fh:
                signature: bytes | None = fh.read()
        except FileNotFoundError:
            signature = None
        return manifest, data, signature
    return None


# --- a new manifest -----------------------------------------------------------------


def _new_manifest(store: Store, chosen: List[_Selected],
                  records: Mapping[Tuple[Tuple[str, str, str], str], SnapshotRecord],
                  pins: Mapping[str, Pin]) -> Manifest:
    manifests = _Manifests(store)
    repos = []
    for sel in chosen:
        snapshots = tuple(records[sel.key, c].snapshot for c in sorted(sel.commits))
        refs = tuple(_ref_entry(store, manifests, sel, key, records[sel.key, key[2]])
                     for key in sorted(sel.refs, key=lambda k: (k[0], k[1])))
        repos.append(RepoEntry(sel.id, refs, snapshots))
    weights = []
    for url in sorted(pins):
        pin = pins[url]
        locations: Tuple[str, ...] = ()
        for record in records.values():  # where the code asks for it, as packed
            if url in record.weight_digests:
                entry = manifests.weight(record.bundle, url, pin)
                if entry is not None:
                    locations = entry.locations
                    break
        weights.append(WeightEntry(url, pin.size, pin.sha256, locations))
    return Manifest(tuple(repos), tuple(weights), tool=f"mirror {__version__}",
                    created=settings().now(),
                    format_version=_format_version(chosen, records))


def _format_version(chosen: List[_Selected],
                    records: Mapping[Tuple[Tuple[str, str, str], str], SnapshotRecord]) -> int:
    """2 when every snapshot carries its git objects, 1 when none does; a bundle of one
    format cannot hold both."""
    proven = {key: r.proven for key, r in records.items()}
    if all(proven.values()):
        return 2
    if not any(proven.values()):
        return 1
    labels = {sel.key: sel.id.spec for sel in chosen}
    old = sorted(f"{labels[key]}@{short(commit)}" for (key, commit), p in proven.items()
                 if not p)
    new = sorted(f"{labels[key]}@{short(commit)}" for (key, commit), p in proven.items() if p)
    raise MirrorError(
        f"cannot export {old[0]} with {new[0]} in one bundle: {old[0]} came in a format 1 "
        f"bundle, without the git objects that format 2 needs for every snapshot; export "
        f"{'them' if len(old) > 1 else 'it'} ({', '.join(old)}) separately")


class _Manifests:
    """The store's bundle records, each read once."""

    def __init__(self, store: Store):
        self.store = store
        self.read: Dict[str, Manifest | None] = {}

    def get(self, bundle_id: str | None) -> Manifest | None:
        if not bundle_id:
            return None
        if bundle_id not in self.read:
            path = self.store.layout.bundle_record(bundle_id)
            try:
                self.read[bundle_id] = read_record(path, Manifest.from_stored) \
                    if os.path.exists(path) else None
            except StoreError:
                self.read[bundle_id] = None
        return self.read[bundle_id]

    def all(self) -> List[Tuple[str, Manifest]]:
        out = []
        for name in sorted(os.listdir(self.store.layout.bundles)) \
                if os.path.isdir(self.store.layout.bundles) else []:
            if name.endswith(".json") and not name.startswith("."):
                manifest = self.get(name[:-len(".json")])
                if manifest is not None:
                    out.append((name[:-len(".json")], manifest))
        return out

    def ref(self, bundle_id: str | None, ident: RepoId, key: RefKey) -> RefEntry | None:
        manifest = self.get(bundle_id)
        for repo in manifest.repos if manifest else ():
            if _repo_key(repo.id) == _repo_key(ident):
                for ref in repo.refs:
                    if (ref.kind, ref.name, ref.commit) == key:
                        return ref
        return None

    def weight(self, bundle_id: str | None, url: str, pin: Pin) -> WeightEntry | None:
        manifest = self.get(bundle_id)
        for w in manifest.weights if manifest else ():
            if w.url == url and Pin(w.sha256, w.size) == pin:
                return w
        return None


def _ref_entry(store: Store, manifests: _Manifests, sel: _Selected, key: RefKey,
               record: SnapshotRecord) -> RefEntry:
    """The ref as the bundle that last set it recorded it (else the newest bundle that
    holds it at this commit; else made here, asked by its name). An annotated tag's
    target stays only if the snapshot's git objects, as installed, carry it."""
    kind, name, commit = key
    move = store.last_move(sel.layout, kind, name)
    ref = manifests.ref(move.bundle, sel.id, key) if move and move.new == commit else None
    if ref is None:
        held = [(m.created, bundle_id) for bundle_id, m in manifests.all()
                if manifests.ref(bundle_id, sel.id, key) is not None]
        ref = manifests.ref(max(held)[1], sel.id, key) if held else None
    if ref is None:
        return RefEntry(name, kind, commit, asked=name, resolved_at=0)
    if ref.target is not None and ref.target != commit and \
            not _carries_tag(store, record.snapshot, ref.target):
        ref = dataclasses.replace(ref, target=None)
    return ref


def _carries_tag(store: Store, snap: SnapshotEntry, target: str) -> bool:
    """Whether the snapshot's git objects hold the tag object ``target`` (install proves
    a tag's target from them)."""
    if snap.objects is None:
        return False
    try:
        with open(store.layout.blob(snap.objects.sha256), "rb") as fh:
            objects = fh.read()
        return any(hashlib.sha1(f"tag {len(data)}\0".encode() + data).hexdigest() == target
                   for kind, data in decode(objects) if kind == "tag")
    except (OSError, ProofError):  # a missing blob is reported by _sources
        return False


# --- the members' bytes -------------------------------------------------------------


def _sources(store: Store, manifest: Manifest) -> Dict[str, str]:
    """Member name -> the store's blob of it, each checked to be there with its size."""
    sources: Dict[str, str] = {}

    def need(member: str, sha256: str, size: int, what: str) -> None:
        path = store.layout.blob(sha256)
        try:
            actual = os.stat(path).st_size
        except OSError:
            raise StoreError(path, f"{what} is missing from the store; nothing was exported "
                                   f"(run 'mirror verify', and install the bundle that "
                                   f"brought it again with --force)") from None
        if actual != size:
            raise StoreError(path, f"{what} is {actual} bytes, not the {size} installed; "
                                   f"nothing was exported (run 'mirror verify')")
        sources[member] = path

    for repo in manifest.repos:
        for snap in repo.snapshots:
            label = f"{repo.id.spec}@{short(snap.commit)}"
            for f in snap.files:
                need(code_member(snap.commit, f.path), f.sha256, f.size,
                     f"{label}: file {f.path}")
            if snap.objects is not None:
                need(objects_member(snap.commit), snap.objects.sha256, snap.objects.size,
                     f"{label}: the blob of its git objects")
    for w in manifest.weights:
        need(weight_member(w.sha256), w.sha256, w.size, f"weight {w.url}")
    return sources
