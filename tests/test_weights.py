"""Weight discovery (static, over real source shapes) and download (real HTTP, real faults)."""

import hashlib
import os

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
