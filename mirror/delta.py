"""Delta bundles: updates that carry only what changed.

A site behind an air gap already holds most of what a new bundle would carry. A
*baseline* says what: an inventory of the target store (``mirror inventory``),
an earlier bundle it installed, or a pack lock file. :func:`make_delta` turns a
whole manifest into a delta that leaves out every code file and weight whose
content the baseline holds, and names them as *prerequisites*: those contents
by sha256, and the snapshots the delta's refs move forward from by commit id
(format 3, see docs/bundle-format.md).

A delta installs only onto a store that holds its prerequisites
(:func:`check_prerequisites`, before anything is written), and then exactly as
the whole bundle would: the contents it leaves out are the store's own blobs,
verified when they were installed, and install proves every git id from them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Dict, FrozenSet, List, Mapping, Tuple

from .errors import InvalidRecordError, MirrorError, PrerequisiteError
from .model import DELTA_VERSION, Manifest, Pin, Prerequisite, Prerequisites
from .refs import DEFAULT_BRANCH, RepoSpec

RepoKey = Tuple[str, str, str]  # host, owner, name, in lower case: one store folder


def repo_key(host: str, owner: str, name: str) -> RepoKey:
    return host.lower(), owner.lower(), name.lower()


@dataclass(frozen=True)
class Baseline:
    """What a target store holds, as far as a delta may rely on it."""

    source: str  # the file it was read from, for messages
    blobs: FrozenSet[str]  # sha256 of every content it holds
    weights: FrozenSet[str]  # sha256 of the contents it holds as weights
    refs: Mapping[Tuple[RepoKey, str, str], Prerequisite]  # (repo, kind, name) -> its commit
    urls: Mapping[str, Pin]  # weight URL -> the bytes it has for it, where known
    # Signed by a key the packer trusts: its URL pins stand in for downloads. Unsigned,
    # a baseline only decides what is left out; every weight is fetched and compared.
    vouched: bool = False

    @classmethod
    def load(cls, path: str, keys: Mapping[str, object] | None = None) -> Baseline:
        """Read an inventory, a bundle or a lock file; which one is told by content.
        With ``keys`` (key id -> public key), an inventory or bundle must be signed by
        one of them, and is then ``vouched`` for."""
        from . import bundle

        try:
            with open(path, "rb") as fh:
                head = fh.read(4)
        except OSError as e:
            raise MirrorError(f"--since {path}: {e.strerror or e}") from None
        if head in bundle.OPENINGS:  # a bundle (or its first part)
            if keys is None:
                data = bundle.read_manifest_bytes(path)
                return cls.from_manifest(bundle.manifest_from_bytes(path, data), path,
                                         bundle.bundle_id(data))
            from .signing import check

            signed = _head(path)  # the signed manifest is all a baseline uses
            check(signed.signature, signed.manifest_bytes, keys, path)
            return replace(cls.from_manifest(signed.manifest, path, signed.bundle_id),
                           vouched=True)
        try:
            with open(path, "rb") as fh:
                obj = json.load(fh)
        except (OSError, ValueError) as e:
            raise MirrorError(f"--since {path}: not an inventory, a bundle or a lock file "
                              f"({e})") from None
        from .inventory import is_inventory
        from .inventory import load as load_inventory

        if is_inventory(obj):
            return replace(cls.from_inventory(load_inventory(path, keys), path),
                           vouched=keys is not None)
        if isinstance(obj, dict) and "refs" in obj and "weights" in obj:
            if keys is not None:
                raise MirrorError(f"--since {path}: a lock file carries no signature; "
                                  f"--since-key takes a signed inventory or bundle")
            return cls.from_lock(path)
        raise MirrorError(f"--since {path}: not an inventory, a bundle or a lock file")

    @classmethod
    def from_inventory(cls, inv, path: str) -> Baseline:  # noqa: ANN001 - inventory.Inventory
        refs = {}
        for repo in inv.repos:
            key = repo_key(repo.host, repo.owner, repo.name)
            brought = {s.commit: s for s in repo.snapshots}
            for ref in repo.refs:
                snap = brought.get(ref.commit)
                refs[(key, ref.kind, ref.name)] = Prerequisite(
                    repo.host, repo.owner, repo.name, ref.commit,
                    snap.bundle if snap else None, snap.bundle_file if snap else None)
        # An inventory lists each (URL, content) a snapshot pins: a URL pinned to two
        # contents says nothing certain.
        urls: Dict[str, Pin] = {}
        for w in inv.weights:
            urls[w.url] = Pin(w.sha256, w.size) if w.url not in urls else None
        return cls(path, frozenset(b.sha256 for b in inv.blobs),
                   frozenset(w.sha256 for w in inv.weights), refs,
                   {u: p for u, p in urls.items() if p is not None})

    @classmethod
    def from_manifest(cls, manifest: Manifest, path: str, ident: str) -> Baseline:
        """An earlier bundle (whose id is ``ident``): what it carried, and what it
        assumed in turn."""
        refs = {}
        for repo in manifest.repos:
            key = repo_key(repo.id.host, repo.id.owner, repo.id.name)
            for ref in repo.refs:
                refs[(key, ref.kind, ref.name)] = Prerequisite(
                    repo.id.host, repo.id.owner, repo.id.name, ref.commit, ident,
                    os.path.basename(path))
        blobs = {m.sha256 for m in manifest.members().values()} | set(manifest.assumed)
        weights = {w.sha256 for w in manifest.weights}
        return cls(path, frozenset(blobs), frozenset(weights), refs,
                   {w.url: Pin(w.sha256, w.size) for w in manifest.weights})

    @classmethod
    def from_lock(cls, path: str) -> Baseline:
        """A pack lock file: each spec's commit and each weight URL's sha256."""
        from .pins import Pins

        pins = Pins.load(path)
        refs = {}
        for asked, commit in pins.refs.items():
            spec = RepoSpec.parse(asked)
            if spec.commit is None:  # owner/name alone is the default branch
                kinds = ("branch", "tag") if spec.ref else ("branch",)  # the lock: not which
                for kind in kinds:  # any host: pack's --git-host is not in the spec
                    refs[(repo_key("", spec.owner, spec.name), kind,
                          spec.ref or DEFAULT_BRANCH)] = \
                        Prerequisite("", spec.owner, spec.name, commit)
        weights = frozenset(pins.weights.values())
        return cls(path, weights, weights, refs, {})  # no sizes: every URL is fetched


class _Stop(Exception):
    pass


def _head(path: str):  # noqa: ANN202 - bundle.Head
    """A bundle's manifest and signature, read as install reads them, and no further."""
    from . import bundle

    heads = []

    def stop(head) -> None:  # noqa: ANN001
        heads.append(head)
        raise _Stop

    try:
        bundle.read(path, None, on_head=stop)
    except _Stop:
        pass
    return heads[0]


