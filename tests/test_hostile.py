"""A corpus of hostile and broken bundles, each made by code so it is reproducible.

For every one, ``mirror install`` and ``mirror verify`` exit non-zero with a one-line
error, nothing is written outside the store, and the store is byte-for-byte as it
was. A property-based test then mutates a good bundle at random.
"""

import errno
import io
import json
import os
import random
import tarfile
import threading

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror import bundle
from mirror.errors import BundleError
from mirror.installer import install
from mirror.model import canonical_json
from tests.conftest import MIRROR, run, tree_digest, unpack


def _tar(entries, compress=True, pax_global=None):
    """A tar stream (zstd-compressed) of ``entries``: (TarInfo, bytes or None)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers=pax_global) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return zstandard.ZstdCompressor().compress(raw.getvalue()) if compress else raw.getvalue()


def _info(name, size=0, kind=tarfile.REGTYPE, link="", pax=None):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    info.pax_headers = pax or {}
    return info


def _with(manifest, members, extra=(), order=None, edit=None, pax=None, compress=True):
    """A bundle of ``members`` (name -> bytes); ``pax`` adds PAX records to members."""
    manifest = json.loads(json.dumps(manifest))
    if edit:
        edit(manifest)
    data = canonical_json(manifest)
    pax = pax or {}
    entries = [(_info("manifest.json", len(data), pax=pax.get("manifest.json")), data)]
    names = order or sorted(members)
    entries += [(_info(n, len(members[n]), pax=pax.get(n)), members[n]) for n in names]
    entries += list(extra)
    return _tar(entries, compress)


def _sparse(name, data, kept):
    """PAX records making ``name`` sparse: tar extracts ``kept`` bytes of ``data``, then
    a hole, while the archive stores all of ``data``."""
    return {name: {"GNU.sparse.numblocks": "1", "GNU.sparse.map": f"0,{kept}",
                   "GNU.sparse.size": str(len(data)), "GNU.sparse.name": name}}


def _chained_pax_headers(manifest, members, count):
    """``count`` PAX headers in a row before a member (tarfile recurses on each)."""
    raw = _with(manifest, members, compress=False)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        at = tar.getmembers()[1].offset
    record = b"10 path=x\n"
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(record)
    block = header.tobuf(tarfile.USTAR_FORMAT) + record + b"\0" * (-len(record) % 512)
    return zstandard.ZstdCompressor().compress(raw[:at] + block * count + raw[at:])


def _garbage_at_the_end(manifest, members):
    """A whole, valid archive, but a block of text where the end-of-archive zeros go."""
    raw = bytearray(_with(manifest, members, compress=False))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    raw[end:end + tarfile.BLOCKSIZE] = b"GARBAGE!" * (tarfile.BLOCKSIZE // 8)
    return zstandard.ZstdCompressor().compress(bytes(raw))


def _hidden_in_padding(manifest, members):
    """Every member and digest right, but bytes where tar's zero padding belongs."""
    raw = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(
        _with(manifest, members)))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        info = next(m for m in tar.getmembers() if m.size % tarfile.BLOCKSIZE)
    raw[info.offset_data + info.size] = ord("X")
    return zstandard.ZstdCompressor().compress(bytes(raw))


