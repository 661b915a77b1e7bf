"""A commit id is a proof: what an attacker who controls a bundle can no longer do
(issue "A commit id is a proof"). Each test builds the attack from a genuine bundle."""

from __future__ import annotations

import hashlib
import os

import pytest

import mirror.hub
from mirror import bundle
from mirror.errors import BundleError
from mirror.installer import install
from mirror.model import Manifest, objects_member
from mirror.store import Store
from tests.conftest import MIRROR, run, tree_digest, unpack

FORGED = b"REVISION = 'forged'\ndef mlp(**kwargs):\n    raise SystemExit('forged code ran')\n"


def _forge(genuine: str, out, version: int = 2, commit: str | None = None,
           commit_time: int | None = None) -> str:
    """The genuine bundle with hubconf.py replaced and every digest made consistent; in
    format 1 (no git objects), optionally naming another commit and time for master."""
    manifest, members = unpack(genuine)
    snap = manifest["repos"][0]["snapshots"][0]
    old_commit = snap["commit"]
    entry = next(f for f in snap["files"] if f["path"] == "hubconf.py")
    entry.update(size=len(FORGED), sha256=hashlib.sha256(FORGED).hexdigest())
    members[bundle.code_member(old_commit, "hubconf.py")] = FORGED
    if version == 1:
        manifest["format_version"] = 1
        del snap["objects"], members[objects_member(old_commit)]
        for ref in manifest["repos"][0]["refs"]:
            ref.pop("target", None)
    if commit:
        for name in [m for m in members if m.startswith(f"code/{old_commit}/")]:
            members[name.replace(old_commit, commit)] = members.pop(name)
        snap["commit"] = commit
        manifest["repos"][0]["refs"][0]["commit"] = commit
    if commit_time is not None:
        snap["commit_time"] = commit_time
    bundle.write(str(out), Manifest.from_json(manifest), members)
    return str(out)


def test_a_forged_commit_is_refused_and_the_genuine_one_then_installs(master_bundle, home,
                                                                      tmp_path, upstream):
    install(master_bundle)
    forged = _forge(master_bundle, tmp_path / "forged.hub")
    before = tree_digest(home)
    master = upstream.demo.branches["master"]
    with pytest.raises(BundleError) as e:
        install(forged)
    assert f"commit {master[:12]} does not match its content" in str(e.value)
    assert tree_digest(home) == before
    r = run(MIRROR + ["verify", forged])
    assert r.returncode == 3 and f"commit {master[:12]} does not match" in r.stderr


def test_an_unproven_squatter_is_replaced_by_the_proven_commit(master_bundle, home, tmp_path,
                                                                upstream):
    forged = _forge(master_bundle, tmp_path / "squat.hub", version=1)
    assert install(forged).snapshots_installed  # format 1: installs, unproven
    r = run(MIRROR + ["list", "--long"])
    assert "(unproven: its bundle, format 1, carried no git objects" in r.stdout
    r = run(MIRROR + ["verify"])
    assert r.returncode == 0 and "0 proven from their git ids, 1 unproven" in r.stdout
    report = install(master_bundle)  # the genuine commit, proven, takes its place
    master = upstream.demo.branches["master"]
    assert list(map(str, report.snapshots_installed)) == [f"demo/tinynets@{master[:12]}"]
    (repo,) = Store().repos()
    assert [s.proven for s in repo.snapshots] == [True]
    model = mirror.hub.load("demo/tinynets", "mlp", git_host=upstream.git.host)
    assert model.revision == upstream.demo.revisions[master]
    r = run(MIRROR + ["verify"])
    assert r.returncode == 0 and "1 proven from their git ids, 0 unproven" in r.stdout
    assert install(forged).snapshots_present  # and an unproven copy never replaces it


