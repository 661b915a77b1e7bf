"""MegEngine Hub's own cache, kept true by the store, so unmodified
``megengine.hub.load`` works offline and never loads what the store does not pin.

MegEngine (megengine/hub/fetcher.py and hub.py, 1.13) looks for:

- repo code in ``MGE_HOME/hub/<v>_<h>``, ``<v>`` its version with dots as
  underscores and ``<h> = sha1(f"{owner}_{name}_{branch with / as _}" +
  (f"_{commit}" if commit else ""))[:16]``; with ``use_cache=True`` (its
  default) an existing directory is used as is, with no network;
- weights in ``MGE_HOME/serialized/<sha256(url)[:6]>_<basename of the URL>``: one
  file per URL, whatever code asks for it.

The store records every path it writes there in a ledger
(:class:`~mirror.model.SeedLedger`, one per MegEngine home) and works from it:
:func:`reconcile` computes what should be seeded from the store as it is now
(:func:`wanted`), then makes, moves, repairs and deletes seeds to match, under
the ledger's lock. Install, remove, gc and ``mirror seed`` all call it;
:func:`check` is ``mirror verify``'s part. A path the store did not make (MegEngine
fetched it itself) is never touched, only reported.

One rule gives a URL's bytes (:meth:`mirror.store.Store.url_pin`): MegEngine has one
file per URL, so a ref or ``commit=`` seed whose snapshot pins other bytes for a
URL its code asks for is not seeded: stock MegEngine then fails loudly offline
for it, instead of loading the wrong weights. ``mirror.hub.load`` serves every
snapshot its own pins.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from typing import Dict, List, Sequence, Set, Tuple

from .atomic import link_or_copy, make_temp_dir, swap, write_atomic
from .errors import AmbiguousWeightError, StoreError
from .hashing import sha256_file
from .ids import short
from .layout import MegEngineLayout, listing
from .locking import locked
from .model import JsonObject, Pin, Seed, SeedLedger, SnapshotRecord, canonical_json
from .refs import DEFAULT_BRANCH
from .store import Store, read_record
from .tree import materialize

MARK = ".mirror-seed"  # inside a seeded directory: which commit (and bundle) mirror put there


def installed_megengine_version() -> str | None:
    """The installed MegEngine's version, read without importing it (a slow import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megengine")
    except PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Wanted:
    """A seed the store as it is now calls for, and (for code) the snapshot it holds."""

    seed: Seed
    record: SnapshotRecord | None = None


@dataclass(frozen=True)
class LeftOut:
    """A seed the store calls for but leaves out: whom it is about (a repo's folder in
    the store, or a weight's URL), and why, as one line."""

    about: str
    why: str


@dataclass
class SeedReport:
    """What :func:`reconcile` did to one MegEngine home."""

    megengine_home: str
    seeded: List[str] = field(default_factory=list)  # made, moved or repaired
    kept: int = 0  # already as wanted
    removed: List[str] = field(default_factory=list)  # the store's, no longer wanted
    unseeded: List[LeftOut] = field(default_factory=list)  # those left out, and why
    foreign: List[str] = field(default_factory=list)  # paths MegEngine made, left alone
    bytes_freed: int = 0  # by removed seeds that were copies

    def lines(self) -> List[str]:
        """One line per change or refusal, as install and ``mirror seed`` print them."""
        return (self.seeded + [f"removed seed {r}" for r in self.removed]
                + [f"not seeded {u.why}" for u in self.unseeded]
                + self.foreign)

    def to_json(self) -> JsonObject:
        return {"megengine_home": self.megengine_home, "seeded": self.seeded,
                "kept": self.kept, "removed": self.removed,
                "unseeded": [u.why for u in self.unseeded],
                "foreign": self.foreign, "bytes_freed": self.bytes_freed}


