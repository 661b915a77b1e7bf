"""All or nothing: an install that fails while publishing, on an error raised by the
filesystem (``EPERM``, ``ENAMETOOLONG``, ``EXDEV``, a full disk), leaves what readers
see exactly as it was, and the store then verifies and installs as before.

The error is injected into the real filesystem calls that publishing makes, at
every one of them in turn (the n-th call fails, the others run for real): a
real full disk or a read-only folder can be arranged only at a few of them.
"""

from __future__ import annotations

import errno
import os
import re
import shutil

import pytest

import mirror.journal
from mirror import housekeeping
from mirror.errors import StoreError
from mirror.installer import InstallOptions, Transaction, install
from mirror.packer import PackOptions, pack
from mirror.store import Store
from tests.conftest import MIRROR, run, tree_digest
from tests.test_commit_proof import _forge
from tests.upstream.demorepo import git

FAULTS = (errno.EPERM, errno.ENAMETOOLONG, errno.EXDEV, errno.ENOSPC)
LOCKS = (".lock", ".refs.lock")


class Faults:
    """Counts the filesystem calls made while publishing; with ``fail_at``, the call
    of that number raises ``OSError(code)`` instead of running, once."""

    CALLS = ((os, "replace"), (os, "rename"), (os, "mkdir"), (os, "link"), (os, "fsync"),
             (os, "open"), (os, "truncate"), (mirror.journal, "swap"))

    def __init__(self, monkeypatch, home: str, fail_at: int | None = None,
                 code: int = errno.EPERM):
        self.home, self.calls = home, []
        self.fail_at, self.code, self.active = fail_at, code, False
        for module, name in self.CALLS:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), name))
        real = Transaction.publish

        def publish(transaction):
            self.active = True
            try:
                real(transaction)
            finally:
                self.active = False

        monkeypatch.setattr(Transaction, "publish", publish)

    def _wrap(self, fn, name):
        def call(*args, **kwargs):
            # os.makedirs(exist_ok=True) tries mkdir on folders that exist and ignores
            # the error: not a step that can fail.
            if self.active and not (name == "mkdir" and os.path.isdir(args[0])):
                # tempfile's random names differ from run to run; what they name does not
                call = f"{name}{args[:2] if name != 'fsync' else '(fd)'}".replace(self.home,
                                                                               "HOME")
                self.calls.append(re.sub(r"[a-z0-9_]{8}(?=[/'.,])", "*", call))
                if len(self.calls) - 1 == self.fail_at:
                    self.active = False  # once: undoing runs for real
                    raise OSError(self.code, os.strerror(self.code),
                                  *([args[0]] if isinstance(args[0], str) else []))
            return fn(*args, **kwargs)
        return call


