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
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Mapping, Tuple

from .errors import InvalidRecordError
from .ids import is_hex, short
from .model import MODE_GITLINK, PATH_MAX, FileEntry, Manifest, RefEntry, SnapshotEntry

TYPES = ("commit", "tree", "blob", "tag")  # as git names them; a member holds no blobs
CARRIED = ("commit", "tree", "tag")
MODE_TREE = 0o040000
MAX_OBJECTS_BYTES = 256 << 20  # a snapshot's trees and history: a few MiB even for big repos
MAX_DEPTH = PATH_MAX // 2  # nested trees: a path of single-letter folders
MAX_GITLINKS = 10_000  # submodule entries, which no file of the snapshot matches
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
        if kind not in CARRIED or not size.isdigit() or end + 1 + int(size) > len(data):
            raise ProofError(f"git objects: a malformed object header, or an object other "
                             f"than a commit, tree or tag, at byte {at}")
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
        if not re.fullmatch(rb"[0-7]{1,7}", mode):
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
              blob_path: Callable[[FileEntry], str | None]) -> Proof:
        """Prove ``snap`` from its objects member and its files (``blob_path`` gives the
        verified bytes of each); raises ProofError naming what does not match."""
        if not is_hex(snap.commit, (40,)):
            raise ProofError(f"commit {short(snap.commit)} is not a sha1 id; git's sha256 "
                             f"object format is not supported yet")
        try:
            return self._prove(snap, objects, blob_path)
        except (self.pygit2.GitError, ValueError, KeyError) as e:
            if isinstance(e, ProofError):
                raise
            raise ProofError(f"commit {short(snap.commit)}: its git objects cannot be read "
                             f"({type(e).__name__}: {e})") from None

    def _prove(self, snap: SnapshotEntry, objects: bytes,
               blob_path: Callable[[FileEntry], str | None]) -> Proof:
        written = self.add(objects)
        if written.get(snap.commit) != "commit":
            raise ProofError(f"commit {short(snap.commit)} does not match its content: no "
                             f"object in the bundle hashes to it")
        commit = self.repo[snap.commit]
        if str(commit.tree_id) != snap.tree:
            raise ProofError(f"commit {short(snap.commit)} names tree "
                             f"{short(str(commit.tree_id))}, not {short(snap.tree)}")
        self._check_tree(snap, commit.tree_id, blob_path)
        return Proof(snap.commit, self.parents(written))

    def parents(self, written: Mapping[str, str]) -> Dict[str, Tuple[str, ...]]:
        """The parents of each commit among ``written`` (id -> type), as hashed."""
        return {oid: tuple(str(p) for p in self.repo[oid].parent_ids)
                for oid, kind in written.items() if kind == "commit"}

    def _check_tree(self, snap: SnapshotEntry, tree_id: object,
                    blob_path: Callable[[FileEntry], str | None]) -> None:
        files = {f.path: f for f in snap.files}
        seen = set()
        for path, mode, oid in self._walk(snap, tree_id, ""):
            if mode == MODE_GITLINK:
                continue  # a submodule: only its commit id is in this repo
            f = files.get(path)
            if f is None:
                raise ProofError(f"commit {short(snap.commit)} does not match its content: "
                                 f"its tree has {path!r}, the snapshot does not")
            content = blob_path(f)  # None: a delta's prerequisite, not here to hash
            if f.mode != mode or (content is not None and
                                  str(self.pygit2.hashfile(content)) != oid):
                raise ProofError(f"commit {short(snap.commit)} does not match its content: "
                                 f"{path!r} is not the file its tree names")
            seen.add(path)
        extra = sorted(set(files) - seen)
        if extra:
            raise ProofError(f"commit {short(snap.commit)} does not match its content: "
                             f"{extra[0]!r} is not in its tree")

    def _walk(self, snap: SnapshotEntry, tree_id: object,
              prefix: str) -> Iterator[Tuple[str, int, str]]:
        """Every non-tree entry below ``tree_id``, iteratively, within a budget: a bundle
        could name one subtree many times over and make a tiny tree walk forever."""
        budget = 3 * len(snap.files) + MAX_GITLINKS  # folders hold files: fewer than 2 each
        stack = [(str(tree_id), prefix, 0)]
        while stack:
            oid, at, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise ProofError(f"commit {short(snap.commit)}: trees nested over "
                                 f"{MAX_DEPTH} deep")
            entries = list(tree_entries(self._tree(snap, oid)))
            if not entries and depth:
                raise ProofError(f"commit {short(snap.commit)}: an empty subtree "
                                 f"{at.rstrip('/')[:80]!r}, which git never writes")
            for mode, name, entry_id in entries:
                budget -= 1
                if budget < 0:
                    raise ProofError(f"commit {short(snap.commit)}: its tree has more "
                                     f"entries than the snapshot has files")
                if mode == MODE_TREE:
                    stack.append((entry_id, at + name + "/", depth + 1))
                else:
                    yield at + name, mode, entry_id

    def _tree(self, snap: SnapshotEntry, oid: str) -> bytes:
        try:
            kind, data = self.repo.odb.read(oid)
        except (KeyError, ValueError):
            raise ProofError(f"commit {short(snap.commit)}: tree {short(oid)} is missing "
                             f"from the bundle") from None
        if kind != self.kinds["tree"]:
            raise ProofError(f"commit {short(snap.commit)}: {short(oid)} is not a tree")
        return data

    def check_tag(self, ref: RefEntry) -> None:
        """An annotated tag's object must hash to its id and name the ref's commit."""
        if ref.target is None or ref.target == ref.commit:
            return
        try:
            target = self.repo[ref.target].peel(self.pygit2.Commit)
        except (KeyError, ValueError, self.pygit2.InvalidSpecError, self.pygit2.GitError):
            raise ProofError(f"tag {ref.name!r}: object {short(ref.target)} is missing from "
                             f"the bundle or names no commit") from None
        if str(target.id) != ref.commit:
            raise ProofError(f"tag {ref.name!r} names commit {short(str(target.id))}, not "
                             f"{short(ref.commit)}")