def make_delta(manifest: Manifest, baseline: Baseline) -> Manifest:
    """``manifest`` as a delta against ``baseline``: the code files and weights whose
    content the baseline holds become prerequisites, and so do the commits that the
    baseline's refs of the same names point at. A content is left out only where every
    use of it can be met: as a weight only if the baseline holds it as one (scanned as
    one when it came), never when a symlink's target is those bytes. A manifest that
    would leave out nothing, or holds format 1 snapshots (no git ids to prove a delta
    against), is returned whole."""
    if any(s.objects is None for r in manifest.repos for s in r.snapshots):
        return manifest
    code, links = set(), set()
    for repo in manifest.repos:
        for snap in repo.snapshots:
            for f in snap.files:
                (links if f.is_link else code).add(f.sha256)
    weights = {w.sha256 for w in manifest.weights}
    assumed = {sha for sha in (code | weights) - links
               if (sha not in code or sha in baseline.blobs)
               and (sha not in weights or sha in baseline.weights)}
    commits: Dict[Tuple[RepoKey, str], Prerequisite] = {}
    for repo in manifest.repos:
        key = repo_key(repo.id.host, repo.id.owner, repo.id.name)
        for ref in repo.refs:
            found = baseline.refs.get((key, ref.kind, ref.name)) or baseline.refs.get(
                (("",) + key[1:], ref.kind, ref.name))
            if found is not None:
                commits.setdefault((key, found.commit), replace(
                    found, host=repo.id.host, owner=repo.id.owner, name=repo.id.name))
    if not assumed and not commits:
        return manifest
    return replace(manifest, format_version=DELTA_VERSION, prerequisites=Prerequisites(
        tuple(commits[k] for k in sorted(commits)), tuple(sorted(assumed))))


def missing(store, manifest: Manifest) -> List[str]:  # noqa: ANN001 - store.Store
    """What ``manifest``'s prerequisites name that ``store`` lacks, one line each."""
    if manifest.prerequisites is None:
        return []
    out = []
    for pre in manifest.prerequisites.commits:
        repo = store.layout.repo(pre.host, pre.owner, pre.name)
        if store.snapshot_record(repo, pre.commit) is None:
            out.append(f"snapshot {pre.label}")
    uses = _uses(manifest)
    weights = None
    for sha in manifest.prerequisites.blobs:
        what, size, as_weight = uses[sha]
        path = store.layout.blob(sha)
        try:
            ok = os.stat(path).st_size == size
        except OSError:
            ok = False
        if ok and as_weight:
            if weights is None:
                weights = _stored_weights(store)
            ok = sha in weights
        if not ok:
            out.append(f"{what} (sha256 {sha[:16]}, {size} bytes)")
    return out


def check_prerequisites(store, manifest: Manifest, bundle_path: str) -> None:  # noqa: ANN001
    """Raise :class:`PrerequisiteError` if ``store`` lacks what the delta assumes."""
    lacking = missing(store, manifest)
    if lacking:
        gone = not any(line.startswith("snapshot ") for line in lacking)
        raise PrerequisiteError(bundle_path, store.home, lacking,
                                [p.label for p in manifest.prerequisites.commits], gone)


def _uses(manifest: Manifest) -> Dict[str, Tuple[str, int, bool]]:
    """sha256 -> (what uses it, as messages name it; its size; whether a weight does)."""
    uses: Dict[str, Tuple[str, int, bool]] = {}
    for w in manifest.weights:
        uses.setdefault(w.sha256, (f"weight {w.url}", w.size, True))
    for repo in manifest.repos:
        for snap in repo.snapshots:
            for f in snap.files:
                uses.setdefault(f.sha256, (f"{repo.id.label}@{snap.commit[:12]}:{f.path}",
                                           f.size, False))
    return uses


def _stored_weights(store) -> FrozenSet[str]:  # noqa: ANN001
    """The contents the store holds as weights: pinned by a snapshot, or brought as a
    weight by a bundle it keeps (so scanned as a weight when installed)."""
    from .store import read_record

    found = set()
    for repo in store.layout.all_repos():
        for commit in store.commits(repo):
            try:
                record = store.snapshot_record(repo, commit)
            except MirrorError:
                continue
            if record is not None:
                found.update(p.sha256 for p in record.weight_digests.values())
    folder = store.layout.bundles
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        try:
            manifest = read_record(os.path.join(folder, name), Manifest.from_stored)
        except (MirrorError, InvalidRecordError):
            continue
        found.update(w.sha256 for w in manifest.weights)
    return frozenset(found)
