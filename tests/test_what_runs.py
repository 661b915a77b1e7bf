"""What runs is what was verified: snapshot code runs only from the source its
install checked (never from bytecode), nothing in the loader's public surface reaches
the network under source="local", and a loader racing 'mirror remove' says so.

Every process below runs with no network (``unshare -n``) and a socket guard that
logs and refuses any ``connect`` or ``getaddrinfo``, so an attempt is seen even
where the namespace would only have made it fail.
"""

import hashlib
import importlib._bootstrap_external as bootstrap
import importlib.machinery
import io
import json
import os
import sys
import textwrap

import megengine
import megengine.module as M
import pytest

from mirror.ids import short
from mirror.store import Store
from tests.conftest import MIRROR, handmade_bundle, run, same_weights, tree_digest

HAND_URL = "http://127.0.0.1:9/w/lin.pkl"
CODE = "c0de" + "0" * 36  # hand/code: the bytecode tests
RACE = "7ace" + "0" * 36  # hand/racing: the remove races

GUARD = """
import os, socket

def _refuse(what):
    def refuse(*args, **kwargs):
        with open(os.environ["NET_LOG"], "a") as fh:
            fh.write(f"{what} {args[1:] if what == 'connect' else args}\\n")
        raise OSError(f"test guard: {what} refused")
    return refuse

socket.socket.connect = socket.socket.connect_ex = _refuse("connect")
socket.getaddrinfo = _refuse("getaddrinfo")
"""

HAND_HUBCONF = f"""
import megengine.module as M
from megengine import hub

import helper

URL = {HAND_URL!r}


@hub.pretrained(URL)
def lin(**kwargs):
    return helper.make()


class Downloading(M.Linear):
    \"\"\"A class whose constructor downloads, as real repos' backbones do.\"\"\"

    def __init__(self):
        super().__init__(2, 2)
        self.load_state_dict(hub.load_serialized_obj_from_url(URL))
"""

HELPER = """
import megengine.module as M

MARK = "genuine"


def make():
    return M.Linear(2, 2)
"""

# What an attacker who can write the store would like to run instead.
EVIL_HELPER = """
import os
open(os.environ["MARKER"], "w").write("ran")
import megengine.module as M
MARK = "evil"


def make():
    return M.Linear(2, 2)
"""

RACING_HUBCONF = f"""
import os

import megengine.module as M
from megengine import hub

if os.environ.get("RACE") == "import":
    import mirror
    mirror.remove("hand/racing")
    import later


@hub.pretrained({HAND_URL!r})
def lin(**kwargs):
    return M.Linear(2, 2)


def remove_then_load():
    import mirror
    mirror.remove("hand/racing")
    return lin(pretrained=True)
"""


@pytest.fixture(scope="module")
def lin_weights() -> bytes:
    buf = io.BytesIO()
    megengine.save(M.Linear(2, 2).state_dict(), buf)
    return buf.getvalue()


def _install(env, *bundles):
    for b in bundles:
        r = run(MIRROR + ["install", "--no-megengine-cache", b], env=env, netns=True)
        assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def surface(all_refs_bundle, lin_weights, tmp_path_factory):
    """A store with the demo repo and hand/surface; env for guarded processes."""
    root = tmp_path_factory.mktemp("surface")
    env = dict(os.environ, MGE_MIRROR_HOME=str(root / "store"), MGE_HOME=str(root / "mge"),
               NET_LOG=str(root / "net.log"))
    hand = handmade_bundle(root / "hand.hub", {
        "5" * 40: {"hubconf.py": HAND_HUBCONF, "helper.py": HELPER}},
        owner="hand", name="surface", refs=[("master", "branch", "5" * 40)],
        weights=[(HAND_URL, lin_weights)])
    _install(env, all_refs_bundle, hand)
    return env


def guarded(env, code: str, *args: str, cmd=None):
    """Run ``code`` guarded, with no network; (JSON it printed last, or None, stderr)."""
    script = textwrap.dedent(GUARD) + textwrap.dedent(code)
    r = run((cmd or []) + [sys.executable, "-c", script, *args], env=env, netns=True)
    out = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    return out, r.stderr


def net_log(env) -> str:
    path = env["NET_LOG"]
    return open(path).read() if os.path.exists(path) else ""


# --- no network from any public function ------------------------------------

