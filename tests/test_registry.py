"""Bundles through a real OCI registry (Debian's docker-registry, CNCF Distribution
2.8) on the loopback: push, pull and install oci://..., over HTTP with no auth, over
TLS behind htpasswd Basic auth, and through the Bearer token flow; blobs not sent
twice; a wrong password, a missing tag and a damaged layer refused with the store
unchanged; the artifact as ORAS lays it out; and a load in `unshare -n` after."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import requests

from mirror import bundle, oci
from mirror.cli import iec
from mirror.errors import BundleError, MirrorError, OCIReferenceError, RegistryError, SignatureError
from mirror.installer import InstallOptions, install
from mirror.packer import PackOptions, pack
from mirror.reference import Connection, Reference
from tests.conftest import MIRROR, keypairs, run, same_weights, store_content, tree_digest
from tests.upstream.registry import RegistryServer, TokenServer, sha256_digest
from tests.upstream.tls import make_certificates

PLAIN = Connection(plain_http=True)
USERS = {"alice": "wonderland"}
IDENTITY_TOKEN = "rt-alice-0f3c"  # what docker login stores for an OAuth2 login

LOAD_MLP = """
import json, sys
import numpy as np
import mirror.hub
model = mirror.hub.load("demo/tinynets", "mlp", pretrained=True, source="local")
print(json.dumps({k: np.asarray(v).tolist() for k, v in model.state_dict().items()}))
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Over HTTP, anonymous: a registry on a trusted network."""
    server = RegistryServer(str(tmp_path_factory.mktemp("registry"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """Over TLS (a CA made here) behind htpasswd Basic auth."""
    root = str(tmp_path_factory.mktemp("secure-registry"))
    certs = make_certificates(os.path.join(root, "tls"))
    server = RegistryServer(root, certificates=certs, users=USERS).start()
    yield server, certs
    server.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    """Behind the distribution spec's Bearer token flow, with its own token service."""
    root = str(tmp_path_factory.mktemp("token-registry"))
    tokens = TokenServer(root, USERS, refresh_tokens={IDENTITY_TOKEN: "alice"}).start()
    server = RegistryServer(root, token=tokens).start()
    yield server, tokens
    server.stop()
    tokens.stop()


@pytest.fixture(scope="module")
def split(upstream, tmp_path_factory):
    """master with a 3 MiB weight that does not compress, in 1 MiB parts."""
    root = tmp_path_factory.mktemp("split-for-registry")
    extra = (upstream.weights.add("registry/w.bin", random.Random(5).randbytes(3 << 20)),)
    opts = PackOptions(git_host=upstream.git.host, protocol="http", progress=False,
                       extra_weights=extra, split_size="1M", stream=False)
    return pack([upstream.spec()], str(root / "m.hub"), opts)


@pytest.fixture(scope="module")
def streamed_bundle(upstream, tmp_path_factory):
    """master packed with --stream: format 4, its manifest at its end."""
    out = tmp_path_factory.mktemp("streamed-for-registry") / "s.hub"
    pack([upstream.spec()], str(out), PackOptions(
        git_host=upstream.git.host, protocol="http", progress=False, stream=True))
    assert out.read_bytes()[:4] == bundle.POINTER_MAGIC
    return str(out)


