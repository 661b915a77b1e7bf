"""Dynamic discovery: --trace, --entry and --follow-nested, on the real demo repo."""

import os
import sys

import pytest

from mirror import bundle
from mirror.errors import MirrorError
from mirror.pack import pack
from mirror.store import Store
from tests.conftest import run


def _pack(upstream, out, spec, **kw):
    pack([upstream.spec(spec)], str(out), git_host=upstream.git.host, protocol="http",
         progress=False, **kw)
    return bundle.read_manifest(str(out))


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
    assert Store(env["MGE_MIRROR_HOME"]).repos()[0]["commits"] == sorted([c["c3"], c["c4"]])
