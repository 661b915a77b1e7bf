"""``mirror pack``: snapshot repos at exact commits, fetch their weights, write one bundle."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Sequence

from . import __version__, bundle
from .errors import MirrorError
from .git import Upstream
from .refs import DEFAULT_HOST, RepoSpec
from .weights import Unresolved, WeightRef, discover, download, entrypoints, url_basename


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


def _now() -> int:
    # SOURCE_DATE_EPOCH (reproducible-builds.org) makes repeated packs byte-identical.
    return int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())


def pack(specs: Sequence[str], output: str, *, git_host: str | None = None,
         protocol: str = "https", extra_weights: Sequence[str] = (), progress: bool = True,
         log: Callable[[str], None] = lambda msg: None) -> PackReport:
    """Pack every repo spec into the bundle ``output``."""
    report = PackReport(output=output)
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):  # before any download, not after
        raise MirrorError(f"cannot write {output}: directory {out_dir} does not exist")
    repos: Dict[tuple, Dict[str, Any]] = {}
    weight_refs: Dict[str, List[str]] = {u: [] for u in extra_weights}
    with tempfile.TemporaryDirectory(prefix="mirror-pack-") as work:
        sources: Dict[str, bundle.Source] = {}
        for text in specs:
            spec = RepoSpec.parse(text)
            if git_host and spec.host == DEFAULT_HOST:
                spec = replace(spec, host=git_host)
            url = spec.url(protocol.lower())
            with Upstream(url) as up:
                resolved = up.resolve(spec)
                log(f"resolved {spec} -> {resolved.kind} {resolved.name} at {resolved.commit}")
                snap = up.snapshot(resolved.commit)
            found, unresolved = discover(snap.files)
            report.unresolved += [f"{spec.repo}@{snap.commit[:12]} {u}" for u in unresolved]
            _warn_unresolved(unresolved, log)
            for w in found:
                weight_refs.setdefault(w.url, []).extend(_where(spec, snap.commit, w))

            key = (spec.host, spec.owner, spec.name)
            repo = repos.setdefault(key, {"host": spec.host, "owner": spec.owner,
                                          "name": spec.name, "url": url,
                                          "refs": [], "snapshots": []})
            repo["refs"].append({"name": resolved.name, "kind": resolved.kind,
                                 "commit": resolved.commit, "asked": text,
                                 "resolved_at": _now()})
            report.refs.append(f"{spec.repo}:{resolved.name} -> {resolved.commit}")
            if all(s["commit"] != snap.commit for s in repo["snapshots"]):
                files = []
                for f in snap.files:
                    sha = hashlib.sha256(f.data).hexdigest()
                    files.append({"path": f.path, "mode": f.mode, "size": len(f.data),
                                  "sha256": sha})
                    sources[bundle.code_member(snap.commit, f.path)] = f.data
                repo["snapshots"].append({"commit": snap.commit, "tree": snap.tree,
                                          "commit_time": snap.commit_time, "files": files,
                                          "entrypoints": entrypoints(snap.files),
                                          "weights": sorted(w.url for w in found)})
                report.files += len(files)

        weights = []
        for i, (url, where) in enumerate(sorted(weight_refs.items())):
            log(f"downloading {url}")
            got = download(url, os.path.join(work, f"w{i}-{url_basename(url)}"),
                           progress=progress)
            sources[bundle.weight_member(got.sha256)] = got.path
            weights.append({"url": url, "size": got.size, "sha256": got.sha256,
                            "locations": sorted(set(where))})
        manifest = {
            "format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION,
            "tool": f"mirror {__version__}", "created": _now(),
            "repos": [repos[k] for k in sorted(repos)], "weights": weights,
        }
        try:
            report.sha256 = bundle.write(output, manifest, sources)
        except ValueError as e:  # e.g. a file name the bundle format cannot carry safely
            raise MirrorError(f"cannot pack into {output}: {e}") from None
    report.size = os.path.getsize(output)
    report.weights = [{"url": w["url"], "size": w["size"], "sha256": w["sha256"]}
                      for w in weights]
    return report


def _where(spec: RepoSpec, commit: str, w: WeightRef) -> List[str]:
    return [f"{spec.repo}@{commit[:12]}:{loc}" for loc in w.locations]


def _warn_unresolved(unresolved: List[Unresolved], log: Callable[[str], None]) -> None:
    for u in unresolved:
        log(f"warning: cannot tell statically which URL {u} downloads; "
            f"add it with --weights URL")
