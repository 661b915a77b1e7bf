"""``mirror pack``: snapshot repos at exact commits, fetch their weights, write one bundle."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Sequence

from . import __version__, bundle
from .errors import MirrorError, UnresolvedError
from .git import Upstream
from .lock import Lock
from .refs import DEFAULT_HOST, RepoSpec, Rewrites
from .weights import DownloadCache, coverage, discover, fetch_all


@dataclass
class PackReport:
    """What ``pack`` wrote: the bundle, its digest and size, and what went into it."""

    output: str
    sha256: str = ""
    size: int = 0
    refs: List[str] = field(default_factory=list)
    files: int = 0
    weights: List[Dict[str, Any]] = field(default_factory=list)
    unresolved: List[str] = field(default_factory=list)
    excluded: List[str] = field(default_factory=list)
    coverage: Dict[str, Dict[str, List[str]]] = field(default_factory=dict)


def _now() -> int:
    # SOURCE_DATE_EPOCH (reproducible-builds.org) makes repeated packs byte-identical.
    return int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())


def pack(specs: Sequence[str], output: str, *, git_host: str | None = None,
         protocol: str = "https", extra_weights: Sequence[str] = (),
         rewrites: Sequence[str] = (), exclude: Sequence[str] = (),
         allow_unresolved: bool = False, allow_unreachable: bool = False,
         lock: str | None = None, jobs: int = 4, cache_dir: str | None = None,
         refresh: bool = False,
         progress: bool = True, log: Callable[[str], None] = lambda msg: None) -> PackReport:
    """Pack every repo spec into the bundle ``output``.

    ``rewrites`` (``FROM=TO``) change where git and weight bytes are fetched from,
    never the URLs recorded; ``exclude`` drops weights whose URL matches a glob;
    ``lock`` is a lock file to write, or to enforce if it exists. Weights are
    downloaded ``jobs`` at a time through the packing host's download cache
    (``refresh`` downloads again: with a lock, that is how to check that upstream
    still serves the pinned bytes).
    """
    pins = Lock.load(lock) if lock else None
    report = PackReport(output=output)
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):  # before any download, not after
        raise MirrorError(f"cannot write {output}: directory {out_dir} does not exist")
    rewrite = Rewrites.parse(rewrites)
    repos: Dict[tuple, Dict[str, Any]] = {}
    weight_refs: Dict[str, List[str]] = {u: [] for u in extra_weights}
    sources: Dict[str, bundle.Source] = {}
    mtimes: Dict[str, int] = {}

    for text in specs:
        spec = RepoSpec.parse(text)
        if protocol.lower() == "file":
            # --git-host is then a directory of owner/name repositories: where the bytes
            # are, not who the repo is, so the recorded identity keeps the spec's host.
            if not git_host:
                raise MirrorError("--protocol file needs --git-host DIR (a directory "
                                  "holding owner/name repositories)")
            url = spec.url("https")
            fetch_url = rewrite(f"file://{os.path.abspath(git_host)}/{spec.repo}")
        else:
            if git_host and spec.host == DEFAULT_HOST:
                spec = replace(spec, host=git_host)
            url = spec.url(protocol.lower())
            fetch_url = rewrite(url)
        with Upstream(fetch_url) as up:
            resolved = up.resolve(spec, allow_unreachable=allow_unreachable)
            if pins:
                pins.check_ref(text, resolved.commit)
            log(f"resolved {spec} -> {resolved.kind} {resolved.name} at {resolved.commit}")
            snap = up.snapshot(resolved.commit)
        found, unresolved = discover(snap.files)
        label = f"{spec.repo}@{snap.commit[:12]}"
        report.unresolved += [f"{label} {u}" for u in unresolved]
        kept = [w for w in found if not _excluded(w.url, exclude)]
        report.excluded += sorted(w.url for w in found if _excluded(w.url, exclude))
        for w in kept:
            weight_refs.setdefault(w.url, []).extend(f"{label}:{loc}" for loc in w.locations)

        key = (spec.host, spec.owner, spec.name)
        repo = repos.setdefault(key, {"host": spec.host, "owner": spec.owner,
                                      "name": spec.name, "url": url,
                                      "refs": [], "snapshots": []})
        repo["refs"].append({"name": resolved.name, "kind": resolved.kind,
                             "commit": resolved.commit, "asked": text,
                             "resolved_at": _now(), "fetched_from": fetch_url})
        report.refs.append(f"{spec.repo}:{resolved.name} -> {resolved.commit}")
        if any(s["commit"] == snap.commit for s in repo["snapshots"]):
            continue
        files = []
        for f in snap.files:
            files.append({"path": f.path, "mode": f.mode, "size": len(f.data),
                          "sha256": hashlib.sha256(f.data).hexdigest()})
            member = bundle.code_member(snap.commit, f.path)
            sources[member], mtimes[member] = f.data, snap.commit_time
        entry_weights = coverage(snap.files)
        report.coverage[label] = entry_weights
        repo["snapshots"].append({
            "commit": snap.commit, "tree": snap.tree, "commit_time": snap.commit_time,
            "files": files, "entrypoints": sorted(entry_weights), "coverage": entry_weights,
            "weights": sorted(w.url for w in kept),
            "excluded": sorted(w.url for w in found if w not in kept),
            "unresolved": [str(u) for u in unresolved]})
        report.files += len(files)

    if report.unresolved and not allow_unresolved:
        raise UnresolvedError(report.unresolved)
    for u in report.unresolved:
        log(f"warning: packed without the file that {u} downloads")

    urls = sorted(weight_refs)
    log(f"fetching {len(urls)} weights ({jobs} at a time)")
    got = fetch_all(urls, DownloadCache(cache_dir, refresh), rewrite, jobs=jobs,
                    progress=progress,
                    expect=pins.weights if pins else None)
    weights = []
    for url in urls:
        if pins:
            pins.check_weight(url, got[url].sha256)
        sources[bundle.weight_member(got[url].sha256)] = got[url].path
        weights.append({"url": url, "size": got[url].size, "sha256": got[url].sha256,
                        "locations": sorted(set(weight_refs[url]))})
    manifest = {
        "format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION,
        "tool": f"mirror {__version__}", "created": _now(),
        "repos": [repos[k] for k in sorted(repos)], "weights": weights,
    }
    try:
        report.sha256 = bundle.write(output, manifest, sources, mtimes)
    except ValueError as e:  # e.g. a file name the bundle format cannot carry safely
        raise MirrorError(f"cannot pack into {output}: {e}") from None
    report.size = os.path.getsize(output)
    report.weights = [{"url": w["url"], "size": w["size"], "sha256": w["sha256"]}
                      for w in weights]
    if pins and not pins.exists:
        pins.write({r["asked"]: r["commit"] for repo in repos.values() for r in repo["refs"]},
                   {w["url"]: w["sha256"] for w in weights})
        log(f"wrote lock {pins.path}")
    return report


def _excluded(url: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(url, p) for p in patterns)
