"""Trust across the gap: signed bundles, trusted keys, receipts, and a loader that runs
only signed code when a trust policy is configured."""

import hashlib
import json
import os
import stat
import subprocess

import pytest

import mirror.hub
from mirror import bundle
from mirror.errors import SignatureError
from mirror.installer import install
from mirror.model import Manifest
from mirror.pack_options import PackOptions
from mirror.packer import pack
from mirror.store import Store
from tests.conftest import MIRROR, keypairs, run, tree_digest, unpack


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    out = keypairs(root)
    trusted = root / "trusted"
    trusted.mkdir()
    (trusted / "release.pub").write_bytes((root / "release.pub").read_bytes())
    out["trusted_dir"] = str(trusted)
    return out


@pytest.fixture(scope="module")
def signed(upstream, keys, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("signed") / "signed.hub")
    pack([upstream.spec(":v1.0")], out, PackOptions(git_host=upstream.git.host,
                                                    protocol="http", progress=False,
                                                    sign=keys["release"][0]))
    return out


def test_keygen_writes_a_private_key_only_its_owner_can_read(keys):
    private, public, kid = keys["release"]
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert open(public).read().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(kid) == 16
    r = run(MIRROR + ["keygen", "-o", private])
    assert r.returncode == 6 and "not overwriting a key" in r.stderr


def test_a_signed_bundle_verifies_with_its_key_and_only_with_it(signed, keys):
    names = subprocess.run(["tar", "--zstd", "-tf", signed], capture_output=True, text=True,
                           check=True).stdout.split()
    assert names[:2] == ["manifest.json", "manifest.sig"]
    r = run(MIRROR + ["verify", signed, "--trusted-key", keys["release"][1]])
    assert r.returncode == 0 and r.stdout.strip().endswith(f"signed by {keys['release'][2]}")
    r = run(MIRROR + ["verify", signed, "--trusted-key", keys["other"][1]])
    assert r.returncode == 5
    assert r.stderr.strip() == (f"Error: refusing {signed}: it is signed by key "
                                f"{keys['release'][2]}, which is not trusted (trusted: "
                                f"{keys['other'][2]})")


def test_an_unsigned_bundle_is_refused_when_a_key_is_required(master_bundle, keys):
    r = run(MIRROR + ["verify", master_bundle, "--trusted-key", keys["release"][1]])
    assert r.returncode == 5
    assert r.stderr.strip() == f"Error: refusing {master_bundle}: it is not signed"


def test_a_manifest_changed_after_signing_is_refused(signed, keys, tmp_path):
    heads = []
    manifest, members = unpack(signed, on_head=heads.append)
    manifest["repos"][0]["refs"][0]["name"] = "v9.9"  # a lie, under the old signature
    bad = str(tmp_path / "forged.hub")
    bundle.write(bad, Manifest.from_json(manifest), members, sign=lambda _: heads[0].signature)
    r = run(MIRROR + ["verify", bad, "--trusted-key", keys["release"][1]])
    assert r.returncode == 5
    assert r.stderr.strip() == f"Error: refusing {bad}: its manifest was changed after signing"


def test_a_detached_signature_from_mirror_sign(master_bundle, keys, tmp_path):
    copy = tmp_path / "copy.hub"
    copy.write_bytes(open(master_bundle, "rb").read())
    r = run(MIRROR + ["sign", str(copy), "--key", keys["other"][0]])
    assert r.returncode == 0 and (tmp_path / "copy.hub.sig").exists()
    r = run(MIRROR + ["verify", str(copy), "--trusted-key", keys["other"][1]])
    assert r.returncode == 0 and f"signed by {keys['other'][2]}" in r.stdout


def test_install_requires_a_trusted_signature_before_writing_anything(master_bundle, signed,
                                                                      keys, home, tmp_path):
    install(signed)  # a store with content
    before = tree_digest(home)
    r = run(MIRROR + ["install", master_bundle, "--require-signature", "--trusted-key",
                      keys["trusted_dir"], "--receipt", str(tmp_path / "refused.json")])
    assert r.returncode == 5 and "it is not signed" in r.stderr
    assert tree_digest(home) == before
    assert json.loads((tmp_path / "refused.json").read_text())["result"] == "refused"

    receipt = tmp_path / "receipt.json"
    r = run(MIRROR + ["install", signed, "--force", "--trusted-key", keys["trusted_dir"],
                      "--receipt", str(receipt)])
    assert r.returncode == 0, r.stderr
    assert f"signed by trusted key {keys['release'][2]}" in r.stdout
    record = json.loads(receipt.read_text())
    assert record["result"] == "installed" and record["signed_by"] == keys["release"][2]
    manifest = bundle.read_manifest(signed)
    assert sorted(m["name"] for m in record["members"]) == sorted(manifest.members())
    with open(signed, "rb") as fh:
        assert record["bundle_sha256"] == hashlib.sha256(fh.read()).hexdigest()


