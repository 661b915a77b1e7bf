"""The isolated host for real: install and load inside a network namespace with no network."""

import io
import json
import os
import sys
import textwrap

import megengine
import numpy as np
import pytest

from tests.conftest import ENTRYPOINTS, MIRROR, run

LOAD = textwrap.dedent('''
    import json, socket, sys
    import numpy as np
    import mirror.hub

    host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # Prove the air gap: the upstream that served the bundle is unreachable from here.
    try:
        socket.create_connection((host, port), timeout=2).close()
        reachable = True
    except OSError:
        reachable = False
    arrays = {}
    for entry in ("mlp", "small_cnn"):
        model = mirror.hub.load("demo/tinynets", entry, pretrained=True, source="local")
        for k, v in model.state_dict().items():
            arrays[entry + "/" + k] = np.asarray(v)
    np.savez(out, **arrays)
    print(json.dumps({"reachable": reachable,
                      "list": mirror.hub.list("demo/tinynets", source="local"),
                      "help": mirror.hub.help("demo/tinynets", "small_cnn", source="local")}))
''')


def _env(home):
    return dict(os.environ, MGE_MIRROR_HOME=home, MGE_HOME=os.path.join(home, "..", "mge"))


def test_install_and_load_with_no_network(upstream, master_bundle, tmp_path):
    home = str(tmp_path / "store")
    r = run(MIRROR + ["install", master_bundle], env=_env(home), netns=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("verified ")

    out = str(tmp_path / "params.npz")
    r = run([sys.executable, "-c", LOAD, "127.0.0.1", str(upstream.weights.port), out],
            env=_env(home), netns=True)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["reachable"] is False
    assert answer["list"] == ENTRYPOINTS
    assert answer["help"] == "A two-convolution network for 3x8x8 images (revision 3)."

    master = upstream.demo.branches["master"]
    got = np.load(out)
    for entry in ("mlp", "small_cnn"):
        url = upstream.demo.urls[master][entry]
        served = megengine.load(io.BytesIO(upstream.demo.weights[url]))
        for k, v in served.items():
            np.testing.assert_array_equal(got[f"{entry}/{k}"], v)
        assert sorted(k for k in got.files if k.startswith(entry + "/")) == sorted(
            f"{entry}/{k}" for k in served)


def test_load_with_an_empty_store_fails_naming_the_repo(tmp_path):
    home = str(tmp_path / "store")
    code = "import mirror.hub; mirror.hub.load('demo/tinynets', 'mlp', pretrained=True)"
    r = run([sys.executable, "-c", code], env=_env(home), netns=True)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last == (
        f"mirror.errors.NotInstalledError: demo/tinynets:master is not installed in {home}: "
        f"the store has nothing for demo/tinynets. Pack it on a connected host "
        f"(mirror pack demo/tinynets:master -o X.hub) and run 'mirror install X.hub' here.")


def test_the_namespace_really_has_no_network(upstream):
    code = ("import socket, sys\n"
            "try:\n socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2)\n"
            "except OSError as e:\n print('refused', e.errno)\nelse:\n print('connected')")
    inside = run([sys.executable, "-c", code, str(upstream.weights.port)], netns=True)
    outside = run([sys.executable, "-c", code, str(upstream.weights.port)])
    assert inside.stdout.startswith("refused") and outside.stdout.strip() == "connected"


@pytest.mark.parametrize("cmd", [["ls"], ["home"]])
def test_cli_runs_in_the_namespace(tmp_path, cmd):
    r = run(MIRROR + cmd, env=_env(str(tmp_path / "store")), netns=True)
    assert r.returncode == 0, r.stderr