def wanted(store: Store, megengine_home: str, versions: Sequence[str],
           trusted: Set[str] | None = None) -> Tuple[Dict[str, Wanted], List[LeftOut]]:
    """Every seed the store calls for in the MegEngine cache at ``megengine_home``, by
    path, and why each one it leaves out is left out.

    Code: every ref as ``owner/name:ref``, and every snapshot as ``commit=`` under
    each branch that names it and the default branch, for each of ``versions``;
    with ``trusted`` key ids, only snapshots one of them signed (stock MegEngine runs
    what it finds, unchecked). Weights: every URL a snapshot or bundle pins, with
    the bytes of :meth:`Store.url_pin`.
    """
    cache = MegEngineLayout(megengine_home)
    pins = store.url_pins()
    out: Dict[str, Wanted] = {}
    left_out: List[LeftOut] = []
    for url, pin in sorted(pins.items()):
        if isinstance(pin, AmbiguousWeightError):
            left_out.append(LeftOut(url, f"weight {url}: {pin}"))
        else:
            out[cache.weight(url)] = Wanted(Seed("weight", cache.weight(url), pin.sha256, url))
    for repo in store.layout.all_repos():
        try:
            ident = store.repo_id(repo)
        except StoreError as e:
            left_out.append(LeftOut(repo.path, str(e)))
            continue
        refs, commits = store.refs(repo), set(store.commits(repo))
        keys: Dict[Tuple[str, str, str | None], Tuple[str, str]] = {}  # key -> commit, label
        for ref, head in refs.items():
            keys[(ref, "", None)] = (head.commit, f"{ident.label}:{ref}")
        for commit in commits:
            for branch in {r for r, h in refs.items() if h.commit == commit} | {DEFAULT_BRANCH}:
                keys[(branch, commit, commit)] = (
                    commit, f"{ident.label}:{branch} commit={short(commit)}")
        for (branch, _, with_commit), (commit, label) in sorted(keys.items()):
            why, record = _why_not(store, repo, commit, trusted, pins)
            if why:
                left_out.append(LeftOut(repo.path, f"{label}: {why}"))
                continue
            for version in versions:
                path = cache.repo(version, ident.owner, ident.name, branch, with_commit)
                out[path] = Wanted(Seed("repo", path, commit, label, record.bundle, version),
                                   record)
    return out, left_out


def _why_not(store: Store, repo, commit: str, trusted: Set[str] | None,
             pins: Dict[str, Pin | AmbiguousWeightError]) -> Tuple[str, SnapshotRecord | None]:
    """Why the snapshot of ``commit`` cannot be seeded ("" if it can), and its record."""
    if not os.path.isdir(repo.snapshot(commit)):
        return "its snapshot is not installed", None
    try:
        record = store.snapshot_record(repo, commit)
    except StoreError as e:
        return str(e), None
    if record is None:
        return "its snapshot has no record", None
    if trusted is not None and record.signed_by not in trusted:
        return "its bundle was not signed by a trusted key", record
    for url, pin in sorted(record.weight_digests.items()):
        one = pins.get(url)
        if one != pin:
            held = "no one set of bytes" if not isinstance(one, Pin) else \
                f"sha256 {one.sha256[:12]}"
            return (f"its code's weight {url} is pinned to sha256 {pin.sha256[:12]}, but "
                    f"MegEngine's one file for that URL holds {held} (the bytes master "
                    f"pins); mirror.hub.load serves it"), record
    return "", record


