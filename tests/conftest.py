"""Shared fixtures: one real loopback upstream (git + weights) per test session."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import List

import pytest

from mirror.packer import PackOptions, pack
from tests.upstream import DemoRepo, GitServer, WeightServer, build_demo_repo
from tests.upstream.demorepo import git, make_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Never the user's caches: the packing host's download cache lives in the session's temp dir.
os.environ["MGE_MIRROR_DOWNLOADS"] = tempfile.mkdtemp(prefix="mirror-test-downloads-")
MIRROR = [sys.executable, "-m", "mirror"]
# megengine.hub.list's answer for the demo repo: every callable, imported classes included.
ENTRYPOINTS = ["MLP", "SmallCNN", "mlp", "mlp_from_url", "mlp_via_hub", "small_cnn"]


PUBLIC_WEIGHTS = "https://data.example.invalid"  # never contacted: served via --rewrite


@dataclass
class Upstream:
    demo: DemoRepo
    git: GitServer
    weights: WeightServer
    mirrored: DemoRepo  # names github.com and PUBLIC_WEIGHTS; packed with --rewrite

    @property
    def rewrites(self) -> List[str]:
        return [f"https://github.com={self.git.base_url}",
                f"{PUBLIC_WEIGHTS}={self.weights.base_url}"]

    def spec(self, suffix: str = "") -> str:
        return f"{self.demo.repo}{suffix}"


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Upstream:
    root = tmp_path_factory.mktemp("upstream")
    weights = WeightServer().start()
    demo = build_demo_repo(str(root / "git"), weights)
    mirrored = build_demo_repo(str(root / "git"), weights, name="mirrored",
                               url_base=PUBLIC_WEIGHTS)
    git = GitServer(str(root / "git")).start()
    yield Upstream(demo, git, weights, mirrored)
    git.stop()
    weights.stop()


# The session's bundles keep the manifest first (format 2), pack's default, which
# the corpus of hostile bundles is built from and pipes read; the manifest last
# (pack --stream, format 4) has its own tests (test_streamed.py).
MANIFEST_FIRST = {"stream": False}


@pytest.fixture(scope="session")
def master_bundle(upstream, tmp_path_factory) -> str:
    """The demo repo's master tip, packed once for the session (pinned by commit)."""
    out = str(tmp_path_factory.mktemp("bundles") / "master.hub")
    pack([upstream.spec("@" + upstream.demo.branches["master"][:10])], out,
         PackOptions(git_host=upstream.git.host, protocol="http", progress=False,
                     **MANIFEST_FIRST))
    return out


@pytest.fixture(scope="session")
def all_refs_bundle(upstream, tmp_path_factory) -> str:
    """master, dev, the v1.0 tag and c1 by commit, in one bundle."""
    out = str(tmp_path_factory.mktemp("bundles") / "all.hub")
    specs = [upstream.spec(s) for s in ("", ":dev", ":v1.0")]
    specs.append(upstream.spec("@" + upstream.demo.commits["c1"]))
    pack(specs, out, PackOptions(git_host=upstream.git.host, protocol="http", progress=False,
                                 **MANIFEST_FIRST))
    return out


@pytest.fixture()
def home(tmp_path, monkeypatch) -> str:
    """An empty store, and MGE_HOME pointing away from the user's real caches."""
    path = str(tmp_path / "store")
    monkeypatch.setenv("MGE_MIRROR_HOME", path)
    monkeypatch.setenv("MGE_HOME", str(tmp_path / "mge"))
    return path


def run(args: List[str], env=None, netns: bool = False, timeout: float = 120,
        cwd_: str = ROOT, **kw) -> subprocess.CompletedProcess:
    """Run a command, inside a fresh network namespace with no network if ``netns``."""
    cmd = (["unshare", "--net", "--"] if netns else []) + list(args)
    env = dict(env if env is not None else os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd_, **kw)


