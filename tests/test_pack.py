"""mirror pack against the real loopback git and weight servers."""

import hashlib
import json
import os
import subprocess

import pytest
import zstandard

from mirror import bundle
from mirror.errors import RefNotFoundError
from mirror.installer import install
from mirror.model import Manifest
from mirror.packer import PackOptions, pack
from tests.conftest import MIRROR, manifest_json, run


def _git_show(upstream, commit, path) -> bytes:
    return subprocess.run(["git", "--git-dir", upstream.demo.bare, "show", f"{commit}:{path}"],
                          capture_output=True, check=True).stdout


def test_cli_pack_pinned_commit_writes_a_verified_tar_zstd_bundle(upstream, tmp_path):
    c2 = upstream.demo.commits["c2"]
    out = tmp_path / "demo.hub"
    r = run(MIRROR + ["pack", upstream.spec("@" + c2[:8]), "-o", str(out),
                      "--git-host", upstream.git.host, "--protocol", "http", "-q"])
    assert r.returncode == 0, r.stderr
    assert f"packed demo/tinynets:master -> {c2}" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["demo.hub"]  # nothing left beside it
    urls = upstream.demo.urls[c2]
    assert f"coverage demo/tinynets@{c2[:12]} small_cnn: {urls['small_cnn']}\n" in r.stdout
    # an entrypoint that downloads in its body: its URL, found without running it
    assert f"coverage demo/tinynets@{c2[:12]} mlp_from_url: {urls['mlp']}\n" in r.stdout

    # Standard tools can list it, manifest first.
    names = subprocess.run(["tar", "--zstd", "-tf", str(out)], capture_output=True, text=True,
                           check=True).stdout.split()
    assert names[0] == "manifest.json"

    manifest = bundle.read(str(out)).to_json()
    (repo,) = manifest["repos"]
    assert (repo["host"], repo["owner"], repo["name"]) == (upstream.git.host, "demo", "tinynets")
    assert repo["refs"] == [{"name": "master", "kind": "branch", "commit": c2,
                             "asked": upstream.spec("@" + c2[:8]),
                             "resolved_at": repo["refs"][0]["resolved_at"],
                             "fetched_from": upstream.git.url("demo/tinynets")}]
    (snap,) = repo["snapshots"]
    assert snap["commit"] == c2
    paths = [f["path"] for f in snap["files"]]
    assert paths == sorted(["README.md", "hubconf.py", "tinynets/__init__.py",
                            "tinynets/labels.txt", "tinynets/mlp.py",
                            "tinynets/vision/__init__.py", "tinynets/vision/cnn.py"])
    for f in snap["files"]:  # every file is exactly git's blob
        data = _git_show(upstream, c2, f["path"])
        assert (f["size"], f["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert "code/" + c2 + "/" + f["path"] in names

    served = upstream.demo.urls[c2]
    assert sorted(w["url"] for w in manifest["weights"]) == sorted(served.values())
    for w in manifest["weights"]:
        data = upstream.demo.weights[w["url"]]
        assert (w["size"], w["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert w["locations"][0].startswith(f"demo/tinynets@{c2[:12]}:hubconf.py:")

    # One id for the bundle, wherever it is shown: pack, inspect, install and the store.
    manifest_bytes = bundle.read_manifest_bytes(str(out))
    bundle_id = hashlib.sha256(manifest_bytes).hexdigest()
    assert f"bundle id {bundle_id[:16]}\n" in r.stdout
    assert f"bundle id {bundle_id}\n" in run(MIRROR + ["inspect", str(out)]).stdout
    home = tmp_path / "store"
    assert install(str(out), str(home)).bundle_id == bundle_id
    assert (home / "bundles" / f"{bundle_id}.json").read_bytes() == manifest_bytes


@pytest.mark.parametrize("suffix, label, kind, name", [
    (":dev", "c4", "branch", "dev"),
    (":v1.0", "c2", "tag", "v1.0"),
    ("", "c3", "branch", "master"),
])
def test_refs_resolve_to_their_commits(upstream, tmp_path, suffix, label, kind, name):
    out = str(tmp_path / "x.hub")
    report = pack([upstream.spec(suffix)], out,
                  PackOptions(git_host=upstream.git.host, protocol="http", progress=False))
    ref = manifest_json(out)["repos"][0]["refs"][0]
    assert (ref["kind"], ref["name"], ref["commit"]) == (kind, name,
                                                         upstream.demo.commits[label])
    assert list(map(str, report.refs)) == [
        f"demo/tinynets:{name} -> {upstream.demo.commits[label]}"]


def test_same_inputs_give_a_byte_identical_bundle(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = str(tmp_path / "a.hub"), str(tmp_path / "b.hub")
    for out in (a, b):
        pack([upstream.spec(":v1.0")], out,
             PackOptions(git_host=upstream.git.host, protocol="http", progress=False))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_an_unwritable_output_is_one_clear_error(upstream, tmp_path):
    r = run(MIRROR + ["pack", upstream.spec(":v1.0"), "-o", "/proc/demo.hub",
                      "--git-host", upstream.git.host, "--protocol", "http", "-q"])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "Error: cannot pack into /proc/demo.hub: No such file or directory"]


def test_a_source_that_cannot_be_read_is_named_and_nothing_is_written(tmp_path):
    """A cached download removed before the bundle is written: the error names it,
    not the bundle, and no partial bundle is left."""
    data = b"weights"
    sha = hashlib.sha256(data).hexdigest()
    manifest = {"format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION,
                "repos": [], "weights": [{"url": "https://example.invalid/w", "sha256": sha,
                                          "size": len(data)}]}
    missing = str(tmp_path / "cache" / "w.data")
    with pytest.raises(bundle.SourceError) as e:
        bundle.write(str(tmp_path / "x.hub"), Manifest.from_json(manifest),
                     {bundle.weight_member(sha): missing})
    assert str(e.value) == f"cannot read {missing}: No such file or directory"
    assert os.listdir(tmp_path) == []


def test_a_local_file_that_changes_after_it_was_hashed_is_never_packed(tmp_path):
    """A weight given by its local path is read where it is, not copied: if it is
    replaced or rewritten between its hash and its packing, even with its times put
    back (as a write through a mapping leaves them), the bundle, which would hold
    other bytes than its digest's, is not written."""
    data = b"weights v1"
    sha = hashlib.sha256(data).hexdigest()
    manifest = Manifest.from_json({
        "format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION, "repos": [],
        "weights": [{"url": "/data/w.pkl", "sha256": sha, "size": len(data)}]})
    src = tmp_path / "w.pkl"
    out = tmp_path / "out"
    out.mkdir()
    sources = {bundle.weight_member(sha): bundle.LocalFile(str(src), sha)}
    # replaced (a new file renamed over it), same size
    (tmp_path / "new").write_bytes(b"weights v2")
    os.replace(tmp_path / "new", src)
    with pytest.raises(bundle.SourceError) as e:
        bundle.write(str(out / "x.hub"), manifest, sources)
    assert str(e.value) == (f"cannot read {src}: it changed after it was hashed; pack "
                            f"again once it is written")
    assert os.listdir(out) == []
    # rewritten in place, same size, its times as they were
    src.write_bytes(data)
    before = os.stat(src)
    with open(src, "r+b") as fh:
        fh.write(b"W")
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(bundle.SourceError):
        bundle.write(str(out / "x.hub"), manifest, sources)
    assert os.listdir(out) == []
    # unchanged: written, and it verifies
    src.write_bytes(data)
    bundle.write(str(out / "x.hub"), manifest, sources)
    assert bundle.verify(str(out / "x.hub")).manifest == manifest


def test_a_local_weight_is_packed_from_where_it_is_not_copied(upstream, tmp_path):
    """Weights given by path or file: URL are hashed in place: nothing lands in the
    download cache, and the bundle holds their exact bytes."""
    import io

    import megengine
    import numpy as np

    from mirror.download import list_downloads

    a, b = tmp_path / "a.pkl", tmp_path / "b.pkl"
    for path, n in ((a, 6), (b, 7)):
        buf = io.BytesIO()
        megengine.save({"w": np.arange(n, dtype=np.float32)}, buf)
        path.write_bytes(buf.getvalue())
    cache, out = tmp_path / "cache", str(tmp_path / "l.hub")
    report = pack([upstream.spec(":v1.0")], out, PackOptions(
        git_host=upstream.git.host, protocol="http", progress=False, cache_dir=str(cache),
        extra_weights=[str(a), b.as_uri()]))
    got = {w.url: w.sha256 for w in report.weights}
    assert got[str(a)] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert got[b.as_uri()] == hashlib.sha256(b.read_bytes()).hexdigest()
    assert sorted(d.url for d in list_downloads(str(cache))) == sorted(
        u for u in got if u.startswith("http://"))  # the repo's own, downloaded
    _, members = bundle.read_all(out)
    for path, url in ((a, str(a)), (b, b.as_uri())):
        assert members[bundle.weight_member(got[url])] == path.read_bytes()


@pytest.mark.parametrize("stream", [False, True], ids=["", "stream"])
@pytest.mark.parametrize("kind", ["missing", "folder", "fifo", "file-url"])
def test_a_local_weight_that_is_not_a_file_fails_at_once_naming_it(upstream, tmp_path, kind,
                                                                   stream):
    """A path or file: URL that is missing, a folder or a FIFO (which a read would
    wait on forever) fails the pack at once, naming it; nothing is written. The
    same where a --stream pack reads it only as it compresses it."""
    import time

    from mirror.errors import DownloadError

    path = tmp_path / "w.pkl"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    url = path.as_uri() if kind == "file-url" else str(path)
    reason = {"missing": "No such file or directory", "file-url": "No such file or "
              "directory", "folder": "Is a directory"}.get(kind, "not a regular file")
    started = time.monotonic()
    with pytest.raises(DownloadError) as e:
        pack([upstream.spec(":v1.0")], str(tmp_path / "x.hub"), PackOptions(
            git_host=upstream.git.host, protocol="http", progress=False,
            cache_dir=str(tmp_path / "cache"), extra_weights=[url], stream=stream))
    assert str(e.value) == f"download failed: {path}: {reason}"
    assert time.monotonic() - started < 5  # no retries
    assert not (tmp_path / "x.hub").exists()


def test_unknown_ref_names_the_ref_and_what_exists(upstream, tmp_path):
    out = tmp_path / "x.hub"
    with pytest.raises(RefNotFoundError) as e:
        pack([upstream.spec(":nope")], str(out),
             PackOptions(git_host=upstream.git.host, protocol="http", progress=False))
    assert "'nope'" in str(e.value) and "dev, master, v1.0" in str(e.value)
    assert not out.exists()


def test_cli_errors_are_one_line_with_an_exit_code(upstream, tmp_path):
    r = run(MIRROR + ["pack", upstream.spec("@" + "0" * 12), "-o", str(tmp_path / "x.hub"),
                      "--git-host", upstream.git.host, "--protocol", "http", "-q"])
    assert r.returncode == 4  # not found
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: git: {upstream.git.url('demo/tinynets')}: no branch, tag or commit "
        f"'000000000000'")
    assert "Traceback" not in r.stderr


def test_commit_not_on_the_ref_is_refused(upstream, tmp_path):
    with pytest.raises(Exception) as e:
        pack([upstream.spec(":v1.0@" + upstream.demo.commits["c3"][:10])], str(tmp_path / "x.hub"),
             PackOptions(git_host=upstream.git.host, protocol="http", progress=False))
    assert "not reachable from tag 'v1.0'" in str(e.value)


def test_weight_server_down_leaves_no_partial_bundle(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("MGE_MIRROR_DOWNLOADS", str(tmp_path / "cache"))
    url = upstream.demo.urls[upstream.demo.commits["c1"]]["mlp"]
    path = url.split("/", 3)[3]
    upstream.weights.fault(path, "404")
    out = tmp_path / "x.hub"
    try:
        with pytest.raises(Exception) as e:
            pack([upstream.spec("@" + upstream.demo.commits["c1"])], str(out),
                 PackOptions(git_host=upstream.git.host, protocol="http", progress=False))
    finally:
        upstream.weights.fault(path, None)
    assert url in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no bundle, no temp file


def test_bundle_is_zstd_of_tar(master_bundle):
    with open(master_bundle, "rb") as fh:
        raw = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()
    assert raw[257:262] == b"ustar"
    assert json.loads(bundle.read_manifest(master_bundle).to_bytes())


def test_output_directory_must_exist_before_anything_is_fetched(upstream, tmp_path):
    hits = dict(upstream.weights.hits)
    out = tmp_path / "missing" / "x.hub"
    r = run(MIRROR + ["pack", upstream.spec(), "-o", str(out), "--git-host", upstream.git.host,
                      "--protocol", "http", "-q"])
    assert r.returncode == 1
    assert r.stderr.strip() == (f"Error: cannot write {out}: directory {out.parent} "
                                f"does not exist")
    assert upstream.weights.hits == hits