def reconcile(store: Store, megengine_home: str, versions: Sequence[str] = (),
              trusted: Set[str] | None = None) -> SeedReport:
    """Make MegEngine's cache at ``megengine_home`` hold exactly what the store calls
    for, for ``versions`` and every version seeded there before: seed what is
    missing (a directory a stock ``use_cache=False`` deleted included), move what a
    ref moved, and delete the store's own seeds that nothing calls for any more.
    Paths MegEngine made itself are left alone and reported. Under a trust policy (the
    store's, or ``trusted`` key ids) only code a trusted key signed is seeded."""
    report = SeedReport(os.path.abspath(megengine_home))
    layout = store.layout
    os.makedirs(layout.seeds, exist_ok=True)
    with locked(layout.seeds_lock):
        ledger = read_ledger(store, megengine_home)
        versions = sorted(set(versions) | set(ledger.versions))
        want, report.unseeded = wanted(store, megengine_home, versions,
                                       trusted if trusted is not None else _trusted(store))
        if not want and not ledger.seeds:
            return report
        old = {s.path: s for s in ledger.seeds}
        # The ledger first names every path about to be written, so a crash leaves
        # no seed it does not know of (ownership is checked on disk before deleting).
        intent = replace(ledger, seeds=tuple({**old, **{p: w.seed for p, w in want.items()}}
                                             .values()))
        if intent != ledger:
            _write_ledger(store, intent)
        kept: Dict[str, Seed] = {}
        for path, seed in sorted(old.items()):
            if path not in want and _owned(store, seed):
                report.bytes_freed += _delete(seed)
                report.removed.append(f"{seed.label} ({path})")
            elif path not in want and os.path.lexists(path):
                report.foreign.append(_foreign(seed))
        for path, w in sorted(want.items()):
            seed = _adopted(store, w.seed, old.get(path))
            if seed is None:
                report.foreign.append(_foreign(w.seed))
            elif seed == w.seed and _intact(store, seed):
                report.kept += 1
                kept[path] = seed
            else:
                _put(store, w)
                report.seeded.append(f"seeded {w.seed.label} -> {_short_path(path)}")
                kept[path] = w.seed
        final = SeedLedger(report.megengine_home, tuple(kept.values()))
        if final != intent or intent != ledger:
            _write_ledger(store, final)
    return report


def reconcile_all(store: Store, trusted: Set[str] | None = None) -> List[SeedReport]:
    """:func:`reconcile` for every MegEngine home the store has seeded (after a remove
    or a gc: their seeds of what is gone go too)."""
    return [reconcile(store, ledger.megengine_home, (), trusted) for ledger in ledgers(store)]


def check(store: Store) -> List[str]:
    """``mirror verify``'s part: every seed in every ledger against the disk and the
    store as it is now. Returns the problems found."""
    problems = []
    for ledger in ledgers(store):
        want, _ = wanted(store, ledger.megengine_home, ledger.versions, _trusted(store))
        recorded = {s.path: s for s in ledger.seeds}
        for seed in ledger.seeds:
            if not os.path.lexists(seed.path):
                problems.append(f"seed {seed.label} ({seed.path}) is missing: stock "
                                f"megengine.hub will not find it offline; run 'mirror seed'")
            elif not _intact(store, seed, deep=True):
                problems.append(f"seed {seed.label} ({seed.path}) was changed; run "
                                f"'mirror seed'")
            elif seed.path not in want or want[seed.path].seed != seed:
                problems.append(f"seed {seed.label} ({seed.path}) is stale: the store now "
                                f"calls for other contents or none; run 'mirror seed'")
        for path, w in want.items():
            if path not in recorded and _adopted(store, w.seed, None) is not None:
                problems.append(f"{w.seed.label} is not seeded in {ledger.megengine_home}; "
                                f"run 'mirror seed'")
    return problems


def ledgers(store: Store) -> List[SeedLedger]:
    """Every seed ledger of the store (one per MegEngine home it seeded)."""
    out = []
    for name in listing(store.layout.seeds):
        if name.endswith(".json"):
            out.append(read_record(os.path.join(store.layout.seeds, name),
                                   SeedLedger.from_json))
    return out


def read_ledger(store: Store, megengine_home: str) -> SeedLedger:
    path = store.layout.seed_ledger(megengine_home)
    if not os.path.exists(path):
        return SeedLedger(os.path.abspath(megengine_home))
    return read_record(path, SeedLedger.from_json)


def _write_ledger(store: Store, ledger: SeedLedger) -> None:
    write_atomic(store.layout.seed_ledger(ledger.megengine_home),
                 canonical_json(ledger.to_json()))


def _trusted(store: Store) -> Set[str] | None:
    policy = store.policy
    return set(policy.keys()) if policy.required else None


# --- one seed on disk ---------------------------------------------------------------


def _owned(store: Store, seed: Seed) -> bool:
    """Whether what is at ``seed.path`` is the store's to replace or delete: a directory
    with mirror's mark, a weight file that is the blob (a hard link) or its bytes."""
    if seed.kind == "repo":
        return _read_mark(seed.path) is not None
    try:
        st = os.lstat(seed.path)
    except FileNotFoundError:
        return False
    blob = store.layout.blob(seed.target)
    if os.path.exists(blob) and os.path.samestat(st, os.stat(blob)):
        return True
    return not os.path.islink(seed.path) and sha256_file(seed.path)[0] == seed.target


