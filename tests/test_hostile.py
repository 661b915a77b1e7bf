"""A corpus of hostile and broken bundles, each made by code so it is reproducible.

For every one, ``mirror install`` and ``mirror verify`` exit non-zero with a one-line
error, the same one (``verify`` accepts exactly what ``install`` does), nothing is
written outside the store, and the store is byte-for-byte as it was. Among them,
manifests whose every member matches but which say what the typed model
(:mod:`mirror.model`, :mod:`mirror.names`) refuses. A property-based test then
mutates a good bundle at random.
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


def _with(manifest, members, extra=(), order=None, edit=None, pax=None, compress=True,
          escaped=False):
    """A bundle of ``members`` (name -> bytes); ``pax`` adds PAX records to members.
    ``escaped`` writes the manifest with ``\\u`` escapes, which can carry a lone surrogate
    (``"\\udcff"``) that no UTF-8 byte can."""
    manifest = json.loads(json.dumps(manifest))
    if edit:
        edit(manifest)
    data = canonical_json(manifest) if not escaped else (
        json.dumps(manifest, sort_keys=True, ensure_ascii=True) + "\n").encode()
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


def _format_1(manifest, members, path=None, escaped=False):
    """The same bundle in format 1 (no git objects: nothing recomputes the tree id, so
    only the typed model can refuse a path), with the first file of the first snapshot
    renamed to ``path``, its member too."""
    manifest = json.loads(json.dumps(manifest))
    manifest["format_version"] = 1
    members = {n: data for n, data in members.items() if not n.startswith("git/")}
    for repo in manifest["repos"]:
        for snap in repo["snapshots"]:
            del snap["objects"]
    snap = manifest["repos"][0]["snapshots"][0]
    if path is not None:
        old, snap["files"][0]["path"] = snap["files"][0]["path"], path
        members[bundle.code_member(snap["commit"], path)] = members.pop(
            bundle.code_member(snap["commit"], old))
    return _with(manifest, members, escaped=escaped)


def _manifest_corpus(good):
    """name -> (bytes of a bundle whose members all match its manifest, but whose
    manifest says what the typed model refuses; what the refusal says). Edits to refs,
    weights, entrypoints and repo fields leave format 2's git ids as they were; edits
    to a snapshot's files would not, so those are format 1 bundles."""
    manifest, members = unpack(good)

    def snap(m):
        return m["repos"][0]["snapshots"][0]

    def repo(m):
        return m["repos"][0]

    def url(new):
        """Every mention of the first weight's URL changed to ``new``."""
        def edit(m):
            old = m["weights"][0]["url"]
            m["weights"][0]["url"] = new
            for s in repo(m)["snapshots"]:
                s["weights"] = [new if u == old else u for u in s["weights"]]
                s["coverage"] = {e: [new if u == old else u for u in urls]
                                 for e, urls in s["coverage"].items()}
        return edit

    def ref(*names, kind="branch"):
        """More refs, of ``names``, at the commit the first one names."""
        def edit(m):
            first = repo(m)["refs"][0]
            repo(m)["refs"] += [dict(first, name=n, kind=kind) for n in names]
        return edit

    def bad(edit, expected, escaped=False):
        return _with(manifest, members, edit=edit, escaped=escaped), expected

    w = manifest["weights"][0]["url"]
    return {
        "entrypoints not a list": bad(lambda m: snap(m).update(entrypoints=5),
                                      "'entrypoints' missing or not a list"),
        "weights not a list": bad(lambda m: m.update(weights=5),
                                  "'weights' missing or not a list"),
        "a snapshot's weights not a list": bad(lambda m: snap(m).update(weights=5),
                                               "'weights' missing or not a list"),
        "weight URL with a NUL": bad(url(w + "\0x"), "holds the control character '\\x00'"),
        "weight URL with a lone surrogate": bad(url(w + "\udcff"), "is not valid UTF-8",
                                                escaped=True),
        "weight URL with a newline": bad(url(w + "\nx"), "holds the control character '\\n'"),
        "weight URL with a space": bad(url(w + " x"), "holds whitespace"),
        "weight URL of 9,000 bytes": bad(url(w + "x" * 9000), "over the 8192 byte limit"),
        "weight URL of an unsupported scheme": bad(url("ftp://example.com/w.pkl"),
                                                   "has the scheme 'ftp'"),
        "relative weight path": bad(url("weights/w.pkl"), "has the scheme '(none)'"),
        "http weight URL without a host": bad(url("http:///w.pkl"), "has no host"),
        "weight URL listed twice": bad(lambda m: m["weights"].append(m["weights"][0]),
                                       "is listed twice"),
        "refs x and x/y": bad(ref("x", "x/y"), "branch 'x/y' cannot coexist with branch 'x'"),
        "refs x/y and x": bad(ref("x/y", "x"), "branch 'x/y' cannot coexist with branch 'x'"),
        "a ref listed twice": bad(ref("master"), "branch 'master' is listed twice"),
        "ref name with ..": bad(ref("a..b"), "'a..b' is not a valid git branch name"),
        "ref name ending in .lock": bad(ref("x.lock", kind="tag"),
                                        "tag 'x.lock' is not a valid git tag name"),
        "ref name starting with -": bad(ref("-x"), "'-x' is not a valid git branch name"),
        "branch named HEAD": bad(ref("HEAD"), "'HEAD' is not a valid git branch name"),
        "ref name with DEL": bad(ref("x\x7f"), "holds the control character '\\x7f'"),
        "ref name with a NUL": bad(ref("x\0y"), "holds the control character '\\x00'"),
        "ref component of 256 bytes": bad(ref("a/" + "r" * 256), "has a 256 byte component"),
        "ref name with a lone surrogate": bad(ref("x\udcff"), "is not valid UTF-8",
                                              escaped=True),
        "file path component of 256 bytes": (_format_1(manifest, members, "d" * 256),
                                             "has a 256 byte component"),
        "file path with a newline": (_format_1(manifest, members, "a\nb.py"),
                                     "holds the control character '\\n'"),
        "file path with a C1 control": (_format_1(manifest, members, "a\x9bb.py"),
                                        "holds the control character '\\x9b'"),
        "file path with a lone surrogate": (_format_1(manifest, members, "a\udcffb.py",
                                                      escaped=True), "is not valid UTF-8"),
        "owner with an escape sequence": bad(lambda m: repo(m).update(owner="demo\x1b[2J"),
                                             "holds the control character '\\x1b'"),
        "owner of 256 bytes": bad(lambda m: repo(m).update(owner="o" * 256),
                                  "over the 255 byte limit"),
        "name growing past 255 bytes in lower case": bad(
            lambda m: repo(m).update(name="\u0130" * 127), "over 255 bytes in lower case"),
        "host that is a path": bad(lambda m: repo(m).update(host="../../etc"),
                                   "is not a git host"),
        "repo url with a newline": bad(lambda m: repo(m).update(url="http://x/\ny"),
                                       "holds the control character '\\n'"),
        "the same repo twice, in other case": bad(
            lambda m: m["repos"].append(dict(repo(m), owner="DEMO")), "is listed twice"),
        "the same snapshot twice": bad(
            lambda m: repo(m)["snapshots"].append(snap(m)), "is listed twice"),
        "entrypoint not an identifier": bad(
            lambda m: snap(m)["entrypoints"].append("rm -rf"), "is not a Python identifier"),
        "coverage of no entrypoint": bad(lambda m: snap(m)["coverage"].update(ghost=[]),
                                         "coverage names 'ghost'"),
        "excluded URL with an escape sequence": bad(
            lambda m: snap(m).update(excluded=["\x1b]0;owned\x07"]),
            "holds the control character '\\x1b'"),
        "tool with a carriage return": bad(lambda m: m.update(tool="mirror\rOK"),
                                           "holds the control character '\\r'"),
        "trace with a lone surrogate": bad(lambda m: snap(m).update(trace={
            "weights": {"mlp": [{"url": "\udcff"}]}, "nested": {}, "errors": {}}),
            "is not valid UTF-8", escaped=True),
        "size of 2**63": bad(lambda m: m["weights"][0].update(size=2 ** 63), "out of range"),
        "commit_time of 2**63": bad(lambda m: snap(m).update(commit_time=2 ** 63),
                                    "out of range"),
        "created in the year 10000": bad(lambda m: m.update(created=253402300800),
                                         "'created' 253402300800 is out of range"),
        "negative resolved_at": bad(lambda m: repo(m)["refs"][0].update(resolved_at=-1),
                                    "'resolved_at' -1 is out of range"),
        "tree that is not an id": bad(lambda m: snap(m).update(tree="../x"),
                                      "tree '../x' is not a full id"),
    }


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
    corpus.update((name, data) for name, (data, _) in _manifest_corpus(good).items())
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


