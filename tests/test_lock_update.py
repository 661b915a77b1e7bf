"""pack --lock FILE --update: pins moved and added on purpose, each change said, the
file as a first pack would write it, and left alone when the pack fails."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from typing import List

import pytest

from mirror.errors import DownloadError, LockMismatchError, MirrorError
from mirror.packer import PackOptions, pack
from tests.conftest import MIRROR, run
from tests.upstream import GitServer, WeightServer
from tests.upstream.demorepo import git, make_weights

HUBCONF = '''\
import megengine.module as M
from megengine import hub


class Net(M.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = M.Linear(8, 16)
        self.fc2 = M.Linear(16, 4)


@hub.pretrained("{url}")
def net(**kwargs):
    return Net()
'''

_names = itertools.count()


@dataclass
class Servers:
    git: GitServer
    weights: WeightServer


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A git server and a weight server of this module's own: its tests move branches
    and change served bytes, which no other test may see."""
    weights = WeightServer().start()
    git_server = GitServer(str(tmp_path_factory.mktemp("lock-git"))).start()
    yield Servers(git_server, weights)
    git_server.stop()
    weights.stop()


@dataclass
class Repo:
    """A one-entry hub repo on the git server, its weight on the weight server."""

    servers: Servers
    spec: str  # owner/name
    work: str  # a clone whose commits are pushed to the served bare repo
    bare: str

    def weight(self, path: str, seed: int) -> str:
        """Serve real MegEngine weights (seeded) at ``path``; return their URL."""
        return self.servers.weights.add(f"{self.spec}/{path}", make_weights("mlp", seed))

    def sha(self, url: str) -> str:
        return hashlib.sha256(self.servers.weights.files[
            url[len(self.servers.weights.base_url):]]).hexdigest()

    def commit(self, branch: str, url: str, message: str) -> str:
        """Commit a hubconf.py whose entry loads ``url`` on ``branch``, and push it."""
        git(self.work, "checkout", "-q", "-B", branch)
        with open(os.path.join(self.work, "hubconf.py"), "w") as fh:
            fh.write(HUBCONF.format(url=url))
        with open(os.path.join(self.work, "README.md"), "w") as fh:
            fh.write(f"# {message}\n")
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", message)
        git(self.work, "push", "-q", "-f", self.bare, f"{branch}:{branch}")
        return git(self.work, "rev-parse", "HEAD")


@pytest.fixture()
def repo(servers, tmp_path) -> Repo:
    spec = f"lock/net{next(_names)}"
    bare = os.path.join(servers.git.root, spec)
    git(servers.git.root, "init", "-q", "--bare", "-b", "master", bare)
    work = str(tmp_path / "work")
    os.mkdir(work)
    git(work, "init", "-q", "-b", "master")
    return Repo(servers, spec, work, bare)


def _options(repo: Repo, tmp_path, **kw) -> PackOptions:
    return PackOptions(git_host=repo.servers.git.host, protocol="http", progress=False,
                       cache_dir=str(tmp_path / "cache"), **kw)


def _pack(repo, tmp_path, specs, out, **kw) -> tuple:
    """(report, the lines logged that start with 'lock:')."""
    logged: List[str] = []
    report = pack(specs, str(tmp_path / out), _options(repo, tmp_path, **kw),
                  log=logged.append)
    return report, [m for m in logged if m.startswith("lock:")], logged


def _cli(repo, tmp_path, *args: str):
    env = dict(os.environ, MGE_MIRROR_DOWNLOADS=str(tmp_path / "cache"))
    return run(MIRROR + ["pack", *args, "--git-host", repo.servers.git.host,
                         "--protocol", "http"], env=env)


def test_update_moves_the_pins_that_changed_and_says_so(repo, tmp_path):
    url = repo.weight("net.pkl", 1)
    c1 = repo.commit("master", url, "c1")
    spec, lock = f"{repo.spec}:master", tmp_path / "net.lock"
    _pack(repo, tmp_path, [spec], "a.hub", lock=str(lock))
    written = lock.read_bytes()
    old = repo.sha(url)
    assert json.loads(written) == {"version": 1, "refs": {spec: c1}, "weights": {url: old}}

    # Upstream serves other bytes under the pinned URL: the lock refuses them, as ever.
    repo.weight("net.pkl", 2)
    new = repo.sha(url)
    def refused() -> str:
        r = _cli(repo, tmp_path, spec, "-o", str(tmp_path / "b.hub"), "--lock", str(lock),
                 "--refresh", "-q")
        assert r.returncode == LockMismatchError.exit_code
        return r.stderr

    assert refused() == (f"Error: lock {lock}: {url} now has sha256 {new}, the lock pins "
                         f"{old}: its content changed upstream. Review the change; pack "
                         f"again with --update to move the pins\n")
    # And the branch moves: that is what it names first.
    c2 = repo.commit("master", url, "c2")
    assert refused() == (f"Error: lock {lock}: {spec} now resolves to {c2}, the lock pins "
                         f"{c1}. Review the change; pack again with --update to move the "
                         f"pins\n")
    assert lock.read_bytes() == written and not (tmp_path / "b.hub").exists()

    r = _cli(repo, tmp_path, spec, "-o", str(tmp_path / "c.hub"), "--lock", str(lock),
             "--update", "--refresh")
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith(("lock:", "wrote lock"))]
    assert said == [f"lock: moved {spec} {c1} -> {c2}",
                    f"lock: weight {url} sha256 {old} -> {new}",
                    f"wrote lock {lock}"]
    assert json.loads(lock.read_bytes()) == {"version": 1, "refs": {spec: c2},
                                             "weights": {url: new}}
    # Byte for byte what a first pack of the same state writes, so that it diffs cleanly.
    _pack(repo, tmp_path, [spec], "d.hub", lock=str(tmp_path / "fresh.lock"))
    assert lock.read_bytes() == (tmp_path / "fresh.lock").read_bytes()
    # And enforced from now on, as any lock.
    _, lines, _ = _pack(repo, tmp_path, [spec], "e.hub", lock=str(lock))
    assert lines == []


