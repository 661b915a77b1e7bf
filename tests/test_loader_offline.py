"""The loader on an isolated host: every call below runs in a network namespace
with no network, against a store whose bundles were installed without seeding
MegEngine's own cache (so only mirror can answer)."""

import hashlib
import io
import json
import os
import shutil
import sys
import textwrap

import megengine
import numpy as np
import pytest

from mirror.store import Store
from tests.conftest import MIRROR, handmade_bundle, run

HAND_A = "abcdef1" + "0" * 33  # two commits that share a 7-digit prefix
HAND_B = "abcdef1" + "1" * 33
MISSING_WEIGHT = "http://127.0.0.1:9/weights/never_packed.pkl"


@pytest.fixture(scope="module")
def offline(upstream, all_refs_bundle, tmp_path_factory):
    """A store with the demo repo and a handmade repo; env for processes using it."""
    root = tmp_path_factory.mktemp("offline")
    env = dict(os.environ, MGE_MIRROR_HOME=str(root / "store"), MGE_HOME=str(root / "mge"))
    hand = handmade_bundle(root / "hand.hub", {
        HAND_A: {"hubconf.py": (
            "import megengine.module as M\nfrom megengine import hub\n\n\n"
            f"@hub.pretrained({MISSING_WEIGHT!r})\n"
            "def linear(**kwargs):\n    return M.Linear(1, 1)\n")},
        HAND_B: {"hubconf.py": "dependencies = ['no_such_module_here']\n\n\n"
                               "def b():\n    return 'B'\n"},
    }, refs=[("master", "branch", HAND_B)])
    broken = handmade_bundle(root / "broken.hub", {
        "c" * 40: {"hubconf.py": "import cv9000\n\ndef x():\n    pass\n"}},
        owner="hand", name="broken", refs=[("master", "branch", "c" * 40)])
    for b in (all_refs_bundle, hand, broken):
        r = run(MIRROR + ["install", "--no-megengine-cache", b], env=env, netns=True)
        assert r.returncode == 0, r.stderr
    return env


def offline_python(env, code: str, *args: str):
    """Run ``code`` with no network; return the JSON it prints last, or the error line."""
    r = run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, netns=True)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def digest(params) -> str:
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode() + np.ascontiguousarray(params[k], np.float32).tobytes())
    return h.hexdigest()


def served_digest(upstream, commit_label, entry="mlp"):
    commit = upstream.demo.commits[commit_label]
    url = upstream.demo.urls[commit][entry]
    return digest(megengine.load(io.BytesIO(upstream.demo.weights[url])))


LOAD_FORMS = """
import hashlib, json, sys
import numpy as np
import mirror.hub

def digest(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + np.ascontiguousarray(np.asarray(v), np.float32).tobytes())
    return h.hexdigest()

out = {}
for label, info, entry, kwargs in json.loads(sys.argv[1]):
    model = mirror.hub.load(info, entry, pretrained=True, **kwargs)
    out[label] = [model.revision, digest(model)]
print(json.dumps(out))
"""


def test_every_revision_form_loads_that_revisions_code_and_weights(upstream, offline):
    c = upstream.demo.commits
    forms = [
        ("default", "demo/tinynets", "mlp", {}, "c3"),
        ("branch", "demo/tinynets:master", "mlp", {}, "c3"),
        ("dev", "demo/tinynets:dev", "mlp", {}, "c4"),  # side by side with master
        ("tag", "demo/tinynets:v1.0", "mlp", {}, "c2"),
        ("commit", "demo/tinynets", "mlp", {"commit": c["c1"]}, "c1"),
        ("abbrev", "demo/tinynets", "mlp", {"commit": c["c1"][:7]}, "c1"),
        ("commit-wins", "demo/tinynets:dev", "mlp", {"commit": c["c2"][:10]}, "c2"),
        ("git_host", "demo/tinynets", "mlp", {"git_host": upstream.git.host}, "c3"),
        ("cnn-tag", "demo/tinynets:v1.0", "small_cnn", {}, "c2"),
        ("by-code", "demo/tinynets:dev", "mlp_from_url", {}, "c4"),
        # Repo code that calls megengine.hub.load itself: the default branch, from the store.
        ("nested", "demo/tinynets:dev", "mlp_via_hub", {}, "c3"),
    ]
    got = offline_python(offline, LOAD_FORMS, json.dumps([f[:4] for f in forms]))
    assert "error" not in got, got
    for label, _, entry, _, expected in forms:
        weights_of = {"small_cnn": "small_cnn"}.get(entry, "mlp")
        assert got[label] == [upstream.demo.revisions[c[expected]],
                              served_digest(upstream, expected, weights_of)], label


