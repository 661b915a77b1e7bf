"""mirror.hub answers MegEngine Hub's calls from the store, in this process."""

import io
import os

import megengine
import numpy as np
import pytest

import mirror.hub
from mirror.errors import EntrypointNotFoundError, IntegrityError, NotInstalledError
from mirror.installer import install
from mirror.store import Store
from tests.conftest import ENTRYPOINTS


@pytest.fixture()
def installed(all_refs_bundle, home, upstream):
    install(all_refs_bundle)
    hits = dict(upstream.weights.hits)
    yield home
    # Every weight came from the store: the weight server saw no request, and
    # MegEngine's own download cache was never written.
    assert upstream.weights.hits == hits
    assert not os.path.exists(os.path.join(os.environ["MGE_HOME"], "serialized"))


def assert_weights_equal(model, served: bytes):
    expected = megengine.load(io.BytesIO(served))
    got = {k: np.asarray(v) for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


@pytest.mark.parametrize("repo_info, commit_label, kwargs", [
    ("demo/tinynets", "c3", {}),
    ("demo/tinynets:master", "c3", {}),
    ("demo/tinynets:dev", "c4", {}),
    ("demo/tinynets:v1.0", "c2", {}),
    ("demo/tinynets", "c1", {"commit": "c1"}),
    ("demo/tinynets:dev", "c1", {"commit": "c1"}),  # commit= wins over the ref, as in MegEngine
])
@pytest.mark.parametrize("entry", ["mlp", "small_cnn", "mlp_from_url"])
def test_load_gives_that_revisions_code_and_exact_weights(upstream, installed, repo_info,
                                                          commit_label, kwargs, entry):
    commit = upstream.demo.commits[commit_label]
    if "commit" in kwargs:
        kwargs = {"commit": commit[:9]}
    model = mirror.hub.load(repo_info, entry, pretrained=True, source="local", **kwargs)
    assert model.revision == upstream.demo.revisions[commit]
    assert model.labels == ["cat", "dog", "bird", "fish"]  # read from a non-Python file
    # mlp_from_url calls megengine.hub.load_serialized_obj_from_url itself, for mlp's file.
    url = upstream.demo.urls[commit][entry.replace("_from_url", "")]
    assert_weights_equal(model, upstream.demo.weights[url])


def test_two_commits_side_by_side_keep_their_own_code(upstream, installed):
    master = mirror.hub.load("demo/tinynets", "mlp", source="local")
    dev = mirror.hub.load("demo/tinynets:dev", "mlp", source="local")
    assert (master.revision, dev.revision) == ("3", "4-dev")


def test_without_pretrained_no_weights_are_read(upstream, installed):
    model = mirror.hub.load("demo/tinynets", "mlp", source="local", pretrained=False)
    served = megengine.load(io.BytesIO(upstream.demo.weights[
        upstream.demo.urls[upstream.demo.commits["c3"]]["mlp"]]))
    assert not np.array_equal(model.fc1.weight.numpy(), served["fc1.weight"])


def test_list_and_help(installed):
    # MegEngine's rule: every callable not starting with "__", classes included.
    assert mirror.hub.list("demo/tinynets", source="local") == ENTRYPOINTS
    # What pack recorded without running hubconf (mirror list --long shows it) is the
    # same: hubconf imports MLP and SmallCNN from the repo's package.
    snapshots = [s for r in Store(installed).repos() for s in r.snapshots]
    assert len(snapshots) == 4 and all(list(s.entrypoints) == ENTRYPOINTS for s in snapshots)
    assert mirror.hub.help("demo/tinynets:v1.0", "mlp", source="local") == (
        "A two-layer perceptron over 8 features (revision 2).")


def test_output_on_a_fixed_input_matches_the_served_weights(upstream, installed):
    model = mirror.hub.load("demo/tinynets", "mlp", pretrained=True, source="local")
    model.eval()
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    w = megengine.load(io.BytesIO(upstream.demo.weights[
        upstream.demo.urls[upstream.demo.commits["c3"]]["mlp"]]))
    h = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
    expected = h @ w["fc2.weight"].T + w["fc2.bias"]
    np.testing.assert_allclose(model(megengine.tensor(x)).numpy(), expected, rtol=1e-5)


def test_not_installed_names_the_repo_and_what_the_store_has(upstream, installed):
    with pytest.raises(NotInstalledError) as e:
        mirror.hub.load("demo/tinynets:feature", "mlp", source="local")
    msg = str(e.value)
    assert msg.startswith("demo/tinynets:feature is not installed in ")
    assert f"branch dev -> {upstream.demo.commits['c4'][:12]}" in msg
    assert "mirror pack demo/tinynets:feature" in msg
    with pytest.raises(NotInstalledError) as e:
        mirror.hub.load("other/repo", "mlp", source="local")
    assert "the store has nothing for other/repo" in str(e.value)


def test_unknown_entrypoint_suggests_the_closest(installed):
    with pytest.raises(EntrypointNotFoundError) as e:
        mirror.hub.load("demo/tinynets", "smal_cnn", source="local")
    assert f"it has: {', '.join(ENTRYPOINTS)}" in str(e.value)
    assert str(e.value).endswith("did you mean 'small_cnn'?")


def test_a_tampered_weight_is_never_loaded(upstream, installed):
    url = upstream.demo.urls[upstream.demo.commits["c2"]]["mlp"]
    stored = Store().weight(url)
    os.chmod(stored.path, 0o644)
    with open(stored.path, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError) as e:
        mirror.hub.load("demo/tinynets:v1.0", "mlp", pretrained=True, source="local")
    assert url in str(e.value) and stored.sha256 in str(e.value)


def test_owner_and_name_match_case_insensitively_as_on_github(upstream, installed):
    model = mirror.hub.load("Demo/TinyNets:dev", "mlp", source="local")
    assert model.revision == "4-dev"


def test_owner_and_name_are_not_patterns(installed):
    with pytest.raises(NotInstalledError):
        mirror.hub.load("*/tinynets", "mlp", source="local")


def test_offline_mode_forces_local(installed, monkeypatch):
    monkeypatch.setenv("MGE_MIRROR_OFFLINE", "1")
    with pytest.raises(NotInstalledError):
        mirror.hub.load("other/repo", "x", source="remote")


def test_loading_leaves_the_snapshot_and_sys_path_as_they_were(upstream, installed):
    import sys

    snap = Store().resolve("demo", "tinynets", "master", host=upstream.git.host)
    before_files = sorted(os.walk(snap.path))
    path_before = list(sys.path)
    mirror.hub.load("demo/tinynets", "small_cnn", source="local", pretrained=True)
    assert sorted(os.walk(snap.path)) == before_files  # no __pycache__ written
    assert sys.path == path_before
    assert not any(m == "tinynets" or m.startswith("tinynets.") for m in sys.modules)