def test_update_with_nothing_changed_says_so_and_leaves_the_file(repo, tmp_path):
    url = repo.weight("net.pkl", 3)
    repo.commit("master", url, "c1")
    lock = tmp_path / "net.lock"
    _pack(repo, tmp_path, [repo.spec], "a.hub", lock=str(lock))
    written = lock.read_bytes()
    report, lines, logged = _pack(repo, tmp_path, [repo.spec], "b.hub", lock=str(lock),
                                  update_lock=True, refresh=True)
    assert lines == ["lock: unchanged"]
    assert not any(m.startswith("wrote lock") for m in logged)
    assert lock.read_bytes() == written
    assert report.lock_changes == [] and report.to_json()["lock_changes"] == []


def test_update_adds_pins_for_new_specs_and_keeps_those_not_packed(repo, tmp_path):
    url = repo.weight("net.pkl", 4)
    c1 = repo.commit("master", url, "c1")
    master, dev, lock = f"{repo.spec}:master", f"{repo.spec}:dev", tmp_path / "net.lock"
    _pack(repo, tmp_path, [master], "a.hub", lock=str(lock))
    dev_url = repo.weight("net-dev.pkl", 5)
    d1 = repo.commit("dev", dev_url, "d1")
    with pytest.raises(LockMismatchError):  # without --update, as before
        _pack(repo, tmp_path, [master, dev], "b.hub", lock=str(lock))

    report, lines, _ = _pack(repo, tmp_path, [master, dev], "b.hub", lock=str(lock),
                             update_lock=True)
    assert lines == [f"lock: added {dev} -> {d1}",
                     f"lock: added weight {dev_url} sha256 {repo.sha(dev_url)}"]
    assert report.to_json()["lock_changes"] == [
        {"kind": "ref", "name": dev, "old": None, "new": d1},
        {"kind": "weight", "name": dev_url, "old": None, "new": repo.sha(dev_url)}]
    pins = {"version": 1, "refs": {master: c1, dev: d1},
            "weights": {url: repo.sha(url), dev_url: repo.sha(dev_url)}}
    assert json.loads(lock.read_bytes()) == pins

    # A pack of some of the specs moves nothing it does not pack, and says what it kept.
    written = lock.read_bytes()
    _, lines, _ = _pack(repo, tmp_path, [dev], "c.hub", lock=str(lock), update_lock=True)
    assert lines == ["lock: unchanged",
                     f"lock: kept 2 pin(s) this pack does not use: {master}, {url}"]
    assert lock.read_bytes() == written


def test_update_needs_a_lock(repo, tmp_path):
    url = repo.weight("net.pkl", 6)
    repo.commit("master", url, "c1")
    message = "--update moves the pins of a lock file; give --lock FILE"
    with pytest.raises(MirrorError) as e:
        _pack(repo, tmp_path, [repo.spec], "a.hub", update_lock=True)
    assert str(e.value) == message
    r = _cli(repo, tmp_path, repo.spec, "-o", str(tmp_path / "a.hub"), "--update", "-q")
    assert (r.returncode, r.stderr) == (2, f"Error: {message}\n")  # usage
    assert not (tmp_path / "a.hub").exists()

    # A recipe's lock is a --lock: --update moves its pins.
    lock = tmp_path / "net.lock"
    recipe = tmp_path / "net.toml"
    recipe.write_text(f'lock = "net.lock"\n[[repo]]\nspec = "{repo.spec}"\n')
    _pack(repo, tmp_path, [repo.spec], "b.hub", lock=str(lock))
    c2 = repo.commit("master", url, "c2")
    r = _cli(repo, tmp_path, "--recipe", str(recipe), "-o", str(tmp_path / "c.hub"),
             "--update")
    assert r.returncode == 0, r.stderr
    assert json.loads(lock.read_bytes())["refs"] == {repo.spec: c2}


def test_a_failed_update_leaves_the_lock_as_it_was(repo, tmp_path):
    url = repo.weight("net.pkl", 7)
    repo.commit("master", url, "c1")
    lock = tmp_path / "net.lock"
    _pack(repo, tmp_path, [repo.spec], "a.hub", lock=str(lock))
    written = lock.read_bytes()
    repo.commit("master", url, "c2")
    repo.weight("net.pkl", 8)
    path = f"{repo.spec}/net.pkl"
    repo.servers.weights.fault(path, "404")
    logged: List[str] = []
    try:
        with pytest.raises(DownloadError):
            pack([repo.spec], str(tmp_path / "b.hub"),
                 _options(repo, tmp_path, lock=str(lock), update_lock=True, refresh=True),
                 log=logged.append)
    finally:
        repo.servers.weights.fault(path, None)
    assert lock.read_bytes() == written
    assert not any(m.startswith("lock:") for m in logged)
    assert not (tmp_path / "b.hub").exists()