SURFACE = """
import json, sys
import numpy as np
import megengine.hub as stock
import mirror, mirror.hub

def state(obj):
    obj = obj.state_dict() if hasattr(obj, "state_dict") else obj
    return {k: np.asarray(v).tolist() for k, v in obj.items()}

DEMO, HAND, URL = "demo/tinynets", "hand/surface", sys.argv[1]
out = {"list": mirror.hub.list(DEMO), "help": mirror.hub.help(DEMO, "mlp")}
out["load mlp"] = state(mirror.hub.load(DEMO, "mlp", pretrained=True))
out["load mlp_from_url"] = state(mirror.hub.load(DEMO, "mlp_from_url"))
out["load mlp_via_hub"] = state(mirror.hub.load(DEMO, "mlp_via_hub"))
out["load small_cnn"] = state(mirror.hub.load(DEMO, "small_cnn", pretrained=True))
m, h = mirror.hub.import_module(DEMO), mirror.hub.import_module(HAND)
out["import mlp"] = state(m.mlp(pretrained=True))
out["import mlp_from_url"] = state(m.mlp_from_url())
out["import mlp_via_hub"] = state(m.mlp_via_hub())
out["import small_cnn"] = state(m.small_cnn(pretrained=True))
out["import lin"] = state(h.lin(pretrained=True))
out["import Downloading"] = state(h.Downloading())
out["url"] = state(mirror.hub.load_serialized_obj_from_url(URL))
with mirror.patch_megengine():
    out["patched list"] = stock.list(DEMO, use_cache=False)
    out["patched help"] = stock.help(DEMO, "mlp")
    out["patched load mlp"] = state(stock.load(DEMO, "mlp", pretrained=True))
    pm, ph = stock.import_module(DEMO), stock.import_module(HAND)
    out["patched import mlp_via_hub"] = state(pm.mlp_via_hub())
    out["patched url"] = state(stock.load_serialized_obj_from_url(URL))
# Modules imported under the patch keep answering from the store after it ends.
out["after mlp"] = state(pm.mlp(pretrained=True))
out["after mlp_from_url"] = state(pm.mlp_from_url())
out["after Downloading"] = state(ph.Downloading())
print(json.dumps(out))
"""


def test_the_whole_loader_surface_stays_offline(upstream, surface, lin_weights):
    out, err = guarded(surface, SURFACE, HAND_URL)
    assert out is not None, err
    assert net_log(surface) == ""
    master = upstream.demo.commits["c3"]
    mlp = upstream.demo.weights[upstream.demo.urls[master]["mlp"]]
    cnn = upstream.demo.weights[upstream.demo.urls[master]["small_cnn"]]
    assert out.pop("list") == out.pop("patched list") == ["MLP", "SmallCNN", "mlp",
                                                          "mlp_from_url", "mlp_via_hub",
                                                          "small_cnn"]
    assert out.pop("help") == out.pop("patched help") == \
        f"A two-layer perceptron over 8 features (revision {upstream.demo.revisions[master]})."
    for key in ("load small_cnn", "import small_cnn"):
        assert same_weights(out.pop(key), cnn), key
    for key in ("import lin", "import Downloading", "url", "patched url", "after Downloading"):
        assert same_weights(out.pop(key), lin_weights), key
    for key, state in out.items():  # every other way to the demo's master MLP
        assert same_weights(state, mlp), key


def test_mirror_run_stays_offline(upstream, surface, lin_weights, tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(GUARD) + textwrap.dedent("""
        import json
        import numpy as np
        import megengine.hub as hub
        m = hub.import_module("hand/surface")
        models = [hub.load("demo/tinynets", "mlp_from_url"), m.lin(pretrained=True),
                  m.Downloading()]
        print(json.dumps([{k: np.asarray(v).tolist() for k, v in x.state_dict().items()}
                          for x in models]))
    """))
    r = run(MIRROR + ["run", "--", sys.executable, str(script)], env=surface, netns=True)
    assert r.returncode == 0, r.stderr
    mlp_state, lin_state, built = json.loads(r.stdout.strip().splitlines()[-1])
    master = upstream.demo.commits["c3"]
    assert same_weights(mlp_state, upstream.demo.weights[upstream.demo.urls[master]["mlp"]])
    assert same_weights(lin_state, lin_weights) and same_weights(built, lin_weights)
    assert net_log(surface) == ""


# --- nothing executable outside verification ---------------------------------