def tree_digest(path: str) -> dict:
    """Every file under ``path`` with its bytes, for before/after comparisons."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), path) + "/"] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def store_content(home: str) -> dict:
    """The store's repos as loads see them: refs and snapshot trees, not the records
    (which say when they were installed)."""
    digest = tree_digest(os.path.join(home, "repos"))
    return {k: v for k, v in digest.items() if not k.endswith((".json", "refs.log"))}


@pytest.fixture(scope="session")
def big_bundle(upstream, tmp_path_factory) -> str:
    """master plus 6 extra 5 MiB weight files: an install long enough to interrupt."""
    rng = random.Random(7)
    urls = [upstream.weights.add(f"big/w{i}.pkl", rng.randbytes(5 << 20)) for i in range(6)]
    out = str(tmp_path_factory.mktemp("bundles") / "big.hub")
    pack([upstream.spec()], out, PackOptions(git_host=upstream.git.host, protocol="http",
                                             extra_weights=urls, progress=False,
                                             **MANIFEST_FIRST))
    return out


def pack_spec(upstream, spec: str, out) -> str:
    pack([upstream.spec(spec)], str(out),
         PackOptions(git_host=upstream.git.host, protocol="http", progress=False))
    return str(out)


def handmade_bundle(out, snapshots, owner="hand", name="made", refs=(), weights=()) -> str:
    """A bundle written directly with mirror.bundle: for repos git could not produce
    (commit ids sharing a prefix) or that are broken on purpose.

    ``snapshots`` maps a commit id to ``{path: text}``; ``refs`` are
    ``(name, kind, commit)``; ``weights`` are ``(url, bytes)``.
    """
    import hashlib

    from mirror import bundle, model

    sources, snaps = {}, []
    for i, (commit, files) in enumerate(sorted(snapshots.items())):
        entries = []
        for path, text in sorted(files.items()):
            data = text.encode()
            entries.append({"path": path, "mode": 0o100644, "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
            sources[bundle.code_member(commit, path)] = data
        snaps.append({"commit": commit, "tree": "0" * 40, "commit_time": 1700000000 + i,
                      "files": entries, "weights": sorted(u for u, _ in weights)})
    ws = []
    for url, data in weights:
        sha = hashlib.sha256(data).hexdigest()
        ws.append({"url": url, "size": len(data), "sha256": sha, "locations": []})
        sources[bundle.weight_member(sha)] = data
    manifest = {"format": model.FORMAT, "format_version": 1,  # no git objects: unproven
                "tool": "tests", "created": 0, "weights": ws,
                "repos": [{"host": "github.com", "owner": owner, "name": name,
                           "url": f"https://github.com/{owner}/{name}",
                           "refs": [{"name": n, "kind": k, "commit": c, "asked": n,
                                     "resolved_at": 0} for n, k, c in refs],
                           "snapshots": snaps}]}
    bundle.write(str(out), model.Manifest.from_json(manifest), sources)
    return str(out)


def manifest_json(bundle_path: str) -> dict:
    """A bundle's manifest as the JSON it holds, for tests that look inside or edit it."""
    import json

    from mirror import bundle

    return json.loads(bundle.read_manifest_bytes(bundle_path))


def unpack(bundle_path: str, on_head=None):
    """(manifest as JSON, {member name: bytes}) of a bundle that verifies: the raw
    material for tests that rebuild it with something changed."""
    from mirror import bundle

    manifest, members = bundle.read_all(bundle_path, on_head=on_head)
    return manifest.to_json(), members


RETRAINED_HUBCONF = '''\
import megengine.hub as hub
import megengine.module as M

REVISION = "{revision}"


class Net(M.Module):
    def __init__(self):
        super().__init__()
        self.revision = REVISION
        self.fc1 = M.Linear(8, 16)
        self.fc2 = M.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x))


@hub.pretrained("{url}")
def net(**kwargs):
    return Net()
'''


@pytest.fixture(scope="session")
def retrained(upstream, tmp_path_factory):
    """roll/models at v1 (also tagged v1) then v2, its one weight URL serving other bytes
    at each, as a retrained model published under the same name: a signed bundle packed
    at each (made at times 1000 and 2000; v1's holds master and the tag), the bytes
    served and the commits."""
    root = tmp_path_factory.mktemp("roll")
    key = root / "release"
    assert run(MIRROR + ["keygen", "-o", str(key)]).returncode == 0
    work, bare = root / "work", os.path.join(upstream.git.root, "roll", "models")
    work.mkdir()
    git(work, "init", "-q", "-b", "master")
    served, commits, bundles = {}, {}, {}
    url = upstream.weights.base_url + "/roll/net.pkl"
    for n, seed in ((1, 101), (2, 202)):
        served[n] = make_weights("mlp", seed)
        upstream.weights.add("roll/net.pkl", served[n])
        (work / "hubconf.py").write_text(RETRAINED_HUBCONF.format(revision=n, url=url))
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", f"v{n}")
        commits[n] = git(work, "rev-parse", "HEAD")
        if n == 1:
            git(work, "tag", "v1")
            git(work, "clone", "-q", "--bare", str(work), bare)
        else:
            git(work, "push", "-q", bare, "master")
        bundles[n] = str(root / f"v{n}.hub")
        os.environ["SOURCE_DATE_EPOCH"] = str(1000 * n)
        try:
            # refresh: the packing host's download cache holds v1's bytes for the URL
            pack(["roll/models"] + (["roll/models:v1"] if n == 1 else []), bundles[n],
                 PackOptions(
                     git_host=upstream.git.host, protocol="http", progress=False,
                     sign=str(key), refresh=True))
        finally:
            del os.environ["SOURCE_DATE_EPOCH"]
    return url, served, commits, bundles


def same_weights(state, data: bytes) -> bool:
    """Whether a loaded state dict (or its JSON lists) holds exactly the arrays saved in
    ``data``, the bytes a weight server served."""
    import megengine
    import numpy as np

    expected = megengine.load(io.BytesIO(data))
    return sorted(state) == sorted(expected) and all(
        np.array_equal(np.asarray(state[k], np.float32), expected[k]) for k in expected)


def keypairs(root, names=("release", "other")) -> dict:
    """``mirror keygen`` for each name under ``root``: name -> (private key path, public
    key path, key id)."""
    out = {}
    for name in names:
        r = run(MIRROR + ["keygen", "-o", str(root / name)])
        assert r.returncode == 0, r.stderr
        out[name] = (str(root / name), str(root / f"{name}.pub"), r.stdout.split()[1][:-1])
    return out
