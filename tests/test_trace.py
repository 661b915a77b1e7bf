"""Dynamic discovery: --trace, --entry and --follow-nested, on the real demo repo."""

import os
import sys

import pytest

from mirror.errors import MirrorError
from mirror.packer import PackOptions, pack
from mirror.store import Store
from mirror.trace import _scrubbed
from tests.conftest import manifest_json, run


def _pack(upstream, out, spec, **kw):
    pack([upstream.spec(spec)], str(out),
         PackOptions(git_host=upstream.git.host, protocol="http", progress=False, **kw))
    return manifest_json(str(out))


def test_trace_records_what_each_entrypoint_downloads_and_loads(upstream, tmp_path):
    dev = upstream.demo.commits["c4"]
    urls = upstream.demo.urls[dev]
    manifest = _pack(upstream, tmp_path / "t.hub", ":dev", trace=True)
    snap = manifest["repos"][0]["snapshots"][0]
    traced = snap["trace"]
    # The decorated factories, and the undecorated one that downloads by itself
    # (its own default is pretrained=True), each with the line that asks.
    assert traced["weights"] == {
        "mlp": [{"url": urls["mlp"], "at": "hubconf.py:12"}],
        "mlp_from_url": [{"url": urls["mlp"], "at": "hubconf.py:22"}],
        "small_cnn": [{"url": urls["small_cnn"], "at": "hubconf.py:31"}],
    }
    assert traced["nested"] == {
        "mlp_via_hub": [{"repo_info": "demo/tinynets", "entry": "mlp", "at": "hubconf.py:28"}]}
    assert traced["errors"] == {}
    assert snap["nested"] == ["demo/tinynets"]
    w = {x["url"]: x for x in manifest["weights"]}
    assert f"demo/tinynets@{dev[:12]}:hubconf.py:22 (trace of mlp_from_url)" in \
        w[urls["mlp"]]["locations"]


def test_entry_packs_only_what_that_entrypoint_needs(upstream, tmp_path):
    dev = upstream.demo.commits["c4"]
    manifest = _pack(upstream, tmp_path / "e.hub", ":dev", entries=["small_cnn"])
    assert [w["url"] for w in manifest["weights"]] == [upstream.demo.urls[dev]["small_cnn"]]
    manifest = _pack(upstream, tmp_path / "f.hub", ":dev", entries=["mlp_from_url"])
    assert [w["url"] for w in manifest["weights"]] == [upstream.demo.urls[dev]["mlp"]]
    with pytest.raises(MirrorError) as e:
        _pack(upstream, tmp_path / "g.hub", ":dev", entries=["resnet50"])
    assert "no entrypoint resnet50 in hubconf.py (it has: MLP, SmallCNN, mlp" in str(e.value)