@pytest.fixture(scope="module")
def manifest_corpus(master_bundle):
    return _manifest_corpus(master_bundle)


def test_the_corpus_has_at_least_100_kinds(corpus, manifest_corpus):
    assert len(corpus) >= 100
    assert len(manifest_corpus) >= 40 and set(manifest_corpus) <= set(corpus)


def test_the_bundles_are_good_but_for_the_edit(master_bundle, tmp_path):
    """The builders alone make bundles that verify: each refusal below is the edit's."""
    manifest, members = unpack(master_bundle)
    for name, data in (("format 2", _with(manifest, members)),
                       ("format 1", _format_1(manifest, members)),
                       ("format 1, renamed", _format_1(manifest, members, "README.txt")),
                       ("escaped", _with(manifest, members, escaped=True))):
        path = tmp_path / "good.hub"
        path.write_bytes(data)
        assert bundle.verify(str(path)).manifest.repos, name


def test_each_manifest_is_refused_by_the_model_for_its_fault(manifest_corpus, tmp_path):
    path = str(tmp_path / "bad.hub")
    for name, (data, expected) in sorted(manifest_corpus.items()):
        with open(path, "wb") as fh:
            fh.write(data)
        with pytest.raises(BundleError) as e:
            bundle.verify(path)
        message = str(e.value)
        assert f"{path} [manifest.json]: invalid manifest: " in message, (name, message)
        assert expected in message, (name, message)
        assert "\n" not in message and len(message) < 600, (name, message)


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


def test_verify_and_install_refuse_with_the_same_message(corpus, tmp_path):
    """``mirror verify BUNDLE`` and ``mirror install BUNDLE`` accept exactly the same
    bundles: install, into an empty store, refuses each bad one with verify's message
    and exit code, and leaves no repo, blob or record behind."""
    outside = tmp_path / "outside"
    outside.mkdir()
    bad = outside / "bad.hub"
    for i, (name, data) in enumerate(sorted(corpus.items())):
        bad.write_bytes(data)
        home = tmp_path / f"store-{i}"
        env = dict(os.environ, MGE_MIRROR_HOME=str(home), MGE_HOME=str(tmp_path / "mge"))
        said = {}
        for command in ("verify", "install"):
            r = run(MIRROR + [command, str(bad)], env=env, cwd_=str(outside))
            assert r.returncode != 0, (name, command, r.stdout)
            said[command] = (r.returncode, r.stderr.strip())
        assert said["install"] == said["verify"], name
        assert sorted(tree_digest(str(home))) in ([], [".lock", "tmp/"]), name


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
