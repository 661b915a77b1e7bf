"""Real repositories packed and installed: every commit, tree, tag and blob id in the
store equals what git says upstream, recomputed at install (issue "A commit id is a
proof", Done when). The ids are checked with ``git`` and hashlib, never with mirror."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pygit2
import pytest

import mirror.installer
from mirror import bundle
from mirror.errors import BundleError
from mirror.git import HISTORY
from mirror.installer import install
from mirror.model import MODE_GITLINK, MODE_LINK, Manifest, objects_member
from mirror.packer import PackOptions, pack
from mirror.proof import decode, encode
from mirror.store import Store
from tests.conftest import MIRROR, manifest_json, run, tree_digest, unpack

ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
           GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid",
           GIT_AUTHOR_DATE="1700000000 +0000", GIT_COMMITTER_DATE="1700000000 +0000",
           GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1")
GITLINK = "1234567890abcdef1234567890abcdef12345678"  # a submodule's commit, never fetched


def git(bare, *args, data: bytes | None = None) -> bytes:
    return subprocess.run(["git", "--git-dir", str(bare), *args], input=data, env=ENV,
                          check=True, capture_output=True).stdout


def rev(bare, name: str) -> str:
    return git(bare, "rev-parse", name).decode().strip()


def raw_tree(bare, tree: str, prefix: str = ""):
    """(path, mode, id) of every entry below ``tree``, modes as stored (git's own ls-tree
    and libgit2 both show 100664 as 100644), and the ids of its trees."""
    data, entries, trees = git(bare, "cat-file", "tree", tree), [], [tree]
    while data:
        head, _, data = data.partition(b"\0")
        mode, name = head.decode().split(" ", 1)
        oid, data = data[:20].hex(), data[20:]
        if int(mode, 8) == 0o040000:
            sub, subtrees = raw_tree(bare, oid, prefix + name + "/")
            entries += sub
            trees += subtrees
        else:
            entries.append((prefix + name, int(mode, 8), oid))
    return entries, trees


@pytest.fixture()
def proofs(monkeypatch):
    """What install's proof step returned, commit -> Proof, for every install."""
    seen, prove_manifest = {}, mirror.installer.prove_manifest

    def spy(*args, **kw):
        found = prove_manifest(*args, **kw)
        seen.update(found)
        return found

    monkeypatch.setattr(mirror.installer, "prove_manifest", spy)
    return seen


def check_store(home, bare, host: str, repo: str, proofs) -> dict:
    """Every snapshot of ``repo`` in the store is proven and its ids are upstream's;
    returns commit -> {object id (hashlib) -> type} of its stored git objects."""
    store = Store(home)
    paths = store.repo_dir(host, *repo.split("/"))
    commits = store.commits(paths)
    assert commits and sorted(commits) == sorted(c for c in proofs if c in commits)
    stored = {}
    for commit in commits:
        record = store.snapshot_record(paths, commit)
        assert record.proven and proofs[commit].commit == commit
        assert git(bare, "cat-file", "-t", commit).strip() == b"commit"
        assert record.snapshot.tree == rev(bare, commit + "^{tree}")
        entries, trees = raw_tree(bare, record.snapshot.tree)
        files = {f.path: f for f in record.snapshot.files}
        assert sorted(files) == sorted(p for p, m, _ in entries if m != MODE_GITLINK)
        root = paths.snapshot(commit)
        for path, mode, oid in entries:
            full = os.path.join(root, path)
            assert oid == rev(bare, f"{commit}:{path}")
            if mode == MODE_GITLINK:
                assert not os.path.lexists(full)  # a submodule: no content here
            elif mode == MODE_LINK:
                assert str(pygit2.hash(os.readlink(full).encode())) == oid
            else:
                assert str(pygit2.hashfile(full)) == oid
        with open(store.layout.blob(record.snapshot.objects.sha256), "rb") as fh:
            objects = {hashlib.sha1(f"{k} {len(d)}\0".encode() + d).hexdigest(): k
                       for k, d in decode(fh.read())}
        assert sorted(o for o, k in objects.items() if k == "tree") == sorted(trees)
        chain = git(bare, "rev-list", "--first-parent", f"--max-count={HISTORY}",
                    commit).decode().split()
        assert sorted(o for o, k in objects.items() if k == "commit") == sorted(chain)
        tags = git(bare, "for-each-ref", "--format=%(objectname)", "refs/tags").split()
        assert {o for o, k in objects.items() if k == "tag"} <= {t.decode() for t in tags}
        stored[commit] = objects
    return stored