@pytest.mark.parametrize("call, message", [
    ("mirror.hub.load('hand/made', 'a', commit='abcdef1')",
     f"mirror.errors.AmbiguousCommitError: hand/made: commit 'abcdef1' is ambiguous, "
     f"it matches {HAND_A}, {HAND_B}"),
    ("mirror.hub.load('demo/tinynets', 'mlp', commit='abc12')",
     "mirror.errors.SpecError: invalid repo spec 'abc12': commit= takes a full commit id "
     "or at least 7 of its hex digits"),
    ("mirror.hub.load('demo/tinynets', 'mlp_vai_hub')",
     "mirror.errors.EntrypointNotFoundError: demo/tinynets@{c3}: no entrypoint "
     "'mlp_vai_hub' in hubconf.py (it has: MLP, SmallCNN, mlp, mlp_from_url, mlp_via_hub, "
     "small_cnn); did you mean 'mlp_via_hub'?"),
    ("mirror.hub.load('hand/made', 'b')",
     "mirror.errors.DependencyError: entrypoint 'b' of hand/made@abcdef111111 needs "
     "module 'no_such_module_here', which cannot be imported here (hubconf.py declares it "
     "in dependencies); install it into this Python environment"),
    ("mirror.hub.list('hand/broken')",
     "mirror.errors.DependencyError: hand/broken@cccccccccccc needs module 'cv9000', which "
     "cannot be imported here (hubconf.py imports it); install it into this Python "
     "environment"),
    (f"mirror.hub.load('hand/made', 'linear', commit={HAND_A[:8]!r}, pretrained=True)",
     f"mirror.errors.WeightNotInstalledError: weight {MISSING_WEIGHT} (asked for at "
     f"hubconf.py:5) is not installed in {{home}}: no installed bundle packed it. Pack it "
     f"with 'mirror pack hand/made@{HAND_A} --weights {MISSING_WEIGHT} -o X.hub' and "
     f"install that bundle"),
])
def test_errors_say_exactly_what_is_wrong(upstream, offline, call, message):
    got = offline_python(offline, f"import mirror.hub\n{call}\n")
    expected = message.format(c3=upstream.demo.commits["c3"][:12],
                              home=offline["MGE_MIRROR_HOME"])
    assert got == {"error": expected}


def test_not_installed_lists_what_the_store_has(upstream, offline):
    got = offline_python(offline, "import mirror.hub\nmirror.hub.load('demo/tinynets:v2.0', 'mlp')")
    c = upstream.demo.commits
    msg = got["error"]
    assert msg.startswith("mirror.errors.NotInstalledError: demo/tinynets:v2.0 is not installed "
                          f"in {offline['MGE_MIRROR_HOME']}: the store has branch dev -> "
                          f"{c['c4'][:12]} (installed ")
    for part in (f"branch master -> {c['c3'][:12]}", f"tag v1.0 -> {c['c2'][:12]}",
                 f"commit {c['c1'][:12]}",
                 "Pack it on a connected host (mirror pack demo/tinynets:v2.0 -o X.hub) and "
                 "run 'mirror install X.hub' here."):
        assert part in msg


