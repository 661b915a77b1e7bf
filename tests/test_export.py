"""``mirror export``: a bundle made from an installed store, with no network, that installs
elsewhere as the bundle(s) that brought its content did."""

import filecmp
import json
import os
import subprocess
import sys
import textwrap

import pytest

from mirror import bundle
from mirror.errors import MirrorError
from mirror.export import export, select
from mirror.ids import short
from mirror.layout import StoreLayout
from mirror.model import Manifest
from mirror.pack_options import PackOptions
from mirror.packer import pack
from mirror.store import Store
from tests.conftest import MIRROR, handmade_bundle, keypairs, manifest_json, run, same_weights

REPO = "demo/tinynets"


def _env(root, name):
    return dict(os.environ, MGE_MIRROR_HOME=str(root / name), MGE_HOME=str(root / f"{name}-mge"),
                SOURCE_DATE_EPOCH="1234567890")


def _install(env, path, *extra):
    r = run(MIRROR + ["install", "--no-megengine-cache", *extra, path], env=env, netns=True)
    assert r.returncode == 0, r.stderr
    return r


def _export(env, out, *specs, extra=()):
    """``mirror export --json`` with no network: its report (or the failed run)."""
    r = run(MIRROR + ["export", *specs, "-o", str(out), "--json", *extra], env=env,
            netns=True)
    if r.returncode != 0:  # under --json, the error is a JSON object on stderr
        error = json.loads(r.stderr)["error"]
        assert error["exit_code"] == r.returncode
        r.stderr = f"Error: {error['message']}\n"
    return (json.loads(r.stdout) if r.returncode == 0 else None), r


def _members(path):
    return subprocess.run(["tar", "--zstd", "-tf", str(path)], capture_output=True,
                          text=True, check=True).stdout.split()


def _records(home, commit):
    """The snapshot record of ``commit`` in the store at ``home``, without the fields of
    its own install (which bundle, when)."""
    store = Store(home)
    record = store.snapshot_record(store.find_repo("github.com", "demo", "tinynets"), commit)
    return record.snapshot, dict(record.weight_digests)


