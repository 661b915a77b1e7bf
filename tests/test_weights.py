"""Weight discovery (static, over real source shapes) and download (real HTTP, real faults)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from mirror.discovery import Entrypoint, coverage, discover
from mirror.download import download
from mirror.errors import DownloadError
from mirror.git import TreeFile
from mirror.model import MODE_FILE


def _src(path, text):
    return TreeFile(path, MODE_FILE, text.encode())


def test_discovers_every_url_shape_real_hub_repos_use():
    hubconf = '''
from megengine import hub
import megengine
from megengine.hub import pretrained

BASE = "https://data.example/models/"
VERSION = "v2"
URLS = {"a": BASE + "a.pkl", "b": f"{BASE}b_{VERSION}.pkl"}

@hub.pretrained(
    "https://data.example/models/weights/"
    "resnet18_naiveaug_70312_78a63ca6.pkl"
)
def resnet18(**kwargs): ...

@pretrained(BASE + "plus.pkl")
def plus(**kwargs): ...

@megengine.hub.pretrained("{}fmt_{}.model".format(BASE, VERSION))
def fmt(**kwargs): ...

@hub.pretrained("%spct.pkl" % BASE)
def pct(**kwargs): ...

@hub.pretrained(URLS["a"])
def a(**kwargs): ...

@hub.pretrained(url=URLS["b"])
def b(**kwargs): ...

def direct():
    return hub.load_serialized_obj_from_url(BASE + "direct.pkl")

def dynamic(name):
    return hub.load_serialized_obj_from_url(BASE + name)
'''
    weights, unresolved = discover([_src("hubconf.py", hubconf), _src("README.md", "x(")])
    assert [w.url for w in weights] == sorted([
        "https://data.example/models/weights/resnet18_naiveaug_70312_78a63ca6.pkl",
        "https://data.example/models/plus.pkl",
        "https://data.example/models/fmt_v2.model",
        "https://data.example/models/pct.pkl",
        "https://data.example/models/a.pkl",
        "https://data.example/models/b_v2.pkl",
        "https://data.example/models/direct.pkl",
    ])
    first = next(w for w in weights if w.url.endswith("78a63ca6.pkl"))
    assert [str(loc) for loc in first.locations] == ["hubconf.py:10"]
    assert [str(u) for u in unresolved] == ["hubconf.py:35: BASE + name"]


def test_same_url_in_two_files_is_one_weight_with_both_locations():
    code = 'from megengine import hub\n@hub.pretrained("http://h/w.pkl")\ndef f(): ...\n'
    weights, _ = discover([_src("a.py", code), _src("pkg/b.py", "\n" + code)])
    assert len(weights) == 1
    assert [str(x) for x in weights[0].locations] == ["a.py:2", "pkg/b.py:3"]


def test_entrypoints_a_hubconf_imports_from_its_package_tree_are_found_with_their_weights():
    # megengine/models' shape: hubconf.py only imports, from a deep package tree,
    # through packages that re-export; the decorators are where the functions are.
    hubconf = '''
from megengine import hub
import official.vision.classification.resnet.model as R
from functools import partial
from official.vision.classification import resnet18, ResNet
from official.vision.classification.resnet.model import resnet50 as r50
from official.vision.detection.models import *
from official.loops import looped
from official.quantization import constant

def _helper(): ...
def __dunder(): ...
class Local: ...
mobilenet = partial(resnet18)  # callable, but only known by running it
'''
    model = '''
from megengine import hub
BASE = "https://data.example/models/"

class ResNet:
    def __init__(self, pretrained=False):
        if pretrained:  # a constructor that downloads
            hub.load_serialized_obj_from_url(BASE + "backbone.pkl")

@hub.pretrained(
    "https://data.example/models/weights/"
    "resnet18_naiveaug_70312_78a63ca6.pkl"
)
def resnet18(**kwargs): ...

@hub.pretrained(url=BASE + "resnet50.pkl")
def resnet50(url=None, **kwargs):
    return hub.load_serialized_obj_from_url(url)  # its own parameter: not the module's
'''
    detection = '''
from megengine import hub
__all__ = ["retinanet", "FCOS"]
class FCOS: ...
@hub.pretrained("https://data.example/models/retinanet.pkl")
def retinanet(**kwargs): ...
def unlisted(): ...
'''
    files = [_src("hubconf.py", hubconf), _src("official/__init__.py", ""),
             _src("official/vision/__init__.py", ""),
             _src("official/vision/classification/__init__.py",
                  "from .resnet.model import resnet18, ResNet\n"),
             _src("official/vision/classification/resnet/__init__.py", ""),
             _src("official/vision/classification/resnet/model.py", model),
             _src("official/vision/detection/models.py", detection),
             _src("official/loops.py", "from official.loops2 import looped\n"),
             _src("official/loops2.py", "from official.loops import looped\n"),
             _src("official/quantization.py", "constant = 3\n")]
    model_py = "official/vision/classification/resnet/model.py"
    assert coverage(files) == {
        # MegEngine's rule: every callable not named __*, classes included
        "FCOS": Entrypoint("official/vision/detection/models.py", ()),
        "Local": Entrypoint("hubconf.py", ()),
        "ResNet": Entrypoint(model_py, ("https://data.example/models/backbone.pkl",)),
        "_helper": Entrypoint("hubconf.py", ()),
        "r50": Entrypoint(model_py, ("https://data.example/models/resnet50.pkl",)),
        "resnet18": Entrypoint(model_py, (
            "https://data.example/models/weights/resnet18_naiveaug_70312_78a63ca6.pkl",)),
        "retinanet": Entrypoint("official/vision/detection/models.py",
                                ("https://data.example/models/retinanet.pkl",)),
    }
    # Not listed: modules (R, hub), a constant, a cycle, and what only running tells
    # (partial from outside the repo, mobilenet made by assignment).


def test_a_name_hubconf_binds_again_is_what_it_was_bound_to_last():
    hubconf = ("from models import a, b\n"
               "a = 3\n"  # no longer the function
               "def b(): ...\n")  # its own, and its own weights: none
    models = ('from megengine import hub\n@hub.pretrained("https://h/a.pkl")\ndef a(): ...\n'
              '@hub.pretrained("https://h/b.pkl")\ndef b(): ...\n')
    assert coverage([_src("hubconf.py", hubconf), _src("models.py", models)]) == {
        "b": Entrypoint("hubconf.py", ())}


# Layouts where a name hubconf binds is not, or may not be, a function or class it can
# see without running the code (found by attacking the static reading): never
# claimed. With what the static reading says instead.
NEVER_CLAIMED = {
    "del": ({"hubconf.py": "def f(): ...\ndel f\n"}, []),
    "except as": ({"hubconf.py": "def f(): ...\ntry:\n    1 / 0\n"
                                 "except ZeroDivisionError as f:\n    pass\n"}, []),
    "match capture": ({"hubconf.py": "def f(): ...\nmatch 1:\n    case f:\n        pass\n"},
                      []),
    "global in a function": ({"hubconf.py": "def f(): ...\ndef _r():\n    global f\n"
                                            "    f = None\n_r()\n"}, ["_r"]),
    "globals()": ({"hubconf.py": "def f(): ...\nglobals()['f'] = None\n"}, []),
    "globals().update": ({"hubconf.py": "def f(): ...\nglobals().update(f=None)\n"}, []),
    "globals() only read": ({"hubconf.py": "def f(): ...\ndef get(n):\n"
                                           "    return globals()[n]\n"}, ["f", "get"]),
    "a decorator other than pretrained": (
        {"hubconf.py": "def register(fn):\n    pass\n@register\ndef f(): ...\n"},
        ["register"]),
    "* from outside the repo": ({"hubconf.py": "def e(): ...\nfrom math import *\n"}, []),
    "* of a constant over it": ({"hubconf.py": "def f(): ...\nfrom other import *\n",
                                 "other.py": "f = 3\n"}, []),
    "__all__ grown": ({"hubconf.py": "from m import *\n",
                       "m.py": "__all__ = ['a']\n__all__ += ['b']\n"
                               "def a(): ...\ndef b(): ...\ndef c(): ...\n"}, ["a", "b"]),
    "__all__ changed": ({"hubconf.py": "from m import *\n",
                         "m.py": "__all__ = ['a']\n__all__.append('c')\n"
                                 "def a(): ...\ndef b(): ...\ndef c(): ...\n"}, []),
    "a package before a module": ({"hubconf.py": "from m import f\n",
                                   "m.py": "def f(): ...\n", "m/__init__.py": "f = 1\n"},
                                  []),
    "a submodule over its package's function": (
        {"hubconf.py": "from pkg import resnet\n",
         "pkg/__init__.py": "def resnet(): ...\nfrom .resnet import helper\n",
         "pkg/resnet.py": "def helper(): ...\n"}, []),
    "a function from its own submodule": (
        {"hubconf.py": "from pkg import resnet\n",
         "pkg/__init__.py": "from .resnet import resnet\n",
         "pkg/resnet.py": "def resnet(): ...\n"}, ["resnet"]),
    "relative, in hubconf": ({"hubconf.py": "from .models import f\n",
                              "models.py": "def f(): ...\n"}, None),
    "relative, above the top": ({"hubconf.py": "from models.a import f\n",
                                 "models/__init__.py": "", "models/a.py": "from ..x import f\n",
                                 "x.py": "def f(): ...\n"}, None),
}

PYTHON_LISTS = """
import importlib.util, json, sys
out = {}
for case, root in json.loads(sys.argv[1]).items():
    sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location("hubconf.py", root + "/hubconf.py")
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        out[case] = sorted(n for n in dir(m) if not n.startswith("__") and callable(getattr(m, n)))
    except Exception as e:
        out[case] = None
    sys.path.remove(root)
    for name in [n for n in sys.modules if n in ("m", "other", "pkg", "models", "x")
                 or n.startswith(("pkg.", "models."))]:
        del sys.modules[name]
