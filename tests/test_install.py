"""mirror install: every byte verified, nothing visible until all of it is."""

import hashlib
import json
import os
import shutil
import stat

import pytest

from mirror import bundle
from mirror.config import settings
from mirror.errors import BundleError
from mirror.installer import install
from mirror.model import canonical_json
from mirror.store import Store
from tests.conftest import MIRROR, manifest_json, run, tree_digest, unpack


def test_install_puts_every_file_and_weight_in_the_store(master_bundle, home, upstream):
    report = install(master_bundle)
    master = upstream.demo.branches["master"]
    assert list(map(str, report.snapshots_installed)) == [f"demo/tinynets@{master[:12]}"]
    assert list(map(str, report.refs_set)) == [f"demo/tinynets:master -> {master[:12]}"]

    snap = os.path.join(home, "repos", upstream.git.host, "demo", "tinynets", "snapshots",
                        master)
    manifest = manifest_json(master_bundle)
    for f in manifest["repos"][0]["snapshots"][0]["files"]:
        path = os.path.join(snap, f["path"])
        with open(path, "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == f["sha256"]
        assert not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    for url, data in ((u, upstream.demo.weights[u]) for u in upstream.demo.urls[master].values()):
        stored = Store().weight(url)
        with open(stored.path, "rb") as fh:
            assert fh.read() == data
    ref = os.path.join(home, "repos", upstream.git.host, "demo", "tinynets", "refs", "heads",
                       "master")
    with open(ref) as fh:
        assert fh.read() == master + "\n"


def test_second_install_changes_nothing_and_says_so(master_bundle, home):
    assert run(MIRROR + ["install", master_bundle]).returncode == 0  # seeding, as below
    before = tree_digest(home)
    r = run(MIRROR + ["install", master_bundle])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("0 B written (nothing changed)")
    assert "already installed demo/tinynets@" in r.stdout
    assert tree_digest(home) == before


def _rewrite(src: str, dst: str, edit) -> None:
    """Re-pack ``src`` with ``edit(manifest, sources)`` applied: a bundle that lies."""
    manifest, sources = unpack(src)
    edit(manifest, sources)
    tmp = dst + ".raw"
    # Write without the writer's own validation: the point is a bundle that lies.
    import io
    import tarfile

    import zstandard
    with open(tmp, "wb") as raw:
        with zstandard.ZstdCompressor().stream_writer(raw) as z:
            with tarfile.open(fileobj=z, mode="w|") as tar:
                data = canonical_json(manifest)
                for name, blob in [("manifest.json", data)] + sorted(sources.items()):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    os.replace(tmp, dst)


def _flip_weight_byte(manifest, sources):
    name = bundle.weight_member(manifest["weights"][0]["sha256"])
    data = bytearray(sources[name])
    data[len(data) // 2] ^= 0x01
    sources[name] = bytes(data)


def _drop_code_file(manifest, sources):
    snap = manifest["repos"][0]["snapshots"][0]
    del sources[bundle.code_member(snap["commit"], "hubconf.py")]


def _extra_member(manifest, sources):
    sources["code/evil.py"] = b"import os\n"


def _lie_about_size(manifest, sources):
    manifest["repos"][0]["snapshots"][0]["files"][0]["size"] += 1


def _escape_path(manifest, sources):
    manifest["repos"][0]["snapshots"][0]["files"][0]["path"] = "../../outside.py"


def _file_below_a_symlink(manifest, sources):
    snap = manifest["repos"][0]["snapshots"][0]
    for path, mode, data in (("l", 0o120000, b"tinynets"), ("l/evil.py", 0o100644, b"x")):
        snap["files"].append({"path": path, "mode": mode, "size": len(data),
                              "sha256": hashlib.sha256(data).hexdigest()})
        sources[bundle.code_member(snap["commit"], path)] = data


def _symlink_out_of_the_snapshot(manifest, sources):
    snap = manifest["repos"][0]["snapshots"][0]
    data = b"../../../../etc/passwd"
    snap["files"].append({"path": "tinynets/data", "mode": 0o120000, "size": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
    sources[bundle.code_member(snap["commit"], "tinynets/data")] = data


def _duplicate_path(manifest, sources):
    files = manifest["repos"][0]["snapshots"][0]["files"]
    files.append(dict(files[0]))


def _no_commit_time(manifest, sources):
    del manifest["repos"][0]["snapshots"][0]["commit_time"]


def _ref_to_a_missing_snapshot(manifest, sources):
    manifest["repos"][0]["refs"][0]["commit"] = "f" * 40


def _future_format(manifest, sources):
    manifest["format_version"] = 5


def _forged_content(manifest, sources):
    """Every digest consistent, but the files are not those of the commit named."""
    snap = manifest["repos"][0]["snapshots"][0]
    entry = next(f for f in snap["files"] if f["path"] == "hubconf.py")
    data = b"print('forged')\n"
    entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    sources[bundle.code_member(snap["commit"], "hubconf.py")] = data


@pytest.mark.parametrize("edit, expected", [
    (_flip_weight_byte, "differs from the manifest's"),
    (_drop_code_file, "missing from the bundle"),
    (_extra_member, "[code/evil.py]: member is not listed in the manifest"),
    (_lie_about_size, "differs from the manifest's"),
    (_escape_path, "unsafe file path '../../outside.py'"),
    (_file_below_a_symlink, "file 'l/evil.py' is below 'l', which is not a directory"),
    (_symlink_out_of_the_snapshot, "symlink tinynets/data -> ../../../../etc/passwd in "
                                   "snapshot "),
    (_duplicate_path, "is listed twice in snapshot"),
    (_no_commit_time, "'commit_time' missing or not a int"),
    (_ref_to_a_missing_snapshot, "which is not a snapshot in this bundle"),
    (_future_format, "format version 5 is not supported (this mirror reads versions 1 to 4; "
                     "upgrade mirror)"),
    (_forged_content, "does not match its content: 'hubconf.py' is not the file its tree "
                      "names"),
])
def test_a_bundle_that_lies_is_refused_and_the_store_is_untouched(
        master_bundle, home, tmp_path, edit, expected):
    bad = str(tmp_path / "bad.hub")
    _rewrite(master_bundle, bad, edit)
    install(master_bundle)  # a store with content, to prove nothing of it changes
    before = tree_digest(home)
    with pytest.raises(BundleError) as e:
        install(bad)
    assert expected in str(e.value) and bad in str(e.value)
    assert tree_digest(home) == before
    r = run(MIRROR + ["verify", bad])
    assert r.returncode == 3 and expected in r.stderr
    r = run(MIRROR + ["install", bad])
    assert r.returncode == 3
    assert r.stderr.strip().startswith(f"Error: bad bundle {bad}") and expected in r.stderr


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -1])
def test_truncated_or_empty_bundle_is_refused(master_bundle, home, tmp_path, cut):
    with open(master_bundle, "rb") as fh:
        data = fh.read()
    n = cut if isinstance(cut, int) and cut >= 0 else (
        int(len(data) * cut) if isinstance(cut, float) else len(data) - 1)
    bad = tmp_path / "cut.hub"
    bad.write_bytes(data[:n])
    with pytest.raises(BundleError) as e:
        install(str(bad))
    assert str(bad) in str(e.value)
    assert not os.path.exists(os.path.join(home, "repos"))
    assert os.listdir(os.path.join(home, "tmp")) == []


def test_missing_bundle_file_is_a_clear_error(home, tmp_path):
    r = run(MIRROR + ["install", str(tmp_path / "nope.hub")])
    assert r.returncode == 4  # not found, not a failed verification
    missing = tmp_path / "nope.hub"
    assert r.stderr.strip() == f"Error: no such bundle: {missing}"


def test_verify_checks_a_bundle_without_installing(master_bundle, home):
    r = run(MIRROR + ["verify", master_bundle])
    assert r.returncode == 0 and r.stdout.startswith(f"{master_bundle}: OK, ")
    assert not os.path.exists(home)


def test_default_home_follows_megengine_conventions(monkeypatch):
    for var in ("MGE_MIRROR_HOME", "MGE_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert settings().store_home == os.path.expanduser("~/.cache/megengine/mirror")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert settings().store_home == "/x/megengine/mirror"
    monkeypatch.setenv("MGE_HOME", "/m")
    assert settings().store_home == "/m/mirror"
    monkeypatch.setenv("MGE_MIRROR_HOME", "/s")
    assert settings().store_home == "/s"


def test_list_shows_refs_and_commits(master_bundle, home, upstream):
    install(master_bundle)
    r = run(MIRROR + ["list", "--json"])
    (repo,) = json.loads(r.stdout)["repos"]
    master = upstream.demo.branches["master"]
    assert repo["refs"] == [{"kind": "branch", "name": "master", "commit": master}]
    assert [s["commit"] for s in repo["snapshots"]] == [master]


def test_store_that_cannot_be_written_is_a_clear_error(master_bundle, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "store").write_text("a file where the store's directory should be")
    monkeypatch.setenv("MGE_MIRROR_HOME", str(ro / "store"))
    r = run(MIRROR + ["install", master_bundle])
    assert r.returncode == 1
    assert r.stderr.strip() == (f"Error: store {ro / 'store' / 'tmp'}: cannot write here: "
                                f"Not a directory")
    shutil.rmtree(ro)


def test_store_and_bundle_are_readable_by_other_users(master_bundle, home, upstream):
    assert stat.S_IMODE(os.stat(master_bundle).st_mode) == 0o644
    install(master_bundle)
    for dirpath, dirnames, filenames in os.walk(home):
        if os.path.relpath(dirpath, home).startswith("tmp"):
            continue
        for d in dirnames:
            assert os.stat(os.path.join(dirpath, d)).st_mode & 0o005 == 0o005, d
        for f in filenames:
            assert os.stat(os.path.join(dirpath, f)).st_mode & 0o004, f


def test_a_megengine_cache_that_cannot_be_written_is_a_warning(master_bundle, home, tmp_path,
                                                               upstream,
                                                               monkeypatch):
    blocked = tmp_path / "mge-is-a-file"
    blocked.write_text("")
    monkeypatch.setenv("MGE_HOME", str(blocked))
    r = run(MIRROR + ["install", master_bundle])
    assert r.returncode == 0, r.stderr
    assert "megengine cache: warning: not seeded" in r.stdout
    assert Store().repos()[0].commits == [upstream.demo.branches["master"]]


@pytest.mark.parametrize("tail", [b"\0" * 512, b"junk", b"\x28\xb5\x2f\xfd" + b"\0" * 20])
def test_data_appended_after_the_archive_is_refused(master_bundle, home, tmp_path, tail):
    import zstandard

    bad = tmp_path / "tail.hub"
    with open(master_bundle, "rb") as fh:
        data = fh.read()
    # Appended as another zstd frame (what a careless concatenation makes), or raw.
    extra = zstandard.ZstdCompressor().compress(tail) if tail != b"junk" else tail
    bad.write_bytes(data + extra)
    with pytest.raises(BundleError) as e:
        install(str(bad))
    assert str(bad) in str(e.value)
    assert not os.path.exists(os.path.join(home, "repos"))


@pytest.mark.parametrize("kind", ["empty frame", "skippable frame"])
def test_frames_that_decode_to_nothing_are_refused(master_bundle, home, tmp_path, kind):
    import zstandard

    extra = zstandard.ZstdCompressor().compress(b"") if kind == "empty frame" else (
        b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"hello")
    with open(master_bundle, "rb") as fh:
        data = fh.read()
    for name, blob in (("end", data + extra), ("start", extra + data)):
        bad = tmp_path / f"{name}.hub"
        bad.write_bytes(blob)
        r = run(MIRROR + ["verify", str(bad)])
        assert r.returncode == 3, (name, r.stdout)
        assert ("empty zstd frame" if kind == "empty frame" else "skippable zstd frame") \
            in r.stderr