def visible(home: str) -> dict:
    """What readers of the store see: every file but blobs (named by no record until a
    snapshot is published: gc collects those a failed install leaves), work in
    progress and lock files, with its bytes and mode; and every folder with one."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(home):
        rel = os.path.relpath(dirpath, home)
        if rel.split(os.sep)[0] in ("blobs", "tmp"):
            continue
        for f in filenames:
            full = os.path.join(dirpath, f)
            if f not in LOCKS:
                with open(full, "rb") as fh:  # the clock's readings aside
                    data = re.sub(rb'"(time|installed_at)":[0-9]+', rb'"\1":0', fh.read())
                out[os.path.join(rel, f)] = (data, os.lstat(full).st_mode)
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                out[os.path.join(rel, d)] = os.readlink(full)
    return out


def _blobs(home: str) -> set:
    folder = os.path.join(home, "blobs")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def _scenarios(master_bundle, all_refs_bundle, tmp_path):
    """name -> (what the store holds first, the bundle then installed, its options)."""
    squatter = _forge(master_bundle, tmp_path / "squat.hub", version=1)
    older = _forge(master_bundle, tmp_path / "older.hub", version=1, commit="f" * 40,
                   commit_time=1)
    return {
        # a new repo: repo.json, folders, four snapshots, refs, a new refs.log
        "new repo": ([], all_refs_bundle, InstallOptions()),
        # a proven snapshot swapped in for an unproven one: record and folder replaced
        "proven replaces unproven": ([squatter], master_bundle, InstallOptions()),
        # --force moves master back: a ref file replaced, refs.log appended
        "ref moved by --force": ([master_bundle], older, InstallOptions(force=True)),
    }


@pytest.mark.parametrize("scenario", ["new repo", "proven replaces unproven",
                                      "ref moved by --force"])
def test_an_error_at_any_publish_step_leaves_the_store_as_it_was(
        scenario, master_bundle, all_refs_bundle, tmp_path, monkeypatch):
    first, bundle_path, options = _scenarios(master_bundle, all_refs_bundle,
                                             tmp_path)[scenario]
    base = str(tmp_path / "base")
    for b in first:
        install(b, base)
    os.makedirs(base, exist_ok=True)

    with monkeypatch.context() as m:  # the calls one successful install makes
        good = str(tmp_path / "good")
        counted = Faults(m, good)
        shutil.copytree(base, good, symlinks=True)
        report = install(bundle_path, good, options)
    assert report.changed and len(counted.calls) >= 15, counted.calls
    before = visible(base)
    assert visible(good) != before  # the install does change what readers see

    after = visible(good)
    refused = fell_back = 0
    for at in range(len(counted.calls)):
        code = FAULTS[at % len(FAULTS)]
        home = str(tmp_path / f"at-{at}")
        shutil.copytree(base, home, symlinks=True)
        blobs = _blobs(home)
        where = counted.calls[at]
        with monkeypatch.context() as m:
            faults = Faults(m, home, fail_at=at, code=code)
            try:
                install(bundle_path, home, options)
            except StoreError as e:
                assert os.strerror(code) in str(e), (where, str(e))
                assert "could not be undone" not in str(e), (where, str(e))
                assert visible(home) == before, where  # all ...
                refused += 1
            else:  # a step with a fallback (a hard link: a copy instead)
                assert visible(home) == after, where  # ... or nothing
                fell_back += 1
        assert faults.calls[at] == where  # the same step, failed
        assert blobs <= _blobs(home)
        assert housekeeping.verify(Store(home)).ok, where
        shutil.rmtree(home)
    print(f"{scenario}: {len(counted.calls)} steps failed in turn: {refused} refused with "
          f"the store as it was, {fell_back} fell back")
    assert refused >= len(counted.calls) // 2
    # and the failed step was only a failure: the same install then goes through
    home = str(tmp_path / "again")
    shutil.copytree(base, home, symlinks=True)
    assert visible(Store(home).home) == before
    assert install(bundle_path, home, options).changed
    assert visible(home) == after


def test_a_ref_that_cannot_sit_beside_an_installed_one_is_refused_before_any_write(
        upstream, home, tmp_path):
    """Upstream deleted branch ``feature`` and made ``feature/a``: git keeps refs as
    files, so the store cannot hold both; only the store can tell, at install."""
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "feature")
    (work / "hubconf.py").write_text("def answer():\n    return 42\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "one")
    bare = os.path.join(upstream.git.root, "refs", "clash")
    git(work, "clone", "-q", "--bare", str(work), bare)
    options = PackOptions(git_host=upstream.git.host, protocol="http", progress=False)
    first, second = str(tmp_path / "feature.hub"), str(tmp_path / "feature-a.hub")
    pack(["refs/clash:feature"], first, options)
    git(bare, "branch", "-m", "feature", "feature/a")
    pack(["refs/clash:feature/a"], second, options)
    install(first)
    before = tree_digest(home)
    r = run(MIRROR + ["install", second])
    assert r.returncode == 6 and r.stderr.strip() == (
        f"Error: {second}: branch 'feature/a' of refs/clash cannot be installed beside the "
        f"installed branch 'feature' (git keeps refs as files: one name cannot be both a "
        f"file and a folder); nothing was installed. Remove it first with 'mirror remove "
        f"refs/clash:feature'")
    assert tree_digest(home) == before
    assert run(MIRROR + ["verify", second]).returncode == 0  # the bundle itself is sound
    assert run(MIRROR + ["remove", "refs/clash:feature"]).returncode == 0
    assert list(map(str, install(second).refs_set)) == [
        f"refs/clash:feature/a -> {git(bare, 'rev-parse', 'feature/a')[:12]}"]