print(json.dumps(out))
"""


def test_what_is_not_known_without_running_the_code_is_never_claimed(tmp_path):
    roots = {}
    for i, (case, (files, _)) in enumerate(NEVER_CLAIMED.items()):
        roots[case] = str(tmp_path / str(i))
        for path, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(roots[case], path)), exist_ok=True)
            with open(os.path.join(roots[case], path), "w") as fh:
                fh.write(text)
    listed = json.loads(subprocess.run([sys.executable, "-c", PYTHON_LISTS, json.dumps(roots)],
                                       capture_output=True, text=True, check=True).stdout)
    for case, (files, expected) in NEVER_CLAIMED.items():
        static = coverage([_src(p, t) for p, t in files.items()])
        assert sorted(static) == (expected or []), case
        if listed[case] is None:  # Python cannot import it: no hub.list either
            assert expected is None, case
        else:
            assert set(static) <= set(listed[case]), case


@pytest.mark.parametrize("code", [
    # a class body is a scope of its own: its URL, not the module's, is the decorator's
    "URL = 'https://module/x.pkl'\nclass Net:\n    URL = 'https://class/y.pkl'\n"
    "    @hub.pretrained(URL)\n    def load(self): ...\n",
    # a name a function imports is its own, not the module's constant
    "URL = 'https://module/x.pkl'\ndef Net():\n    from other import URL\n"
    "    return hub.load_serialized_obj_from_url(URL)\n",
    "URL = 'https://module/x.pkl'\ndef Net():\n    try:\n        pass\n"
    "    except Exception as URL:\n        return hub.load_serialized_obj_from_url(URL)\n",
])
def test_a_url_is_never_taken_from_the_wrong_scope(code):
    files = [_src("hubconf.py", "from megengine import hub\n" + code),
             _src("other.py", "URL = 'https://other/z.pkl'\n")]
    assert coverage(files) == {"Net": Entrypoint("hubconf.py", ())}
    assert "https://module/x.pkl" not in [w.url for w in discover(files)[0]]


def test_deep_import_chains_and_expressions_end_without_an_error():
    chain = [_src(f"m{i}.py", f"from m{i + 1} import f\n") for i in range(400)]
    chain.append(_src("m400.py", "def f(): ...\n"))
    deep = ("def g():\n    return hub.load_serialized_obj_from_url("
            + "+".join(["'a'"] * 3000) + ")\n")
    files = [_src("hubconf.py", "from megengine import hub\nfrom m0 import f\n" + deep)] + chain
    assert sorted(coverage(files)) == ["g"]  # f: deeper than followed (Python fails too)
    weights, unresolved = discover(files)
    # said, so the pack fails unless told otherwise: never a file silently passed over
    assert (weights, [str(u) for u in unresolved]) == (
        [], ["hubconf.py:1: (nested too deeply to read)"])


@pytest.mark.parametrize("files, urls, unresolved", [
    # a list or dict that code changes in place, here or in another module: not known
    ({"m.py": "URLS = ['https://x/a']\nURLS[0] = 'https://y/a'\n@hub.pretrained(URLS[0])\n"
              "def f(): ...\n"}, [], ["m.py:4: URLS[0]"]),
    ({"m.py": "URLS = {'a': 'https://x/a'}\n@hub.pretrained(URLS['a'])\ndef f(): ...\n",
      "n.py": "from m import URLS\nURLS.update(a='https://y/a')\n"}, [], ["m.py:3: URLS['a']"]),
    # __all__ grown at the top level is still known; a * from it binds only what it lists
    ({"m.py": "BASE = 'https://x/'\nfrom consts import *\n@hub.pretrained(BASE + 'r.pkl')\n"
              "def f(): ...\n",
      "consts.py": "__all__ = ['A']\n__all__ += ['B']\nA = B = 1\nBASE = 'https://other/'\n"},
     ["https://x/r.pkl"], []),
    # globals() only read (a registry lookup, megengine/models' __all__) changes nothing
    ({"m.py": "BASE = 'https://x/'\n__all__ = [k for k in globals() if not k.startswith('_')]\n"
              "@hub.pretrained(BASE + 'r.pkl')\ndef f(): ...\n"}, ["https://x/r.pkl"], []),
    # a method sees the module's names, not its class body's
    ({"m.py": "URLS = {'r': 'https://x/r.pkl'}\nclass Net:\n    URLS = URLS\n"
              "    def load(self):\n        return hub.load_serialized_obj_from_url(URLS['r'])\n"},
     ["https://x/r.pkl"], []),
    # a * from outside the repo is taken to bind none of the repo's constant names
    ({"m.py": "from const import BASE\nfrom megengine.module import *\n"
              "@hub.pretrained(BASE + 'r.pkl')\ndef f(): ...\n",
      "const.py": "BASE = 'https://x/'\n"}, ["https://x/r.pkl"], []),
])
def test_constants_are_known_only_where_python_would_give_them(files, urls, unresolved):
    weights, missed = discover([_src(p, "from megengine import hub\n" * (p == "m.py") + t)
                                for p, t in files.items()])
    assert ([w.url for w in weights], [str(u) for u in missed]) == (urls, unresolved)


@pytest.fixture()
def served(upstream):
    data = os.urandom(3 << 20)  # 3 MiB: several chunks, so a drop lands mid-body
    url = upstream.weights.add("faults/blob.pkl", data)
    yield url, data
    upstream.weights.fault("faults/blob.pkl", None)


def test_download_verifies_size_and_digest(served, tmp_path):
    url, data = served
    got = download(url, str(tmp_path / "w"), progress=False)
    assert (got.size, got.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / "w").read_bytes() == data
    assert not (tmp_path / "w.part").exists()


def test_download_resumes_after_a_dropped_connection(upstream, served, tmp_path):
    url, data = served
    upstream.weights.fault("faults/blob.pkl", "drop", times=1)
    before = upstream.weights.range_requests
    got = download(url, str(tmp_path / "w"), progress=False)
    assert (tmp_path / "w").read_bytes() == data
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert upstream.weights.range_requests == before + 1  # only the rest was fetched


def test_download_retries_server_errors(upstream, served, tmp_path):
    url, data = served
    upstream.weights.fault("faults/blob.pkl", "500", times=2)
    assert download(url, str(tmp_path / "w"), progress=False).size == len(data)


def test_download_survives_a_slow_body(upstream, tmp_path):
    data = os.urandom(64 << 10)
    url = upstream.weights.add("faults/slow.pkl", data)
    upstream.weights.fault("faults/slow.pkl", "slow")
    try:
        assert download(url, str(tmp_path / "w"), progress=False).size == len(data)
    finally:
        upstream.weights.fault("faults/slow.pkl", None)


def test_missing_file_is_a_clear_error_and_leaves_nothing(upstream, tmp_path):
    url = upstream.weights.url("faults/nope.pkl")
    with pytest.raises(DownloadError) as e:
        download(url, str(tmp_path / "w"), progress=False)
    assert str(e.value) == (f"download failed: {url}: not there, or not public: check the "
                            f"URL (or where --rewrite points it) (HTTP 404 Not Found)")
    assert os.listdir(tmp_path) == []


def test_persistent_server_error_gives_up_with_the_url(upstream, served, tmp_path):
    url, _ = served
    upstream.weights.fault("faults/blob.pkl", "500")
    with pytest.raises(DownloadError) as e:
        download(url, str(tmp_path / "w"), progress=False, retries=1)
    assert url in str(e.value) and "HTTP 500" in str(e.value) and "2 attempts" in str(e.value)


@pytest.mark.parametrize("url, message", [
    ("gs://bucket/w.pkl", "unsupported URL scheme 'gs'"),
    ("weights/w.pkl", "unsupported URL scheme '(none)'"),
    ("/no/such/file.pkl", "No such file or directory"),
    ("http://127.0.0.1:abc/w.pkl", "invalid URL"),
])
def test_urls_that_cannot_be_downloaded_fail_at_once(url, message, tmp_path):
    with pytest.raises(DownloadError) as e:
        download(url, str(tmp_path / "w"), progress=False)
    assert str(e.value).startswith(f"download failed: {url}: {message}")


@pytest.mark.parametrize("form", ["uri", "path"])
def test_file_urls_and_local_paths_are_copied_and_hashed(tmp_path, form):
    src = tmp_path / "src.pkl"
    src.write_bytes(b"weights")
    url = src.as_uri() if form == "uri" else str(src)
    got = download(url, str(tmp_path / "w"), progress=False)
    assert (got.size, got.sha256) == (7, hashlib.sha256(b"weights").hexdigest())
    assert (tmp_path / "w").read_bytes() == b"weights"


def test_expressions_that_raise_are_reported_not_crashed_on():
    code = ('from megengine import hub\nX = 1 % 0\nY = "{0.real}".format("a")\n'
            'Z = "http://h/" + "a" * 10\n'
            '@hub.pretrained(X)\ndef f(): ...\n@hub.pretrained(Y)\ndef g(): ...\n'
            '@hub.pretrained(Z)\ndef h(): ...\n')
    weights, unresolved = discover([_src("hubconf.py", code)])
    assert [w.url for w in weights] == []  # "a" * 10 is not one of the supported forms
    assert [str(u) for u in unresolved] == ["hubconf.py:5: X", "hubconf.py:7: Y",
                                            "hubconf.py:9: Z"]


def test_constants_imported_from_other_modules_of_the_repo():
    files = [
        _src("models/const.py", 'HOST = "https://data.example"\nBASE = HOST + "/w/"\n'),
        _src("models/__init__.py", ""),
        _src("models/nets/__init__.py", ""),
        _src("models/nets/resnet.py",
             "from megengine import hub\nfrom ..const import BASE\n\n"
             "@hub.pretrained(BASE + 'resnet.pkl')\ndef resnet(**kw): ...\n"),
        _src("hubconf.py",
             "from megengine import hub\nimport models.const as c\n"
             "from models.const import BASE as ROOT\nfrom models.nets.resnet import resnet\n\n"
             "@hub.pretrained(c.HOST + '/alias.pkl')\ndef alias(**kw): ...\n\n"
             "@hub.pretrained(ROOT + 'renamed.pkl')\ndef renamed(**kw): ...\n"),
        _src("cycle_a.py", "from cycle_b import B\nA = 'x'\n"),
        _src("cycle_b.py", "from cycle_a import A\nB = 'y'\n"),
    ]
    weights, unresolved = discover(files)
    assert {w.url: [str(x) for x in w.locations] for w in weights} == {
        "https://data.example/alias.pkl": ["hubconf.py:6"],
        "https://data.example/w/renamed.pkl": ["hubconf.py:9"],
        "https://data.example/w/resnet.pkl": ["models/nets/resnet.py:4"],
    }
    assert unresolved == []


def test_names_rebound_in_ways_not_followed_are_unknown_never_stale():
    code = '''
from megengine import hub
A = "https://h/a/"
A += "v2/"
B = "https://h/b/"
if True:
    B = "https://h/other/"
C, D = "https://h/c/", "x"
E = "https://h/e/"

@hub.pretrained(A + "1.pkl")
def a(**kw): ...

@hub.pretrained(B + "2.pkl")
def b(**kw): ...

@hub.pretrained(C + "3.pkl")
def c(**kw): ...

def d(E="https://h/param/"):
    return hub.load_serialized_obj_from_url(E + "4.pkl")

@hub.pretrained(E + "5.pkl")
def e(E=None): ...
'''
    weights, unresolved = discover([_src("hubconf.py", code)])
    assert [w.url for w in weights] == ["https://h/e/5.pkl"]  # the decorator is outside e
    assert [str(u) for u in unresolved] == [
        "hubconf.py:11: A + '1.pkl'", "hubconf.py:14: B + '2.pkl'",
        "hubconf.py:17: C + '3.pkl'", "hubconf.py:21: E + '4.pkl'"]