@pytest.fixture
def code_store(lin_weights, tmp_path):
    """A store holding hand/code, whose hubconf imports a sibling module of the
    snapshot and a module from elsewhere (``sitemod``, on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitemod.py").write_text("VALUE = 42\n")
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"), NET_LOG=str(tmp_path / "net.log"),
               MARKER=str(tmp_path / "marker"), PYTHONPATH=str(site))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the interpreter's default: bytecode cached
    hubconf = HAND_HUBCONF.replace("import helper\n", "import helper\nimport sitemod\n")
    bundle = handmade_bundle(tmp_path / "code.hub", {
        CODE: {"hubconf.py": hubconf, "helper.py": HELPER}},
        owner="hand", name="code", refs=[("master", "branch", CODE)],
        weights=[(HAND_URL, lin_weights)])
    _install(env, bundle)
    snapshot = Store(env["MGE_MIRROR_HOME"]).resolve("hand", "code", "master").path
    return env, snapshot, site


LOAD_CODE = """
import json, sys
import mirror.hub
m = mirror.hub.import_module("hand/code")
lin = m.lin(pretrained=True)
print(json.dumps({"mark": m.helper.MARK, "prefix": sys.pycache_prefix,
                  "dont_write": sys.dont_write_bytecode}))
"""


def test_snapshot_code_is_compiled_in_memory_and_other_caching_is_left_alone(code_store):
    env, snapshot, site = code_store
    before = tree_digest(env["MGE_MIRROR_HOME"])
    out, err = guarded(env, LOAD_CODE)
    assert out == {"mark": "genuine", "prefix": None, "dont_write": False}, err
    # Not one byte of the store changed: no __pycache__, no bytecode anywhere in it...
    assert tree_digest(env["MGE_MIRROR_HOME"]) == before
    # ...while a module from elsewhere is cached where the interpreter caches it.
    assert os.listdir(site / "__pycache__") == [f"sitemod.{sys.implementation.cache_tag}.pyc"]
    assert not os.path.exists(env["MARKER"]) and net_log(env) == ""


def _forged_pyc(source_path: str, evil: str) -> bytes:
    """Bytecode of ``evil`` that Python's cache check would accept for ``source_path``
    (its header names the source's mtime and size)."""
    st = os.stat(source_path)
    code = compile(evil, source_path, "exec")
    return bytes(bootstrap._code_to_timestamp_pyc(code, st.st_mtime, st.st_size))


def test_forged_bytecode_is_never_run(code_store):
    env, snapshot, _ = code_store
    source = os.path.join(snapshot, "helper.py")
    forged = _forged_pyc(source, EVIL_HELPER)
    name = f"helper.{sys.implementation.cache_tag}.pyc"
    # Where Python would look: beside the source, and where earlier mirrors cached it.
    for folder in (os.path.join(snapshot, "__pycache__"),
                   os.path.join(env["MGE_MIRROR_HOME"], "pycache", snapshot.lstrip(os.sep))):
        os.makedirs(folder)
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(forged)
    out, err = guarded(env, LOAD_CODE)
    assert out == {"mark": "genuine", "prefix": None, "dont_write": False}, err
    assert not os.path.exists(env["MARKER"])


@pytest.mark.parametrize("change", ["edited", "replaced by a package", "hubconf edited"])
def test_changed_source_is_refused_before_it_runs(code_store, change):
    env, snapshot, _ = code_store
    if change == "replaced by a package":
        os.unlink(os.path.join(snapshot, "helper.py"))
        os.mkdir(os.path.join(snapshot, "helper"))
        path = os.path.join(snapshot, "helper", "__init__.py")
    else:
        path = os.path.join(snapshot, "hubconf.py" if change == "hubconf edited" else "helper.py")
        os.unlink(path)  # a hard link into blobs/: unlink, so only the snapshot's copy changes
    evil = EVIL_HELPER + ("\nfrom megengine import hub\nlin = make\n"
                          if change == "hubconf edited" else "")
    with open(path, "w") as fh:
        fh.write(evil)
    out, err = guarded(env, LOAD_CODE)
    assert out is None
    if change == "replaced by a package":
        reason = "is not a file of the snapshot as installed"
    else:
        installed = HAND_HUBCONF.replace("import helper\n", "import helper\nimport sitemod\n") \
            if change == "hubconf edited" else HELPER
        reason = (f"has sha256 {hashlib.sha256(evil.encode()).hexdigest()}, installed as "
                  f"{hashlib.sha256(installed.encode()).hexdigest()}")
    assert err.strip().splitlines()[-1] == (
        f"mirror.errors.CodeIntegrityError: hand/code@{short(CODE)}: {path} {reason}; it was "
        f"not run. Run 'mirror verify' and reinstall the bundle that brought it with --force")
    assert not os.path.exists(env["MARKER"])


def test_native_code_in_a_snapshot_is_refused(lin_weights, tmp_path):
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"), NET_LOG=str(tmp_path / "n"))
    ext = f"fast{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    bundle = handmade_bundle(tmp_path / "native.hub", {
        CODE: {"hubconf.py": "import fast\n", ext: "not really a shared object"}},
        owner="hand", name="native", refs=[("master", "branch", CODE)])
    _install(env, bundle)
    snapshot = Store(env["MGE_MIRROR_HOME"]).resolve("hand", "native", "master").path
    out, err = guarded(env, "import mirror.hub\nmirror.hub.list('hand/native')\n")
    assert out is None
    assert err.strip().splitlines()[-1] == (
        f"mirror.errors.CodeIntegrityError: hand/native@{short(CODE)}: "
        f"{os.path.join(snapshot, ext)} is not Python source; only .py source of a snapshot "
        f"is run; it was not run. Run 'mirror verify' and reinstall the bundle that brought "
        f"it with --force")