def _refs(home):
    store = Store(home)
    repo = store.find_repo("github.com", "demo", "tinynets")
    return {(h.kind, h.name): h.commit for h in store.ref_entries(repo)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-keys")
    out = keypairs(root)
    return out


@pytest.fixture(scope="module")
def store_a(all_refs_bundle, tmp_path_factory):
    """Store A: the demo repo's master, dev, v1.0 and c1, from one real bundle."""
    root = tmp_path_factory.mktemp("export-a")
    env = _env(root, "store")
    _install(env, all_refs_bundle)
    return env


# --- the same bundle, made again ------------------------------------------------------


def test_exporting_all_that_a_bundle_brought_makes_that_bundle_again(store_a,
                                                                     all_refs_bundle,
                                                                     tmp_path):
    out = tmp_path / "again.hub"
    report, r = _export(store_a, out, REPO)
    assert r.returncode == 0, r.stderr
    original = bundle.read_manifest_bytes(all_refs_bundle)
    assert bundle.read_manifest_bytes(str(out)) == original
    assert report["bundle_id"] == bundle.bundle_id(original)
    assert report["reemitted"] is True and report["signed"] is False
    assert "manifest.sig" not in _members(out)
    # the same members with the same times: byte for byte the bundle pack wrote
    assert filecmp.cmp(str(out), all_refs_bundle, shallow=False)


def test_a_signed_bundle_made_again_keeps_its_signature_and_installs_under_trust(
        upstream, keys, tmp_path):
    signed = str(tmp_path / "signed.hub")
    pack([upstream.spec(":v1.0")], signed, PackOptions(
        git_host=upstream.git.host, protocol="http", progress=False, sign=keys["release"][0]))
    env_a = _env(tmp_path, "a")
    _install(env_a, signed, "--trusted-key", keys["release"][1])
    original_sig = os.path.join(env_a["MGE_MIRROR_HOME"], "signatures",
                                bundle.bundle_id(bundle.read_manifest_bytes(signed)) + ".sig")
    assert os.path.isfile(original_sig)

    out = tmp_path / "again.hub"
    report, r = _export(env_a, out, REPO)
    assert r.returncode == 0, r.stderr
    assert report["reemitted"] is True and report["signed"] is True
    assert bundle.read_manifest_bytes(str(out)) == bundle.read_manifest_bytes(signed)
    heads = []
    bundle.read(str(out), on_head=heads.append)
    with open(original_sig, "rb") as fh:
        assert heads[0].signature == fh.read()
    assert _members(out)[:2] == ["manifest.json", "manifest.sig"]

    env_b = _env(tmp_path, "b")
    r = _install(env_b, str(out), "--require-signature", "--trusted-key", keys["release"][1])
    assert f"signed by trusted key {keys['release'][2]}" in r.stdout
    r = run(MIRROR + ["install", "--no-megengine-cache", "--require-signature",
                      "--trusted-key", keys["other"][1], str(out)], env=_env(tmp_path, "c"),
            netns=True)
    assert r.returncode == 5, r.stderr

    # --sign: the same manifest, signed anew by the key given
    resigned = tmp_path / "resigned.hub"
    report, r = _export(env_a, resigned, REPO, extra=("--sign", keys["other"][0]))
    assert r.returncode == 0, r.stderr
    assert report["bundle_id"] == bundle.bundle_id(bundle.read_manifest_bytes(signed))
    r = run(MIRROR + ["verify", str(resigned), "--trusted-key", keys["other"][1]], netns=True)
    assert r.returncode == 0 and r.stdout.strip().endswith(f"signed by {keys['other'][2]}")


# --- a part of what was installed -------------------------------------------------------

LOAD = textwrap.dedent('''
    import json, sys
    import numpy as np
    import mirror.hub

    model = mirror.hub.load(sys.argv[1], "mlp", pretrained=True, source="local")
    print(json.dumps({"revision": model.revision, "params": {
        k: np.asarray(v).tolist() for k, v in model.state_dict().items()}}))
''')


def test_one_ref_exported_installs_and_loads_elsewhere_with_no_network(
        upstream, store_a, all_refs_bundle, tmp_path):
    dev = upstream.demo.branches["dev"]
    out = tmp_path / "dev.hub"
    report, r = _export(store_a, out, REPO + ":dev")
    assert r.returncode == 0, r.stderr
    assert report["reemitted"] is False and report["signed"] is False
    assert report["snapshots"] == [f"{upstream.git.host}/{REPO}@{dev}"]
    url = upstream.demo.urls[dev]["mlp"]
    assert url in report["weights"]

    manifest = manifest_json(str(out))
    original = manifest_json(all_refs_bundle)
    (repo,) = manifest["repos"]
    (ref,) = repo["refs"]
    assert ref == next(r for r in original["repos"][0]["refs"] if r["name"] == "dev")
    assert [s["commit"] for s in repo["snapshots"]] == [dev]
    assert repo["snapshots"][0] == next(s for s in original["repos"][0]["snapshots"]
                                        if s["commit"] == dev)
    assert {w["url"] for w in manifest["weights"]} == set(repo["snapshots"][0]["weights"])
    for w in manifest["weights"]:  # as the original bundle listed them, locations too
        assert w in original["weights"]
    assert manifest["format_version"] == 2 and manifest["created"] == 1234567890
    assert manifest["tool"].startswith("mirror ")

    r = run(MIRROR + ["verify", str(out)], netns=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(f"{out}: OK")

    env_b = _env(tmp_path, "b")
    _install(env_b, str(out))
    assert _refs(env_b["MGE_MIRROR_HOME"]) == {("branch", "dev"): dev}
    assert _records(env_b["MGE_MIRROR_HOME"], dev) == _records(store_a["MGE_MIRROR_HOME"], dev)
    r = run([sys.executable, "-c", LOAD, f"{REPO}:dev"], env=env_b, netns=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["revision"] == upstream.demo.revisions[dev]
    assert same_weights(got["params"], upstream.demo.weights[url])
    r = run(MIRROR + ["verify"], env=env_b, netns=True)
    assert r.returncode == 0, r.stdout


def test_an_annotated_tag_keeps_the_tag_object_install_proves(upstream, store_a,
                                                               all_refs_bundle, tmp_path):
    out = tmp_path / "tag.hub"
    elsewhere = dict(store_a, MGE_MIRROR_HOME=str(tmp_path / "empty"))  # --home wins
    report, r = _export(elsewhere, out, REPO + ":v1.0",
                        extra=("--home", store_a["MGE_MIRROR_HOME"]))
    assert r.returncode == 0, r.stderr
    (ref,) = manifest_json(str(out))["repos"][0]["refs"]
    original = next(r for r in manifest_json(all_refs_bundle)["repos"][0]["refs"]
                    if r["name"] == "v1.0")
    assert ref == original and ref["target"] != ref["commit"]  # an annotated tag
    env_b = _env(tmp_path, "b")
    _install(env_b, str(out))
    assert _refs(env_b["MGE_MIRROR_HOME"]) == {("tag", "v1.0"): upstream.demo.tags["v1.0"]}


def test_a_commit_exported_alone_brings_its_snapshot_and_no_ref(upstream, store_a,
                                                                 tmp_path):
    c1 = upstream.demo.commits["c1"]
    out = tmp_path / "c1.hub"
    report, r = _export(store_a, out, f"{REPO}@{c1[:9]}")
    assert r.returncode == 0, r.stderr
    (repo,) = manifest_json(str(out))["repos"]
    assert repo["refs"] == [] and [s["commit"] for s in repo["snapshots"]] == [c1]
    env_b = _env(tmp_path, "b")
    _install(env_b, str(out))
    assert _refs(env_b["MGE_MIRROR_HOME"]) == {}
    assert _records(env_b["MGE_MIRROR_HOME"], c1) == _records(store_a["MGE_MIRROR_HOME"], c1)


def test_select_leaves_a_seam_and_the_library_writes_what_it_chose(upstream, store_a,
                                                                   tmp_path):
    store = Store(store_a["MGE_MIRROR_HOME"])
    manifest, sources, manifest_bytes, signature = select(store, [REPO + ":master"])
    master = upstream.demo.branches["master"]
    assert manifest_bytes is None and signature is None
    assert [s.commit for r in manifest.repos for s in r.snapshots] == [master]
    assert set(sources) == set(manifest.members())
    assert all(p.startswith(StoreLayout(store.home).blobs + os.sep) for p in sources.values())
    out = str(tmp_path / "master.hub")
    report = export(store, REPO + ":master", out)
    assert report.bundle_id == bundle.bundle_id(bundle.read_manifest_bytes(out))
    assert report.snapshots == (f"{upstream.git.host}/{REPO}@{master}",)
    assert not report.reemitted
    assert bundle.verify(out).manifest == manifest.__class__.from_bytes(
        bundle.read_manifest_bytes(out))


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    (REPO + ":nope", "demo/tinynets:nope is not installed in {home}: the store has branch "
                     "dev, branch master, tag v1.0 for demo/tinynets. Pack it on a connected "
                     "host (mirror pack demo/tinynets:nope -o X.hub) and run 'mirror "
                     "install X.hub' here."),
    ("nobody/nothing", "nobody/nothing is not installed in {home}: the store has nothing "
                       "for nobody/nothing. Pack it on a connected host (mirror pack "
                       "nobody/nothing -o X.hub) and run 'mirror install X.hub' here."),
])
def test_a_spec_naming_nothing_installed_fails_and_writes_nothing(store_a, tmp_path, spec,
                                                                   message):
    out = tmp_path / "none.hub"
    _, r = _export(store_a, out, REPO, spec)
    assert r.returncode == 4
    assert r.stderr.strip() == "Error: " + message.format(home=store_a["MGE_MIRROR_HOME"])
    assert os.listdir(tmp_path) == []


def test_a_blob_missing_from_the_store_fails_before_anything_is_written(
        upstream, master_bundle, tmp_path):
    env = _env(tmp_path, "store")
    _install(env, master_bundle)
    home = env["MGE_MIRROR_HOME"]
    master = upstream.demo.branches["master"]
    url = upstream.demo.urls[master]["mlp"]
    pin = _records(home, master)[1][url]
    blob = StoreLayout(home).blob(pin.sha256)
    os.unlink(blob)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _, r = _export(env, out_dir / "x.hub", REPO)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"Error: store {blob}: weight {url} is missing from the store; nothing was exported "
        f"(run 'mirror verify', and install the bundle that brought it again with --force)")
    assert os.listdir(out_dir) == []

    objects = _records(home, master)[0].objects  # cut short: not what was installed
    path = StoreLayout(home).blob(objects.sha256)
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.truncate(objects.size - 1)
    _, r = _export(env, out_dir / "x.hub", f"{REPO}@{master}")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"Error: store {path}: {upstream.git.host}/demo/tinynets@{short(master)}: the blob "
        f"of its git objects is {objects.size - 1} bytes, not the {objects.size} installed; "
        f"nothing was exported (run 'mirror verify')")
    assert os.listdir(out_dir) == []

    hubconf = next(f for f in _records(home, master)[0].files if f.path == "hubconf.py")
    os.unlink(StoreLayout(home).blob(hubconf.sha256))
    _, r = _export(env, out_dir / "x.hub", REPO + ":master")
    assert r.returncode == 1
    assert (f"{upstream.git.host}/demo/tinynets@{short(master)}: file hubconf.py is missing"
            in r.stderr)
    assert os.listdir(out_dir) == []