def prove_manifest(manifest: Manifest, blob_path: Callable[[str], str | None],
                   work: str) -> Dict[str, Proof]:
    """Prove every snapshot of a format 2 manifest (none in format 1), with a scratch
    object database in the folder ``work``; ``blob_path(sha256)`` is where the
    verified bytes of each member are, or None for a content a delta assumes (its
    place in the tree is checked, its bytes are not: install has them). Returns
    commit -> :class:`Proof`; raises ProofError for the first snapshot or tag whose
    bytes do not hash to its id."""
    proofs: Dict[str, Proof] = {}
    for repo in manifest.repos:
        dbs: Dict[str, ObjectDatabase] = {}
        for snap in repo.snapshots:
            if snap.objects is None:
                continue
            if snap.objects.size > MAX_OBJECTS_BYTES:
                raise ProofError(f"commit {short(snap.commit)}: {snap.objects.size} bytes of "
                                 f"git objects, over the {MAX_OBJECTS_BYTES} byte limit")
            # One database per snapshot: its proof may use only its own objects.
            db = dbs[snap.commit] = ObjectDatabase(os.path.join(
                work, f"objects-{len(proofs)}-{snap.commit}.git"))
            with open(blob_path(snap.objects.sha256), "rb") as fh:
                objects = fh.read()
            proofs[snap.commit] = db.prove(snap, objects, lambda f: blob_path(f.sha256))
        for ref in repo.refs:
            if ref.commit in dbs:
                dbs[ref.commit].check_tag(ref)
    return proofs


def history(objects: bytes, commit: str, work: str) -> Proof:
    """The first-parent history that a stored (already proven) snapshot's objects
    carry, for deciding whether a ref would move back."""
    db = ObjectDatabase(os.path.join(work, "history.git"))
    return Proof(commit, db.parents(db.add(objects)))
