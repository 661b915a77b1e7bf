"""What a store holds, as a small JSON file to carry back out of the air gap.

``mirror inventory -o store.inv`` on the isolated host lists every repo, ref and
snapshot of the store, every weight pin of its snapshot records and every blob;
on the connected host the file tells a packer what the store already has, so a
delta bundle can leave it out. The shape::

    {"format": "mge-mirror-inventory", "format_version": 1, "tool": "mirror 0.1.0",
     "created": 1700000000,
     "repos": [{"host", "owner", "name",
                "refs": [{"kind", "name", "commit"}],
                "snapshots": [{"commit", "bundle", "bundle_file"}]}],
     "weights": [{"url", "sha256", "size"}],
     "blobs": [{"sha256", "size"}]}

It is written with :func:`mirror.model.canonical_json`, every list sorted, so one
store gives the same bytes (``created`` is ``SOURCE_DATE_EPOCH`` when set). With
a key it is signed beside itself (``FILE.sig``, the same signature document a
bundle carries, over the file's bytes). As :mod:`mirror.model` does, every field
is parsed and checked once, by ``from_json``; :func:`take` builds each item
through the same checks, so what it writes :func:`load` reads back.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

from .errors import ConfigError, InvalidRecordError, MirrorError, StoreError
from .ids import is_hex, short
from .model import (
    TIME_MAX,
    JsonObject,
    RefEntry,
    _list_of,
    _plain_name,
    _ranged,
    _sha256,
    _size,
    canonical_json,
    need,
    parse_bytes,
)
from .names import NAME_MAX, check_host, check_refs, check_text, check_url, shown
from .store import Store

FORMAT = "mge-mirror-inventory"
FORMAT_VERSION = 1
SIGNATURE_SUFFIX = ".sig"


class InventoryError(MirrorError):
    """Raised when an inventory file cannot be read or is malformed; the message names
    the file. (A bad signature is a :class:`mirror.errors.SignatureError`.)"""

    exit_code = 3

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"inventory {path}: {reason}")


def _unique(items: List[Any], key: Any, what: Any) -> None:
    """Refuse an item whose ``key`` an earlier one has; ``what(item)`` names it."""
    seen: set = set()
    for item in items:
        k = key(item)
        if k in seen:
            raise InvalidRecordError(f"{what(item)} is listed twice")
        seen.add(k)


@dataclass(frozen=True)
class InventoryRef:
    """A branch or tag of a stored repo and the commit it names."""

    kind: str  # "branch" or "tag"
    name: str
    commit: str

    @classmethod
    def from_json(cls, obj: Any) -> InventoryRef:
        ref = RefEntry.from_json(obj)  # the manifest's checks: kind, git's name rules, id
        return cls(ref.kind, ref.name, ref.commit)

    def to_json(self) -> JsonObject:
        return {"kind": self.kind, "name": self.name, "commit": self.commit}


@dataclass(frozen=True)
class InventorySnapshot:
    """A stored snapshot: its commit and the bundle that brought it (its id, the sha256
    of its manifest, and its file name as installed; None when not recorded)."""

    commit: str
    bundle: str | None = None
    bundle_file: str | None = None

    @classmethod
    def from_json(cls, obj: Any) -> InventorySnapshot:
        commit = need(obj, "commit", str)
        if not is_hex(commit, (40, 64)):
            raise InvalidRecordError(f"snapshot commit {shown(commit)} is not a full id")
        bundle, bundle_file = obj.get("bundle"), obj.get("bundle_file")
        if bundle is not None and not is_hex(bundle, (64,)):
            raise InvalidRecordError(f"snapshot {short(commit)} 'bundle' is not null or 64 "
                                     f"lowercase hex digits")
        if bundle_file is not None:
            check_text(need(obj, "bundle_file", str), f"snapshot {short(commit)} 'bundle_file'",
                       NAME_MAX)  # a file name, as installed
        return cls(commit, bundle, bundle_file)

    def to_json(self) -> JsonObject:
        return {"commit": self.commit, "bundle": self.bundle, "bundle_file": self.bundle_file}


@dataclass(frozen=True)
class InventoryRepo:
    """A stored repo: who it is, its refs (each naming one of its snapshots) and its
    snapshots."""

    host: str
    owner: str
    name: str
    refs: Tuple[InventoryRef, ...] = ()
    snapshots: Tuple[InventorySnapshot, ...] = ()

    @classmethod
    def from_json(cls, obj: Any) -> InventoryRepo:
        host = check_host(need(obj, "host", str), "repo host")
        owner, name = (_plain_name(need(obj, k, str), k) for k in ("owner", "name"))
        label = f"repo {host}/{owner}/{name}"
        snapshots = sorted(_list_of(obj, "snapshots", InventorySnapshot.from_json),
                           key=lambda s: s.commit)
        refs = sorted(_list_of(obj, "refs", InventoryRef.from_json),
                      key=lambda r: (r.kind, r.name))
        _unique(snapshots, lambda s: s.commit, lambda s: f"{label} snapshot {s.commit}")
        check_refs([(r.kind, r.name) for r in refs])
        commits = {s.commit for s in snapshots}
        for ref in refs:
            if ref.commit not in commits:
                raise InvalidRecordError(f"{label} {ref.kind} {shown(ref.name)} points at "
                                         f"{ref.commit}, which is not one of its snapshots")
        return cls(host, owner, name, tuple(refs), tuple(snapshots))

    def to_json(self) -> JsonObject:
        return {"host": self.host, "owner": self.owner, "name": self.name,
                "refs": [r.to_json() for r in self.refs],
                "snapshots": [s.to_json() for s in self.snapshots]}

    @property
    def key(self) -> Tuple[str, str, str]:
        """The store's folder for the repo: host, owner and name in lower case."""
        return self.host.lower(), self.owner.lower(), self.name.lower()