PATCHED = """
import json, megengine.hub as stock
original = stock.load
import mirror
patch = mirror.patch_megengine()
from megengine import hub
m = hub.load("demo/tinynets:v1.0", "mlp", pretrained=True, use_cache=False)
names = hub.list("demo/tinynets:dev", use_cache=False)
patch.undo()
# What stays is the dispatcher under megengine.hub: calls from anything but snapshot
# code go to MegEngine's own function, unchanged.
restored = stock.load.__wrapped__ is original
with mirror.patch_megengine():
    inside = stock.load("demo/tinynets:dev", "mlp", pretrained=True, use_cache=False).revision
print(json.dumps({"rev": m.revision, "list": names, "restored": restored, "inside": inside,
                  "after": stock.load.__wrapped__ is original}))
"""


def test_patch_megengine_serves_unmodified_calls_even_with_use_cache_false(offline):
    got = offline_python(offline, PATCHED)
    assert got == {"rev": "2", "list": ["MLP", "SmallCNN", "mlp", "mlp_from_url", "mlp_via_hub",
                                        "small_cnn"],
                   "restored": True, "inside": "4-dev", "after": True}
    assert not os.path.exists(os.path.join(offline["MGE_HOME"], "hub"))  # nothing fetched


SCRIPT = """
import sys
import megengine.hub

model = megengine.hub.load("demo/tinynets:dev", "small_cnn", pretrained=True, use_cache=False)
print("revision", model.revision, "args", sys.argv[1:])
print("doc", megengine.hub.help("demo/tinynets", "mlp"))
"""


def test_mirror_run_runs_an_unmodified_script_offline(offline, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    r = run(MIRROR + ["run", "--", sys.executable, str(script), "--flag", "x"], env=offline,
            netns=True)
    assert r.returncode == 0, r.stderr
    assert "revision 4-dev args ['--flag', 'x']" in r.stdout
    assert "doc A two-layer perceptron over 8 features (revision 3)." in r.stdout
    # The same script without mirror run has no network and no MegEngine cache: it fails.
    r = run([sys.executable, str(script)], env=offline, netns=True)
    assert r.returncode != 0


def test_a_corrupted_blob_is_detected_at_load(upstream, offline, tmp_path):
    home = str(tmp_path / "store")
    shutil.copytree(offline["MGE_MIRROR_HOME"], home, symlinks=True)
    url = upstream.demo.urls[upstream.demo.commits["c3"]]["mlp"]
    stored = Store(home).weight(url)
    os.chmod(stored.path, 0o644)
    with open(stored.path, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\xff\xfe")
    got = offline_python(dict(offline, MGE_MIRROR_HOME=home),
                         "import mirror.hub\nmirror.hub.load('demo/tinynets', 'mlp', "
                         "pretrained=True)")
    assert got["error"].startswith(f"mirror.errors.IntegrityError: integrity check failed for "
                                   f"{url} ({stored.path}): expected sha256 {stored.sha256}, "
                                   f"got ")


SOURCES = """
import json, os, mirror.hub
out = {"auto-installed": mirror.hub.load("demo/tinynets:dev", "mlp", source="auto").revision}
try:
    mirror.hub.load("other/repo", "x", source="auto")
except mirror.errors.MirrorError as e:
    out["auto-missing"] = "mirror: " + type(e).__name__
except Exception as e:  # megengine.hub answered: it tried the network, which is not there
    out["auto-missing"] = "megengine: " + type(e).__name__
os.environ["MGE_MIRROR_OFFLINE"] = "1"
try:
    mirror.hub.load("other/repo", "x", source="remote")
except mirror.errors.MirrorError as e:
    out["offline-remote"] = type(e).__name__
print(json.dumps(out))
"""


def test_sources_auto_and_offline_mode(offline):
    got = offline_python(offline, SOURCES)
    assert got["auto-installed"] == "4-dev"
    assert got["auto-missing"].startswith("megengine: ")  # fell back to megengine.hub
    assert got["offline-remote"] == "NotInstalledError"  # MGE_MIRROR_OFFLINE=1 wins