def _adopted(store: Store, seed: Seed, recorded: Seed | None) -> Seed | None:
    """What is at ``seed.path`` now, as a seed of the store's (None: MegEngine made it,
    or an earlier mirror left it without a mark, and it is not the store's to touch).
    A missing path is the store's to write."""
    if not os.path.lexists(seed.path):
        return recorded or seed
    if seed.kind == "repo":
        mark = _read_mark(seed.path)
        if mark is None:
            return None
        return replace(seed, target=mark[0], bundle=mark[1])
    if recorded is not None and _owned(store, recorded):
        return recorded
    return seed if _owned(store, seed) else None


def _intact(store: Store, seed: Seed, deep: bool = False) -> bool:
    """Whether the seed on disk still holds what it was made with: for code, its mark
    (and, ``deep``, every file); for a weight, the blob's bytes."""
    if seed.kind == "weight":
        return _owned(store, seed)
    if _read_mark(seed.path) != (seed.target, seed.bundle):
        return False
    if not deep:
        return True
    repo_record = _record_of(store, seed)
    if repo_record is None:
        return False
    for f in repo_record.snapshot.files:
        full = os.path.join(seed.path, f.path)
        if f.is_link:
            if not os.path.islink(full):
                return False
            continue
        if os.path.islink(full) or not os.path.isfile(full):
            return False
        blob = store.layout.blob(f.sha256)
        same = os.path.exists(blob) and os.path.samestat(os.stat(full), os.stat(blob))
        if not same and sha256_file(full)[0] != f.sha256:  # a copy: its bytes
            return False
    return True


def _record_of(store: Store, seed: Seed) -> SnapshotRecord | None:
    for repo in store.layout.all_repos():
        try:
            record = store.snapshot_record(repo, seed.target)
        except StoreError:
            continue
        if record is not None and record.bundle == seed.bundle:
            return record
    return None


def _put(store: Store, w: Wanted) -> None:
    """Write a seed whole, in one step: a new directory swapped in for an old one (no
    gap for a reader), a weight file renamed over the old one."""
    target = w.seed.path
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if w.seed.kind == "weight":
        tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.mirror")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        link_or_copy(store.layout.blob(w.seed.target), tmp)
        os.replace(tmp, target)
        return
    building = make_temp_dir(os.path.dirname(target), ".mirror-")
    try:
        materialize(building, w.record.snapshot.files, store.layout.blob)
        write_atomic(os.path.join(building, MARK), json.dumps(
            {"commit": w.seed.target, "bundle": w.seed.bundle, "for": w.seed.label}).encode())
        if os.path.isdir(target):
            swap(building, target)  # building now holds the old seed
        else:
            os.rename(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _delete(seed: Seed) -> int:
    """Delete one of the store's seeds; the bytes freed on disk (a hard link to a blob
    frees nothing by itself: the blob goes with gc)."""
    freed = 0
    if seed.kind == "weight":
        st = os.lstat(seed.path)
        freed = st.st_blocks * 512 if st.st_nlink == 1 else 0
        os.unlink(seed.path)
        return freed
    trash = make_temp_dir(os.path.dirname(seed.path), ".mirror-gone-")
    os.rename(seed.path, os.path.join(trash, "seed"))  # gone for readers at once
    for dirpath, _, names in os.walk(trash):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            freed += st.st_blocks * 512 if st.st_nlink == 1 else 0
    shutil.rmtree(trash, ignore_errors=True)
    return freed


def _foreign(seed: Seed) -> str:
    return f"left {seed.label} alone: {seed.path} was not made by mirror"


def _short_path(path: str) -> str:
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def _read_mark(directory: str) -> Tuple[str, str | None] | None:
    """(commit, bundle id) of a directory mirror seeded; None if it did not (or the
    mark is unreadable). Marks of before the bundle was kept have None for it."""
    try:
        with open(os.path.join(directory, MARK)) as fh:
            mark = json.load(fh)
        return mark["commit"], mark.get("bundle")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