@dataclass(frozen=True)
class InventoryWeight:
    """A weight pin of a stored snapshot: the URL its code asks for and the bytes
    installed for it."""

    url: str
    sha256: str
    size: int

    @classmethod
    def from_json(cls, obj: Any) -> InventoryWeight:
        url = check_url(need(obj, "url", str), "weight URL")
        what = f"weight {shown(url)}"
        return cls(url, _sha256(obj, what), _size(obj, what))

    def to_json(self) -> JsonObject:
        return {"url": self.url, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class InventoryBlob:
    """A file in the store's ``blobs/``: its sha256 (its name) and size."""

    sha256: str
    size: int

    @classmethod
    def from_json(cls, obj: Any) -> InventoryBlob:
        sha = obj.get("sha256") if isinstance(obj, dict) else None
        what = f"blob {shown(sha)}" if isinstance(sha, str) else "blob"
        return cls(_sha256(obj, what), _size(obj, what))

    def to_json(self) -> JsonObject:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Inventory:
    """What a store holds: its repos, the weight pins of its snapshots, its blobs."""

    tool: str
    created: int
    repos: Tuple[InventoryRepo, ...] = ()
    weights: Tuple[InventoryWeight, ...] = ()
    blobs: Tuple[InventoryBlob, ...] = ()

    @classmethod
    def from_json(cls, obj: Any) -> Inventory:
        """Parse and check an inventory; every list comes out sorted. Raises
        :class:`InvalidRecordError` naming the field."""
        if not is_inventory(obj):
            raise InvalidRecordError("not a mirror inventory")
        version = obj.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise InvalidRecordError(f"format version {version!r} is not supported (this "
                                     f"mirror reads version {FORMAT_VERSION}; upgrade mirror)")
        tool = check_text(need(obj, "tool", str), "inventory 'tool'")
        created = _ranged(need(obj, "created", int), "inventory 'created'", 0, TIME_MAX)
        repos = sorted(_list_of(obj, "repos", InventoryRepo.from_json), key=lambda r: r.key)
        _unique(repos, lambda r: r.key, lambda r: f"repo {'/'.join(r.key)}")
        weights = sorted(_list_of(obj, "weights", InventoryWeight.from_json),
                         key=lambda w: (w.url, w.sha256, w.size))
        _unique(weights, lambda w: w, lambda w: f"weight {shown(w.url)} ({w.sha256})")
        blobs = sorted(_list_of(obj, "blobs", InventoryBlob.from_json), key=lambda b: b.sha256)
        _unique(blobs, lambda b: b.sha256, lambda b: f"blob {b.sha256}")
        return cls(tool, created, tuple(repos), tuple(weights), tuple(blobs))

    @classmethod
    def from_bytes(cls, data: bytes) -> Inventory:
        return parse_bytes(data, cls.from_json)

    def to_json(self) -> JsonObject:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "tool": self.tool,
                "created": self.created, "repos": [r.to_json() for r in self.repos],
                "weights": [w.to_json() for w in self.weights],
                "blobs": [b.to_json() for b in self.blobs]}

    def to_bytes(self) -> bytes:
        """The file's bytes: canonical JSON, the same for the same inventory."""
        return canonical_json(self.to_json())

    @property
    def snapshots(self) -> int:
        """How many snapshots the inventory lists, over all repos."""
        return sum(len(r.snapshots) for r in self.repos)

    def summary(self) -> JsonObject:
        """The counts ``mirror inventory`` prints."""
        return {"repos": len(self.repos), "snapshots": self.snapshots,
                "weights": len(self.weights), "blobs": len(self.blobs)}