def check_refs(home, bare, host: str, repo: str) -> None:
    """Every branch and tag in the store names the commit ``git rev-parse`` names."""
    refs = os.path.join(Store(home).repo_dir(host, *repo.split("/")).path, "refs")
    for kind in ("heads", "tags"):
        folder = os.path.join(refs, kind)
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            with open(os.path.join(folder, name)) as fh:
                assert fh.read().strip() == rev(bare, f"refs/{kind}/{name}^{{commit}}")


@pytest.fixture(scope="module")
def git_root(tmp_path_factory):
    """``many/commits`` (1200 commits, each changing a file) and ``odd/modes`` (a
    submodule entry, a 100664 file, an executable and a symlink in a subtree)."""
    root = tmp_path_factory.mktemp("proofgit") / "git"
    many = root / "many" / "commits"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "master", str(many)], env=ENV, check=True)
    stream = []
    for i in range(1, 1201):
        msg, count = f"commit {i}\n".encode(), f"{i}\n".encode()
        stream.append(b"commit refs/heads/master\nmark :%d\ncommitter t <t@example.invalid> "
                      b"%d +0000\ndata %d\n%s" % (i, 1700000000 + i, len(msg), msg))
        stream.append(b"from :%d\n" % (i - 1) if i > 1 else b"")
        stream.append(b"M 644 inline count.txt\ndata %d\n%s\n" % (len(count), count))
        if i == 1:
            stream.append(b"M 644 inline hubconf.py\ndata 23\ndef f():\n    return 1\n\n")
    git(many, "fast-import", "--quiet", data=b"".join(stream))

    odd = root / "odd" / "modes"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "master", str(odd)], env=ENV, check=True)

    def blob(text: bytes) -> str:
        return git(odd, "hash-object", "-w", "--stdin", data=text).decode().strip()

    hello = blob(b"hello\n")
    pkg = git(odd, "mktree", data=f"100755 blob {hello}\trun.sh\n120000 blob "
              f"{blob(b'../file.txt')}\tlink\n".encode()).decode().strip()
    # git mktree and git add rewrite 100664 as 100644: the tree is written byte by byte.
    entries = [("100664", "file.txt", hello), ("100644", "hubconf.py",
               blob(b"def f():\n    return 1\n")), ("40000", "pkg", pkg),
               ("160000", "sub", GITLINK)]
    raw = b"".join(f"{m} {n}".encode() + b"\0" + bytes.fromhex(i) for m, n, i in entries)
    tree = git(odd, "hash-object", "-t", "tree", "--literally", "-w", "--stdin",
               data=raw).decode().strip()
    commit = git(odd, "commit-tree", tree, "-m", "odd modes").decode().strip()
    git(odd, "update-ref", "refs/heads/master", commit)
    return root


def pack_file(git_root, specs, out, **kw) -> str:
    pack(specs, str(out), PackOptions(git_host=str(git_root), protocol="file",
                                      progress=False, **kw))
    return str(out)


def test_demo_repo_ids_and_its_annotated_tag_are_upstreams(upstream, all_refs_bundle, home,
                                                          proofs):
    """master, dev, v1.0 and c1 of the demo repo (over HTTP): each snapshot proven at
    install, its commit, trees and blobs those of upstream, the annotated tag's object
    carried and hashing to ``git rev-parse v1.0``."""
    bare, host = upstream.demo.bare, upstream.git.host
    tag = rev(bare, "v1.0")
    assert tag != upstream.demo.tags["v1.0"]  # annotated: its own object
    refs = {r["name"]: r for r in manifest_json(all_refs_bundle)["repos"][0]["refs"]}
    assert refs["v1.0"]["target"] == tag and refs["v1.0"]["commit"] == rev(bare, "v1.0^{}")
    assert {refs[b]["commit"] for b in ("master", "dev")} == {rev(bare, "master"),
                                                             rev(bare, "dev")}
    install(all_refs_bundle)
    stored = check_store(home, bare, host, upstream.demo.repo, proofs)
    assert set(stored) == set(upstream.demo.commits.values())
    assert stored[upstream.demo.tags["v1.0"]][tag] == "tag"
    check_refs(home, bare, host, upstream.demo.repo)