@pytest.fixture()
def memo(tmp_path, monkeypatch):
    """push's digest memo, fresh for each test (it lives in the user's cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _env(tmp_path, name="store"):
    return dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / name),
                MGE_HOME=str(tmp_path / f"{name}-mge"), XDG_CACHE_HOME=str(tmp_path / "cache"))


def _put_blob(server, name, data):
    """Upload ``data`` as a blob of repository ``name`` (in one request); its digest."""
    r = requests.post(f"{server.url}/v2/{name}/blobs/uploads/", timeout=10)
    r.raise_for_status()
    digest = sha256_digest(data)
    requests.put(requests.compat.urljoin(r.url, r.headers["Location"]), timeout=30,
                 params={"digest": digest}, data=data,
                 headers={"Content-Type": "application/octet-stream"}).raise_for_status()
    return digest


def _manifest(server, name, tag, **kw):
    r = requests.get(f"{server.url}/v2/{name}/manifests/{tag}", timeout=10,
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, **kw)
    assert r.status_code == 200, r.text
    return r.content, r.json()


# --- the round trip ----------------------------------------------------------------------


def test_push_pull_install_then_load_with_no_network(registry, master_bundle, tmp_path,
                                                     upstream):
    env = _env(tmp_path)
    r = run(MIRROR + ["push", master_bundle, registry.ref("models/demo:v1"), "--plain-http"],
            env=env)
    assert r.returncode == 0, r.stderr
    data, _ = _manifest(registry, "models/demo", "v1")
    digest = sha256_digest(data)
    assert r.stdout.splitlines() == [
        f"pushed {registry.ref('models/demo:v1')}@{digest}",
        "1 layers: 1 uploaded "
        f"({iec(os.path.getsize(master_bundle))}), 0 already there, 0 mounted", digest]

    pulled = tmp_path / "pulled.hub"
    r = run(MIRROR + ["pull", registry.ref("models/demo:v1"), "-o", str(pulled),
                      "--plain-http"], env=env)
    assert r.returncode == 0, r.stderr
    assert pulled.read_bytes() == open(master_bundle, "rb").read()
    assert not os.path.exists(str(pulled) + ".partial")

    # by digest: a digest is a proof, and what install reads, straight into the store
    r = run(MIRROR + ["install", f"{registry.ref('models/demo')}@{digest}", "--plain-http"],
            env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(
        "verified 1", ) and r.stdout.splitlines()[0].endswith(
        f"from {registry.ref('models/demo')}@{digest}")

    # the same store as installing the file
    alone = _env(tmp_path, "alone")
    assert run(MIRROR + ["install", master_bundle], env=alone).returncode == 0
    assert store_content(env["MGE_MIRROR_HOME"]) == store_content(alone["MGE_MIRROR_HOME"])

    # a second store, installed from the registry by tag, loads inside the air gap
    second = _env(tmp_path, "second")
    r = run(MIRROR + ["install", registry.ref("models/demo:v1"), "--plain-http"], env=second)
    assert r.returncode == 0, r.stderr
    r = run([sys.executable, "-c", LOAD_MLP], env=second, netns=True)
    assert r.returncode == 0, r.stderr
    url = upstream.demo.urls[upstream.demo.branches["master"]]["mlp"]
    assert same_weights(json.loads(r.stdout.splitlines()[-1]), upstream.demo.weights[url])


def test_a_streamed_bundle_goes_through_a_registry(registry, upstream, master_bundle,
                                                   streamed_bundle, tmp_path, memo):
    """A format 4 bundle (pack --stream), its manifest at its end, is pushed as it is:
    install reads that manifest first, by range, then the layer once, in order; the
    store is the one the file makes, and loads with no network; pull gives back its
    bytes. One whose first frame lies is refused as the file is, the store unchanged."""
    from tests.test_streamed import _frames, _pointed

    out = Path(streamed_bundle)
    ref = registry.ref("models/streamed:v1")
    env = _env(tmp_path)
    r = run(MIRROR + ["push", str(out), ref, "--plain-http"], env=env)
    assert r.returncode == 0, r.stderr
    for command in (["verify"], ["install", "--no-megengine-cache"]):
        r = run(MIRROR + command + [ref, "--plain-http"], env=env)
        assert r.returncode == 0, r.stderr
    alone = _env(tmp_path, "alone")
    assert run(MIRROR + ["install", "--no-megengine-cache", str(out)],
               env=alone).returncode == 0
    assert store_content(env["MGE_MIRROR_HOME"]) == store_content(alone["MGE_MIRROR_HOME"])
    r = run([sys.executable, "-c", LOAD_MLP], env=env, netns=True)
    assert r.returncode == 0, r.stderr
    url = upstream.demo.urls[upstream.demo.branches["master"]]["mlp"]
    assert same_weights(json.loads(r.stdout.splitlines()[-1]), upstream.demo.weights[url])
    oci.pull(ref, str(tmp_path / "pulled.hub"), connection=PLAIN)
    assert (tmp_path / "pulled.hub").read_bytes() == out.read_bytes()

    data = out.read_bytes()
    frames = _frames(data)
    head_at, head_len = frames[-2]  # the manifest's frame, then the end of the archive
    lying = _env(tmp_path, "lying")
    assert run(MIRROR + ["install", "--no-megengine-cache", master_bundle],
               env=lying).returncode == 0
    before = tree_digest(lying["MGE_MIRROR_HOME"])
    _, artifact = _manifest(registry, "models/streamed", "v1")
    for name, content, said in (
            ("outside", _pointed(data, len(data) - 10, 100),
             "its first frame does not point to a manifest in the file"),
            ("code", _pointed(data, *frames[0]), "first member must be manifest.json"),
            ("half", _pointed(data, head_at, head_len - 5), "truncated")):
        # as a registry could hold it (mirror push reads the manifest, and refuses it)
        artifact["layers"][0].update(digest=_put_blob(registry, "models/streamed", content),
                                     size=len(content))
        requests.put(f"{registry.url}/v2/models/streamed/manifests/{name}", timeout=10,
                     data=json.dumps(artifact).encode(),
                     headers={"Content-Type": artifact["mediaType"]}).raise_for_status()
        lie = registry.ref(f"models/streamed:{name}")
        r = run(MIRROR + ["install", lie, "--plain-http"], env=lying)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 3 and len(lines) == 1, (name, r.stderr)
        assert lines[0].startswith(f"Error: bad bundle {lie}: ") and said in lines[0], \
            (name, lines)
        assert tree_digest(lying["MGE_MIRROR_HOME"]) == before, name

    # the registry's copy damaged inside the manifest's frame, which is read before the
    # layer's digest can be checked: the registry is named, as for any damaged layer
    layer = artifact["layers"][0]
    artifact["layers"][0].update(digest=_put_blob(registry, "models/streamed", data),
                                 size=len(data))
    requests.put(f"{registry.url}/v2/models/streamed/manifests/damaged", timeout=10,
                 data=json.dumps(artifact).encode(),
                 headers={"Content-Type": artifact["mediaType"]}).raise_for_status()
    stored = registry.blob_file(layer["digest"])  # the module's other tests share it
    damaged = bytearray(data)
    damaged[head_at + head_len // 2] ^= 0xFF
    try:
        with open(stored, "wb") as fh:
            fh.write(damaged)
        r = run(MIRROR + ["install", registry.ref("models/streamed:damaged"),
                          "--plain-http"], env=lying)
    finally:
        with open(stored, "wb") as fh:
            fh.write(data)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        f"Error: registry {registry.ref('models/streamed:damaged')}: damaged: layer "), \
        r.stderr
    assert tree_digest(lying["MGE_MIRROR_HOME"]) == before


def test_the_artifact_is_what_oras_pulls(registry, split, tmp_path, memo):
    shuffled = list(split.parts)
    random.Random(3).shuffle(shuffled)
    report = oci.push(shuffled, registry.ref("models/split:parts"), PLAIN)
    assert report.layers == len(split.parts) >= 3 and report.uploaded == len(split.parts)

    data, manifest = _manifest(registry, "models/split", "parts")
    assert sha256_digest(data) == report.digest
    assert manifest["artifactType"] == "application/vnd.megengine.mirror.bundle.v2"
    assert manifest["config"]["mediaType"] == oci.CONFIG_TYPE
    annotations = manifest["annotations"]
    assert annotations["org.megengine.mirror.bundle-id"] == bundle.bundle_id(
        bundle.read_manifest_bytes(split.parts[0]))
    assert annotations["org.opencontainers.image.revision"] == \
        bundle.read_manifest(split.parts[0]).repos[0].snapshots[0].commit
    assert annotations["org.opencontainers.image.source"].endswith("/demo/tinynets.git") \
        or "demo/tinynets" in annotations["org.opencontainers.image.source"]

    # as `oras pull` does: each layer's blob, written under its title, is a part
    out = tmp_path / "oras"
    out.mkdir()
    for layer in manifest["layers"]:
        title = layer["annotations"]["org.opencontainers.image.title"]
        blob = requests.get(f"{registry.url}/v2/models/split/blobs/{layer['digest']}",
                            timeout=10).content
        assert sha256_digest(blob) == layer["digest"]
        (out / title).write_bytes(blob)
    assert sorted(os.listdir(out)) == [os.path.basename(p) for p in split.parts]
    for p in split.parts:
        assert (out / os.path.basename(p)).read_bytes() == open(p, "rb").read()
    config = requests.get(f"{registry.url}/v2/models/split/blobs/"
                          f"{manifest['config']['digest']}", timeout=10).content
    assert config == bundle.read_manifest_bytes(split.parts[0])

    # pull --parts writes them as pushed; without, their concatenation: one bundle
    got = oci.pull(registry.ref("models/split:parts"), str(tmp_path / "p.hub"), True, PLAIN)
    assert list(got.files) == [str(tmp_path / f"p.hub.{i:03d}")
                               for i in range(1, len(split.parts) + 1)]
    for mine, theirs in zip(got.files, split.parts):
        assert open(mine, "rb").read() == open(theirs, "rb").read()
    whole = oci.pull(registry.ref("models/split:parts"), str(tmp_path / "w.hub"),
                     connection=PLAIN)
    assert open(whole.files[0], "rb").read() == b"".join(open(p, "rb").read()
                                                        for p in split.parts)
    r = run(MIRROR + ["verify", whole.files[0]])
    assert r.returncode == 0, r.stderr


def test_install_from_parts_in_a_registry(registry, split, tmp_path, memo):
    oci.push(split.parts, registry.ref("models/split:v1"), PLAIN)
    env = _env(tmp_path)
    r = run(MIRROR + ["install", registry.ref("models/split:v1"), "--plain-http"], env=env)
    assert r.returncode == 0, r.stderr
    alone = _env(tmp_path, "alone")
    assert run(MIRROR + ["install"] + split.parts, env=alone).returncode == 0
    assert store_content(env["MGE_MIRROR_HOME"]) == store_content(alone["MGE_MIRROR_HOME"])


# --- what is not sent twice ------------------------------------------------------------


def test_a_second_tag_uploads_no_blob(registry, master_bundle, memo):
    first = oci.push([master_bundle], registry.ref("models/twice:a"), PLAIN)
    blobs = registry.blob_count()
    second = oci.push([master_bundle], registry.ref("models/twice:b"), PLAIN)
    assert (second.uploaded, second.uploaded_bytes, second.present) == (0, 0, 1)
    assert second.digest == first.digest and registry.blob_count() == blobs
    # another repository of the same registry: mounted, not sent
    third = oci.push([master_bundle], registry.ref("models/elsewhere:a"), PLAIN,
                     mount_from="models/twice")
    assert (third.uploaded, third.mounted) == (0, 1)


def test_a_delta_after_its_whole_bundle_uploads_only_itself(registry, upstream, tmp_path,
                                                            memo):
    opts = PackOptions(git_host=upstream.git.host, protocol="http", progress=False,
                       stream=False)
    old, new, delta = (str(tmp_path / n) for n in ("c1.hub", "master.hub", "delta.hub"))
    pack([upstream.spec("@" + upstream.demo.commits["c1"])], old, opts)
    pack([upstream.spec()], new, opts)
    pack([upstream.spec()], delta, dataclasses.replace(opts, since=old))
    assert bundle.read_manifest(delta).prerequisites is not None

    whole = oci.push([old], registry.ref("delta/models:c1"), PLAIN)
    assert whole.uploaded == 1
    again = oci.push([old], registry.ref("delta/models:c1-again"), PLAIN)
    assert (again.uploaded, again.present) == (0, 1)
    pushed = oci.push([delta], registry.ref("delta/models:master"), PLAIN)
    assert (pushed.uploaded, pushed.uploaded_bytes) == (1, os.path.getsize(delta))
    assert os.path.getsize(delta) < os.path.getsize(new)
    # installed from the registry onto what the whole bundle brought: as the whole bundle
    by_delta, by_whole = _env(tmp_path, "by-delta"), _env(tmp_path, "by-whole")
    for env, second in ((by_delta, registry.ref("delta/models:master")), (by_whole, new)):
        for source in (registry.ref("delta/models:c1"), second):
            r = run(MIRROR + ["install", source, "--plain-http"], env=env)
            assert r.returncode == 0, r.stderr
    assert store_content(by_delta["MGE_MIRROR_HOME"]) == \
        store_content(by_whole["MGE_MIRROR_HOME"])


# --- refusals -----------------------------------------------------------------------------


def test_a_missing_tag_names_it_and_changes_nothing(registry, master_bundle, tmp_path, memo):
    env = _env(tmp_path)
    assert run(MIRROR + ["install", master_bundle], env=env).returncode == 0
    before = tree_digest(env["MGE_MIRROR_HOME"])
    r = run(MIRROR + ["install", registry.ref("models/demo:nope"), "--plain-http"], env=env)
    assert r.returncode == 4  # not found, as a git ref
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: registry {registry.ref('models/demo:nope')}: not found: tag nope in "
        f"{registry.host}/models/demo (MANIFEST_UNKNOWN: manifest unknown)")
    assert tree_digest(env["MGE_MIRROR_HOME"]) == before


def test_a_damaged_layer_is_refused_and_the_store_unchanged(registry, master_bundle,
                                                            upstream, tmp_path, memo):
    # a bundle of its own (dev), so the damage touches no other test's blob
    mine = tmp_path / "mine.hub"
    pack([upstream.spec(":dev")], str(mine), PackOptions(
        git_host=upstream.git.host, protocol="http", progress=False, stream=False))
    report = oci.push([str(mine)], registry.ref("models/damaged:v1"), PLAIN)
    (layer,) = json.loads(_manifest(registry, "models/damaged", "v1")[0])["layers"]
    path = registry.blob_file(layer["digest"])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40  # same size; the registry serves it as stored
    with open(path, "wb") as fh:
        fh.write(data)

    env = _env(tmp_path)
    assert run(MIRROR + ["install", master_bundle], env=env).returncode == 0
    before = tree_digest(env["MGE_MIRROR_HOME"])
    r = run(MIRROR + ["install", registry.ref("models/damaged:v1"), "--plain-http"], env=env)
    damaged = (f"layer mine.hub is {len(data)} bytes that hash to "
               f"{sha256_digest(bytes(data))}, not {len(data)} bytes of {layer['digest']}: "
               f"the registry's copy is damaged (push the bundle again)")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"Error: registry {registry.ref('models/damaged:v1')}: damaged: {damaged}"
    assert tree_digest(env["MGE_MIRROR_HOME"]) == before

    with pytest.raises(RegistryError) as e:
        oci.pull(report.reference, str(tmp_path / "out.hub"), connection=PLAIN)
    assert e.value.kind == "damaged"
    assert str(e.value) == f"registry {report.reference}: damaged: {damaged}"
    assert not os.path.exists(tmp_path / "out.hub")


def test_a_pull_that_broke_off_resumes(registry, master_bundle, tmp_path, memo):
    oci.push([master_bundle], registry.ref("models/resume:v1"), PLAIN)
    whole = open(master_bundle, "rb").read()
    out = tmp_path / "r.hub"
    (tmp_path / "r.hub.partial").write_bytes(whole[:len(whole) // 3])
    got = oci.pull(registry.ref("models/resume:v1"), str(out), connection=PLAIN)
    assert got.resumed_from == len(whole) // 3 and out.read_bytes() == whole
    # what was left is hashed again, not trusted: bytes of another pull (not the
    # registry's fault) are dropped and the layer fetched whole
    (tmp_path / "r2.hub.partial").write_bytes(b"x" * 1000)
    got = oci.pull(registry.ref("models/resume:v1"), str(tmp_path / "r2.hub"),
                   connection=PLAIN)
    assert got.resumed_from == 0 and (tmp_path / "r2.hub").read_bytes() == whole
    assert not os.path.exists(tmp_path / "r2.hub.partial")
    # a folder that is not there: said, not a traceback
    with pytest.raises(MirrorError) as e:
        oci.pull(registry.ref("models/resume:v1"), str(tmp_path / "no" / "r.hub"),
                 connection=PLAIN)
    assert str(e.value) == (f"cannot write {tmp_path / 'no' / 'r.hub.partial'}: No such "
                            f"file or directory")


def test_what_is_not_a_mirror_artifact_is_refused(registry, tmp_path):
    blob = b"{}"
    base = f"{registry.url}/v2/other/image"
    loc = requests.post(f"{base}/blobs/uploads/", timeout=10).headers["Location"]
    requests.put(requests.compat.urljoin(base, loc), params={"digest": sha256_digest(blob)},
                 data=blob, timeout=10).raise_for_status()
    image = json.dumps({"schemaVersion": 2, "mediaType":
                        "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   "digest": sha256_digest(blob), "size": 2},
                        "layers": []}).encode()
    requests.put(f"{base}/manifests/latest", data=image, timeout=10, headers={
        "Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()
    env = _env(tmp_path)
    r = run(MIRROR + ["install", registry.ref("other/image"), "--plain-http"], env=env)
    assert r.returncode == 3
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: bad bundle {registry.ref('other/image')}: not a mirror bundle: its "
        f"artifactType is None, not application/vnd.megengine.mirror.bundle.vN")
    assert not os.path.exists(env["MGE_MIRROR_HOME"] + "/repos")


def test_connection_errors_say_which(registry, master_bundle, tmp_path):
    env = _env(tmp_path)
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: refused
        r = run(MIRROR + ["install", f"oci://127.0.0.1:{dead}/x/y:v1", "--plain-http"],
                env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: registry oci://127.0.0.1:{dead}/x/y:v1: connection refused: nothing answers "
        f"at 127.0.0.1:{dead} (is the registry up, and is this its port?)")
    # TLS spoken to an HTTP registry
    r = run(MIRROR + ["pull", registry.ref("models/demo:v1"), "-o", str(tmp_path / "x")],
            env=env)
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: registry {registry.ref('models/demo:v1')}: TLS: ")
    assert "--plain-http" in r.stderr


@pytest.mark.parametrize("text, reason", [
    ("docker://h/x", "it does not start with oci://"),
    ("oci://h", "expected oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]"),
    ("oci://h/Upper", "'Upper' is not a repository name"),
    ("oci://h/x:-bad", "'-bad' is not a tag"),
    ("oci://h/x@sha256:abc", "'sha256:abc' is not sha256: and 64 lowercase hex digits"),
    ("oci://h_/x", "'h_' is not a host name"),
])
def test_references_are_checked(text, reason):
    with pytest.raises(OCIReferenceError) as e:
        Reference.parse(text)
    assert str(e.value).startswith(f"invalid registry reference {text!r}: {reason}")


def test_references_parse():
    assert Reference.parse("oci://127.0.0.1:5000/a/b:v1") == \
        Reference("127.0.0.1:5000", "a/b", "v1")
    ref = Reference.parse("oci://reg.example/a/b@sha256:" + "0" * 64)
    assert (ref.tag, ref.reference) == (None, "sha256:" + "0" * 64)
    assert str(Reference.parse("oci://h:1/x")) == "oci://h:1/x"
    assert Reference.parse("oci://h:1/x").reference == "latest"


# --- TLS and Basic auth ---------------------------------------------------------------------


def test_tls_and_basic_auth(secure, master_bundle, tmp_path):
    server, certs = secure
    target = server.ref("models/demo:v1")
    env = dict(_env(tmp_path), MGE_MIRROR_REGISTRY_USERNAME="alice",
               MGE_MIRROR_REGISTRY_PASSWORD="wonderland")
    r = run(MIRROR + ["push", master_bundle, target, "--ca-file", certs.ca], env=env)
    assert r.returncode == 0, r.stderr

    # the system's trust store does not know the fixture's CA
    r = run(MIRROR + ["install", target], env=env)
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: registry {target}: TLS: ")
    assert "certificate verify failed" in r.stderr and "--ca-file" in r.stderr

    wrong = dict(env, MGE_MIRROR_REGISTRY_PASSWORD="guess")
    r = run(MIRROR + ["install", target, "--ca-file", certs.ca], env=wrong)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: registry {target}: unauthorized: {server.host} refused the credentials "
        f"from MGE_MIRROR_REGISTRY_USERNAME/_PASSWORD (UNAUTHORIZED: authentication "
        f"required)")
    assert not os.path.exists(wrong["MGE_MIRROR_HOME"] + "/repos")

    anonymous = _env(tmp_path, "anonymous")
    anonymous.update(DOCKER_CONFIG=str(tmp_path / "nodocker"))
    r = run(MIRROR + ["pull", target, "-o", str(tmp_path / "a.hub"), "--ca-file", certs.ca],
            env=anonymous)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: registry {target}: unauthorized: {server.host} asks for a username and "
        f"password, and none is configured (docker login, ~/.docker/config.json, or "
        f"MGE_MIRROR_REGISTRY_USERNAME/_PASSWORD)")

    # docker login's file
    docker = tmp_path / "docker"
    docker.mkdir()
    import base64
    (docker / "config.json").write_text(json.dumps({"auths": {server.host: {
        "auth": base64.b64encode(b"alice:wonderland").decode()}}}))
    logged_in = dict(_env(tmp_path, "docker-store"), DOCKER_CONFIG=str(docker))
    r = run(MIRROR + ["install", target, "--ca-file", certs.ca], env=logged_in)
    assert r.returncode == 0, r.stderr
    r = run([sys.executable, "-c", LOAD_MLP], env=logged_in, netns=True)
    assert r.returncode == 0, r.stderr


# --- the Bearer token flow --------------------------------------------------------------------


def test_bearer_token_flow(token_registry, master_bundle, tmp_path):
    server, tokens = token_registry
    target = server.ref("models/demo:v1")
    env = dict(_env(tmp_path), MGE_MIRROR_REGISTRY_USERNAME="alice",
               MGE_MIRROR_REGISTRY_PASSWORD="wonderland")
    r = run(MIRROR + ["push", master_bundle, target, "--plain-http"], env=env)
    assert r.returncode == 0, r.stderr
    # (Distribution names the actions in either order)
    assert any(user == "alice" and [(s.rsplit(":", 1)[0], set(s.rsplit(":", 1)[1].split(",")))
                                    for s in scopes] == [("repository:models/demo",
                                                          {"pull", "push"})]
               for user, scopes in tokens.issued), tokens.issued
    r = run(MIRROR + ["install", target, "--plain-http"], env=env)
    assert r.returncode == 0, r.stderr

    wrong = dict(env, MGE_MIRROR_REGISTRY_PASSWORD="guess",
                 MGE_MIRROR_HOME=str(tmp_path / "wrong"))
    _login_refused(target, wrong, f"the token service {tokens.base_url}/token refused the "
                                  f"credentials from MGE_MIRROR_REGISTRY_USERNAME/_PASSWORD")

    # anonymous: a token that grants nothing, then the registry's refusal
    anonymous = dict(_env(tmp_path, "anon"), DOCKER_CONFIG=str(tmp_path / "nodocker"))
    r = run(MIRROR + ["install", target, "--plain-http"], env=anonymous)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: registry {target}: unauthorized: {server.host} refused an anonymous request "
        f"(docker login, ~/.docker/config.json, or MGE_MIRROR_REGISTRY_USERNAME/_PASSWORD) "
        f"(UNAUTHORIZED: authentication required)")


def test_an_identity_token_is_traded_for_an_access_token(token_registry, master_bundle,
                                                          tmp_path):
    """``docker login`` to a registry with an OAuth2 login stores an ``identitytoken``
    (a refresh token), not a password: it goes to the token service in docker's POST,
    for an access token; a wrong one is refused, naming where it came from."""
    server, tokens = token_registry
    target = server.ref("models/oauth:v1")
    docker = tmp_path / "docker"
    docker.mkdir()
    config = docker / "config.json"
    config.write_text(json.dumps({"auths": {server.host: {
        "auth": "PHRva2VuPjo=", "identitytoken": IDENTITY_TOKEN}}}))  # "<token>:"
    env = dict(_env(tmp_path), DOCKER_CONFIG=str(docker))
    r = run(MIRROR + ["push", master_bundle, target, "--plain-http"], env=env)
    assert r.returncode == 0, r.stderr
    r = run(MIRROR + ["install", target, "--plain-http"], env=env)
    assert r.returncode == 0, r.stderr
    assert ("alice", ["repository:models/oauth:pull"]) in tokens.issued

    config.write_text(json.dumps({"auths": {server.host: {"identitytoken": "expired"}}}))
    wrong = dict(env, MGE_MIRROR_HOME=str(tmp_path / "wrong"))
    _login_refused(target, wrong, f"the token service {tokens.base_url}/token refused the "
                                  f"identity token from {config} (auths.{server.host})")


def _login_refused(target, env, said):
    """An install whose login the registry refuses: one line, exit 1, no store made."""
    r = run(MIRROR + ["install", target, "--plain-http"], env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"Error: registry {target}: unauthorized: {said}"
    assert not os.path.exists(os.path.join(env["MGE_MIRROR_HOME"], "repos"))


# --- signatures ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["manifest-first", "streamed"])
def test_a_signature_survives_the_round_trip(registry, master_bundle, streamed_bundle,
                                             tmp_path, memo, layout):
    """Also for format 4 (pack --stream), whose manifest is read first by range."""
    keys = keypairs(tmp_path, ("release",))
    signed = tmp_path / "signed.hub"
    shutil.copy(master_bundle if layout == "manifest-first" else streamed_bundle, signed)
    r = run(MIRROR + ["sign", str(signed), "--key", keys["release"][0]])
    assert r.returncode == 0, r.stderr
    pushed = oci.push([str(signed)], registry.ref(f"models/signed:{layout}"), PLAIN)
    assert pushed.layers == 2  # the bundle, and BUNDLE.sig beside it
    oci.push([master_bundle], registry.ref("models/unsigned:v1"), PLAIN)

    got = oci.pull(registry.ref(f"models/signed:{layout}"), str(tmp_path / "p.hub"),
                   connection=PLAIN)
    assert got.files == (str(tmp_path / "p.hub"), str(tmp_path / "p.hub.sig"))
    r = run(MIRROR + ["verify", str(tmp_path / "p.hub"), "--trusted-key", keys["release"][1]])
    assert r.returncode == 0 and r.stdout.strip().endswith(f"signed by {keys['release'][2]}")

    home = str(tmp_path / "store")
    policy = InstallOptions(trusted_keys=(keys["release"][1],), require_signature=True,
                            registry=PLAIN)
    report = install(oci.RegistrySource(registry.ref(f"models/signed:{layout}"), PLAIN),
                     home, policy)
    assert report.signed_by == keys["release"][2]

    other = str(tmp_path / "other")
    with pytest.raises(SignatureError) as e:
        install(oci.RegistrySource(registry.ref("models/unsigned:v1"), PLAIN), other, policy)
    assert str(e.value) == f"refusing {registry.ref('models/unsigned:v1')}: it is not signed"
    assert not os.path.exists(os.path.join(other, "repos"))


def test_push_refuses_what_is_not_one_whole_bundle(registry, split, tmp_path):
    with pytest.raises(BundleError, match="not among the files given"):
        oci.push(split.parts[1:], registry.ref("models/x:v1"), PLAIN)
    junk = tmp_path / "junk.hub"
    junk.write_bytes(b"not a bundle")
    with pytest.raises(BundleError):
        oci.push([str(junk)], registry.ref("models/x:v1"), PLAIN)
    with pytest.raises(OCIReferenceError, match="push stores a tag"):
        oci.push(split.parts, registry.ref("models/x@sha256:" + "0" * 64), PLAIN)


# --- where credentials come from ------------------------------------------------------------


def test_credentials_are_found_as_docker_finds_them(tmp_path):
    from mirror.config import registry_credentials
    from mirror.errors import ConfigError

    docker = tmp_path / "docker"
    docker.mkdir()
    helper = tmp_path / "bin" / "docker-credential-site"
    helper.parent.mkdir()
    # the credential helper protocol: the server on stdin, JSON on stdout
    helper.write_text('#!/bin/sh\nread host\n[ "$host" = "reg.site:5000" ] || exit 1\n'
                      'echo \'{"ServerURL":"reg.site:5000","Username":"bot","Secret":"t0k"}\'\n')
    helper.chmod(0o755)
    env = {"DOCKER_CONFIG": str(docker), "PATH": f"{helper.parent}:{os.environ['PATH']}"}
    config = docker / "config.json"

    assert registry_credentials("reg.site:5000", env) is None  # no file: anonymous
    import base64
    config.write_text(json.dumps({"auths": {"https://reg.site:5000": {
        "auth": base64.b64encode(b"alice:pw:with:colons").decode()}}}))
    found = registry_credentials("reg.site:5000", env)
    assert (found.username, found.password, found.source) == (
        "alice", "pw:with:colons", f"{config} (auths.reg.site:5000)")
    assert registry_credentials("other:5000", env) is None

    config.write_text(json.dumps({"credHelpers": {"reg.site:5000": "site"}, "auths": {}}))
    found = registry_credentials("reg.site:5000", env)
    assert (found.username, found.password, found.source) == (
        "bot", "t0k", "docker-credential-site")
    config.write_text(json.dumps({"credsStore": "site"}))
    assert registry_credentials("reg.site:5000", env).username == "bot"
    assert registry_credentials("other:5000", env) is None  # the helper knows it not

    # docker's convention: a helper that answers "<token>" gives an identity token
    helper.write_text('#!/bin/sh\nread host\n'
                      'echo \'{"ServerURL":"reg.site:5000","Username":"<token>","Secret":"rt"}\'\n')
    found = registry_credentials("reg.site:5000", env)
    assert (found.username, found.password, found.identity_token) == ("<token>", "", "rt")
    assert "rt" not in repr(found).replace("docker-credential-site", "")
    config.write_text(json.dumps({"auths": {"reg.site:5000": {
        "auth": base64.b64encode(b"<token>:").decode(), "identitytoken": "rt2"}}}))
    found = registry_credentials("reg.site:5000", env)
    assert (found.username, found.identity_token) == ("<token>", "rt2")

    config.write_text(json.dumps({"credsStore": "missing"}))
    with pytest.raises(ConfigError, match="docker-credential-missing is not on PATH"):
        registry_credentials("reg.site:5000", env)
    config.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        registry_credentials("reg.site:5000", env)

    # the environment first, whatever the file says
    env.update(MGE_MIRROR_REGISTRY_USERNAME="ci", MGE_MIRROR_REGISTRY_PASSWORD="secret")
    found = registry_credentials("reg.site:5000", env)
    assert (found.username, found.source) == ("ci", "MGE_MIRROR_REGISTRY_USERNAME/_PASSWORD")
    assert "secret" not in repr(found)
    del env["MGE_MIRROR_REGISTRY_PASSWORD"]
    with pytest.raises(ConfigError, match="set both"):
        registry_credentials("reg.site:5000", env)


# --- artifacts that lie, stored in the real registry -------------------------------------------


def _lie(manifest: dict, how: str) -> dict:
    lie = json.loads(json.dumps(manifest))
    layer = lie["layers"][0]
    if how == "short":
        layer["size"] -= 1
    elif how == "long":
        layer["size"] += 1
    elif how == "escape":
        layer["annotations"]["org.opencontainers.image.title"] = "../evil.hub"
    elif how == "control":
        layer["annotations"]["org.opencontainers.image.title"] = "a\nb.hub"
    elif how == "config":
        lie["config"] = dict(layer, mediaType=oci.CONFIG_TYPE)
    return lie


@pytest.mark.parametrize("how, code, said", [
    ("short", 1, "registry {ref}: damaged: layer master.hub is longer than the {short} bytes "
                 "its descriptor says: the registry's copy is damaged (push the bundle again)"),
    ("long", 1, "registry {ref}: damaged: layer master.hub is {size} bytes that hash to "
                "{digest}, not {long} bytes of {digest}: the registry's copy is damaged (push "
                "the bundle again)"),
    ("escape", 3, "bad bundle {ref}: blob {digest}'s title '../evil.hub' is not a plain name"),
    ("control", 3, "bad bundle {ref}: blob {digest}'s title 'a\\nb.hub' holds the control "
                   "character '\\n'"),
])
def test_an_artifact_that_lies_is_refused_with_the_store_unchanged(
        registry, master_bundle, tmp_path, memo, how, code, said):
    oci.push([master_bundle], registry.ref("models/lies:base"), PLAIN)
    _, manifest = _manifest(registry, "models/lies", "base")
    lie = json.dumps(_lie(manifest, how)).encode()
    requests.put(f"{registry.url}/v2/models/lies/manifests/{how}", data=lie, timeout=10,
                 headers={"Content-Type": manifest["mediaType"]}).raise_for_status()
    ref = registry.ref(f"models/lies:{how}")
    size, digest = os.path.getsize(master_bundle), manifest["layers"][0]["digest"]
    said = said.format(ref=ref, size=size, short=size - 1, long=size + 1, digest=digest)

    env = _env(tmp_path)
    assert run(MIRROR + ["install", master_bundle], env=env).returncode == 0
    before = tree_digest(env["MGE_MIRROR_HOME"])
    r = run(MIRROR + ["install", ref, "--plain-http"], env=env)
    assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (code, f"Error: {said}")
    assert tree_digest(env["MGE_MIRROR_HOME"]) == before

    (tmp_path / "out").mkdir()
    r = run(MIRROR + ["pull", ref, "--plain-http", "-o", str(tmp_path / "out" / "p.hub"),
                      "--parts"], env=env)
    assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (code, f"Error: {said}")
    assert os.listdir(tmp_path / "out") in ([], ["p.hub.partial"])
    assert not os.path.exists(tmp_path / "evil.hub")


def test_a_config_that_is_not_the_bundles_manifest_is_refused_by_pull(
        registry, master_bundle, tmp_path, memo):
    oci.push([master_bundle], registry.ref("models/lies:base"), PLAIN)
    _, manifest = _manifest(registry, "models/lies", "base")
    requests.put(f"{registry.url}/v2/models/lies/manifests/config", timeout=10,
                 data=json.dumps(_lie(manifest, "config")).encode(),
                 headers={"Content-Type": manifest["mediaType"]}).raise_for_status()
    with pytest.raises(BundleError) as e:
        oci.pull(registry.ref("models/lies:config"), str(tmp_path / "c.hub"),
                 connection=PLAIN)
    assert str(e.value) == (f"bad bundle {registry.ref('models/lies:config')}: its config "
                            f"is not the manifest of the bundle its layers hold")


# --- a registry that misbehaves as the real one will not ------------------------------------


@pytest.mark.parametrize("mode, code, said", [
    ("scope-loop", 1, "unauthorized: {host} refused an anonymous request (docker login, "
                      "~/.docker/config.json, or MGE_MIRROR_REGISTRY_USERNAME/_PASSWORD)"),
    ("token-bomb", 1, "protocol: the token service http://{host}/token: the answer is over "
                      "65536 bytes"),
    ("error-bomb", 1, "protocol: tag t in {host}/x/y: HTTP 500"),
    ("errors-not-a-list", 4, "not found: tag t in {host}/x/y"),
    ("manifest-cut", 1, "protocol: tag t in {host}/x/y: the answer broke off: "),
    ("annotations-not-an-object", 3, "blob '{layer}''s annotations are not an object"),
    ("nested", 3, "its OCI manifest is not JSON"),
    ("bad-gzip", 1, "protocol: layer b.hub: "),
    # a bundle packed with --stream has its manifest at its end, read by range first
    ("ignores-range", 1, "protocol: the manifest of layer b.hub: the registry ignores "
                         "range requests, which a bundle packed with --stream needs (its "
                         "manifest is at its end): mirror pull it, then install the file"),
    # tokens renewed as they expire: the client gets past the registry to the bytes
    ("token-per-request", 3, "not a zstd frame at byte 0"),
])
def test_a_hostile_registry_gets_one_line_bounded_work_and_memory(tmp_path, mode, code,
                                                                   said):
    from tests.upstream.hostile_registry import LAYER_DIGEST, HostileRegistry

    with HostileRegistry(mode) as server:
        host = f"127.0.0.1:{server.port}"
        ref = f"oci://{host}/x/y:t"
        env = dict(_env(tmp_path), DOCKER_CONFIG=str(tmp_path / "nodocker"))
        r = run(["/usr/bin/time", "-f", "%M"] + MIRROR + ["install", ref, "--plain-http"],
                env=env, timeout=60)
        requests_made = len(server.seen)
    *lines, rss = [line for line in r.stderr.strip().splitlines()
                   if not line.startswith("Command exited with")]  # /usr/bin/time's
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    said = said.format(host=host, layer=LAYER_DIGEST)
    if code in (1, 4):  # the registry's failure, or its "not found"
        assert lines[0].startswith(f"Error: registry {ref}: {said}"), lines[0]
    else:
        assert lines[0].startswith(f"Error: bad bundle {ref}: ") and said in lines[0], lines[0]
    assert int(rss) < 150 * 1024, f"{rss} KiB"
    assert requests_made < 12
    assert not os.path.exists(os.path.join(env["MGE_MIRROR_HOME"], "repos"))


def test_credentials_never_go_to_another_host(tmp_path, master_bundle):
    from tests.upstream.hostile_registry import HostileRegistry

    with HostileRegistry("location-elsewhere") as server:
        env = dict(_env(tmp_path), MGE_MIRROR_REGISTRY_USERNAME="alice",
                   MGE_MIRROR_REGISTRY_PASSWORD="secret")
        r = run(MIRROR + ["push", master_bundle, f"oci://127.0.0.1:{server.port}/x/y:t",
                          "--plain-http"], env=env, timeout=60)
        seen = list(server.seen)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    elsewhere = [s for s in seen if s[1].startswith("localhost")]
    assert elsewhere and all(auth is None for _, _, _, auth in elsewhere), seen
    assert any(auth for _, host, _, auth in seen if host.startswith("127.0.0.1"))


def test_bundles_files_and_references_mixed_are_each_installed(registry, all_refs_bundle,
                                                               master_bundle, tmp_path, memo):
    oci.push([master_bundle], registry.ref("mixed/a:v1"), PLAIN)
    oci.push([all_refs_bundle], registry.ref("mixed/b:v1"), PLAIN)
    env = _env(tmp_path)
    refs = [registry.ref("mixed/a:v1"), registry.ref("mixed/b:v1")]
    r = run(MIRROR + ["install", master_bundle] + refs + ["--plain-http", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    assert [o["bundle"] for o in json.loads(r.stdout)["bundles"]] == [master_bundle] + refs
    r = run(MIRROR + ["verify"] + refs + ["--plain-http"], env=env)
    assert r.returncode == 0, r.stderr
    assert [line.split(": OK")[0] for line in r.stdout.splitlines()] == refs


def test_oras_pulls_the_parts(registry, split, tmp_path, memo):
    """ORAS's own Python SDK (the `oras` CLI is not packaged here) pulls the artifact
    as any ORAS artifact: each layer written under its title, the parts as packed."""
    import oras.client

    oci.push(split.parts, registry.ref("oras/parts:v1"), PLAIN)
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    files = client.pull(target=f"{registry.host}/oras/parts:v1", outdir=str(tmp_path))
    assert sorted(os.path.basename(f) for f in files) == \
        [os.path.basename(p) for p in split.parts]
    for path in split.parts:
        assert (tmp_path / os.path.basename(path)).read_bytes() == open(path, "rb").read()
    r = run(MIRROR + ["install"] + sorted(files), env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