def test_follow_nested_packs_the_repo_the_code_loads_and_it_loads_offline(upstream, tmp_path):
    c = upstream.demo.commits
    out = tmp_path / "n.hub"
    manifest = _pack(upstream, out, ":dev", entries=["mlp_via_hub"], follow_nested=True)
    (repo,) = manifest["repos"]
    assert sorted((r["name"], r["commit"]) for r in repo["refs"]) == [
        ("dev", c["c4"]), ("master", c["c3"])]
    assert [w["url"] for w in manifest["weights"]] == [upstream.demo.urls[c["c3"]]["mlp"]]
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"))
    code = ("import mirror.hub\n"
            "m = mirror.hub.load('demo/tinynets:dev', 'mlp_via_hub')\nprint(m.revision)")
    assert run([sys.executable, "-m", "mirror", "install", str(out)], env=env,
               netns=True).returncode == 0
    r = run([sys.executable, "-c", code], env=env, netns=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "3"  # master's mlp, through the nested load
    assert Store(env["MGE_MIRROR_HOME"]).repos()[0].commits == sorted([c["c3"], c["c4"]])


def _file_repo(root, owner, name, files):
    """A git repo at root/owner/name with one commit of ``files``, made by fast-import."""
    import subprocess

    bare = root / owner / name
    subprocess.run(["git", "init", "-q", "--bare", "-b", "master", str(bare)], check=True)
    parts = [b"commit refs/heads/master\ncommitter t <t@example.invalid> 1700000000 +0000\n"
             b"data 3\nmsg\n"]
    for path, text in files.items():
        data = text.encode()
        parts.append(b"M 644 inline %s\ndata %d\n%s\n" % (path.encode(), len(data), data))
    subprocess.run(["git", "--git-dir", str(bare), "fast-import", "--quiet"],
                   input=b"".join(parts), check=True)


@pytest.fixture(scope="module")
def nested_repos(upstream, tmp_path_factory):
    root = tmp_path_factory.mktemp("nested") / "git"
    w = {n: upstream.weights.add(f"nested/{n}.pkl", n.encode() * 10) for n in ("a", "b", "v")}
    _file_repo(root, "o", "top", {"hubconf.py": (
        "from megengine import hub\n"
        f"VOCAB = hub.load_serialized_obj_from_url({w['v']!r})  # at import\n\n"
        "def one(pretrained=True):\n    return hub.load('o/nested', 'ea')\n\n"
        "def two(pretrained=True):\n    return hub.load('o/nested', 'eb')\n\n"
        "def broken(pretrained=True):\n    raise RuntimeError(f'boom at {__file__} '"
        " + repr(object()))\n")})
    _file_repo(root, "o", "nested", {"hubconf.py": (
        "import megengine.module as M\nfrom megengine import hub\n\n"
        f"@hub.pretrained({w['a']!r})\ndef ea(**kw):\n    return M.Linear(1, 1)\n\n"
        f"@hub.pretrained({w['b']!r})\ndef eb(**kw):\n    return M.Linear(1, 1)\n")})
    return str(root), w


def _file_pack(root, out, **kw):
    pack(["o/top"], str(out), PackOptions(git_host=root, protocol="file", progress=False, **kw))
    return manifest_json(str(out))


def test_entries_merge_what_each_nested_load_needs_and_import_time_downloads(
        nested_repos, tmp_path):
    root, w = nested_repos
    m = _file_pack(root, tmp_path / "x.hub", entries=["one", "two"], follow_nested=True)
    assert sorted(x["url"] for x in m["weights"]) == sorted([w["a"], w["b"], w["v"]])
    repos = {r["name"]: r for r in m["repos"]}
    assert [r["name"] for r in repos["nested"]["refs"]] == ["master"]  # not twice
    assert sorted(repos["nested"]["snapshots"][0]["weights"]) == sorted([w["a"], w["b"]])


def test_follow_nested_alone_traces(nested_repos, tmp_path):
    root, w = nested_repos
    m = _file_pack(root, tmp_path / "y.hub", follow_nested=True, allow_unresolved=True)
    assert {r["name"] for r in m["repos"]} == {"top", "nested"}


def test_a_named_entry_that_fails_to_trace_fails_the_pack(nested_repos, tmp_path):
    root, _ = nested_repos
    with pytest.raises(MirrorError) as e:
        _file_pack(root, tmp_path / "z.hub", entries=["broken"])
    assert "tracing broken failed: RuntimeError: boom at <snapshot>/hubconf.py" in \
        str(e.value), str(e.value)


def test_an_error_is_recorded_without_its_temporary_folder_or_addresses():
    # A folder's random name with "0x" and hex digits in it left the path in the
    # record once in a while: the same code traced twice gave two manifests.
    root = "/tmp/mirror-trace-xwc90xa3s"
    error = RuntimeError(f"boom at {root}/hubconf.py <object object at 0x7f3a2c>")
    assert _scrubbed(error, root) == "boom at <snapshot>/hubconf.py <object object at 0x?>"


def test_trace_gives_the_same_bundle_twice(nested_repos, tmp_path, monkeypatch):
    root, _ = nested_repos
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    for name, jobs in (("a", 1), ("b", 1), ("c", 2)):
        _file_pack(root, tmp_path / f"{name}.hub", trace=True, trace_jobs=jobs)
    # the same bytes across runs and --trace-jobs (entries finish in any order)
    assert (tmp_path / "a.hub").read_bytes() == (tmp_path / "b.hub").read_bytes() == \
        (tmp_path / "c.hub").read_bytes()