def test_a_format_1_snapshot_cannot_share_a_bundle_with_a_format_2_one(upstream,
                                                                        master_bundle,
                                                                        tmp_path):
    commit = "ab" * 20
    hand = handmade_bundle(tmp_path / "hand.hub", {commit: {"hubconf.py": "def x():\n    pass\n"}},
                           refs=[("master", "branch", commit)])
    env = _env(tmp_path, "store")
    _install(env, hand)
    _install(env, master_bundle)
    store = Store(env["MGE_MIRROR_HOME"])
    # the handmade repo alone is its own (format 1) bundle again
    out = str(tmp_path / "hand-again.hub")
    report = export(store, ["hand/made"], out)
    assert report.reemitted
    assert bundle.read_manifest_bytes(out) == bundle.read_manifest_bytes(hand)
    # with the demo repo, whose snapshot carries git objects (format 2): refused
    both = str(tmp_path / "both.hub")
    with pytest.raises(MirrorError) as e:
        export(store, ["hand/made", REPO], both)
    assert str(e.value).startswith(f"cannot export hand/made@{short(commit)} with "
                                   f"{upstream.git.host}/demo/tinynets@")
    assert not os.path.exists(both)


def test_write_takes_manifest_bytes_only_if_they_hold_the_manifest(all_refs_bundle,
                                                                    master_bundle, tmp_path):
    manifest, members = bundle.read_all(master_bundle)
    other = bundle.read_manifest_bytes(all_refs_bundle)
    with pytest.raises(ValueError, match="manifest_bytes do not hold the manifest given"):
        bundle.write(str(tmp_path / "x.hub"), manifest, members, manifest_bytes=other)
    assert not os.path.exists(tmp_path / "x.hub")
    # the same JSON, spelled otherwise: kept verbatim, so its own id
    spelled = json.dumps(json.loads(bundle.read_manifest_bytes(master_bundle)),
                         indent=2).encode()
    bid = bundle.write(str(tmp_path / "y.hub"), manifest, members, manifest_bytes=spelled,
                       signature=b'{"a": 1}\n')
    assert bid == bundle.bundle_id(spelled) != bundle.bundle_id(manifest.to_bytes())
    assert bundle.read_manifest_bytes(str(tmp_path / "y.hub")) == spelled
    assert Manifest.from_bytes(spelled) == manifest
    heads = []
    bundle.read(str(tmp_path / "y.hub"), on_head=heads.append)
    assert heads[0].signature == b'{"a": 1}\n'
