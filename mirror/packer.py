"""``mirror pack``: snapshot repos at exact commits, fetch their weights, write one bundle.

The flow: each spec is resolved upstream (:mod:`mirror.git`), its snapshot's
weight URLs are found statically (:mod:`mirror.discovery`) and, when asked, by
running its entrypoints (:mod:`mirror.trace`); the weights are downloaded
(:mod:`mirror.download`), checked against the pin file (:mod:`mirror.pins`) and
for unsafe pickles, and everything is written as one bundle (:mod:`mirror.bundle`)
whose manifest is a :class:`mirror.model.Manifest`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, List, Sequence, Set, Tuple

from tqdm import tqdm

from . import __version__, bundle, confine
from .config import settings
from .delta import Baseline, make_delta
from .discovery import Entrypoint, coverage, discover
from .download import Arriving, DownloadCache, fetch_arriving, local_file, reading_in_place
from .errors import (
    LockMismatchError,
    MirrorError,
    UnresolvedError,
    UnsafePickleError,
    UsageError,
)
from .git import Snapshot, Upstream
from .hashing import sha256_bytes
from .ids import short
from .links import decode, refused
from .model import (
    FORMAT_VERSION,
    MODE_LINK,
    STREAMED_VERSION,
    FileEntry,
    JsonObject,
    Manifest,
    Pin,
    Prerequisites,
    RefEntry,
    RepoEntry,
    RepoId,
    SnapshotEntry,
    WeightEntry,
    WeightFile,
    code_member,
    objects_member,
    weight_member,
)
from .names import one_line
from .pack_options import PackOptions
from .parts import split_size
from .pins import LockChange, Pins
from .refs import DEFAULT_HOST, RepoSpec, ResolvedRef, check_host
from .rewrites import Rewrites
from .safety import unsafe_globals
from .signing import load_keys, load_private, sign
from .sizes import iec, parse_size
from .trace import IMPORT, NestedCall, Trace, TraceLimits, trace

__all__ = ["PackOptions", "PackReport", "pack"]

DEFAULT_OPTIONS = PackOptions()
Follow = Tuple[str, Tuple[str, ...]]  # a spec still to pack, and the entries it needs


@dataclass(frozen=True)
class _Local:
    """A weight in a local file, read only as it is packed."""

    url: str
    path: str


@dataclass(frozen=True)
class PackedRef:
    """A ref the bundle sets: ``kind`` ``name`` of ``repo`` (``host/owner/name``) at
    ``commit``, as ``asked`` on the command line."""

    repo: str
    kind: str
    name: str
    commit: str
    asked: str
    label: str  # the repo as messages name it: owner/name, or host/owner/name

    def __str__(self) -> str:
        return f"{self.label}:{self.name} -> {self.commit}"

    def to_json(self) -> JsonObject:
        return {"repo": self.repo, "kind": self.kind, "name": self.name,
                "commit": self.commit, "asked": self.asked}


@dataclass(frozen=True)
class EntryCoverage:
    """The weights one entrypoint of a packed snapshot loads, as its code names them
    (and, traced, as it asked for them)."""

    repo: str  # host/owner/name
    commit: str
    entrypoint: str
    urls: Tuple[str, ...]
    label: str  # the snapshot as messages name it: owner/name@commit

    def to_json(self) -> JsonObject:
        return {"repo": self.repo, "commit": self.commit, "entrypoint": self.entrypoint,
                "weights": list(self.urls)}


@dataclass(frozen=True)
class Untraced:
    """An entrypoint ``--trace`` could not run, and why, as the manifest records it."""

    repo: str  # host/owner/name
    commit: str
    entrypoint: str
    cause: str
    label: str  # the snapshot as messages name it: owner/name@commit

    def to_json(self) -> JsonObject:
        return {"repo": self.repo, "commit": self.commit, "entrypoint": self.entrypoint,
                "cause": self.cause}


@dataclass
class PackReport:
    """What ``pack`` wrote: the bundle, its id and size, and what went into it."""

    output: str
    bundle_id: str = ""  # sha256 of the manifest: what install records and list shows
    size: int = 0  # -1: written to stdout; in parts, their sizes' sum
    parts: List[str] = field(default_factory=list)  # the part files (--split-size)
    refs: List[PackedRef] = field(default_factory=list)
    files: int = 0
    weights: List[WeightEntry] = field(default_factory=list)
    unresolved: List[str] = field(default_factory=list)
    excluded: List[str] = field(default_factory=list)
    nested: List[str] = field(default_factory=list)
    coverage: List[EntryCoverage] = field(default_factory=list)
    untraced: List[Untraced] = field(default_factory=list)
    prerequisites: Prerequisites | None = None  # a delta's (--since), else None
    lock_changes: List[LockChange] = field(default_factory=list)  # --lock --update's

    def to_json(self) -> JsonObject:
        """What ``mirror pack --json`` prints (a weight without its locations)."""
        return {"output": self.output, "bundle_id": self.bundle_id, "size": self.size,
                "parts": list(self.parts),
                "refs": [r.to_json() for r in self.refs], "files": self.files,
                "weights": [{"url": w.url, "size": w.size, "sha256": w.sha256}
                            for w in self.weights],
                "unresolved": list(self.unresolved), "excluded": list(self.excluded),
                "nested": list(self.nested),
                "coverage": [c.to_json() for c in self.coverage],
                "untraced": [u.to_json() for u in self.untraced],
                "prerequisites": self.prerequisites.to_json() if self.prerequisites
                else None,
                "lock_changes": [c.to_json() for c in self.lock_changes]}


def pack(specs: Sequence[str], output: str, options: PackOptions = DEFAULT_OPTIONS, *,
         log: Callable[[str], None] = lambda m: None) -> PackReport:
    """Pack every repo spec, and the weights its code downloads, into the bundle ``output``.

    Args:
        specs: repo specs, ``[host/]owner/name[:ref][@commit]``.
        output: the bundle file to write; its directory must exist. It appears only
            when complete.
        options: how to pack (:class:`PackOptions`): ``rewrites`` (``FROM=TO``) change
            where git and weight bytes are fetched from, never the URLs recorded;
            ``exclude`` drops weights whose URL matches a glob; ``entries`` packs only
            what those entrypoints need (which implies ``trace``, running them with
            downloads recorded instead of performed); ``follow_nested`` also packs
            repos that the code loads with ``megengine.hub.load``; ``lock`` is a pin
            file to write, or to enforce if it exists (``update_lock``: to move and
            add pins in, keeping those this pack does not use, see :mod:`mirror.pins`;
            each change is logged and in the report). Weights are downloaded ``jobs``
            at a time through the packing host's download cache (``refresh``
            downloads again: with a pin file, that checks that upstream still serves
            the pinned bytes).
        log: called with each progress message and warning.

    Returns:
        A :class:`PackReport` of what the bundle holds, with its id.

    Raises:
        SpecError: a spec cannot be parsed.
        GitError: a repo cannot be reached, or a ref or commit is not there.
        UnresolvedError: some download's URL cannot be worked out (unless
            ``allow_unresolved``).
        DownloadError: a weight cannot be downloaded.
        LockMismatchError: the pin file pins other commits or bytes, or not all of them
            (never with ``update_lock``).
        UnsafePickleError: a weight would import more than numpy, tensors and
            collections (unless ``allow_unsafe_pickle``).
        MirrorError: the bundle cannot be written, among others.
    """
    split_size(options.split_size, output)  # a bad size fails before any download
    packer = _Packer(output, options, log)
    queue: List[Follow] = [(s, tuple(options.entries)) for s in specs]
    while queue:
        queue += packer.add(*queue.pop(0))
    return packer.finish()


@dataclass
class _Repo:
    """A repo as it is being packed: its refs and snapshots so far."""

    id: RepoId
    refs: List[RefEntry] = field(default_factory=list)
    snapshots: Dict[str, _Snapshot] = field(default_factory=dict)  # by commit, in order

    def entry(self) -> RepoEntry:
        return RepoEntry(self.id, tuple(self.refs),
                         tuple(s.entry() for s in self.snapshots.values()))


@dataclass
class _Snapshot:
    """A snapshot as it is being packed: a later request may need more of its weights."""

    base: SnapshotEntry
    objects: bytes  # its git objects (mirror.proof), tags of later refs added
    weights: Set[str] = field(default_factory=set)

    def entry(self) -> SnapshotEntry:
        return replace(self.base, weights=tuple(sorted(self.weights)),
                       objects=Pin(sha256_bytes(self.objects), len(self.objects)))


@dataclass(frozen=True)
class _Found:
    """What a snapshot's code asks for, for the whole snapshot or for some entries."""

    kept: Dict[str, List[str]]  # URL -> where it is asked for, exclusions left out
    follow: List[Follow]  # nested loads to pack with --follow-nested
    coverage: Dict[str, Entrypoint]  # what hubconf's entrypoints name, found statically
    excluded: List[str]
    unresolved: List[str]
    nested: List[str]  # specs the code loads
    trace: Trace | None