def is_inventory(obj: Any) -> bool:
    """Whether a JSON object says it is an inventory (not a lock file, manifest...)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


# --- taking one ------------------------------------------------------------------


def take(store: Store) -> Inventory:
    """The inventory of ``store``, read only. A record that cannot be read (a repo's
    ``repo.json``, a snapshot's record, a damaged ref, a blob gone while listed) leaves
    out what it stands for, never fails: left out, it is packed again. A snapshot
    directory without a record is left out too, as is a ref naming no listed snapshot.
    A store that does not exist has an empty inventory. ``created`` is
    ``SOURCE_DATE_EPOCH`` when set, else now."""
    from . import __version__
    from .config import settings

    created = settings().now()
    if not 0 <= created <= TIME_MAX:
        raise ConfigError("SOURCE_DATE_EPOCH", f"{created} is out of range (0 to {TIME_MAX})")
    repos: Dict[Tuple[str, str, str], InventoryRepo] = {}
    weights: set = set()
    for layout in store.layout.all_repos():
        try:
            ident = store.repo_id(layout)
        except StoreError:
            continue
        snapshots = []
        for commit in store.commits(layout):
            try:
                record = store.snapshot_record(layout, commit)
            except StoreError:
                continue
            if record is None:
                continue
            snapshot = _parsed(InventorySnapshot, {"commit": commit, "bundle": record.bundle,
                                                   "bundle_file": record.bundle_file})
            if snapshot is None:  # an odd bundle name: the snapshot without it
                snapshot = InventorySnapshot(commit)
            snapshots.append(snapshot)
            for url, pin in record.weight_digests.items():
                weight = _parsed(InventoryWeight, {"url": url, "sha256": pin.sha256,
                                                   "size": pin.size})
                if weight is not None:
                    weights.add(weight)
        commits = {s.commit for s in snapshots}
        refs = [_parsed(InventoryRef, {"kind": h.kind, "name": h.name, "commit": h.commit})
                for h in store.ref_entries(layout)]
        repo = _parsed(InventoryRepo, {
            "host": ident.host, "owner": ident.owner, "name": ident.name,
            "snapshots": [s.to_json() for s in snapshots],
            "refs": [r.to_json() for r in refs if r is not None and r.commit in commits]})
        if repo is not None and repo.key not in repos:
            repos[repo.key] = repo
    return Inventory(f"mirror {__version__}", created,
                     tuple(repos[k] for k in sorted(repos)),
                     tuple(sorted(weights, key=lambda w: (w.url, w.sha256, w.size))),
                     tuple(_blobs(store)))


def _parsed(kind: Any, obj: JsonObject) -> Any:
    """``kind.from_json(obj)``, or None if it does not pass."""
    try:
        return kind.from_json(obj)
    except InvalidRecordError:
        return None


def _blobs(store: Store) -> List[InventoryBlob]:
    folder = store.layout.blobs
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    out = []
    for name in names:
        if not is_hex(name, (64,)):
            continue
        try:
            st = os.lstat(os.path.join(folder, name))
        except OSError:  # gone since listed (gc)
            continue
        if stat.S_ISREG(st.st_mode):
            out.append(InventoryBlob(name, st.st_size))
    return out


# --- files ------------------------------------------------------------------------


def write(inventory: Inventory, path: str, sign_key: str | None = None) -> str | None:
    """Write ``inventory`` to ``path`` atomically; with ``sign_key`` (a private key
    file) also ``path.sig``, the signature document of the file's bytes. Without one, a
    ``path.sig`` left from an earlier write is removed, as it no longer matches.
    Returns the signing key's id, or None."""
    from .atomic import write_atomic
    from .signing import key_id, load_private, sign

    data = inventory.to_bytes()
    private = load_private(sign_key) if sign_key else None  # before anything is written
    write_atomic(path, data)
    if private is None:
        try:
            os.unlink(path + SIGNATURE_SUFFIX)
        except FileNotFoundError:
            pass
        return None
    write_atomic(path + SIGNATURE_SUFFIX, sign(private, data))
    return key_id(private.public_key())


def load(path: str, keys: Mapping[str, Any] | None = None) -> Inventory:
    """The inventory in the file at ``path``. With ``keys`` (key id -> Ed25519 public
    key, as :func:`mirror.signing.load_keys` returns), ``path.sig`` must be a valid
    signature of its bytes by one of them, else :class:`mirror.errors.SignatureError`.
    A file that cannot be read or parsed is an :class:`InventoryError` naming it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise InventoryError(path, f"cannot read it: {e.strerror}") from None
    if keys is not None:
        from .signing import check

        try:
            with open(path + SIGNATURE_SUFFIX, "rb") as fh:
                document: bytes | None = fh.read()
        except FileNotFoundError:
            document = None
        except OSError as e:
            raise InventoryError(path, f"cannot read its signature: {e.strerror}") from None
        check(document, data, dict(keys), path)
    try:
        return Inventory.from_bytes(data)
    except InvalidRecordError as e:
        raise InventoryError(path, e.reason) from None
