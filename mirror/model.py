"""The typed model of a bundle's manifest and of the store's records.

Every manifest and record is parsed here, once, at the edge: ``from_json``
checks every field's type, range and name (by the rules of :mod:`mirror.names`)
before anything else sees it, and raises :class:`~mirror.errors.InvalidRecordError`
naming the field and the value that is wrong. Whatever passes can be written to
the store, shown and used as a file name without an error half-way through. Past
that point the rest of mirror handles frozen dataclasses, never dicts, and
``to_json`` writes them back. ``verify`` and ``install`` parse a manifest with
the same :meth:`Manifest.from_json`, so a bundle that verifies also installs.

The JSON shapes are documented in ``docs/bundle-format.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Tuple, TypeVar

from .errors import InvalidRecordError
from .ids import is_hex, short
from .names import (
    NAME_MAX,
    REF_KINDS,
    URL_MAX,
    check_component,
    check_host,
    check_identifier,
    check_path,
    check_ref_name,
    check_refs,
    check_text,
    check_url,
    check_url_text,
    check_utf8,
    one_line,
    shown,
)
from .refs import DEFAULT_HOST

FORMAT = "mge-mirror-bundle"
FORMAT_VERSION = 2  # 2: snapshots carry git's objects, so install recomputes every id
DELTA_VERSION = 3  # 3: a delta, which leaves out what its prerequisites bring
# 4: version 2's content, its weights written as they arrived and its manifest last
# (see mirror.bundle.StreamedWriter)
STREAMED_VERSION = 4
READS = (1, 2, 3, 4)  # every earlier version stays installable
RECORD_SCHEMA = 1  # of the store's records; records of before the schema field are 0

# git's file modes, the only ones a snapshot holds (a submodule has no content here).
MODE_FILE, MODE_EXEC, MODE_LINK = 0o100644, 0o100755, 0o120000
MODE_GROUP_WRITABLE = 0o100664  # an old git's regular file: kept, as its tree's id needs it
MODE_GITLINK = 0o160000  # a submodule: a commit id in a tree, no content in this repo
MODES = (MODE_FILE, MODE_EXEC, MODE_LINK, MODE_GROUP_WRITABLE)
PATH_MAX = 4096  # no longer path can be checked out; a symlink target is read whole
# symlink(2) takes a target of at most PATH_MAX - 1 bytes (it counts the ending NUL).
LINK_TARGET_MAX = PATH_MAX - 1
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1  # what git's times and file sizes hold
# The dates mirror shows (a bundle's creation, when a ref was resolved, a snapshot
# installed, a ref moved): time.gmtime fails past the year 9999 on some platforms and
# near 2**55 seconds on all, so no later date is accepted, and none before 1970.
TIME_MAX = 253402300799  # 9999-12-31 23:59:59 UTC


def canonical_json(obj: Any) -> bytes:
    """The bytes mirror writes for a manifest or record: sorted keys, compact (json's C
    encoder does not indent, and the indenting Python one took seconds for thousands
    of files; ``mirror inspect --json`` or ``jq .`` show it indented)."""
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            + "\n").encode()


# --- checks --------------------------------------------------------------------

T = TypeVar("T")
JsonObject = Dict[str, Any]  # a JSON object at the edge: what to_json returns, from_json takes


def parse_bytes(data: bytes, parse: Callable[[Any], T]) -> T:
    """``parse`` of the JSON in ``data``; any fault is an :class:`InvalidRecordError`."""
    try:
        return parse(json.loads(data))
    except (ValueError, RecursionError) as e:  # InvalidRecordError is a ValueError
        raise InvalidRecordError(str(e)) from None


def need(entry: Any, key: str, kind: type) -> Any:
    """``entry[key]``, which must be a ``kind`` (a bool is not an int)."""
    if not isinstance(entry, dict) or not isinstance(entry.get(key), kind) or (
            kind is int and isinstance(entry.get(key), bool)):
        raise InvalidRecordError(f"{key!r} missing or not a {kind.__name__}")
    return entry[key]


def _optional(entry: Dict[str, Any], key: str, kind: type, default: Any) -> Any:
    return need(entry, key, kind) if key in entry and entry[key] is not None else default


def _strings(entry: Dict[str, Any], key: str, check: Callable[[str, str], str],
             what: str) -> Tuple[str, ...]:
    """``entry[key]``, a list of strings (missing: none), each passing ``check``, whose
    messages call one ``what``."""
    value = _optional(entry, key, list, [])
    if not all(isinstance(v, str) for v in value):
        raise InvalidRecordError(f"{key!r} is not a list of strings")
    return tuple(check(v, what) for v in value)


def _stored_text(value: str, what: str) -> str:
    return check_text(one_line(value), what)


def _ranged(value: int, what: str, low: int, high: int) -> int:
    if not low <= value <= high:
        digits = str(value)
        shown_value = digits if len(digits) <= 40 else f"{digits[:20]}... ({len(digits)} digits)"
        raise InvalidRecordError(f"{what} {shown_value} is out of range ({low} to {high})")
    return value


def _time(entry: Dict[str, Any], key: str, what: str, default: Any = 0) -> Any:
    """An optional date in seconds since 1970 (``default`` when missing or null)."""
    value = _optional(entry, key, int, None)
    return default if value is None else _ranged(value, what, 0, TIME_MAX)


def _list_of(entry: Dict[str, Any], key: str, parse: Callable[[Any], T]) -> Tuple[T, ...]:
    return tuple(parse(item) for item in need(entry, key, list))


def _size(entry: Any, what: str) -> int:
    if not isinstance(entry, dict):
        raise InvalidRecordError(f"{what}: not an object with a size and a sha256")
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRecordError(f"{what}: size is not a non-negative integer")
    return _ranged(size, f"{what}: size", 0, INT64_MAX)


def _sha256(entry: Any, what: str) -> str:
    if not isinstance(entry, dict) or not is_hex(entry.get("sha256"), (64,)):
        raise InvalidRecordError(f"{what}: sha256 is not 64 lowercase hex digits")
    return entry["sha256"]


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
        path = check_path(need(obj, "path", str), "file path")
        mode = need(obj, "mode", int)
        if mode not in MODES:
            raise InvalidRecordError(f"file {path!r} has an unsupported mode")
        size, sha256 = _size(obj, path), _sha256(obj, path)
        if mode == MODE_LINK and size > LINK_TARGET_MAX:
            raise InvalidRecordError(f"symlink {shown(path)} has a {size} byte target, over "
                                     f"the {LINK_TARGET_MAX} bytes a symlink can hold")
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
        if kind not in REF_KINDS:
            raise InvalidRecordError(f"ref {shown(name)} is of kind {shown(kind)}, neither "
                                     f"'branch' nor 'tag'")
        check_ref_name(name, kind)
        label = f"{kind} {shown(name)}"
        commit = need(obj, "commit", str)
        if not is_hex(commit, (40, 64)):
            raise InvalidRecordError(f"{label} points at {shown(commit)}, not a full commit id")
        target = _optional(obj, "target", str, None)
        if target is not None and not is_hex(target, (40,)):
            raise InvalidRecordError(f"ref {name!r} targets {target!r}, not an object id")
        fetched_from = _optional(obj, "fetched_from", str, None)
        return cls(name, kind, commit,
                   check_text(_optional(obj, "asked", str, ""), f"{label} 'asked'"),
                   _time(obj, "resolved_at", f"{label} 'resolved_at'"),
                   None if fetched_from is None else
                   check_text(fetched_from, f"{label} 'fetched_from'", URL_MAX), target)

    def to_json(self) -> JsonObject:
        out = {"name": self.name, "kind": self.kind, "commit": self.commit,
               "asked": self.asked, "resolved_at": self.resolved_at}
        if self.fetched_from is not None:
            out["fetched_from"] = self.fetched_from
        if self.target is not None:
            out["target"] = self.target
        return out


def _check_utf8(obj: Any, what: str) -> None:
    """Every string in JSON ``obj``, keys included, has a UTF-8 form (no lone surrogate),
    so the record that keeps it can be written. Iterative: the JSON may be deep."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            check_utf8(item, what)  # a traced error may span lines: only UTF-8 is asked
        elif isinstance(item, dict):
            stack += list(item.keys()) + list(item.values())
        elif isinstance(item, list):
            stack += item


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
        _check_utf8(parts, "trace")
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
    def from_json(cls, obj: Any, stored: bool = False) -> SnapshotEntry:
        """``stored``: a record the store already holds, written by this or an earlier
        mirror (whose pack kept a traceback's lines in ``unresolved``): its free text
        is made one line, not refused, so the store stays readable."""
        commit = need(obj, "commit", str)
        if not is_hex(commit, (40, 64)):
            raise InvalidRecordError(f"snapshot commit {shown(commit)} is not a full id")
        label = f"snapshot {short(commit)}"
        tree = _optional(obj, "tree", str, "")  # "": not recorded (a handmade bundle)
        if tree and not is_hex(tree, (40, 64)):
            raise InvalidRecordError(f"{label} tree {shown(tree)} is not a full id")
        # git keeps a signed 64-bit time; a commit may predate 1970 (imported histories).
        commit_time = _ranged(need(obj, "commit_time", int), f"{label} commit_time",
                              INT64_MIN, INT64_MAX)
        files = _list_of(obj, "files", FileEntry.from_json)
        _check_tree(commit, files)
        # Pack downloads every URL in "weights": they must be URLs it can download.
        weights = _strings(obj, "weights", check_url, f"{label} weight URL")
        entrypoints = _strings(obj, "entrypoints", check_identifier, f"{label} entrypoint")
        trace, objects = obj.get("trace"), obj.get("objects")
        text = _stored_text if stored else check_text
        return cls(commit, tree, commit_time, files, weights, entrypoints,
                   _coverage(obj, label, entrypoints),
                   # What pack could not fetch, or resolve, or was told to leave out:
                   # shown by inspect, never downloaded, so only plain text is asked.
                   _strings(obj, "excluded", text, f"{label} excluded URL"),
                   _strings(obj, "unresolved", text, f"{label} unresolved download"),
                   _strings(obj, "nested", text, f"{label} nested spec"),
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


def _coverage(obj: Dict[str, Any], label: str,
              entrypoints: Tuple[str, ...]) -> Dict[str, Tuple[str, ...]]:
    """Entrypoint -> the URLs its ``@pretrained`` names. Pack lists every entrypoint it
    covers (``entrypoints`` is their sorted names), so a key outside them is a forgery.
    The URLs need only be URL text: pack records those of entrypoints it was not asked
    to pack, and those it was told to exclude, without downloading them."""
    coverage = _optional(obj, "coverage", dict, {})
    out = {}
    for entry, urls in coverage.items():
        if entry not in entrypoints:
            raise InvalidRecordError(f"{label} coverage names {shown(entry)}, which is not "
                                     f"one of its entrypoints")
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise InvalidRecordError(f"{label} coverage of {entry!r} is not a list of URLs")
        out[entry] = tuple(check_url_text(u, f"{label} coverage URL") for u in urls)
    return out


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
    """An owner or a name: one folder of the store, which names it in lower case (whose
    UTF-8 may be longer: "İ" is 2 bytes, "i̇" 3)."""
    check_component(value, f"repo {key}")
    if len(value.lower().encode("utf-8")) > NAME_MAX:
        raise InvalidRecordError(f"repo {key} {shown(value)} is over {NAME_MAX} bytes in "
                                 f"lower case, as the store names its folder")
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
        url = check_text(need(obj, "url", str), "repo url", URL_MAX)  # ssh's form too
        host = check_host(need(obj, "host", str), "repo host")
        owner, name = (_plain_name(need(obj, k, str), k) for k in ("owner", "name"))
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

    @property
    def full(self) -> str:
        """``host/owner/name``: the repo as a spec names it on any host, and as JSON
        output does."""
        return f"{self.host}/{self.owner}/{self.name}"

    @property
    def spec(self) -> str:
        """``owner/name``, or ``host/owner/name`` off the default host: as a spec names
        it, and as tables and reports show it."""
        return self.label if self.host == DEFAULT_HOST else self.full


@dataclass(frozen=True)
class RepoEntry:
    """A repo in a manifest: who it is, the refs packed and their snapshots."""

    id: RepoId
    refs: Tuple[RefEntry, ...]
    snapshots: Tuple[SnapshotEntry, ...]

    @classmethod
    def from_json(cls, obj: Any, stored: bool = False) -> RepoEntry:
        ident = RepoId.from_json(obj)
        snapshots = _list_of(obj, "snapshots", lambda o: SnapshotEntry.from_json(o, stored))
        refs = _list_of(obj, "refs", RefEntry.from_json)
        commits: set = set()
        for snap in snapshots:
            if snap.commit in commits:
                raise InvalidRecordError(f"snapshot {snap.commit} of {ident.label} is listed "
                                         f"twice")
            commits.add(snap.commit)
        check_refs([(r.kind, r.name) for r in refs])  # one file each, none a folder of another
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
        url = check_url(need(obj, "url", str), "weight URL")
        return cls(url, _size(obj, url), _sha256(obj, url),
                   _strings(obj, "locations", check_text, f"weight {shown(url)} location"))

    def to_json(self) -> JsonObject:
        return {"url": self.url, "size": self.size, "sha256": self.sha256,
                "locations": list(self.locations)}


@dataclass(frozen=True)
class Prerequisite:
    """A snapshot a delta was made against: the store it installs into must hold it."""

    host: str
    owner: str
    name: str
    commit: str
    bundle: str | None = None  # the bundle that brought it, where the baseline said
    bundle_file: str | None = None

    @classmethod
    def from_json(cls, obj: Any) -> Prerequisite:
        if not isinstance(obj, dict):
            raise InvalidRecordError("prerequisite commit: not an object")
        host = check_host(need(obj, "host", str), "prerequisite host")
        owner, name = (_plain_name(need(obj, k, str), k) for k in ("owner", "name"))
        commit = need(obj, "commit", str)
        if not is_hex(commit, (40, 64)):
            raise InvalidRecordError(f"prerequisite commit {shown(commit)} is not a full id")
        bundle = _optional(obj, "bundle", str, None)
        if bundle is not None and not is_hex(bundle, (64,)):
            raise InvalidRecordError(f"prerequisite bundle {shown(bundle)} is not a bundle id")
        bundle_file = _optional(obj, "bundle_file", str, None)
        if bundle_file is not None:
            check_text(bundle_file, "prerequisite bundle_file", NAME_MAX)
        return cls(host, owner, name, commit, bundle, bundle_file)

    def to_json(self) -> JsonObject:
        return {"host": self.host, "owner": self.owner, "name": self.name,
                "commit": self.commit, "bundle": self.bundle, "bundle_file": self.bundle_file}

    @property
    def label(self) -> str:
        """``owner/name@commit``, and the bundle that brings it, as messages show it."""
        brought = f" (brought by {self.bundle_file or 'bundle ' + self.bundle[:16]})" \
            if self.bundle_file or self.bundle else ""
        return f"{self.owner}/{self.name}@{short(self.commit)}{brought}"


@dataclass(frozen=True)
class Prerequisites:
    """What a delta assumes its target store holds: snapshots (by commit id) and
    contents (by sha256) that it leaves out."""

    commits: Tuple[Prerequisite, ...] = ()
    blobs: Tuple[str, ...] = ()  # sha256 of code files and weights left out

    @classmethod
    def from_json(cls, obj: Any) -> Prerequisites:
        if not isinstance(obj, dict):
            raise InvalidRecordError("prerequisites: not an object")
        commits = _list_of(obj, "commits", Prerequisite.from_json)
        blobs = tuple(need(obj, "blobs", list))
        for sha in blobs:
            if not is_hex(sha, (64,)):
                raise InvalidRecordError(f"prerequisite blob {shown(sha)} is not 64 lowercase "
                                         f"hex digits")
        if list(blobs) != sorted(set(blobs)):
            raise InvalidRecordError("prerequisite blobs are not sorted and unique")
        keys = [(c.host.lower(), c.owner.lower(), c.name.lower(), c.commit) for c in commits]
        if len(set(keys)) != len(keys):
            raise InvalidRecordError("a prerequisite commit is listed twice")
        return cls(commits, blobs)

    def to_json(self) -> JsonObject:
        return {"commits": [c.to_json() for c in self.commits], "blobs": list(self.blobs)}


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest: what every member is, and what the bundle installs."""

    repos: Tuple[RepoEntry, ...]
    weights: Tuple[WeightEntry, ...]
    tool: str = ""
    created: int = 0
    format_version: int = FORMAT_VERSION
    prerequisites: Prerequisites | None = None  # a delta's (format 3), else None

    @classmethod
    def from_json(cls, obj: Any, stored: bool = False) -> Manifest:
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
        if ("prerequisites" in obj) != (version == DELTA_VERSION):
            raise InvalidRecordError(f"format {version} "
                                     f"{'needs' if version == DELTA_VERSION else 'has no'} "
                                     f"prerequisites")
        manifest = cls(_list_of(obj, "repos", lambda r: RepoEntry.from_json(r, stored)),
                       weights,
                       check_text(_optional(obj, "tool", str, ""), "manifest 'tool'"),
                       _time(obj, "created", "manifest 'created'"), version,
                       Prerequisites.from_json(obj["prerequisites"])
                       if version == DELTA_VERSION else None)
        _check_once(manifest)
        _check_prerequisites(manifest)
        for repo in manifest.repos:
            for snap in repo.snapshots:
                if (snap.objects is not None) != (version >= 2):
                    raise InvalidRecordError(
                        f"snapshot {short(snap.commit)}: format {version} "
                        f"{'needs' if version >= 2 else 'has no'} git objects")
        manifest.members()  # one name, one content
        return manifest

    @classmethod
    def from_stored(cls, obj: Any) -> Manifest:
        """A bundle's manifest as the store recorded it (``bundles/<id>.json``), maybe
        by an earlier mirror (see :meth:`SnapshotEntry.from_json`)."""
        return cls.from_json(obj, stored=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        return parse_bytes(data, cls.from_json)

    def to_json(self) -> JsonObject:
        out = {"format": FORMAT, "format_version": self.format_version, "tool": self.tool,
               "created": self.created, "repos": [r.to_json() for r in self.repos],
               "weights": [w.to_json() for w in self.weights]}
        if self.prerequisites is not None:
            out["prerequisites"] = self.prerequisites.to_json()
        return out

    @property
    def assumed(self) -> frozenset:
        """The sha256 of every content this bundle leaves out (a delta's prerequisites)."""
        return frozenset(self.prerequisites.blobs if self.prerequisites else ())

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def members(self) -> Dict[str, Member]:
        """Every member the manifest promises, by name (the manifest itself excluded):
        all but the code files and weights whose content is a prerequisite."""
        members: Dict[str, Member] = {}
        assumed = self.assumed
        always = set(self.links()) if assumed else set()  # symlinks, and git objects below

        def add(m: Member, carried: bool = False) -> None:
            if m.sha256 in assumed and not carried and m.name not in always:
                return
            if members.setdefault(m.name, m) != m:
                raise InvalidRecordError(f"member {m.name} is listed twice with different "
                                         f"digests")

        for repo in self.repos:
            for snap in repo.snapshots:
                for f in snap.files:
                    add(Member(code_member(snap.commit, f.path), f.size, f.sha256))
                if snap.objects is not None:
                    add(Member(objects_member(snap.commit), snap.objects.size,
                               snap.objects.sha256), carried=True)
        for w in self.weights:
            add(Member(weight_member(w.sha256), w.size, w.sha256))
        return members

    def member_order(self) -> List[str]:
        """The members in the order a bundle holds them: by name; in format 4, code and
        git objects by name, then the weights in the manifest's order, which is the
        order pack wrote them as they arrived."""
        members = self.members()
        if self.format_version != STREAMED_VERSION:
            return sorted(members)
        weights = dict.fromkeys(weight_member(w.sha256) for w in self.weights)
        return sorted(n for n in members if n not in weights) + \
            [n for n in weights if n in members]

    def links(self) -> Dict[str, str]:
        """Member name -> snapshot path of every symlink (whose content is its target)."""
        return {code_member(s.commit, f.path): f.path for r in self.repos
                for s in r.snapshots for f in s.files if f.is_link}


def _check_once(manifest: Manifest) -> None:
    """A weight URL stands for one content, and a repo is one folder of the store
    (named in lower case): neither may be listed twice."""
    urls: set = set()
    for w in manifest.weights:
        if w.url in urls:
            raise InvalidRecordError(f"weight URL {shown(w.url)} is listed twice")
        urls.add(w.url)
    folders: Dict[Tuple[str, str, str], str] = {}
    for repo in manifest.repos:
        key = (repo.id.host.lower(), repo.id.owner.lower(), repo.id.name.lower())
        if key in folders:
            raise InvalidRecordError(f"repo {repo.id.host}/{repo.id.label} is listed twice "
                                     f"(as {folders[key]} too: the store names repos in "
                                     f"lower case)")
        folders[key] = f"{repo.id.host}/{repo.id.label}"


def _check_prerequisites(manifest: Manifest) -> None:
    """A delta's prerequisite contents are each used by a code file or a weight it
    lists, always with one size; symlinks and git objects are always carried."""
    assumed = manifest.assumed
    if not assumed:
        return
    sizes: Dict[str, int] = {}
    for repo in manifest.repos:
        for snap in repo.snapshots:
            for f in snap.files:
                if f.sha256 in assumed and f.is_link:
                    raise InvalidRecordError(f"snapshot {short(snap.commit)}: symlink "
                                             f"{shown(f.path)} is a prerequisite; a delta "
                                             f"carries every symlink")
                if f.sha256 in assumed and sizes.setdefault(f.sha256, f.size) != f.size:
                    raise InvalidRecordError(f"prerequisite blob {f.sha256} is listed with "
                                             f"sizes {sizes[f.sha256]} and {f.size}")
            if snap.objects is not None and snap.objects.sha256 in assumed:
                raise InvalidRecordError(f"snapshot {short(snap.commit)}: its git objects "
                                         f"are a prerequisite; a delta carries them")
    for w in manifest.weights:
        if w.sha256 in assumed and sizes.setdefault(w.sha256, w.size) != w.size:
            raise InvalidRecordError(f"prerequisite blob {w.sha256} is listed with sizes "
                                     f"{sizes[w.sha256]} and {w.size}")
    unused = sorted(assumed - set(sizes))
    if unused:
        raise InvalidRecordError(f"prerequisite blob {unused[0]} is used by no file or "
                                 f"weight of the bundle")


@dataclass(frozen=True)
class WeightFile:
    """A weight file on local disk (downloaded on the packing host, or a blob in the
    store), found by the URL the code asks for, with its verified size and sha256.

    ``in_place``: a local file read where it is, not copied into the download cache,
    which anyone may change: its bytes are hashed again as they are packed."""

    url: str
    path: str
    size: int
    sha256: str
    in_place: bool = False


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
        snapshot = SnapshotEntry.from_json(obj, stored=True)
        label = f"snapshot {short(snapshot.commit)} weight_digests URL"
        digests = _optional(obj, "weight_digests", dict, {})
        return cls(snapshot,
                   {check_url(url, label): Pin.from_json(pin, url) for url, pin in digests.items()},
                   _optional(obj, "bundle", str, None), _optional(obj, "bundle_file", str, None),
                   _optional(obj, "signed_by", str, None),
                   _time(obj, "installed_at", f"snapshot {short(snapshot.commit)} installed_at",
                         None))

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
class RefLogEntry:
    """One line of a repo's ``refs.log``: which bundle moved which ref, from what."""

    ref: str
    kind: str
    old: str | None
    new: str
    bundle: str
    bundle_file: str
    time: int
    created: int = 0  # when the bundle was made (its manifest's "created"); 0: not recorded
    forced: bool = False  # moved by --force where the rules kept it (back, say)

    @classmethod
    def from_json(cls, obj: Any) -> RefLogEntry:
        old = _optional(obj, "old", str, None)
        time = _ranged(need(obj, "time", int), "ref log time", 0, TIME_MAX)
        return cls(need(obj, "ref", str), need(obj, "kind", str), old, need(obj, "new", str),
                   need(obj, "bundle", str), need(obj, "bundle_file", str), time,
                   _time(obj, "created", "ref log 'created'"),
                   _optional(obj, "forced", bool, False))

    def to_json(self) -> JsonObject:
        return {"ref": self.ref, "kind": self.kind, "old": self.old, "new": self.new,
                "bundle": self.bundle, "bundle_file": self.bundle_file, "time": self.time,
                "created": self.created, "forced": self.forced}


# --- MegEngine's cache, as the store seeded it ---------------------------------------

SEED_KINDS = ("repo", "weight")


@dataclass(frozen=True)
class Seed:
    """One path the store wrote into MegEngine's cache: a repo's code directory
    (``hub/<v>_<h>``, for one MegEngine version) or a weight file
    (``serialized/<sha256(url)[:6]>_<name>``), what it holds and what it stands for."""

    kind: str  # "repo" or "weight"
    path: str  # absolute
    target: str  # repo: the commit whose snapshot it holds; weight: the blob's sha256
    label: str  # repo: "owner/name:ref" or "owner/name:branch commit=..."; weight: its URL
    bundle: str | None = None  # repo: the bundle that brought the snapshot (a replaced
    # snapshot is seeded again)
    version: str | None = None  # repo: the MegEngine version whose key names the path

    @classmethod
    def from_json(cls, obj: Any) -> Seed:
        kind, path = need(obj, "kind", str), need(obj, "path", str)
        if kind not in SEED_KINDS or not path.startswith("/"):
            raise InvalidRecordError(f"seed {path!r} of kind {kind!r} is not one mirror makes")
        target = need(obj, "target", str)
        if not is_hex(target, (40, 64)):
            raise InvalidRecordError(f"seed {path!r} targets {target!r}, not an id")
        return cls(kind, path, target, check_text(need(obj, "label", str), "seed label"),
                   _optional(obj, "bundle", str, None), _optional(obj, "version", str, None))

    def to_json(self) -> JsonObject:
        return {"kind": self.kind, "path": self.path, "target": self.target,
                "label": self.label, "bundle": self.bundle, "version": self.version}


@dataclass(frozen=True)
class SeedLedger:
    """``seeds/<id>.json``: every path the store seeded into one MegEngine home."""

    megengine_home: str
    seeds: Tuple[Seed, ...] = ()

    @classmethod
    def from_json(cls, obj: Any) -> SeedLedger:
        _schema(obj)
        return cls(need(obj, "megengine_home", str), _list_of(obj, "seeds", Seed.from_json))

    def to_json(self) -> JsonObject:
        return {"schema": RECORD_SCHEMA, "megengine_home": self.megengine_home,
                "seeds": [s.to_json() for s in self.seeds]}

    @property
    def versions(self) -> Tuple[str, ...]:
        """The MegEngine versions the store has seeded code for."""
        return tuple(sorted({s.version for s in self.seeds if s.version}))