class _Packer:
    def __init__(self, output: str, opts: PackOptions, log: Callable[[str], None]):
        out_dir = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(out_dir):  # before any download, not after
            raise MirrorError(f"cannot write {output}: directory {out_dir} does not exist")
        self.opts, self.log = opts, log
        self.report = PackReport(output=output)
        self.rewrite = Rewrites.parse(opts.rewrites)
        if opts.update_lock and not opts.lock:
            raise UsageError("--update moves the pins of a lock file; give --lock FILE")
        self.pins = Pins.load(opts.lock) if opts.lock else None
        # Under --update the pins are what is being replaced: nothing is checked against them.
        self.enforce = self.pins if self.pins and not opts.update_lock else None
        self.baseline = None
        if opts.since:
            keys = load_keys([opts.since_key]) if opts.since_key else None
            self.baseline = Baseline.load(opts.since, keys)
        elif opts.since_key:
            raise UsageError("--since-key names the key of a --since file; give --since")
        self.repos: Dict[Tuple[str, str, str], _Repo] = {}
        self.weight_refs: Dict[str, List[str]] = {u: [] for u in opts.extra_weights}
        self.sources: Dict[str, bundle.Source] = {}
        self.mtimes: Dict[str, int] = {}
        self.seen: Set[Follow] = set()
        # commit -> entries whose weights are packed (None: the whole snapshot's)
        self.covered: Dict[str, Set[str] | None] = {}
        self.keep = contextlib.ExitStack()  # locks on the downloads the bundle is made of

    def _locate(self, spec: RepoSpec) -> Tuple[RepoSpec, str, str]:
        """(spec with its host, identity URL, URL the bytes are fetched from)."""
        opts = self.opts
        if opts.protocol.lower() == "file":
            # --git-host is then a directory of owner/name repositories: where the bytes
            # are, not who the repo is, so the recorded identity keeps the spec's host.
            if not opts.git_host:
                raise UsageError("--protocol file needs --git-host DIR (a directory "
                                  "holding owner/name repositories)")
            fetch = f"file://{os.path.abspath(opts.git_host)}/{spec.repo}"
            return spec, spec.url("https"), self.rewrite(fetch)
        if opts.git_host is not None:  # a host here, never a path (that is --protocol file)
            check_host(opts.git_host, "--git-host")
        if opts.git_host and spec.host == DEFAULT_HOST:
            spec = replace(spec, host=opts.git_host)
        url = spec.url(opts.protocol.lower())
        return spec, url, self.rewrite(url)

    def add(self, text: str, entries: Tuple[str, ...] = ()) -> List[Follow]:
        """Resolve and snapshot one spec (only what ``entries`` need, if given); return
        the (spec, entries) of nested loads still to pack."""
        if (text, entries) in self.seen:
            return []
        self.seen.add((text, entries))
        spec, url, fetch_url = self._locate(RepoSpec.parse(text))
        with Upstream(fetch_url, history=self.opts.history, progress=self.opts.progress) as up:
            resolved = up.resolve(spec, allow_unreachable=self.opts.allow_unreachable)
            if self.enforce:
                self.enforce.check_ref(text, resolved.commit)
            self.log(f"resolved {spec} -> {resolved.kind} {resolved.name} at "
                     f"{resolved.commit}")
            snap = up.snapshot(resolved.commit)
            tags = up.tag_objects((resolved.target,)) if resolved.target else b""
        # Before anything runs or is recorded (--trace writes the tree out and imports it).
        bad = refused(snap.commit, snap.files, {f.path: decode(f.data) for f in snap.files
                                                if f.mode == MODE_LINK})
        if bad is not None:
            raise MirrorError(f"cannot pack {spec.repo}: {bad.message}")
        repo = self.repos.setdefault((spec.host, spec.owner, spec.name), _Repo(
            RepoId(spec.host, spec.owner, spec.name, url)))
        self._add_ref(repo, spec, resolved, text, fetch_url)
        record = repo.snapshots.get(snap.commit)
        if record is not None and tags not in record.objects:
            record.objects += tags  # another ref, an annotated tag, names this commit
        covered = self.covered.get(snap.commit, set())
        if record is not None and (covered is None or (entries and set(entries) <= covered)):
            return []  # already packed with everything this request needs
        found = self._weights(spec, snap, entries)
        if record is None:
            record = repo.snapshots[snap.commit] = _Snapshot(self._snapshot(snap, found),
                                                                  snap.objects + tags)
        record.weights |= set(found.kept)
        self.covered[snap.commit] = covered | set(entries) if entries else None
        return found.follow if self.opts.follow_nested else []

    def _add_ref(self, repo: _Repo, spec: RepoSpec, resolved: ResolvedRef, text: str,
                 fetch_url: str) -> None:
        for ref in repo.refs:
            if (ref.kind, ref.name) == (resolved.kind, resolved.name):
                if ref.commit == resolved.commit:
                    return  # asked twice (a nested load of a ref already packed, say)
                # owner/name@commit only stands in for the default branch when nothing
                # else names it: the snapshot is still there for commit=.
                if spec.ref is None:
                    self.log(f"note: {text} is packed by commit only; {resolved.name} "
                             f"stays at {short(ref.commit)}")
                    return
                if RepoSpec.parse(ref.asked).ref is None:
                    repo.refs.remove(ref)
                    break
                raise UsageError(
                    f"{ref.asked!r} and {text!r} would both set {resolved.kind} "
                    f"{resolved.name} of {spec.repo} ({short(ref.commit)} and "
                    f"{short(resolved.commit)}); pin other refs with {spec.repo}:REF@COMMIT")
        repo.refs.append(RefEntry(resolved.name, resolved.kind, resolved.commit, asked=text,
                                  resolved_at=settings().now(), fetched_from=fetch_url,
                                  target=resolved.target if resolved.target != resolved.commit
                                  else None))  # an annotated tag's own id
        self.report.refs.append(PackedRef(spec.full, resolved.kind, resolved.name,
                                          resolved.commit, text, spec.repo))

    def _weights(self, spec: RepoSpec, snap: Snapshot, entries: Tuple[str, ...]) -> _Found:
        """What the whole snapshot, or ``entries``, download and load."""
        opts, label = self.opts, f"{spec.repo}@{short(snap.commit)}"
        entry_weights = coverage(snap.files)
        tracing = opts.trace or opts.follow_nested or bool(entries)
        traced = self._trace(snap, label, entries) if tracing else None
        if traced is not None:  # hubconf was imported: what it has is known, not read
            entry_weights = {e: w for e, w in entry_weights.items() if e in traced.entries}
        if entries:
            urls, unresolved = _entry_weights(entries, entry_weights), []
        else:
            found, missed = discover(snap.files)
            urls = {w.url: [str(loc) for loc in w.locations] for w in found}
            unresolved = [str(u) for u in missed]
        calls: List[NestedCall] = []
        if traced is not None:
            for u, where in traced.urls(entries or None).items():
                urls.setdefault(u, []).extend(where)
            for entry, nested in traced.nested.items():
                if not entries or entry in entries or entry == IMPORT:
                    calls += nested
        kept = {u: where for u, where in urls.items() if not self._excluded(u)}
        return self._note(spec, snap.commit, _Found(
            kept=kept,
            # A nested repo is packed whole, or, when entries were named, for the entry
            # called.
            follow=[(c.spec, (c.entry,) if entries else ()) for c in calls],
            coverage=entry_weights, excluded=sorted(set(urls) - set(kept)),
            unresolved=unresolved, nested=sorted({c.spec for c in calls}), trace=traced))

    def _trace(self, snap: Snapshot, label: str, entries: Tuple[str, ...]) -> Trace:
        """Trace ``entries`` of the snapshot (none named: all), each in its own process.
        Fails when a named entry cannot be traced, or, with --strict, any."""
        opts = self.opts
        limits = TraceLimits(parse_size(opts.trace_memory), opts.trace_timeout,
                             opts.trace_jobs)
        with confine.confined(limits.memory) as probe:  # which limit this host allows
            self.log(f"{label}: tracing each entrypoint in its own process, "
                     f"{limits.jobs} at a time, each at most {iec(limits.memory)} resident "
                     f"({probe.how}) and {limits.timeout:.0f} s")
        traced = trace(snap.files, label, entries or None, limits,
                       report=lambda o: self.log(f"{label}: {o.line()}"),
                       progress=opts.progress)
        failed = {e: cause for e, cause in traced.errors.items() if e != IMPORT}
        must = [e for e in (entries or (failed if opts.strict else ())) if e in failed]
        if must:
            raise MirrorError(f"{label}: " + "; ".join(
                f"tracing {e} failed: {one_line(failed[e])}" for e in must)
                + ("" if entries else " (--strict)"))
        return traced

    def _note(self, spec: RepoSpec, commit: str, found: _Found) -> _Found:
        """Add what ``found`` says about the snapshot of ``spec`` at ``commit`` to the
        report and to the weights to fetch."""
        label = f"{spec.repo}@{short(commit)}"
        self.report.excluded += found.excluded
        self.report.unresolved += [f"{label} {u}" for u in found.unresolved]
        for u, where in found.kept.items():
            self.weight_refs.setdefault(u, []).extend(f"{label}:{w}" for w in where)
        self.report.nested += [f"{label} loads {n}" for n in found.nested]
        if found.nested and not self.opts.follow_nested:
            self.log(f"warning: {label} loads {', '.join(found.nested)} through "
                     f"megengine.hub.load; pack them with --follow-nested")
        traced = found.trace.weights if found.trace else {}
        repo = spec.full
        for entry, cause in (found.trace.errors if found.trace else {}).items():
            self.report.untraced.append(Untraced(repo, commit, entry, cause, label))
        for entry, static in found.coverage.items():
            asked = [a.url for a in traced.get(entry, ()) if a.url not in static.urls]
            self.report.coverage.append(EntryCoverage(repo, commit, entry,
                                                      static.urls + tuple(asked), label))
        return found

    def _snapshot(self, snap: Snapshot, found: _Found) -> SnapshotEntry:
        files = []
        for f in snap.files:
            files.append(FileEntry(f.path, f.mode, len(f.data), sha256_bytes(f.data)))
            member = code_member(snap.commit, f.path)
            self.sources[member], self.mtimes[member] = f.data, snap.commit_time
        self.report.files += len(files)
        return SnapshotEntry(
            snap.commit, snap.tree, snap.commit_time, tuple(files),
            # traced: every callable, as megengine.hub.list names them
            entrypoints=tuple(sorted(found.trace.entries if found.trace else found.coverage)),
            coverage={e: static.urls for e, static in found.coverage.items()},
            excluded=tuple(found.excluded), unresolved=tuple(found.unresolved),
            nested=tuple(found.nested),
            trace=found.trace.record() if found.trace is not None else None)

    def _excluded(self, url: str) -> bool:
        return any(fnmatch.fnmatchcase(url, p) for p in self.opts.exclude)

    def finish(self) -> PackReport:
        """Check what was found, fetch the weights and write the bundle."""
        report, pins = self.report, self.pins
        if self.enforce and pins.exists:
            new = pins.missing(sorted({r.asked for repo in self.repos.values()
                                       for r in repo.refs}), sorted(self.weight_refs))
            if new:
                raise LockMismatchError(pins.path, f"it does not pin {', '.join(new[:3])}"
                                                   f"{' ...' if len(new) > 3 else ''}")
        if report.unresolved and not self.opts.allow_unresolved:
            raise UnresolvedError(report.unresolved)
        for u in report.unresolved:
            self.log(f"warning: packed without the file that {u} downloads")
        held = self._held()
        for w in held:
            self.log(f"not downloaded: {w.url} (the signed --since baseline holds it)")
        for repo in self.repos.values():
            for commit, snap in repo.snapshots.items():
                self.sources[objects_member(commit)] = snap.objects
        # self.keep: the download cache's files stay locked until the bundle is written
        with self.keep, self._writing(), self._streamed() as streamed:
            fetched: List[WeightEntry] = []
            with contextlib.closing(self._fetch({w.url for w in held},
                                                streamed is not None)) as arrivals:
                for arriving in arrivals:
                    if isinstance(arriving, _Local):
                        assert streamed is not None
                        fetched.append(self._read_local(arriving, streamed))
                    elif streamed is None:
                        fetched.append(self._weight(arriving.result()))
                    else:  # compressed into the bundle as its bytes arrive
                        streamed.add_arriving(arriving.growth,
                                              functools.partial(self._arrived, arriving,
                                                                fetched))
            weights = sorted(fetched + held, key=lambda w: w.url)
            manifest = Manifest(tuple(self.repos[k].entry() for k in sorted(self.repos)),
                                tuple(weights), tool=f"mirror {__version__}",
                                created=settings().now(),
                                format_version=FORMAT_VERSION if streamed is None
                                else STREAMED_VERSION)
            if self.baseline is not None:
                manifest = make_delta(manifest, self.baseline)
                report.prerequisites = manifest.prerequisites
            if streamed is not None:
                report.bundle_id, files = streamed.finish(manifest, self._signer()), \
                    [report.output]
            else:
                report.bundle_id, files = bundle.write_files(
                    report.output, manifest, self.sources, self.mtimes, sign=self._signer(),
                    split_size=split_size(self.opts.split_size, report.output),
                    progress=self.opts.progress)
        report.size = sum(os.path.getsize(f) for f in files) \
            if report.output != bundle.STREAM else -1
        report.parts = files if self.opts.split_size else []
        report.weights = weights
        if pins and (self.opts.update_lock or not pins.exists):
            self._pin({r.asked: r.commit for repo in self.repos.values() for r in repo.refs},
                      {w.url: w.sha256 for w in weights})
        return report

    def _pin(self, refs: Dict[str, str], weights: Dict[str, str]) -> None:
        """Write the pin file: this pack's pins, and under ``update_lock`` those it does
        not use kept, each change said (only now: a pack that failed moved nothing)."""
        pins = self.pins
        assert pins is not None
        if self.opts.update_lock:
            changes = self.report.lock_changes = pins.changes(refs, weights)
            for line in [c.line() for c in changes] or ["lock: unchanged"]:
                self.log(line)
            kept = pins.unused(refs, weights)
            if kept:
                self.log(f"lock: kept {len(kept)} pin(s) this pack does not use: "
                         f"{', '.join(kept[:3])}{' ...' if len(kept) > 3 else ''}")
            refs, weights = {**pins.refs, **refs}, {**pins.weights, **weights}
        if pins.write(refs, weights):
            self.log(f"wrote lock {pins.path}")

    def _held(self) -> List[WeightEntry]:
        """The weights a delta's target already holds for their URLs, when a trusted key
        signed what says so: not fetched again (unless ``refresh``), as the download
        cache would not be either. Unsigned, a baseline could pin a URL to other bytes
        the target holds, so every URL is fetched and only matching bytes are left out."""
        if self.baseline is None or not self.baseline.vouched or self.opts.refresh:
            return []
        held = []
        for url in sorted(set(self.weight_refs) & set(self.baseline.urls)):
            pin = self.baseline.urls[url]
            if self.enforce:
                self.enforce.check_weight(url, pin.sha256)
            held.append(WeightEntry(url, pin.size, pin.sha256,
                                    tuple(sorted(set(self.weight_refs[url])))))
        return held

    def _fetch(self, held: Set[str], streamed: bool) -> Iterator[Arriving | _Local]:
        """Every weight but the ``held`` URLs, downloaded or from the cache, in URL
        order, each as soon as asked for, while it and the later ones download. A
        ``streamed`` bundle reads a local file only once, as it compresses it: such a
        file comes as :class:`_Local`, unread."""
        opts = self.opts
        urls = sorted(set(self.weight_refs) - held)
        local = {u: p for u in urls if streamed and (p := local_file(self.rewrite(u)))}
        fetched = [u for u in urls if u not in local]
        self.log(f"fetching {len(fetched)} weights ({opts.jobs} at a time)" +
                 (f", reading {len(local)} local files" if local else ""))
        arrivals = fetch_arriving(fetched, DownloadCache(opts.cache_dir, opts.refresh,
                                                         self.keep),
                                  self.rewrite, jobs=opts.jobs, progress=opts.progress,
                                  expect=self.pins.weights if self.pins else None)
        with contextlib.closing(arrivals):  # closed early, it stops every download
            ahead = [next(arrivals)] if fetched else []  # the downloads start now
            for url in urls:
                yield _Local(url, local[url]) if url in local else \
                    ahead.pop() if ahead else next(arrivals)

    def _read_local(self, local: _Local, streamed: bundle.StreamedWriter) -> WeightEntry:
        """A local weight, hashed as it is compressed into ``streamed``: one read."""
        with reading_in_place(local.path) as (fh, size):
            sha256, size, unsafe = streamed.add_read(local.path, fh, size)
        return self._weight(WeightFile(local.url, local.path, size, sha256, in_place=True),
                            unsafe)

    def _arrived(self, arriving: Arriving, fetched: List[WeightEntry]
                 ) -> Tuple[str, bundle.Source, int, str]:
        """A streamed weight, whole: checked, and its member for the bundle."""
        got = arriving.result()
        fetched.append(self._weight(got))
        member = weight_member(got.sha256)
        return member, self.sources[member], got.size, got.sha256

    @contextlib.contextmanager
    def _streamed(self) -> Iterator[bundle.StreamedWriter | None]:
        """The bundle, written as the weights arrive, its manifest last (format 4):
        with ``stream``, to a file, whole, not a delta. Code and git
        objects go in now. Else None: the bundle is written when every weight is here."""
        opts, output = self.opts, self.report.output
        if output == bundle.STREAM or opts.split_size or not opts.stream or \
                self.baseline is not None:
            yield None
            return
        with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="write", leave=False,
                  disable=not opts.progress or None) as bar, \
                bundle.StreamedWriter(output, bar) as streamed:
            for name in sorted(n for n in self.sources if not n.startswith("weights/")):
                streamed.add(name, self.sources[name], len(self.sources[name]),
                             self.mtimes.get(name, 0))
            yield streamed

    def _signer(self) -> Callable[[bytes], bytes] | None:
        if not self.opts.sign:
            return None
        key = load_private(self.opts.sign)
        # (a split bundle's table of parts is signed too, for its purpose)
        return lambda data, purpose=None: sign(key, data, purpose)

    def _weight(self, got: WeightFile, unsafe: List[str] | None = None) -> WeightEntry:
        """The manifest's entry of a downloaded weight, once its pin and its pickle's
        imports (``unsafe``, if its file was scanned already) are checked."""
        if self.enforce:
            self.enforce.check_weight(got.url, got.sha256)
        unsafe = unsafe_globals(got.path) if unsafe is None else unsafe
        if unsafe and not self.opts.allow_unsafe_pickle:
            raise UnsafePickleError(f"weight {got.url}", unsafe)
        self.sources[weight_member(got.sha256)] = bundle.LocalFile(got.path, got.sha256) \
            if got.in_place else got.path
        return WeightEntry(got.url, got.size, got.sha256,
                           tuple(sorted(set(self.weight_refs[got.url]))))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Every failure to write the bundle is one :class:`MirrorError` naming it (and
        the file that failed, if another)."""
        output = self.report.output
        try:
            yield
        except ValueError as e:  # e.g. a file name the bundle format cannot carry safely
            raise MirrorError(f"cannot pack into {output}: {e}") from None
        except bundle.SourceError as e:  # e.g. a cached download removed meanwhile
            raise MirrorError(f"cannot pack into {output}: {e}") from None
        except OSError as e:  # the bundle's own file: a full disk, an unwritable folder
            where = f"{e.filename}: " if e.filename and e.filename != output else ""
            raise MirrorError(f"cannot pack into {output}: {where}"
                              f"{e.strerror or e}") from None


def _entry_weights(entries: Tuple[str, ...],
                   entry_weights: Dict[str, Entrypoint]) -> Dict[str, List[str]]:
    """URL -> where it is asked for, by the named entries' own decorators and bodies
    (what they asked for when run is added from the trace, which checked their names
    and fails the pack for one that could not run)."""
    urls: Dict[str, List[str]] = {}
    for entry in entries:
        static = entry_weights.get(entry)
        for u in static.urls if static else ():
            urls.setdefault(u, []).append(f"{static.path} (entrypoint {entry})")
    return urls