# --- a loader racing 'mirror remove' ---------------------------------------------


@pytest.fixture
def racing(lin_weights, tmp_path):
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"), NET_LOG=str(tmp_path / "net.log"))
    bundle = handmade_bundle(tmp_path / "racing.hub", {
        RACE: {"hubconf.py": RACING_HUBCONF, "later.py": "VALUE = 1\n"}},
        owner="hand", name="racing", refs=[("master", "branch", RACE)],
        weights=[(HAND_URL, lin_weights)])
    _install(env, bundle)
    return env, Store(env["MGE_MIRROR_HOME"]).resolve("hand", "racing", "master").path


@pytest.mark.parametrize("race", ["import", "weights"])
def test_a_loader_racing_remove_says_what_happened(racing, race):
    env, snapshot = racing
    env = dict(env, RACE=race)
    call = "mirror.hub.list('hand/racing')" if race == "import" else \
        "mirror.hub.load('hand/racing', 'remove_then_load')"
    out, err = guarded(env, f"import mirror.hub\n{call}\n")
    assert out is None
    assert err.strip().splitlines()[-1] == (
        f"mirror.errors.SnapshotRemovedError: hand/racing@{short(RACE)} was removed from the "
        f"store while it was being loaded ({snapshot} is gone); install its bundle again, or "
        f"load another revision")
    assert not os.path.exists(snapshot) and net_log(env) == ""


def test_gc_drops_the_bytecode_earlier_mirrors_cached(code_store):
    env, snapshot, _ = code_store
    legacy = os.path.join(env["MGE_MIRROR_HOME"], "pycache", snapshot.lstrip(os.sep))
    os.makedirs(legacy)
    with open(os.path.join(legacy, f"helper.{sys.implementation.cache_tag}.pyc"), "wb") as fh:
        fh.write(_forged_pyc(os.path.join(snapshot, "helper.py"), EVIL_HELPER))
    r = run(MIRROR + ["gc"], env=env, netns=True)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(env["MGE_MIRROR_HOME"], "pycache"))
    assert os.path.exists(os.path.join(snapshot, "helper.py"))


# --- imports that happen late, and other ways around the check ---------------------

LAZY = "1a2e" + "0" * 36
LAZY_HUBCONF = """
import os
import sys

import sitelib  # a library from elsewhere, decorated with hub.pretrained meanwhile

sys.path.insert(0, os.path.dirname(__file__))  # as many hub repos do


def lazy_entry():
    import lazy  # imported when the factory runs, long after hubconf.py
    return lazy.VALUE


def ns_entry():
    import ns.mod  # a folder without __init__.py: a namespace package
    return ns.mod.VALUE


def same_object():
    import megengine.hub
    import megengine.hub.hub
    return megengine.hub.load is megengine.hub.hub.load
"""
SITELIB = f"""
from megengine import hub


@hub.pretrained({HAND_URL!r})
def net(**kwargs):
    return None
"""