def test_a_long_history_proves_branches_forward_only_as_far_as_it_carries(git_root, home,
                                                                          tmp_path, proofs):
    """1200 commits: the tip's bundle carries its first ``HISTORY`` commits, so master
    moves from a commit 50 back, never back to it, and from one 150 back only with a
    longer --history."""
    bare = git_root / "many" / "commits"
    tip, back50, back150 = (rev(bare, f"master~{n}") for n in (0, 50, 150))
    assert int(git(bare, "rev-list", "--count", "master")) >= 1000
    old = pack_file(git_root, [f"many/commits@{back50}"], tmp_path / "old.hub")
    new = pack_file(git_root, ["many/commits"], tmp_path / "new.hub")
    install(old)
    report = install(new)
    assert list(map(str, report.refs_set)) == [
        f"many/commits:master -> {tip[:12]} (was {back50[:12]})"]
    report = install(old)
    assert list(map(str, report.refs_set)) == [] and len(report.refs_kept) == 1
    assert f"stays at newer {tip[:12]}" in str(report.refs_kept[0])
    check_store(home, bare, "github.com", "many/commits", proofs)
    assert len(proofs[tip].parents) == HISTORY and proofs[tip].has_ancestor(back50)

    other = str(tmp_path / "other")
    install(pack_file(git_root, [f"many/commits@{back150}"], tmp_path / "150.hub"), other)
    report = install(new, other)
    assert list(map(str, report.refs_set)) == [] and "does not prove" in str(report.refs_kept[0])
    longer = pack_file(git_root, ["many/commits"], tmp_path / "long.hub", history=200)
    assert list(map(str, install(longer, other).refs_set)) == [
        f"many/commits:master -> {tip[:12]} (was {back150[:12]})"]


@pytest.fixture()
def odd_bundle(git_root, tmp_path) -> str:
    return pack_file(git_root, ["odd/modes"], tmp_path / "odd.hub")


def test_a_submodule_entry_and_odd_modes_are_proven(git_root, odd_bundle, home, proofs):
    """A tree with a gitlink (160000), a 100664 file, an executable and a symlink: the
    install proves it, the tree id is upstream's, the submodule is not a file."""
    bare = git_root / "odd" / "modes"
    assert b"100664 file.txt" in git(bare, "cat-file", "tree", rev(bare, "master^{tree}"))
    install(odd_bundle)
    check_store(home, bare, "github.com", "odd/modes", proofs)
    check_refs(home, bare, "github.com", "odd/modes")
    snap = Store(home).resolve("odd", "modes", "master")
    assert sorted(os.listdir(snap.path)) == ["file.txt", "hubconf.py", "pkg"]
    assert open(os.path.join(snap.path, "file.txt")).read() == "hello\n"


def test_a_100664_file_keeps_its_mode_in_the_record(git_root, odd_bundle, home):
    """The issue: original modes such as 100664 are kept as they are."""
    install(odd_bundle)
    paths = Store(home).repo_dir("github.com", "odd", "modes")
    record = Store(home).snapshot_record(paths, rev(git_root / "odd" / "modes", "master"))
    modes = {f.path: f.mode for f in record.snapshot.files}
    assert modes == {"file.txt": 0o100664, "hubconf.py": 0o100644, "pkg/link": 0o120000,
                     "pkg/run.sh": 0o100755}


def test_a_tampered_tree_object_is_refused_by_verify_and_install(git_root, odd_bundle, home,
                                                                 tmp_path):
    """A tree object changed in ``git/<commit>``, every digest made to match: ``mirror
    verify`` exits 3 with one line naming the commit, install raises BundleError, and
    the store (holding the genuine commit) is byte-for-byte unchanged."""
    manifest, members = unpack(odd_bundle)
    snap = manifest["repos"][0]["snapshots"][0]
    commit = snap["commit"]
    objects = list(decode(members[objects_member(commit)]))
    at = next(i for i, (k, d) in enumerate(objects) if k == "tree" and b"100755 run.sh" in d)
    objects[at] = ("tree", objects[at][1].replace(b"100755 run.sh", b"100644 run.sh"))
    data = members[objects_member(commit)] = encode(iter(objects))
    snap["objects"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    tampered = str(tmp_path / "tampered.hub")
    bundle.write(tampered, Manifest.from_json(manifest), members)

    r = run(MIRROR + ["verify", tampered])
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"commit {commit[:12]}" in r.stderr
    install(odd_bundle)
    before = tree_digest(home)
    with pytest.raises(BundleError) as e:
        install(tampered)
    assert f"commit {commit[:12]}" in str(e.value)
    assert tree_digest(home) == before
