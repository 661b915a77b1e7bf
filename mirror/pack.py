"""``mirror pack``: snapshot repos at exact commits, fetch their weights, write one bundle."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Sequence

from . import __version__, bundle
from .errors import LockMismatchError, MirrorError, UnresolvedError, UnsafePickleError
from .git import Snapshot, Upstream
from .lock import Lock
from .refs import DEFAULT_HOST, RepoSpec, Rewrites
from .safety import unsafe_globals
from .signing import load_private, sign
from .trace import IMPORT, trace
from .weights import DownloadCache, coverage, discover, fetch_all


@dataclass
class PackReport:
    """What ``pack`` wrote: the bundle, its id and size, and what went into it."""

    output: str
    bundle_id: str = ""  # sha256 of the manifest: what install records and list shows
    size: int = 0
    refs: List[str] = field(default_factory=list)
    files: int = 0
    weights: List[Dict[str, Any]] = field(default_factory=list)
    unresolved: List[str] = field(default_factory=list)
    excluded: List[str] = field(default_factory=list)
    nested: List[str] = field(default_factory=list)
    coverage: Dict[str, Dict[str, List[str]]] = field(default_factory=dict)


@dataclass
class Options:
    """How to pack; see :func:`pack`."""

    git_host: str | None = None
    protocol: str = "https"
    extra_weights: Sequence[str] = ()
    rewrites: Sequence[str] = ()
    exclude: Sequence[str] = ()
    entries: Sequence[str] = ()
    trace: bool = False
    follow_nested: bool = False
    allow_unresolved: bool = False
    allow_unreachable: bool = False
    allow_unsafe_pickle: bool = False
    lock: str | None = None
    sign: str | None = None  # a private key file: the bundle carries its signature
    jobs: int = 4
    cache_dir: str | None = None
    refresh: bool = False
    progress: bool = True


def _now() -> int:
    # SOURCE_DATE_EPOCH (reproducible-builds.org) makes repeated packs byte-identical.
    return int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())


def pack(specs: Sequence[str], output: str, *, log: Callable[[str], None] = lambda m: None,
         **options: Any) -> PackReport:
    """Pack every repo spec into the bundle ``output``.

    Options (:class:`Options`): ``rewrites`` (``FROM=TO``) change where git and weight
    bytes are fetched from, never the URLs recorded; ``exclude`` drops weights whose
    URL matches a glob; ``entries`` packs only what those entrypoints need (which
    implies ``trace``, running them with downloads recorded instead of performed);
    ``follow_nested`` also packs repos that the code loads with ``megengine.hub.load``;
    ``lock`` is a lock file to write, or to enforce if it exists. Weights are
    downloaded ``jobs`` at a time through the packing host's download cache
    (``refresh`` downloads again: with a lock, that checks that upstream still
    serves the pinned bytes).
    """
    opts = Options(**options)
    packer = _Packer(output, opts, log)
    queue = [(s, tuple(opts.entries)) for s in specs]
    while queue:
        queue += packer.add(*queue.pop(0))
    return packer.finish()


class _Packer:
    def __init__(self, output: str, opts: Options, log: Callable[[str], None]):
        out_dir = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(out_dir):  # before any download, not after
            raise MirrorError(f"cannot write {output}: directory {out_dir} does not exist")
        self.opts, self.log = opts, log
        self.report = PackReport(output=output)
        self.rewrite = Rewrites.parse(opts.rewrites)
        self.pins = Lock.load(opts.lock) if opts.lock else None
        self.repos: Dict[tuple, Dict[str, Any]] = {}
        self.weight_refs: Dict[str, List[str]] = {u: [] for u in opts.extra_weights}
        self.sources: Dict[str, bundle.Source] = {}
        self.mtimes: Dict[str, int] = {}
        self.seen: set = set()
        # commit -> entries whose weights are packed (None: the whole snapshot's)
        self.covered: Dict[str, set | None] = {}

    def _locate(self, spec: RepoSpec) -> tuple:
        """(spec with its host, identity URL, URL the bytes are fetched from)."""
        opts = self.opts
        if opts.protocol.lower() == "file":
            # --git-host is then a directory of owner/name repositories: where the bytes
            # are, not who the repo is, so the recorded identity keeps the spec's host.
            if not opts.git_host:
                raise MirrorError("--protocol file needs --git-host DIR (a directory "
                                  "holding owner/name repositories)")
            fetch = f"file://{os.path.abspath(opts.git_host)}/{spec.repo}"
            return spec, spec.url("https"), self.rewrite(fetch)
        if opts.git_host and spec.host == DEFAULT_HOST:
            spec = replace(spec, host=opts.git_host)
        url = spec.url(opts.protocol.lower())
        return spec, url, self.rewrite(url)

    def add(self, text: str, entries: tuple = ()) -> List[tuple]:
        """Resolve and snapshot one spec (only what ``entries`` need, if given); return
        the (spec, entries) of nested loads still to pack."""
        if (text, entries) in self.seen:
            return []
        self.seen.add((text, entries))
        spec, url, fetch_url = self._locate(RepoSpec.parse(text))
        with Upstream(fetch_url) as up:
            resolved = up.resolve(spec, allow_unreachable=self.opts.allow_unreachable)
            if self.pins:
                self.pins.check_ref(text, resolved.commit)
            self.log(f"resolved {spec} -> {resolved.kind} {resolved.name} at "
                     f"{resolved.commit}")
            snap = up.snapshot(resolved.commit)
        key = (spec.host, spec.owner, spec.name)
        repo = self.repos.setdefault(key, {"host": spec.host, "owner": spec.owner,
                                           "name": spec.name, "url": url,
                                           "refs": [], "snapshots": []})
        self._add_ref(repo, spec, resolved, text, fetch_url)
        record = next((r for r in repo["snapshots"] if r["commit"] == snap.commit), None)
        covered = self.covered.get(snap.commit, set())
        if record is not None and (covered is None or (entries and set(entries) <= covered)):
            return []  # already packed with everything this request needs
        urls, follow, extra = self._weights(spec, snap, entries)
        if record is None:
            record = self._record(snap, extra)
            repo["snapshots"].append(record)
        record["weights"] = sorted(set(record["weights"]) | set(urls))
        self.covered[snap.commit] = covered | set(entries) if entries else None
        return follow if self.opts.follow_nested else []

    def _add_ref(self, repo: Dict[str, Any], spec: RepoSpec, resolved: Any, text: str,
                 fetch_url: str) -> None:
        for ref in repo["refs"]:
            if (ref["kind"], ref["name"]) == (resolved.kind, resolved.name):
                if ref["commit"] == resolved.commit:
                    return  # asked twice (a nested load of a ref already packed, say)
                # owner/name@commit only stands in for the default branch when nothing
                # else names it: the snapshot is still there for commit=.
                if spec.ref is None:
                    self.log(f"note: {text} is packed by commit only; {resolved.name} "
                             f"stays at {ref['commit'][:12]}")
                    return
                if RepoSpec.parse(ref["asked"]).ref is None:
                    repo["refs"].remove(ref)
                    break
                raise MirrorError(
                    f"{ref['asked']!r} and {text!r} would both set {resolved.kind} "
                    f"{resolved.name} of {spec.repo} ({ref['commit'][:12]} and "
                    f"{resolved.commit[:12]}); pin other refs with {spec.repo}:REF@COMMIT")
        repo["refs"].append({"name": resolved.name, "kind": resolved.kind,
                             "commit": resolved.commit, "asked": text,
                             "resolved_at": _now(), "fetched_from": fetch_url})
        self.report.refs.append(f"{spec.repo}:{resolved.name} -> {resolved.commit}")

    def _weights(self, spec: RepoSpec, snap: Snapshot, entries: tuple) -> tuple:
        """(URL -> where it is asked for, nested loads to follow, what the record notes)
        for the whole snapshot, or for ``entries``."""
        opts, label = self.opts, f"{spec.repo}@{snap.commit[:12]}"
        found, unresolved = discover(snap.files)
        entry_weights = coverage(snap.files)
        urls: Dict[str, List[str]] = {}
        tracing = opts.trace or opts.follow_nested or bool(entries)
        traced = trace(snap.files, label) if tracing else None
        unresolved_text = [str(u) for u in unresolved]
        if entries:
            unknown = sorted(set(entries) - set(traced.entries))
            if unknown:
                raise MirrorError(f"{label}: no entrypoint {', '.join(unknown)} in "
                                  f"hubconf.py (it has: {', '.join(traced.entries)})")
            for entry in entries:
                for u in entry_weights.get(entry, []):
                    urls.setdefault(u, []).append(f"hubconf.py (@pretrained of {entry})")
            # Only the entries' own downloads matter, and they were run; one that failed
            # may have stopped before asking for everything it needs.
            unresolved_text = [f"tracing {e} failed: {traced.errors[e]}" for e in entries
                               if e in traced.errors]
        else:
            for w in found:
                urls.setdefault(w.url, []).extend(str(loc) for loc in w.locations)
        nested_calls: List[Dict[str, Any]] = []
        if traced is not None:
            for u, where in traced.urls(entries or None).items():
                urls.setdefault(u, []).extend(where)
            for entry, calls in traced.nested.items():
                if not entries or entry in entries or entry == IMPORT:
                    nested_calls += calls
            for entry, error in traced.errors.items():
                if entry not in entries:
                    self.log(f"warning: {label}: tracing {entry} failed: {error}")

        kept = {u: where for u, where in urls.items() if not self._excluded(u)}
        self.report.excluded += sorted(set(urls) - set(kept))
        self.report.unresolved += [f"{label} {u}" for u in unresolved_text]
        for u, where in kept.items():
            self.weight_refs.setdefault(u, []).extend(f"{label}:{w}" for w in where)
        nested = sorted({_nested_spec(c) for c in nested_calls})
        self.report.nested += [f"{label} loads {n}" for n in nested]
        if nested and not opts.follow_nested:
            self.log(f"warning: {label} loads {', '.join(nested)} through "
                     f"megengine.hub.load; pack them with --follow-nested")
        # A nested repo is packed whole, or, when entries were named, for the entry called.
        follow = [(_nested_spec(c), (c["entry"],) if entries else ()) for c in nested_calls]
        self.report.coverage[label] = entry_weights
        extra = {"entrypoints": sorted(entry_weights), "coverage": entry_weights,
                 "excluded": sorted(set(urls) - set(kept)), "unresolved": unresolved_text,
                 "nested": nested}
        if traced is not None:
            extra["trace"] = {"weights": traced.weights, "nested": traced.nested,
                              "errors": traced.errors}
        return kept, follow, extra

    def _record(self, snap: Snapshot, extra: Dict[str, Any]) -> Dict[str, Any]:
        files = []
        for f in snap.files:
            files.append({"path": f.path, "mode": f.mode, "size": len(f.data),
                          "sha256": hashlib.sha256(f.data).hexdigest()})
            member = bundle.code_member(snap.commit, f.path)
            self.sources[member], self.mtimes[member] = f.data, snap.commit_time
        self.report.files += len(files)
        return dict(extra, commit=snap.commit, tree=snap.tree, commit_time=snap.commit_time,
                    files=files, weights=[])

    def _excluded(self, url: str) -> bool:
        return any(fnmatch.fnmatchcase(url, p) for p in self.opts.exclude)

    def finish(self) -> PackReport:
        report, opts, pins = self.report, self.opts, self.pins
        if pins and pins.exists:
            new = pins.missing(sorted({r["asked"] for repo in self.repos.values()
                                       for r in repo["refs"]}), sorted(self.weight_refs))
            if new:
                raise LockMismatchError(pins.path, f"it does not pin {', '.join(new[:3])}"
                                                   f"{' ...' if len(new) > 3 else ''}")
        if report.unresolved and not opts.allow_unresolved:
            raise UnresolvedError(report.unresolved)
        for u in report.unresolved:
            self.log(f"warning: packed without the file that {u} downloads")
        urls = sorted(self.weight_refs)
        self.log(f"fetching {len(urls)} weights ({opts.jobs} at a time)")
        got = fetch_all(urls, DownloadCache(opts.cache_dir, opts.refresh), self.rewrite,
                        jobs=opts.jobs, progress=opts.progress,
                        expect=pins.weights if pins else None)
        weights = []
        for url in urls:
            if pins:
                pins.check_weight(url, got[url].sha256)
            unsafe = unsafe_globals(got[url].path)
            if unsafe and not opts.allow_unsafe_pickle:
                raise UnsafePickleError(f"weight {url}", unsafe)
            self.sources[bundle.weight_member(got[url].sha256)] = got[url].path
            weights.append({"url": url, "size": got[url].size, "sha256": got[url].sha256,
                            "locations": sorted(set(self.weight_refs[url]))})
        manifest = {
            "format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION,
            "tool": f"mirror {__version__}", "created": _now(),
            "repos": [self.repos[k] for k in sorted(self.repos)], "weights": weights,
        }
        signer = None
        if opts.sign:
            key = load_private(opts.sign)
            signer = lambda manifest_bytes: sign(key, manifest_bytes)  # noqa: E731
        try:
            report.bundle_id = bundle.write(report.output, manifest, self.sources,
                                            self.mtimes, sign=signer)
        except ValueError as e:  # e.g. a file name the bundle format cannot carry safely
            raise MirrorError(f"cannot pack into {report.output}: {e}") from None
        except bundle.SourceError as e:  # e.g. a cached download removed meanwhile
            raise MirrorError(f"cannot pack into {report.output}: {e}") from None
        except OSError as e:  # the bundle's own file: a full disk, an unwritable folder
            where = f"{e.filename}: " if e.filename and e.filename != report.output else ""
            raise MirrorError(f"cannot pack into {report.output}: {where}"
                              f"{e.strerror or e}") from None
        report.size = os.path.getsize(report.output)
        report.weights = [{k: w[k] for k in ("url", "size", "sha256")} for w in weights]
        if pins and not pins.exists:
            pins.write({r["asked"]: r["commit"] for repo in self.repos.values()
                        for r in repo["refs"]}, {w["url"]: w["sha256"] for w in weights})
            self.log(f"wrote lock {pins.path}")
        return report


def _nested_spec(call: Dict[str, Any]) -> str:
    """A spec for a ``megengine.hub.load`` call the code makes."""
    spec = call["repo_info"]
    if call.get("git_host") and call["git_host"] != DEFAULT_HOST:
        spec = f"{call['git_host']}/{spec}"
    return spec + (f"@{call['commit']}" if call.get("commit") else "")
