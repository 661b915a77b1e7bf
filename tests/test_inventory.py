"""`mirror inventory`: what a store holds, carried out of the air gap so that a delta can
leave it out. Real bundles, installed with no network, then listed and read back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from mirror import bundle, signing
from mirror.errors import SignatureError
from mirror.inventory import Inventory, InventoryError, is_inventory, load, take, write
from mirror.model import canonical_json
from mirror.store import Store
from tests.conftest import MIRROR, manifest_json, run


def install(bundle_path: str, home: str) -> None:
    r = run(MIRROR + ["install", "--no-megengine-cache", "--home", home, bundle_path],
            netns=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def store_home(all_refs_bundle, master_bundle, tmp_path_factory) -> str:
    home = str(tmp_path_factory.mktemp("inventory") / "store")
    install(all_refs_bundle, home)
    install(master_bundle, home)  # the same master commit again: listed once
    return home


def on_disk(home: str) -> dict:
    """The store as its files say: refs, snapshot records and blobs."""
    (repo,) = [d for d, _, names in os.walk(os.path.join(home, "repos")) if "repo.json" in names]
    refs = set()
    for folder, kind in (("heads", "branch"), ("tags", "tag")):
        base = os.path.join(repo, "refs", folder)
        for d, _, names in os.walk(base):
            for n in names:
                with open(os.path.join(d, n)) as fh:
                    refs.add((kind, os.path.relpath(os.path.join(d, n), base), fh.read().strip()))
    snaps = os.path.join(repo, "snapshots")
    records = {n[:-5]: json.load(open(os.path.join(snaps, n)))
               for n in os.listdir(snaps) if n.endswith(".json")}
    blobs = {n: os.path.getsize(os.path.join(home, "blobs", n))
             for n in os.listdir(os.path.join(home, "blobs"))}
    return {"repo": repo, "refs": refs, "records": records, "blobs": blobs}


def test_the_inventory_lists_exactly_what_the_store_holds(store_home, all_refs_bundle,
                                                          upstream, tmp_path):
    out = str(tmp_path / "store.inv")
    r = run(MIRROR + ["inventory", "--home", store_home, "-o", out], netns=True)
    assert r.returncode == 0, r.stderr
    inv, disk = load(out), on_disk(store_home)
    assert r.stdout == (f"inventory of {store_home}: 1 repos, {len(disk['records'])} "
                        f"snapshots, {len(inv.weights)} weights, {len(disk['blobs'])} blobs "
                        f"-> {out}\n")
    manifest = manifest_json(all_refs_bundle)
    (packed,) = manifest["repos"]
    (repo,) = inv.repos
    assert (repo.host, repo.owner, repo.name) == (packed["host"], packed["owner"], packed["name"])
    assert {(f.kind, f.name, f.commit) for f in repo.refs} == disk["refs"] == \
        {(f["kind"], f["name"], f["commit"]) for f in packed["refs"]}
    assert len(disk["refs"]) == 3 and upstream.demo.commits["c1"] in disk["records"]
    bundle_id = hashlib.sha256(bundle.read_manifest_bytes(all_refs_bundle)).hexdigest()
    assert [(s.commit, s.bundle, s.bundle_file) for s in repo.snapshots] == \
        [(c, bundle_id, "all.hub") for c in sorted(s["commit"] for s in packed["snapshots"])]
    assert sorted(disk["records"]) == [s.commit for s in repo.snapshots]
    pins = {(url, p["sha256"], p["size"]) for rec in disk["records"].values()
            for url, p in rec["weight_digests"].items()}
    assert [(w.url, w.sha256, w.size) for w in inv.weights] == sorted(pins)
    assert {(w["url"], w["sha256"], w["size"]) for w in manifest["weights"]} == pins
    assert {b.sha256: b.size for b in inv.blobs} == disk["blobs"]
    assert [b.sha256 for b in inv.blobs] == sorted(disk["blobs"])


def test_the_same_store_gives_the_same_bytes(store_home, tmp_path, monkeypatch):
    env = dict(os.environ, SOURCE_DATE_EPOCH="1234")
    first = run(MIRROR + ["inventory", "--home", store_home], env=env, netns=True)
    second = run(MIRROR + ["inventory", "--home", store_home], env=env, netns=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    obj = json.loads(first.stdout)
    assert obj["created"] == 1234 and obj["format_version"] == 1 and is_inventory(obj)
    assert first.stdout.encode() == canonical_json(obj)  # sorted keys, compact, a newline
    out = str(tmp_path / "inv.json")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234")
    write(take(Store(store_home)), out)
    assert open(out).read() == first.stdout
    assert load(out).to_bytes() == first.stdout.encode()


def test_a_signed_inventory_loads_with_its_key_and_a_changed_byte_is_refused(store_home,
                                                                              tmp_path):
    key = str(tmp_path / "key")
    kid = signing.keygen(key)
    keys = {kid: signing.load_public(key + ".pub")}
    out = str(tmp_path / "signed.inv")
    r = run(MIRROR + ["inventory", "--home", store_home, "-o", out, "--sign", key, "--json"])
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["signed_by"], summary["signature"], summary["repos"]) == \
        (kid, out + ".sig", 1)
    before = load(out, keys)
    assert before == load(out) and before.repos
    data = open(out, "rb").read()
    assert json.loads(open(out + ".sig").read())["manifest_sha256"] == \
        hashlib.sha256(data).hexdigest()
    at = data.index(b'"created":') + len(b'"created":')  # one digit: still an inventory
    with open(out, "wb") as fh:
        fh.write(data[:at] + (b"2" if data[at:at + 1] == b"1" else b"1") + data[at + 1:])
    changed = load(out)  # unsigned, it still parses: only the signature refuses it
    assert changed.created != before.created and changed.repos == before.repos
    with pytest.raises(SignatureError) as e:
        load(out, keys)
    assert str(e.value) == f"refusing {out}: its manifest was changed after signing"
    os.unlink(out + ".sig")
    with pytest.raises(SignatureError) as e:
        load(out, keys)
    assert str(e.value) == f"refusing {out}: it is not signed"
    r = run(MIRROR + ["inventory", "--home", store_home, "--sign", key])
    assert r.returncode == 2 and "--sign needs -o/--output" in r.stderr


def test_an_empty_or_missing_store_has_an_empty_inventory(tmp_path):
    missing = str(tmp_path / "nowhere")
    r = run(MIRROR + ["inventory", "--home", missing, "-o", str(tmp_path / "i"), "--json"])
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in json.loads(r.stdout).items() if k in ("repos", "snapshots",
            "weights", "blobs")} == {"repos": 0, "snapshots": 0, "weights": 0, "blobs": 0}
    assert not os.path.exists(missing)  # read only: not even created
    inv = load(str(tmp_path / "i"))
    assert (inv.repos, inv.weights, inv.blobs) == ((), (), ())
    os.makedirs(os.path.join(missing, "blobs"))
    assert take(Store(missing)).to_json()["repos"] == []


def test_a_record_that_cannot_be_read_is_left_out_not_fatal(store_home, upstream, tmp_path):
    home = str(tmp_path / "copy")
    shutil.copytree(store_home, home)
    disk, c2 = on_disk(home), upstream.demo.tags["v1.0"]
    with open(os.path.join(disk["repo"], "snapshots", c2 + ".json"), "w") as fh:
        fh.write("{not json")
    (repo,) = take(Store(home)).repos
    assert [s.commit for s in repo.snapshots] == sorted(set(disk["records"]) - {c2})
    assert {(r.kind, r.name, r.commit) for r in repo.refs} == \
        {r for r in disk["refs"] if r[2] != c2}
    assert ("tag", "v1.0", c2) in disk["refs"]  # the ref naming it is left out with it


def bad(tmp_path, change) -> str:
    obj = take(Store(str(tmp_path / "none"))).to_json()
    obj["blobs"] = [{"sha256": "a" * 64, "size": 3}]
    change(obj)
    path = str(tmp_path / "bad.inv")
    with open(path, "wb") as fh:
        fh.write(canonical_json(obj))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda o: o.update(format="mge-mirror-bundle"), "not a mirror inventory"),
    (lambda o: o.update(format_version=2),
     "format version 2 is not supported (this mirror reads version 1; upgrade mirror)"),
    (lambda o: o["blobs"][0].update(sha256="A" * 64),
     f"blob {'A' * 64!r}: sha256 is not 64 lowercase hex digits"),
    (lambda o: o["blobs"][0].update(size=-1), f"blob {'a' * 64!r}: size is not a "
                                              f"non-negative integer"),
    (lambda o: o.pop("weights"), "'weights' missing or not a list"),
    (lambda o: o["blobs"].append({"sha256": "a" * 64, "size": 3}), f"blob {'a' * 64} is "
                                                                     f"listed twice"),
])
def test_a_malformed_inventory_is_refused_naming_the_field(tmp_path, change, message):
    path = bad(tmp_path, change)
    with pytest.raises(InventoryError) as e:
        load(path)
    assert str(e.value) == f"inventory {path}: {message}"
    assert e.value.exit_code == 3


def test_an_inventory_is_told_from_a_manifest(master_bundle, tmp_path):
    assert not is_inventory(manifest_json(master_bundle))
    assert not is_inventory([]) and is_inventory(Inventory("t", 0).to_json())
    with pytest.raises(InventoryError) as e:
        load(str(tmp_path / "absent.inv"))
    assert str(e.value) == f"inventory {tmp_path / 'absent.inv'}: cannot read it: No such " \
                           f"file or directory"