@pytest.fixture
def lazy_store(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitelib.py").write_text(SITELIB)
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"), NET_LOG=str(tmp_path / "net.log"),
               MARKER=str(tmp_path / "marker"), PYTHONPATH=str(site))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    bundle = handmade_bundle(tmp_path / "lazy.hub", {LAZY: {
        "hubconf.py": LAZY_HUBCONF, "lazy.py": "VALUE = 'genuine lazy'\n",
        "other.py": "VALUE = 'other'\n", "ns/mod.py": "VALUE = 'genuine ns'\n"}},
        owner="hand", name="lazy", refs=[("master", "branch", LAZY)])
    _install(env, bundle)
    return env, Store(env["MGE_MIRROR_HOME"]).resolve("hand", "lazy", "master").path


LOAD_LAZY = """
import json, pickle
import megengine.hub
import mirror.hub, sitelib
out = {e: mirror.hub.load("hand/lazy", e) for e in ("lazy_entry", "ns_entry", "same_object")}
out["pickles"] = pickle.loads(pickle.dumps(megengine.hub.load)) is megengine.hub.load
# a library's factory decorated while hubconf ran keeps MegEngine's own wrapper
out["sitelib"] = sitelib.net.__code__.co_filename.endswith("megengine/hub/hub.py")
print(json.dumps(out))
"""


def test_late_imports_run_checked_source_and_write_no_bytecode(lazy_store):
    env, snapshot = lazy_store
    before = tree_digest(env["MGE_MIRROR_HOME"])
    out, err = guarded(env, LOAD_LAZY)
    assert out == {"lazy_entry": "genuine lazy", "ns_entry": "genuine ns", "same_object": True,
                   "pickles": True, "sitelib": True}, err
    assert tree_digest(env["MGE_MIRROR_HOME"]) == before
    with open(os.path.join(snapshot, "lazy.py"), "w") as fh:  # lazy.py is a hard link: the
        fh.write(EVIL_HELPER + "VALUE = 'evil'\n")  # blob changes too; this loader must see it
    out, err = guarded(env, LOAD_LAZY)
    assert out is None and "CodeIntegrityError: hand/lazy@1a2e00000000: " \
        f"{os.path.join(snapshot, 'lazy.py')} has sha256" in err.strip().splitlines()[-1]
    assert not os.path.exists(env["MARKER"])


@pytest.mark.parametrize("attack", ["bytecode package", "symlink"])
def test_what_the_record_does_not_hold_never_runs(lazy_store, attack):
    env, snapshot = lazy_store
    if attack == "bytecode package":  # makes ns/ a package run from bytecode
        path = os.path.join(snapshot, "ns", f"__init__{importlib.machinery.BYTECODE_SUFFIXES[0]}")
        with open(path, "wb") as fh:
            fh.write(_forged_pyc(os.path.join(snapshot, "ns", "mod.py"), EVIL_HELPER))
        reason = "is not Python source; only .py source of a snapshot is run"
    else:  # lazy.py made a link to another file of the snapshot, each file intact
        path = os.path.join(snapshot, "lazy.py")
        os.unlink(path)
        os.symlink("other.py", path)
        reason = "goes through lazy.py, a symlink the snapshot as installed does not hold"
    out, err = guarded(env, LOAD_LAZY)
    assert out is None
    assert err.strip().splitlines()[-1] == (
        f"mirror.errors.CodeIntegrityError: hand/lazy@{short(LAZY)}: {path} {reason}; it was "
        f"not run. Run 'mirror verify' and reinstall the bundle that brought it with --force")
    assert not os.path.exists(env["MARKER"])


def test_a_hubconf_that_takes_its_folder_off_sys_path_loads(tmp_path):
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"), NET_LOG=str(tmp_path / "n"))
    bundle = handmade_bundle(tmp_path / "drop.hub", {LAZY: {"hubconf.py": (
        "import os, sys\nsys.path.remove(os.path.dirname(__file__))\n\n"
        "def entry():\n    return 'loaded'\n")}},
        owner="hand", name="drop", refs=[("master", "branch", LAZY)])
    _install(env, bundle)
    out, err = guarded(env, "import json, sys, mirror.hub\n"
                            "print(json.dumps([mirror.hub.load('hand/drop', 'entry'), "
                            "len(sys.meta_path)]))\n")
    assert out is not None and out[0] == "loaded", err
