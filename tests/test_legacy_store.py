"""A store written by an earlier mirror (records without a schema version) still lists,
verifies and loads: upgrading mirror never strands what a host already installed.

The fixture is a store made by the mirror of 2026-11-30 (before the typed model):
demo/mirrored with master, dev, the tag v1.0 and commit c1, installed from one bundle.
"""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest

from tests.conftest import MIRROR, run

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "store-v0.tar.gz")
COMMITS = {"c1": "2d9163bd5b67279812d4980c7ce806cbe43441df",
           "c2": "c120a780322fab1ab19d55a6888ce522a9447260",
           "c3": "e1e4965381391c3fdcf85f3d8cd12928d160c626",
           "c4": "b01d33414a1ef8fbcc2bd9f82ba32a6935f03417"}
MLP_BLOB = {"c3": "eaeb97b22acdf4b63530ed06cd86936bcaefc1fade76023cf8196bb35d69f941"}


@pytest.fixture()
def legacy(tmp_path, monkeypatch) -> str:
    home = tmp_path / "store"
    home.mkdir()
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(home)
    monkeypatch.setenv("MGE_MIRROR_HOME", str(home))
    monkeypatch.setenv("MGE_HOME", str(tmp_path / "mge"))
    return str(home)


def test_an_earlier_store_lists_and_verifies(legacy):
    r = run(MIRROR + ["list", "--json"])
    assert r.returncode == 0, r.stderr
    (repo,) = json.loads(r.stdout)["repos"]
    assert (repo["host"], repo["owner"], repo["name"]) == ("github.com", "demo", "mirrored")
    assert [s["commit"] for s in repo["snapshots"]] == sorted(COMMITS.values())
    assert {r["name"]: r["commit"] for r in repo["refs"]} == {
        "master": COMMITS["c3"], "dev": COMMITS["c4"], "v1.0": COMMITS["c2"]}
    r = run(MIRROR + ["verify"])
    assert r.returncode == 0 and ": OK, " in r.stdout, r.stdout + r.stderr


def test_an_earlier_store_loads_each_ref_with_its_weights(legacy):
    import megengine

    import mirror.hub

    model = mirror.hub.load("demo/mirrored", "mlp", pretrained=True)
    assert model.revision == "3"
    stored = megengine.load(os.path.join(legacy, "blobs", MLP_BLOB["c3"]))
    for name, value in model.state_dict().items():
        assert np.array_equal(np.asarray(value), np.asarray(stored[name])), name
    assert mirror.hub.load("demo/mirrored:dev", "mlp").revision == "4-dev"
    assert mirror.hub.load("demo/mirrored:v1.0", "mlp").revision == "2"
    assert mirror.hub.load("demo/mirrored", "mlp", commit=COMMITS["c1"][:8]).revision == "1"