def test_a_future_dated_forgery_cannot_move_a_branch(master_bundle, home, tmp_path, upstream):
    install(master_bundle)
    master = upstream.demo.branches["master"]
    hijack = _forge(master_bundle, tmp_path / "hijack.hub", version=1, commit="f" * 40,
                    commit_time=4102444800)  # 2100-01-01
    report = install(hijack)
    assert list(map(str, report.refs_set)) == []
    assert list(map(str, report.refs_kept)) == [
        f"demo/tinynets:master stays at {master[:12]}: this bundle does not prove that "
        f"{master[:12]} is an ancestor of ffffffffffff (branches move only forward; --force "
        f"moves it)"]
    ref = os.path.join(home, "repos", upstream.git.host, "demo", "tinynets", "refs", "heads",
                       "master")
    assert open(ref).read().strip() == master
    assert mirror.hub.load("demo/tinynets", "mlp", git_host=upstream.git.host).revision == \
        upstream.demo.revisions[master]


def test_git_sha256_object_ids_are_refused_clearly(tmp_path):
    from mirror.model import SnapshotEntry
    from mirror.proof import ObjectDatabase, ProofError

    snap = SnapshotEntry("a" * 64, "b" * 64, 0, ())
    with pytest.raises(ProofError) as e:
        ObjectDatabase(str(tmp_path / "objects.git")).prove(snap, b"", lambda f: "")
    assert str(e.value) == (f"commit {'a' * 12} is not a sha1 id; git's sha256 object format "
                            f"is not supported yet")


def test_megengine_cache_follows_the_proven_commit(master_bundle, home, tmp_path, upstream):
    """Stock megengine.hub reads the seeded cache: it must not keep the squatter's code."""
    from mirror.installer import InstallOptions
    from mirror.layout import megengine_repo_key

    seed = InstallOptions(megengine_versions=("1.13.0",))
    install(_forge(master_bundle, tmp_path / "squat.hub", version=1), options=seed)
    hubconf = os.path.join(os.environ["MGE_HOME"], "hub", megengine_repo_key(
        "1.13.0", "demo", "tinynets", "master"), "hubconf.py")
    assert open(hubconf, "rb").read() == FORGED
    install(master_bundle, options=seed)
    snap = Store().resolve("demo", "tinynets", "master", host=upstream.git.host)
    assert open(hubconf, "rb").read() == open(os.path.join(snap.path, "hubconf.py"), "rb").read()


def test_force_never_puts_unproven_content_under_a_proven_commit(master_bundle, home,
                                                                  tmp_path, upstream):
    from mirror.installer import InstallOptions

    install(master_bundle)
    forged = _forge(master_bundle, tmp_path / "forced.hub", version=1)
    report = install(forged, options=InstallOptions(force=True))
    master = upstream.demo.branches["master"]
    assert list(map(str, report.snapshots_present)) == [f"demo/tinynets@{master[:12]}"]
    model = mirror.hub.load("demo/tinynets", "mlp", git_host=upstream.git.host)
    assert model.revision == upstream.demo.revisions[master]


def test_a_tree_that_names_one_subtree_over_and_over_is_refused_at_once(tmp_path):
    """A few KiB of trees, each naming the next twice, would take days to walk."""
    from mirror.model import MODE_FILE, FileEntry, SnapshotEntry
    from mirror.proof import ObjectDatabase, ProofError, encode

    def oid(kind: bytes, data: bytes) -> bytes:
        return hashlib.sha1(kind + b" %d\0" % len(data) + data).digest()

    empty_blob = oid(b"blob", b"")
    level = b"160000 f\0" + empty_blob  # a submodule entry: no file to match
    trees = [level]
    for _ in range(60):
        below = oid(b"tree", level)
        level = b"40000 a\0" + below + b"40000 b\0" + below
        trees.append(level)
    root = oid(b"tree", level).hex()
    commit = b"tree " + root.encode() + b"\nauthor a <a> 0 +0000\ncommitter a <a> 0 +0000\n\nm\n"
    objects = encode(iter([("commit", commit)] + [("tree", t) for t in trees]))
    snap = SnapshotEntry(oid(b"commit", commit).hex(), root, 0,
                         (FileEntry("a/f", MODE_FILE, 0, hashlib.sha256(b"").hexdigest()),))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ProofError) as e:
        ObjectDatabase(str(tmp_path / "objects.git")).prove(snap, objects, lambda f: str(empty))
    assert "its tree has more entries than the snapshot has files" in str(e.value)