def _corpus(good):
    """name -> bytes of a bad bundle."""
    manifest, members = unpack(good)
    first = sorted(members)[0]
    weight = next(n for n in members if n.startswith("weights/"))
    good_bytes = open(good, "rb").read()
    data = canonical_json(manifest)
    rng = random.Random(3)

    def snap(m):
        return m["repos"][0]["snapshots"][0]

    corpus = {
        "dotdot member": _with(manifest, members, [(_info("../evil.py", 4), b"evil")]),
        "absolute member": _with(manifest, members, [(_info("/tmp/evil.py", 4), b"evil")]),
        "symlink member": _with(manifest, members,
                                [(_info("code/x", 0, tarfile.SYMTYPE, "/etc/passwd"), None)]),
        "hard link member": _with(manifest, members,
                                  [(_info("code/y", 0, tarfile.LNKTYPE, "/etc/passwd"), None)]),
        "device member": _with(manifest, members, [(_info("code/dev", 0, tarfile.CHRTYPE),
                                                    None)]),
        "fifo member": _with(manifest, members, [(_info("code/fifo", 0, tarfile.FIFOTYPE),
                                                  None)]),
        "directory member": _with(manifest, members, [(_info("code/dir", 0, tarfile.DIRTYPE),
                                                       None)]),
        "duplicate member": _with(manifest, members, [(_info(first, len(members[first])),
                                                       members[first])]),
        "digest lie": _with(manifest, members, edit=lambda m: snap(m)["files"][0].update(
            sha256="0" * 64)),
        "size lie": _with(manifest, members, edit=lambda m: snap(m)["files"][0].update(
            size=snap(m)["files"][0]["size"] + 7)),
        "missing member": _with(manifest, {k: v for k, v in members.items() if k != first}),
        "extra member": _with(manifest, members, [(_info("weights/" + "f" * 64, 3), b"abc")]),
        "members out of order": _with(manifest, members, order=sorted(members, reverse=True)),
        "member before the manifest": _tar([(_info(first, len(members[first])),
                                              members[first]),
                                             (_info("manifest.json", len(data)), data)]),
        "manifest missing": _tar([(_info(n, len(members[n])), members[n]) for n in members]),
        "weight bytes changed": _with({**manifest}, {**members, weight: members[weight][::-1]}),
        "future format": _with(manifest, members, edit=lambda m: m.update(format_version=99)),
        "not a mirror manifest": _with(manifest, members, edit=lambda m: m.update(
            format="something-else")),
        "deeply nested json": _tar([(_info("manifest.json", 200002),
                                     b"[" * 100001 + b"]" * 100001)]),
        "huge manifest": _tar([(_info("manifest.json", bundle.MAX_MANIFEST_BYTES + 1),
                                b" " * (bundle.MAX_MANIFEST_BYTES + 1))]),
        "invalid utf-8 name": _with(manifest, members, [(_info("code/\udcff\udcfe.py", 1),
                                                         b"x")]),
        "unsafe path in manifest": _with(manifest, members, edit=lambda m: snap(m)["files"][
            0].update(path="a/../../b")),
        "symlink escaping in manifest": None,  # built below: needs a matching member
        "uncompressed tar": _tar([(_info("manifest.json", len(data)), data)], compress=False),
        "not a bundle": b"PK\x03\x04 this is a zip file, not a bundle" * 20,
        "empty file": b"",
        "zstd frame claiming a huge size": bundle.ZSTD_MAGIC + bytes([0xC0]) +
        (2 ** 62).to_bytes(8, "little") + b"\x01\x00\x00" + b"\x00" * 16,
        "many tiny unlisted members": _with(manifest, members, [
            (_info(f"code/tiny/{i}", 0), b"") for i in range(20000)]),
        "appended bytes": good_bytes + b"\x00junk",
        "skippable frame": good_bytes + b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd",
        "data hidden in a member's padding": _hidden_in_padding(manifest, members),
        # GNU tar would extract the first half and a hole; the digest covers all of it.
        "sparse member": _with(manifest, members, pax=_sparse(weight, members[weight],
                                                              len(members[weight]) // 2)),
        "sparse manifest": _with(manifest, members, pax=_sparse("manifest.json", data, 10)),
        "malformed sparse size": _with(manifest, members, pax={weight: {
            "GNU.sparse.size": "zz"}}),
        "malformed sparse size on the manifest": _with(manifest, members, pax={
            "manifest.json": {"GNU.sparse.size": "zz"}}),
        "garbage where the archive ends": _garbage_at_the_end(manifest, members),
        "a 2 MiB tar header": _with(manifest, members, pax={first: {
            "comment": "x" * (2 << 20)}}),
        "bytes in a PAX comment": _with(manifest, members, pax={first: {"comment": "hidden"}}),
        "a global PAX header": _tar([(_info("manifest.json", len(data)), data)],
                                    pax_global={"comment": "hidden"}),
        "5,000 chained PAX headers": _chained_pax_headers(manifest, members, 5000),
        # tarfile reads a GNU 1.0 sparse map 512 bytes at a time, into one list
        "a 3 MiB sparse map": _with(manifest, {}, [(_info(first, 3000007, pax={
            "GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "1"}),
            b"300000\n" + b"1000\n" * 600000)]),
        "a path longer than PATH_MAX": _with(manifest, members, edit=lambda m: snap(m)[
            "files"][0].update(path="a/" * 2100 + "x")),
    }
    target = b"../../../../etc/passwd"
    corpus["symlink escaping in manifest"] = _with(
        manifest, {**members, "code/" + snap(manifest)["commit"] + "/link": target},
        edit=lambda m: snap(m)["files"].append({"path": "link", "mode": 0o120000,
                                                "size": len(target),
                                                "sha256": __import__("hashlib").sha256(
                                                    target).hexdigest()}))
    # Every digest consistent, but the files are not those of the commit named.
    forged = b"print('forged')\n"
    hubconf = bundle.code_member(snap(manifest)["commit"], "hubconf.py")
    corpus["forged content, consistent digests"] = _with(
        manifest, {**members, hubconf: forged}, edit=lambda m: next(
            f for f in snap(m)["files"] if f["path"] == "hubconf.py").update(
            size=len(forged), sha256=__import__("hashlib").sha256(forged).hexdigest()))
    for cut in (1, 13, 100, 1000, len(good_bytes) // 3, len(good_bytes) // 2,
                len(good_bytes) - 200, len(good_bytes) - 1):
        corpus[f"truncated at {cut}"] = good_bytes[:cut]
    for i in range(6):
        flipped = bytearray(good_bytes)
        at = rng.randrange(len(flipped))
        flipped[at] ^= 1 << rng.randrange(8)
        corpus[f"bit flip {i} at {at}"] = bytes(flipped)
    return corpus


@pytest.fixture(scope="module")
def corpus(master_bundle):
    return _corpus(master_bundle)


def test_the_corpus_has_at_least_30_kinds(corpus):
    assert len(corpus) >= 40


def test_every_bad_bundle_is_refused_and_nothing_changes(corpus, master_bundle, tmp_path):
    home = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    env = dict(os.environ, MGE_MIRROR_HOME=str(home), MGE_HOME=str(tmp_path / "mge"))
    install(master_bundle, str(home))
    before = tree_digest(str(home))
    for name, data in sorted(corpus.items()):
        bad = outside / "bad.hub"
        bad.write_bytes(data)
        for command in ("install", "verify"):
            r = run(MIRROR + [command, str(bad)], env=env, cwd_=str(outside))
            lines = r.stderr.strip().splitlines()
            assert r.returncode != 0, (name, command, r.stdout)
            assert len(lines) == 1 and lines[0].startswith("Error: "), (name, command, lines)
            assert "Traceback" not in r.stderr, (name, command)
        assert tree_digest(str(home)) == before, name
        assert sorted(os.listdir(outside)) == ["bad.hub"], name
        bad.unlink()


def test_reading_stopped_early_leaves_no_thread(big_bundle):
    """The decompressing thread, which runs megabytes ahead, stops when reading stops:
    a refused signature, a full disk."""
    def refuse(head):
        raise BundleError(big_bundle, "refused by the test")

    def disk_full(member):
        raise OSError(errno.ENOSPC, "No space left on device")

    assert os.path.getsize(big_bundle) > 8 * bundle.CHUNK  # more than the thread holds
    with pytest.raises(BundleError, match="refused by the test"):
        bundle.read(big_bundle, on_head=refuse)
    assert [t.name for t in threading.enumerate() if t.name.startswith("mirror-")] == []
    with pytest.raises(OSError, match="No space left"):
        bundle.read(big_bundle, sink=disk_full)
    assert [t.name for t in threading.enumerate() if t.name.startswith("mirror-")] == []


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_damage_is_refused_or_harmless(master_bundle, data):
    good = open(master_bundle, "rb").read()
    damaged = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, max(0, len(damaged) - 1)))
        if kind == "flip" and damaged:
            damaged[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del damaged[at:]
        elif kind == "insert":
            damaged[at:at] = data.draw(st.binary(min_size=1, max_size=64))
        elif damaged:
            del damaged[at:at + data.draw(st.integers(1, 64))]
    path = master_bundle + ".fuzz"
    with open(path, "wb") as fh:
        fh.write(damaged)
    try:
        manifest = bundle.read(path)
    except BundleError:
        return  # refused, with the error a user sees
    finally:
        os.unlink(path)
    # Accepted: then it must be the very same content (damage only where it is ignored).
    assert manifest == bundle.read(master_bundle)
