"""The store owns its seeds: MegEngine's own cache stays true through upgrade, remove,
gc and repair, for unmodified ``megengine.hub.load`` in a network namespace with no
network.

``retrained`` (tests/conftest.py) is a repo whose one weight URL served other bytes
at v1 (master, and tag v1) and at v2 (master), as a retrained model republished
under the same name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import megengine

import mirror.hub
from mirror.layout import megengine_repo_key
from tests.conftest import MIRROR, run, same_weights

STOCK = textwrap.dedent('''
    import json, sys
    import numpy as np
    from megengine import hub   # stock MegEngine Hub, not mirror

    repo_info, entry, kwargs = json.loads(sys.argv[1])
    model = hub.load(repo_info, entry, pretrained=True, **kwargs)
    print(json.dumps({"revision": model.revision, "params": {
        k: np.asarray(v).tolist() for k, v in model.state_dict().items()}}))
''')


def _env(tmp_path):
    return dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
                MGE_HOME=str(tmp_path / "mge"))


def stock_load(env, repo_info, entry="net", **kwargs):
    """Unmodified megengine.hub.load, offline, in a process of its own."""
    r = run([sys.executable, "-c", STOCK, json.dumps([repo_info, entry, kwargs])], env=env,
            netns=True)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else r


def _install(env, bundle):
    r = run(MIRROR + ["install", bundle], env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _du(*paths) -> int:
    """Bytes on disk, as du counts them (a file with several links once)."""
    out = subprocess.run(["du", "-s", "-B1", "-c", *paths], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def test_an_upgrade_moves_the_seeded_weights_with_the_code(retrained, tmp_path):
    """v1 then v2: stock MegEngine runs v2's code with v2's weights, not v1's."""
    url, served, commits, bundles = retrained
    env = _env(tmp_path)
    _install(env, bundles[1])
    got = stock_load(env, "roll/models")
    assert got["revision"] == "1" and same_weights(got["params"], served[1])
    out = _install(env, bundles[2])
    assert "megengine cache: seeded roll/models:master -> hub/" in out
    got = stock_load(env, "roll/models")
    assert got["revision"] == "2" and same_weights(got["params"], served[2])


def test_two_refs_that_pin_other_bytes_for_one_url(retrained, upstream, master_bundle,
                                                    tmp_path):
    """Master (v2) and tag v1 pin other bytes for the URL; MegEngine keeps one file per
    URL, so v1 is not seeded: stock MegEngine fails loudly for it offline instead of
    loading v2's weights into v1's code, and mirror.hub.load serves each its own."""
    url, served, commits, bundles = retrained
    env = _env(tmp_path)
    _install(env, bundles[1])
    out = _install(env, bundles[2])
    assert (f"megengine cache: not seeded roll/models:v1: its code's weight {url} is "
            f"pinned to sha256 ") in out
    assert "(the bytes master pins); mirror.hub.load serves it" in out
    got = stock_load(env, "roll/models")
    assert got["revision"] == "2" and same_weights(got["params"], served[2])
    for call in (("roll/models:v1",), ("roll/models", "net")):
        kwargs = {"commit": commits[1]} if len(call) == 2 else {}
        failed = stock_load(env, call[0], **kwargs)
        assert isinstance(failed, subprocess.CompletedProcess) and failed.returncode != 0
    version = megengine.__version__
    hub = tmp_path / "mge" / "hub"
    assert not (hub / megengine_repo_key(version, "roll", "models", "v1")).exists()
    # Installing the same bundle again says it again; another repo's install counts it
    again = _install(env, bundles[2])
    assert f"megengine cache: not seeded roll/models:v1: its code's weight {url} " in again
    other = _install(env, master_bundle)
    assert "not seeded roll/models" not in other
    assert ("megengine cache: 3 other ref(s), commit(s) or weight(s) of the store stay "
            "unseeded ('mirror seed' lists them)") in other
    os.environ.update(MGE_MIRROR_HOME=env["MGE_MIRROR_HOME"])
    try:
        old = mirror.hub.load("roll/models:v1", "net", git_host=upstream.git.host,
                              pretrained=True)
    finally:
        del os.environ["MGE_MIRROR_HOME"]
    assert old.revision == "1" and same_weights(old.state_dict(), served[1])
    r = run(MIRROR + ["verify"], env=env)
    assert r.returncode == 0, r.stdout
    assert " seeds checked; 0 problems" in r.stdout


def test_remove_and_gc_delete_their_seeds_and_free_what_they_say(big_bundle, tmp_path):
    """The bytes remove reports as freed are freed on disk: the seeds linking the blobs
    go with them."""
    env = _env(tmp_path)
    _install(env, big_bundle)
    store, mge = str(tmp_path / "store"), str(tmp_path / "mge")
    assert stock_load(env, "demo/tinynets", "mlp")["revision"]
    seeded = sorted(os.listdir(os.path.join(mge, "serialized")))
    assert len(seeded) == 8  # two of the code's weights and six extras
    before = _du(store, mge)
    r = run(MIRROR + ["remove", "demo/tinynets", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    freed = before - _du(store, mge)
    assert freed > 30 << 20  # six 5 MiB weights
    assert abs(plan["bytes_freed"] - freed) < 256 << 10, (plan["bytes_freed"], freed)
    assert len(plan["seeds"]) == 8 + 2  # the weights, and master's code and commit= key
    assert os.listdir(os.path.join(mge, "serialized")) == []
    assert [d for d in os.listdir(os.path.join(mge, "hub")) if not d.startswith(".")] == []
    failed = stock_load(env, "demo/tinynets", "mlp")  # removed: gone for stock MegEngine too
    assert isinstance(failed, subprocess.CompletedProcess) and failed.returncode != 0
    before = _du(store, mge)
    r = run(MIRROR + ["gc"], env=env)
    assert r.returncode == 0 and "0 blobs and 0 other files; freed 0 B" in r.stdout
    assert abs(before - _du(store, mge)) < 64 << 10
    print(f"remove freed {freed} bytes by du, reported {plan['bytes_freed']}")


def test_a_seed_that_stock_use_cache_false_deleted_is_found_and_repaired(retrained,
                                                                         tmp_path):
    url, served, commits, bundles = retrained
    env = _env(tmp_path)
    _install(env, bundles[2])
    broken = stock_load(env, "roll/models", use_cache=False)  # deletes, then cannot fetch
    assert isinstance(broken, subprocess.CompletedProcess) and broken.returncode != 0
    key = megengine_repo_key(megengine.__version__, "roll", "models", "master")
    seed = tmp_path / "mge" / "hub" / key
    assert not seed.exists()
    failed = stock_load(env, "roll/models")
    assert isinstance(failed, subprocess.CompletedProcess) and failed.returncode != 0
    r = run(MIRROR + ["verify"], env=env)
    assert r.returncode == 3
    assert (f"problem: seed roll/models:master ({seed}) is missing: stock megengine.hub "
            f"will not find it offline; run 'mirror seed'") in r.stdout
    r = run(MIRROR + ["seed"], env=env)
    assert r.returncode == 0, r.stderr
    assert f"seeded roll/models:master -> hub/{key}" in r.stdout
    got = stock_load(env, "roll/models")
    assert got["revision"] == "2" and same_weights(got["params"], served[2])
    r = run(MIRROR + ["verify"], env=env)
    assert r.returncode == 0 and "; 0 problems" in r.stdout
    r = run(MIRROR + ["seed"], env=env)  # nothing left to do
    assert r.stdout.strip().splitlines()[-1].endswith(
        "0 seeded, 3 already right, 0 removed, 0 left out, 0 not mirror's")
