"""The typed model of a bundle's manifest and of the store's records.

Every manifest and record is parsed here, once, at the edge: ``from_json``
checks every field's type, range and name before anything else sees it, and
raises :class:`~mirror.errors.InvalidRecordError` saying what is wrong. Past
that point the rest of mirror handles frozen dataclasses, never dicts, and
``to_json`` writes them back. ``verify`` and ``install`` parse a manifest with
the same :meth:`Manifest.from_json`, so a bundle that verifies also installs.

The JSON shapes are documented in ``docs/bundle-format.md``.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Tuple, TypeVar

from .errors import InvalidRecordError
from .ids import is_hex, short

FORMAT = "mge-mirror-bundle"
FORMAT_VERSION = 2  # 2: snapshots carry git's objects, so install recomputes every id
READS = (1, 2)  # every earlier version stays installable
RECORD_SCHEMA = 1  # of the store's records; records of before the schema field are 0

# git's file modes, the only ones a snapshot holds (a submodule has no content here).
MODE_FILE, MODE_EXEC, MODE_LINK = 0o100644, 0o100755, 0o120000
MODE_GROUP_WRITABLE = 0o100664  # an old git's regular file: kept, as its tree's id needs it
MODE_GITLINK = 0o160000  # a submodule: a commit id in a tree, no content in this repo
MODES = (MODE_FILE, MODE_EXEC, MODE_LINK, MODE_GROUP_WRITABLE)
PATH_MAX = 4096  # no longer path can be checked out; a symlink target is read whole


def canonical_json(obj: Any) -> bytes:
    """The bytes mirror writes for a manifest or record: sorted keys, compact (json's C
    encoder does not indent, and the indenting Python one took seconds for thousands
    of files; ``mirror inspect --json`` or ``jq .`` show it indented)."""
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            + "\n").encode()


# --- checks --------------------------------------------------------------------

T = TypeVar("T")
JsonObject = Dict[str, Any]  # a JSON object at the edge: what to_json returns, from_json takes


def need(entry: Any, key: str, kind: type) -> Any:
    """``entry[key]``, which must be a ``kind`` (a bool is not an int)."""
    if not isinstance(entry, dict) or not isinstance(entry.get(key), kind) or (
            kind is int and isinstance(entry.get(key), bool)):
        raise InvalidRecordError(f"{key!r} missing or not a {kind.__name__}")
    return entry[key]


def _optional(entry: Dict[str, Any], key: str, kind: type, default: Any) -> Any:
    return need(entry, key, kind) if key in entry and entry[key] is not None else default


def _strings(entry: Dict[str, Any], key: str) -> Tuple[str, ...]:
    value = _optional(entry, key, list, [])
    if not all(isinstance(v, str) for v in value):
        raise InvalidRecordError(f"{key!r} is not a list of strings")
    return tuple(value)


def _list_of(entry: Dict[str, Any], key: str, parse: Callable[[Any], T]) -> Tuple[T, ...]:
    return tuple(parse(item) for item in need(entry, key, list))


def _size(entry: Any, what: str) -> int:
    if not isinstance(entry, dict):
        raise InvalidRecordError(f"{what}: not an object with a size and a sha256")
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRecordError(f"{what}: size is not a non-negative integer")
    return size


def _sha256(entry: Any, what: str) -> str:
    if not isinstance(entry, dict) or not is_hex(entry.get("sha256"), (64,)):
        raise InvalidRecordError(f"{what}: sha256 is not 64 lowercase hex digits")
    return entry["sha256"]


def safe_path(p: Any) -> bool:
    """A relative POSIX path that cannot leave the directory it is joined to."""
    if not isinstance(p, str) or not p or p.startswith("/") or "\\" in p or "\0" in p:
        return False
    return all(part not in ("", ".", "..") for part in p.split("/"))


def symlink_escapes(path: str, target: str) -> bool:
    """Whether a symlink at ``path`` (in a snapshot) to ``target`` leaves the snapshot."""
    if not target or target.startswith("/") or "\0" in target:
        return True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return resolved in (".", "..") or resolved.startswith("../")


# --- the manifest ----------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """A bundle member as the manifest promises it."""

    name: str
    size: int
    sha256: str


def code_member(commit: str, path: str) -> str:
    return f"code/{commit}/{path}"


def weight_member(sha256: str) -> str:
    return f"weights/{sha256}"


def objects_member(commit: str) -> str:
    """The member holding a snapshot's git objects (format 2, see mirror.proof)."""
    return f"git/{commit}"


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot: path, git mode, size and sha256 of its bytes (a symlink's
    bytes are its target)."""

    path: str
    mode: int
    size: int
    sha256: str

    @classmethod
    def from_json(cls, obj: Any) -> FileEntry:
        path = need(obj, "path", str)
        if not safe_path(path):
            raise InvalidRecordError(f"unsafe file path {path!r}")
        mode = need(obj, "mode", int)
        if mode not in MODES:
            raise InvalidRecordError(f"file {path!r} has an unsupported mode")
        size, sha256 = _size(obj, path), _sha256(obj, path)
        if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX:
            raise InvalidRecordError(f"file path {path[:60]!r}... is over {PATH_MAX} bytes")
        if mode == MODE_LINK and size > PATH_MAX:
            raise InvalidRecordError(f"symlink {path!r} has a {size} byte target")
        return cls(path, mode, size, sha256)

    def to_json(self) -> JsonObject:
        return {"path": self.path, "mode": self.mode, "size": self.size, "sha256": self.sha256}

    @property
    def is_link(self) -> bool:
        return self.mode == MODE_LINK


@dataclass(frozen=True)
class RefEntry:
    """A branch or tag packed: its name, the commit it resolved to, and how it was asked."""

    name: str
    kind: str  # "branch" or "tag"
    commit: str
    asked: str = ""  # the spec as the user wrote it
    resolved_at: int = 0
    fetched_from: str | None = None  # the URL the bytes came from (after rewrites)
    target: str | None = None  # format 2: the object the ref names (an annotated tag's id)

    @classmethod
    def from_json(cls, obj: Any) -> RefEntry:
        kind, name = need(obj, "kind", str), need(obj, "name", str)
        if kind not in ("branch", "tag") or not safe_path(name):
            raise InvalidRecordError(f"ref {name!r} is not a valid {kind} name")
        target = _optional(obj, "target", str, None)
        if target is not None and not is_hex(target, (40,)):
            raise InvalidRecordError(f"ref {name!r} targets {target!r}, not an object id")
        return cls(name, kind, need(obj, "commit", str), _optional(obj, "asked", str, ""),
                   _optional(obj, "resolved_at", int, 0),
                   _optional(obj, "fetched_from", str, None), target)

    def to_json(self) -> JsonObject:
        out = {"name": self.name, "kind": self.kind, "commit": self.commit,
               "asked": self.asked, "resolved_at": self.resolved_at}
        if self.fetched_from is not None:
            out["fetched_from"] = self.fetched_from
        if self.target is not None:
            out["target"] = self.target
        return out


@dataclass(frozen=True)
class TraceRecord:
    """What ``pack --trace`` saw each entrypoint ask for (see :mod:`mirror.trace`):
    ``weights`` entry -> [{url, at}], ``nested`` entry -> [{repo_info, entry, at, ...}],
    ``errors`` entry -> message. Kept as the JSON it is: it is shown, never acted on."""

    weights: Mapping[str, Any]
    nested: Mapping[str, Any]
    errors: Mapping[str, str]

    @classmethod
    def from_json(cls, obj: Any) -> TraceRecord:
        parts = [need(obj, key, dict) for key in ("weights", "nested", "errors")]
        for key, part in zip(("weights", "nested"), parts[:2]):
            if not all(isinstance(v, list) and all(isinstance(c, dict) for c in v)
                       for v in part.values()):
                raise InvalidRecordError(f"trace {key!r} is not lists of calls by entry")
        if not all(isinstance(v, str) for v in parts[2].values()):
            raise InvalidRecordError("trace 'errors' is not messages by entry")
        return cls(*parts)

    def to_json(self) -> JsonObject:
        return {"weights": dict(self.weights), "nested": dict(self.nested),
                "errors": dict(self.errors)}


@dataclass(frozen=True)
class SnapshotEntry:
    """The tree of one commit and what its code asks for."""

    commit: str
    tree: str
    commit_time: int
    files: Tuple[FileEntry, ...]
    weights: Tuple[str, ...] = ()  # URLs this snapshot's code downloads
    entrypoints: Tuple[str, ...] = ()  # hubconf's top-level functions, found statically
    coverage: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)  # entry -> URLs
    excluded: Tuple[str, ...] = ()
    unresolved: Tuple[str, ...] = ()
    nested: Tuple[str, ...] = ()
    trace: TraceRecord | None = None
    objects: Pin | None = None  # format 2: the git objects member (mirror.proof)

    @classmethod
    def from_json(cls, obj: Any) -> SnapshotEntry:
        commit = need(obj, "commit", str)
        if not is_hex(commit, (40, 64)):
            raise InvalidRecordError(f"snapshot commit {commit!r} is not a full id")
        commit_time = need(obj, "commit_time", int)
        files = _list_of(obj, "files", FileEntry.from_json)
        _check_tree(commit, files)
        coverage = _optional(obj, "coverage", dict, {})
        if not all(isinstance(v, list) and all(isinstance(u, str) for u in v)
                   for v in coverage.values()):
            raise InvalidRecordError("'coverage' is not lists of URLs by entrypoint")
        trace, objects = obj.get("trace"), obj.get("objects")
        return cls(commit, _optional(obj, "tree", str, ""), commit_time, files,
                   _strings(obj, "weights"), _strings(obj, "entrypoints"),
                   {k: tuple(v) for k, v in coverage.items()}, _strings(obj, "excluded"),
                   _strings(obj, "unresolved"), _strings(obj, "nested"),
                   TraceRecord.from_json(trace) if trace is not None else None,
                   Pin.from_json(objects, f"git objects of {short(commit)}")
                   if objects is not None else None)

    def to_json(self) -> JsonObject:
        out = {"commit": self.commit, "tree": self.tree, "commit_time": self.commit_time,
               "files": [f.to_json() for f in self.files], "weights": list(self.weights),
               "entrypoints": list(self.entrypoints),
               "coverage": {k: list(v) for k, v in self.coverage.items()},
               "excluded": list(self.excluded), "unresolved": list(self.unresolved),
               "nested": list(self.nested)}
        if self.trace is not None:
            out["trace"] = self.trace.to_json()
        if self.objects is not None:
            out["objects"] = self.objects.to_json()
        return out

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _check_tree(commit: str, files: Tuple[FileEntry, ...]) -> None:
    """Paths each once, none below a file or a symlink."""
    kinds: Dict[str, int] = {}
    for f in files:
        if f.path in kinds:
            raise InvalidRecordError(f"file {f.path!r} is listed twice in snapshot "
                                     f"{short(commit)}")
        kinds[f.path] = f.mode
    for path in kinds:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in kinds:
                # Writing below a symlink could land anywhere; below a file is impossible.
                raise InvalidRecordError(f"file {path!r} is below {parent!r}, which is not a "
                                         f"directory")


def _plain_name(value: str, key: str) -> str:
    if not safe_path(value) or "/" in value:
        raise InvalidRecordError(f"repo {key} {value!r} is not a plain name")
    return value


@dataclass(frozen=True)
class RepoId:
    """Who a repo is: the git host, owner and name as packed, and its URL."""

    host: str
    owner: str
    name: str
    url: str

    @classmethod
    def from_json(cls, obj: Any) -> RepoId:
        url = need(obj, "url", str)
        host, owner, name = (_plain_name(need(obj, k, str), k) for k in ("host", "owner", "name"))
        return cls(host, owner, name, url)

    def to_json(self) -> JsonObject:
        return {"host": self.host, "owner": self.owner, "name": self.name, "url": self.url}

    @classmethod
    def from_record(cls, obj: Any) -> RepoId:
        """A store's ``repo.json``: the identity, with the record's schema version."""
        _schema(obj)
        return cls.from_json(obj)

    def to_record(self) -> JsonObject:
        return dict(self.to_json(), schema=RECORD_SCHEMA)

    @property
    def label(self) -> str:
        """``owner/name``, as messages show it."""
        return f"{self.owner}/{self.name}"


@dataclass(frozen=True)
class RepoEntry:
    """A repo in a manifest: who it is, the refs packed and their snapshots."""

    id: RepoId
    refs: Tuple[RefEntry, ...]
    snapshots: Tuple[SnapshotEntry, ...]

    @classmethod
    def from_json(cls, obj: Any) -> RepoEntry:
        ident = RepoId.from_json(obj)
        snapshots = _list_of(obj, "snapshots", SnapshotEntry.from_json)
        refs = _list_of(obj, "refs", RefEntry.from_json)
        commits = {s.commit for s in snapshots}
        for ref in refs:
            if ref.commit not in commits:
                raise InvalidRecordError(f"ref {ref.name!r} points at {ref.commit!r}, which "
                                         f"is not a snapshot in this bundle")
        return cls(ident, refs, snapshots)

    def to_json(self) -> JsonObject:
        return dict(self.id.to_json(), refs=[r.to_json() for r in self.refs],
                    snapshots=[s.to_json() for s in self.snapshots])


@dataclass(frozen=True)
class WeightEntry:
    """A weight file: the URL the code asks for, its size and sha256, and where the
    code asks for it."""

    url: str
    size: int
    sha256: str
    locations: Tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: Any) -> WeightEntry:
        url = need(obj, "url", str)
        return cls(url, _size(obj, url), _sha256(obj, url), _strings(obj, "locations"))

    def to_json(self) -> JsonObject:
        return {"url": self.url, "size": self.size, "sha256": self.sha256,
                "locations": list(self.locations)}


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest: what every member is, and what the bundle installs."""

    repos: Tuple[RepoEntry, ...]
    weights: Tuple[WeightEntry, ...]
    tool: str = ""
    created: int = 0
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        """Parse and validate a manifest: every field, type and value that ``install``
        relies on. Raises :class:`InvalidRecordError`."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise InvalidRecordError("not a mirror bundle manifest")
        version = obj.get("format_version")
        if version not in READS or isinstance(version, bool):
            raise InvalidRecordError(
                f"format version {version!r} is not supported (this mirror reads versions "
                f"{READS[0]} to {READS[-1]}; upgrade mirror)")
        need(obj, "repos", list)
        weights = _list_of(obj, "weights", WeightEntry.from_json)
        manifest = cls(_list_of(obj, "repos", RepoEntry.from_json), weights,
                       _optional(obj, "tool", str, ""), _optional(obj, "created", int, 0),
                       version)
        for repo in manifest.repos:
            for snap in repo.snapshots:
                if (snap.objects is not None) != (version >= 2):
                    raise InvalidRecordError(
                        f"snapshot {short(snap.commit)}: format {version} "
                        f"{'needs' if version >= 2 else 'has no'} git objects")
        manifest.members()  # one name, one content
        return manifest

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            return cls.from_json(json.loads(data))
        except (ValueError, RecursionError) as e:  # InvalidRecordError is a ValueError
            raise InvalidRecordError(str(e)) from None

    def to_json(self) -> JsonObject:
        return {"format": FORMAT, "format_version": self.format_version, "tool": self.tool,
                "created": self.created, "repos": [r.to_json() for r in self.repos],
                "weights": [w.to_json() for w in self.weights]}

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def members(self) -> Dict[str, Member]:
        """Every member the manifest promises, by name (the manifest itself excluded)."""
        members: Dict[str, Member] = {}

        def add(m: Member) -> None:
            if members.setdefault(m.name, m) != m:
                raise InvalidRecordError(f"member {m.name} is listed twice with different "
                                         f"digests")

        for repo in self.repos:
            for snap in repo.snapshots:
                for f in snap.files:
                    add(Member(code_member(snap.commit, f.path), f.size, f.sha256))
                if snap.objects is not None:
                    add(Member(objects_member(snap.commit), snap.objects.size,
                               snap.objects.sha256))
        for w in self.weights:
            add(Member(weight_member(w.sha256), w.size, w.sha256))
        return members

    def links(self) -> Dict[str, str]:
        """Member name -> snapshot path of every symlink (whose content is its target)."""
        return {code_member(s.commit, f.path): f.path for r in self.repos
                for s in r.snapshots for f in s.files if f.is_link}


@dataclass(frozen=True)
class WeightFile:
    """A weight file on local disk (downloaded on the packing host, or a blob in the
    store), found by the URL the code asks for, with its verified size and sha256."""

    url: str
    path: str
    size: int
    sha256: str


# --- the store's records ------------------------------------------------------------


def _schema(obj: Any) -> int:
    schema = obj.get("schema", 0) if isinstance(obj, dict) else None
    if not isinstance(schema, int) or isinstance(schema, bool) or not \
            0 <= schema <= RECORD_SCHEMA:
        raise InvalidRecordError(f"record schema {schema!r} is not one this mirror reads "
                                 f"(0 to {RECORD_SCHEMA}; upgrade mirror)")
    return schema


@dataclass(frozen=True)
class Pin:
    """The bytes a URL stands for: a blob's sha256 and size."""

    sha256: str
    size: int

    @classmethod
    def from_json(cls, obj: Any, what: str = "weight") -> Pin:
        return cls(_sha256(obj, what), _size(obj, what))

    def to_json(self) -> JsonObject:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class SnapshotRecord:
    """``snapshots/<commit>.json``: the snapshot as packed, the bytes its code's weight
    URLs stand for, and which bundle brought it."""

    snapshot: SnapshotEntry
    weight_digests: Mapping[str, Pin]
    bundle: str | None = None  # the bundle id (sha256 of its manifest)
    bundle_file: str | None = None  # the bundle's file name, as installed
    signed_by: str | None = None  # the trusted key that signed it, if one was checked
    installed_at: int | None = None  # None in records of before it was kept

    @classmethod
    def from_json(cls, obj: Any) -> SnapshotRecord:
        _schema(obj)
        digests = _optional(obj, "weight_digests", dict, {})
        return cls(SnapshotEntry.from_json(obj),
                   {url: Pin.from_json(pin, url) for url, pin in digests.items()},
                   _optional(obj, "bundle", str, None), _optional(obj, "bundle_file", str, None),
                   _optional(obj, "signed_by", str, None),
                   _optional(obj, "installed_at", int, None))

    def to_json(self) -> JsonObject:
        return dict(self.snapshot.to_json(), schema=RECORD_SCHEMA,
                    weight_digests={u: p.to_json() for u, p in self.weight_digests.items()},
                    bundle=self.bundle, bundle_file=self.bundle_file,
                    signed_by=self.signed_by, installed_at=self.installed_at)

    @property
    def commit(self) -> str:
        return self.snapshot.commit

    @property
    def proven(self) -> bool:
        """Whether install recomputed this commit's id from its bytes (format 2)."""
        return self.snapshot.objects is not None

    def blobs(self) -> List[str]:
        """Every blob this snapshot needs: its files, its git objects, its weights."""
        objects = [self.snapshot.objects.sha256] if self.snapshot.objects else []
        return [f.sha256 for f in self.snapshot.files] + objects + \
            [p.sha256 for p in self.weight_digests.values()]


@dataclass(frozen=True)
class WeightRecord:
    """``weights/<sha256(url)>.json``: the bytes a URL stands for outside any snapshot."""

    url: str
    pin: Pin

    @classmethod
    def from_json(cls, obj: Any) -> WeightRecord:
        _schema(obj)
        url = need(obj, "url", str)
        return cls(url, Pin.from_json(obj, url))

    def to_json(self) -> JsonObject:
        return dict(self.pin.to_json(), url=self.url, schema=RECORD_SCHEMA)


@dataclass(frozen=True)
class RefLogEntry:
    """One line of a repo's ``refs.log``: which bundle moved which ref, from what."""

    ref: str
    kind: str
    old: str | None
    new: str
    bundle: str
    bundle_file: str
    time: int

    def to_json(self) -> JsonObject:
        return {"ref": self.ref, "kind": self.kind, "old": self.old, "new": self.new,
                "bundle": self.bundle, "bundle_file": self.bundle_file, "time": self.time}