def test_with_a_trust_policy_the_loader_runs_only_signed_code(master_bundle, signed, keys,
                                                              home, monkeypatch, upstream):
    install(master_bundle)  # unsigned: installed before any policy
    install(signed)
    monkeypatch.setenv("MGE_MIRROR_TRUSTED_KEYS", keys["trusted_dir"])
    with pytest.raises(SignatureError) as e:
        mirror.hub.load("demo/tinynets", "mlp", source="local")
    assert "a trust policy is configured and its bundle was not signed" in str(e.value)
    # Installed again under the policy, the signed snapshot records its signer and runs.
    r = run(MIRROR + ["install", signed, "--force"])
    assert r.returncode == 0, r.stderr
    model = mirror.hub.load("demo/tinynets:v1.0", "mlp", source="local")
    assert model.revision == upstream.demo.revisions[upstream.demo.commits["c2"]]


def test_a_store_config_file_makes_the_policy(master_bundle, signed, keys, home):
    os.makedirs(home)
    with open(os.path.join(home, "config.toml"), "w") as fh:
        fh.write(f'trusted_keys = ["{keys["trusted_dir"]}"]\nrequire_signature = true\n')
    r = run(MIRROR + ["install", master_bundle])
    assert r.returncode == 5 and "it is not signed" in r.stderr
    r = run(MIRROR + ["install", signed])
    assert r.returncode == 0 and f"signed by trusted key {keys['release'][2]}" in r.stdout


def test_under_a_policy_stock_megengine_gets_only_signed_code(master_bundle, keys, home,
                                                             tmp_path, monkeypatch):
    monkeypatch.setenv("MGE_MIRROR_TRUSTED_KEYS", keys["trusted_dir"])
    r = run(MIRROR + ["install", master_bundle, "--allow-unsafe-pickle"])
    assert r.returncode == 5  # unsigned: refused outright under the policy
    monkeypatch.delenv("MGE_MIRROR_TRUSTED_KEYS")
    assert run(MIRROR + ["install", master_bundle]).returncode == 0  # no policy yet
    monkeypatch.setenv("MGE_MIRROR_TRUSTED_KEYS", keys["trusted_dir"])
    # Later signed installs never seed MegEngine's cache with the unsigned snapshot.
    from mirror.megengine_cache import reconcile

    report = reconcile(Store(), str(tmp_path / "mge2"), ["1.13.0"])
    assert report.unseeded and all("its bundle was not signed by a trusted key" in u.why
                                   for u in report.unseeded)
    assert not os.path.exists(tmp_path / "mge2" / "hub")
    assert len(os.listdir(tmp_path / "mge2" / "serialized")) == 2  # weights: no code runs
    # And source="auto" does not fall back to the network: only the store answers.
    with pytest.raises(Exception) as e:
        mirror.hub.load("nobody/nothing", "x", source="auto")
    assert type(e.value).__name__ == "NotInstalledError"


def test_a_receipt_for_a_missing_bundle_is_still_one_line(tmp_path, home):
    r = run(MIRROR + ["install", str(tmp_path / "nope.hub"), "--receipt",
                      str(tmp_path / "r.json")])
    assert r.returncode == 4 and len(r.stderr.strip().splitlines()) == 1
    assert json.loads((tmp_path / "r.json").read_text())["result"] == "refused"


@pytest.mark.parametrize("policy", ["trusted-keys folder", "config.toml"])
def test_a_stores_policy_binds_installs_from_python_too(master_bundle, signed, keys, home,
                                                         policy):
    """The library's install obeys the store's policy, not only the command line."""
    os.makedirs(home)
    if policy == "config.toml":
        with open(os.path.join(home, "config.toml"), "w") as fh:
            fh.write(f'trusted_keys = ["{keys["trusted_dir"]}"]\n')
    else:
        os.symlink(keys["trusted_dir"], os.path.join(home, "trusted-keys"))
    assert install(signed).signed_by == keys["release"][2]
    before = tree_digest(home)
    with pytest.raises(SignatureError) as e:
        install(master_bundle)
    assert str(e.value) == f"refusing {master_bundle}: it is not signed"
    assert tree_digest(home) == before
    assert mirror.hub.load("demo/tinynets:v1.0", "mlp", source="local").revision == "2"
