"""Unmodified megengine.hub works offline after mirror install seeded its caches."""

import io
import json
import os
import sys
import textwrap

import megengine
import numpy as np
from megengine.hub.fetcher import GitHTTPSFetcher

from mirror.layout import megengine_repo_key as repo_key
from tests.conftest import ENTRYPOINTS, MIRROR, run

STOCK = textwrap.dedent('''
    import json, sys
    import numpy as np
    from megengine import hub   # stock MegEngine Hub, not mirror

    calls = json.loads(sys.argv[1])
    out = {}
    for name, (repo_info, entry, kwargs) in calls.items():
        model = hub.load(repo_info, entry, pretrained=True, **kwargs)
        out[name] = {"revision": model.revision,
                     "params": {k: np.asarray(v).tolist() for k, v in model.state_dict().items()}}
    out["list"] = hub.list("demo/tinynets:dev")
    out["help"] = hub.help("demo/tinynets:v1.0", "mlp")
    print(json.dumps(out))
''')


def test_repo_keys_are_megengines_own():
    raw = "demo_tinynets_feature_x_" + "a" * 40
    assert repo_key("1.13.0", "demo", "tinynets", "feature/x", "a" * 40) == (
        "1_13_0_" + GitHTTPSFetcher._gen_repo_dir(raw))


def test_stock_megengine_hub_loads_offline_after_install(upstream, all_refs_bundle, tmp_path):
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"))
    r = run(MIRROR + ["install", all_refs_bundle], env=env, netns=True)
    assert r.returncode == 0, r.stderr
    assert "megengine cache: seeded demo/tinynets:master ->" in r.stdout
    # Seeded files are the store's own bytes (hard links), not copies.
    master = upstream.demo.branches["master"]
    seeded = tmp_path / "mge" / "hub" / repo_key(megengine.__version__, "demo", "tinynets",
                                                "master") / "hubconf.py"
    stored = (tmp_path / "store" / "repos" / upstream.git.host / "demo" / "tinynets" /
              "snapshots" / master / "hubconf.py")
    assert os.stat(seeded).st_ino == os.stat(stored).st_ino

    c = upstream.demo.commits
    calls = {
        "default": ["demo/tinynets", "mlp", {}],
        "dev": ["demo/tinynets:dev", "mlp", {}],
        "tag": ["demo/tinynets:v1.0", "small_cnn", {}],
        "commit": ["demo/tinynets", "mlp", {"commit": c["c1"]}],
    }
    got = {}
    for name, call in calls.items():
        # One process per call: stock MegEngine keeps a repo's packages in sys.modules,
        # so a second revision in the same process would run the first one's code.
        r = run([sys.executable, "-c", STOCK, json.dumps({name: call})], env=env, netns=True)
        assert r.returncode == 0, r.stderr
        got.update(json.loads(r.stdout.strip().splitlines()[-1]))
    for name, label in (("default", "c3"), ("dev", "c4"), ("tag", "c2"), ("commit", "c1")):
        commit = c[label]
        entry = calls[name][1]
        assert got[name]["revision"] == upstream.demo.revisions[commit]
        url = upstream.demo.urls[commit][entry]
        served = megengine.load(io.BytesIO(upstream.demo.weights[url]))
        for k, v in served.items():
            np.testing.assert_array_equal(np.asarray(got[name]["params"][k], np.float32), v)
    assert got["list"] == ENTRYPOINTS
    assert got["help"] == "A two-layer perceptron over 8 features (revision 2)."


def test_a_cache_entry_megengine_made_itself_is_left_alone(upstream, all_refs_bundle, tmp_path):
    mge = tmp_path / "mge"
    version = megengine.__version__
    own = mge / "hub" / repo_key(version, "demo", "tinynets", "master")
    own.mkdir(parents=True)
    (own / "hubconf.py").write_text("# fetched by megengine itself\n")
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"), MGE_HOME=str(mge))
    r = run(MIRROR + ["install", all_refs_bundle], env=env)
    assert r.returncode == 0, r.stderr
    assert f"megengine cache: left demo/tinynets:master alone: {own} was not made by mirror" \
        in r.stdout
    assert os.listdir(own) == ["hubconf.py"]


def test_no_megengine_cache_flag_seeds_nothing(all_refs_bundle, tmp_path):
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"))
    r = run(MIRROR + ["install", "--no-megengine-cache", all_refs_bundle], env=env)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "mge").exists()
