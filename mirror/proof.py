"""A commit id is a proof: git's object ids recomputed from a snapshot's bytes.

Format 2 bundles carry, for each snapshot, one member (``git/<commit>``) of git
objects, each as git hashes it (``<type> <size>\\0<content>``): the commit, every
tree of it (original modes and submodule entries kept), annotated tags naming it,
and the commit objects of its first-parent history as far as pack fetched them.
Reading them into a scratch object database makes pygit2 (libgit2) compute
every id from the bytes; nothing the manifest claims about ids is believed.

A snapshot is proven when its commit object hashes to its id, names its tree,
and that tree, walked, holds exactly the snapshot's files with their modes and
git blob ids (recomputed from the verified files with ``pygit2.hashfile``).
Git's sha256 object format is not supported yet: such repos are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Mapping, Tuple

from .errors import InvalidRecordError
from .ids import is_hex, short
from .model import MODE_GITLINK, FileEntry, Manifest, RefEntry, SnapshotEntry

TYPES = ("commit", "tree", "blob", "tag")
MODE_TREE = 0o040000
MAX_HEADER = 32  # "commit 18446744073709551615\0" fits


class ProofError(InvalidRecordError):
    """A snapshot whose bytes do not hash to the ids it claims."""


def encode(objects: Iterator[Tuple[str, bytes]]) -> bytes:
    """The objects member: each object as git hashes it, one after another."""
    return b"".join(f"{kind} {len(data)}\0".encode() + data for kind, data in objects)


def decode(data: bytes) -> Iterator[Tuple[str, bytes]]:
    """The ``(type, content)`` of each object in an objects member; raises ProofError
    on anything that is not a whole, well-formed sequence."""
    at = 0
    while at < len(data):
        end = data.find(b"\0", at, at + MAX_HEADER)
        kind, _, size = data[at:end].decode("ascii", "replace").partition(" ") \
            if end > 0 else ("", "", "")
        if kind not in TYPES or not size.isdigit() or end + 1 + int(size) > len(data):
            raise ProofError(f"git objects: a malformed object header at byte {at}")
        at = end + 1 + int(size)
        yield kind, data[end + 1:at]


def tree_entries(data: bytes) -> Iterator[Tuple[int, str, str]]:
    """``(mode, name, id)`` of each entry of a raw tree object, modes as written (libgit2
    reports an old git's ``100664`` as ``100644``; the tree's id is of what is
    written). Raises ProofError on a malformed tree."""
    at = 0
    while at < len(data):
        space, end = data.find(b" ", at), data.find(b"\0", at)
        if space < 0 or end < space or end + 21 > len(data):
            raise ProofError(f"git objects: a malformed tree entry at byte {at}")
        mode = data[at:space]
        if not mode.isdigit():
            raise ProofError(f"git objects: a malformed tree mode at byte {at}")
        yield (int(mode, 8), data[space + 1:end].decode("utf-8", "surrogateescape"),
               data[end + 1:end + 21].hex())
        at = end + 21


@dataclass(frozen=True)
class Proof:
    """What a snapshot's objects proved: its commit, and the parents of every commit
    object that hashed to its id (its first-parent history, as far as carried)."""

    commit: str
    parents: Mapping[str, Tuple[str, ...]]

    def has_ancestor(self, ancestor: str) -> bool:
        """Whether ``ancestor`` is this commit or on its carried first-parent chain."""
        at, seen = self.commit, set()
        while at and at not in seen:
            if at == ancestor:
                return True
            seen.add(at)
            at = (self.parents.get(at) or ("",))[0]
        return False


class ObjectDatabase:
    """A scratch bare repository whose object database computes ids (pygit2 1.18
    exposes no in-memory one)."""

    def __init__(self, path: str):
        import pygit2  # here: only proving needs it, and it is a slow import

        self.pygit2 = pygit2
        self.repo = pygit2.init_repository(path, bare=True)
        self.kinds = {"commit": pygit2.enums.ObjectType.COMMIT,
                      "tree": pygit2.enums.ObjectType.TREE,
                      "blob": pygit2.enums.ObjectType.BLOB,
                      "tag": pygit2.enums.ObjectType.TAG}

    def add(self, data: bytes) -> Dict[str, str]:
        """Write every object of an objects member; returns id -> type, the ids as
        libgit2 computed them."""
        out = {}
        for kind, content in decode(data):
            out[str(self.repo.odb.write(self.kinds[kind], content))] = kind
        return out

    def prove(self, snap: SnapshotEntry, objects: bytes,
              blob_path: Callable[[FileEntry], str]) -> Proof:
        """Prove ``snap`` from its objects member and its files (``blob_path`` gives the
        verified bytes of each); raises ProofError naming what does not match."""
        if not is_hex(snap.commit, (40,)):
            raise ProofError(f"commit {short(snap.commit)} is not a sha1 id; git's sha256 "
                             f"object format is not supported yet")
        written = self.add(objects)
        if written.get(snap.commit) != "commit":
            raise ProofError(f"commit {short(snap.commit)} does not match its content: no "
                             f"object in the bundle hashes to it")
        commit = self.repo[snap.commit]
        if str(commit.tree_id) != snap.tree:
            raise ProofError(f"commit {short(snap.commit)} names tree "
                             f"{short(str(commit.tree_id))}, not {short(snap.tree)}")
        self._check_tree(snap, commit.tree_id, blob_path)
        parents = {oid: tuple(str(p) for p in self.repo[oid].parent_ids)
                   for oid, kind in written.items() if kind == "commit"}
        return Proof(snap.commit, parents)

    def _check_tree(self, snap: SnapshotEntry, tree_id: object,
                    blob_path: Callable[[FileEntry], str]) -> None:
        files = {f.path: f for f in snap.files}
        seen = set()
        for path, mode, oid in self._walk(snap, tree_id, ""):
            if mode == MODE_GITLINK:
                continue  # a submodule: only its commit id is in this repo
            f = files.get(path)
            if f is None:
                raise ProofError(f"commit {short(snap.commit)} does not match its content: "
                                 f"its tree has {path!r}, the snapshot does not")
            if f.mode != mode or str(self.pygit2.hashfile(blob_path(f))) != oid:
                raise ProofError(f"commit {short(snap.commit)} does not match its content: "
                                 f"{path!r} is not the file its tree names")
            seen.add(path)
        extra = sorted(set(files) - seen)
        if extra:
            raise ProofError(f"commit {short(snap.commit)} does not match its content: "
                             f"{extra[0]!r} is not in its tree")

    def _walk(self, snap: SnapshotEntry, tree_id: object,
              prefix: str) -> Iterator[Tuple[str, int, str]]:
        try:
            kind, data = self.repo.odb.read(str(tree_id))
        except (KeyError, ValueError):
            raise ProofError(f"commit {short(snap.commit)}: tree {short(str(tree_id))} is "
                             f"missing from the bundle") from None
        if kind != self.kinds["tree"]:
            raise ProofError(f"commit {short(snap.commit)}: {short(str(tree_id))} is not a tree")
        for mode, name, oid in tree_entries(data):
            if mode == MODE_TREE:
                yield from self._walk(snap, oid, prefix + name + "/")
            else:
                yield prefix + name, mode, oid

    def check_tag(self, ref: RefEntry) -> None:
        """An annotated tag's object must hash to its id and name the ref's commit."""
        if ref.target is None or ref.target == ref.commit:
            return
        try:
            target = self.repo[ref.target].peel(self.pygit2.Commit)
        except (KeyError, ValueError, self.pygit2.InvalidSpecError):
            raise ProofError(f"tag {ref.name!r}: object {short(ref.target)} is missing from "
                             f"the bundle or names no commit") from None
        if str(target.id) != ref.commit:
            raise ProofError(f"tag {ref.name!r} names commit {short(str(target.id))}, not "
                             f"{short(ref.commit)}")


def prove_manifest(manifest: Manifest, blob_path: Callable[[str], str],
                   work: str) -> Dict[str, Proof]:
    """Prove every snapshot of a format 2 manifest (none in format 1), with a scratch
    object database in the folder ``work``; ``blob_path(sha256)`` is where the
    verified bytes of each member are. Returns commit -> :class:`Proof`; raises
    ProofError for the first snapshot or tag whose bytes do not hash to its id."""
    proofs: Dict[str, Proof] = {}
    db: ObjectDatabase | None = None
    for repo in manifest.repos:
        for snap in repo.snapshots:
            if snap.objects is None:
                continue
            db = db or ObjectDatabase(os.path.join(work, "objects.git"))
            with open(blob_path(snap.objects.sha256), "rb") as fh:
                objects = fh.read()
            proofs[snap.commit] = db.prove(snap, objects, lambda f: blob_path(f.sha256))
        for ref in repo.refs:
            if db is not None and ref.commit in proofs:
                db.check_tag(ref)
    return proofs


def history(objects: bytes, commit: str, work: str) -> Proof:
    """The first-parent history that a stored (already proven) snapshot's objects
    carry, for deciding whether a ref would move back."""
    db = ObjectDatabase(os.path.join(work, "history.git"))
    written = db.add(objects)
    return Proof(commit, {oid: tuple(str(p) for p in db.repo[oid].parent_ids)
                          for oid, kind in written.items() if kind == "commit"})
