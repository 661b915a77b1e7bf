"""Bundles in parts (`--split-size`): each part verifiable alone as it arrives, all of
them installed in any order with no room to reassemble, their concatenation one
bundle that tar lists; and parts that lie, refused by verify and install alike,
naming the part, with the store as it was."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from mirror import bundle, parts
from mirror.packer import PackOptions, pack
from tests.conftest import MIRROR, keypairs, run, same_weights, tree_digest

SPLIT = 2 << 20

LOAD_MLP = """
import json, sys
import numpy as np
import mirror.hub
model = mirror.hub.load("demo/tinynets", "mlp", pretrained=True, source="local")
print(json.dumps({k: np.asarray(v).tolist() for k, v in model.state_dict().items()}))
"""


@pytest.fixture(scope="module")
def split(upstream, tmp_path_factory):
    """master and two 3 MiB weights that do not compress, signed, in 2 MiB parts: each
    weight spans parts. And another bundle's parts (dev), of the same size."""
    root = tmp_path_factory.mktemp("split")
    keys = keypairs(root, ("release",))
    rng = random.Random(17)
    extra = tuple(upstream.weights.add(f"split/w{i}.bin", rng.randbytes(3 << 20))
                  for i in range(2))
    opts = PackOptions(git_host=upstream.git.host, protocol="http", progress=False,
                       extra_weights=extra, split_size="2M", sign=keys["release"][0])
    report = pack([upstream.spec()], str(root / "m.hub"), opts)
    other = pack([upstream.spec(":dev")], str(root / "d.hub"), opts)
    return report, other, keys["release"]


def _env(tmp_path, name="store"):
    return dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / name),
                MGE_HOME=str(tmp_path / f"{name}-mge"))


def _copy_parts(report, folder):
    folder.mkdir(exist_ok=True)
    return [shutil.copy(p, folder / os.path.basename(p)) for p in report.parts]


def test_parts_fit_the_size_and_a_weight_spans_them(split):
    report, _, _ = split
    sizes = [os.path.getsize(p) for p in report.parts]
    assert len(sizes) >= 4 and all(s <= SPLIT for s in sizes), sizes
    assert report.parts == [f"{report.output}.{i:03d}" for i in range(1, len(sizes) + 1)]
    assert report.size == sum(sizes)
    # every full part is filled to within the slack a frame's cut leaves
    assert all(s > SPLIT - (256 << 10) for s in sizes[:-1]), sizes
    header = parts.header_of(report.parts[0])
    assert header.count == len(sizes) and header.bundle_id == report.bundle_id
    assert [n for n, _ in header.table.parts] == [s - header.size for s in sizes]


def test_each_part_verifies_alone_and_with_the_signing_key(split, tmp_path):
    report, _, (_, public, key_id) = split
    alone = tmp_path / "one"
    alone.mkdir()
    third = shutil.copy(report.parts[2], alone)  # no other part beside it
    r = run(MIRROR + ["verify", "--trusted-key", public, third], netns=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{third}: OK, part 3 of {len(report.parts)} of bundle "
                               f"{report.bundle_id[:16]}, ")
    assert f"signed by {key_id}" in r.stdout
    r = run(MIRROR + ["verify", "--json", third])
    (doc,) = json.loads(r.stdout)["bundles"]
    assert doc["part"]["index"] == 3 and doc["bundle_id"] == report.bundle_id
    # the same part, damaged in transit: named, with the table's digest
    data = bytearray(open(third, "rb").read())
    data[-1000] ^= 1
    open(third, "wb").write(bytes(data))
    r = run(MIRROR + ["verify", third])
    assert r.returncode == 3
    assert r.stderr.startswith(f"Error: bad bundle {third}: part 3 of {len(report.parts)} is "
                               f"corrupt: its sha256 ")


def test_a_part_alone_under_a_key_that_did_not_sign_its_table(split, tmp_path):
    """A table rewritten to match changed payloads (and the manifest kept) is refused
    by its signature: the table is signed, not only the manifest."""
    report, _, (_, public, _) = split
    header = parts.header_of(report.parts[1])
    payload = open(report.parts[1], "rb").read()[header.size:]
    changed = payload[:-1] + bytes([payload[-1] ^ 1])
    sizes = list(header.table.parts)
    sizes[1] = (len(changed), __import__("hashlib").sha256(changed).hexdigest())
    table = parts.Table(header.table.bundle, tuple(sizes)).to_bytes()
    forged = tmp_path / "m.hub.002"
    forged.write_bytes(parts.header_frame(2, header.size, table, header.table_signature,
                                          header.manifest_bytes, header.signature) + changed)
    assert run(MIRROR + ["verify", str(forged)]).returncode == 0  # consistent, unsigned check
    r = run(MIRROR + ["verify", "--trusted-key", public, str(forged)])
    assert r.returncode == 5
    assert r.stderr.strip() == f"Error: refusing {forged}: its table of parts was changed " \
                               f"after signing"


def test_parts_shuffled_install_and_load_with_no_network(split, upstream, tmp_path):
    report, _, _ = split
    given = _copy_parts(report, tmp_path / "disc")
    random.Random(3).shuffle(given)
    env = _env(tmp_path)
    r = run(MIRROR + ["install"] + [str(p) for p in given], env=env, netns=True)
    assert r.returncode == 0, r.stderr
    stem = str(tmp_path / "disc" / "m.hub")
    assert r.stdout.startswith(f"verified {len(bundle.read_manifest(report.parts[0]).members())}"
                               f" files, ")
    assert f"from {stem}.{{001..{len(given):03d}}}" in r.stdout.splitlines()[0]
    loaded = run([sys.executable, "-c", LOAD_MLP], env=env, netns=True)
    assert loaded.returncode == 0, loaded.stderr
    state = json.loads(loaded.stdout)
    mlp = next(u for u in upstream.demo.weights if "/mlp_" in u and
               u in {w.url for w in report.weights})
    assert same_weights(state, upstream.demo.weights[mlp])
    record = json.load(open(next(
        os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "store" / "repos")
        for f in fs if f.endswith(".json") and "snapshots" in d)))
    assert record["bundle_file"] == "m.hub"
    # the same store as from the whole concatenation, read from stdin
    whole = tmp_path / "whole.hub"
    with open(whole, "wb") as out:
        for p in report.parts:
            out.write(open(p, "rb").read())
    other = _env(tmp_path, "piped")
    with open(whole, "rb") as stdin:
        r = subprocess.run(MIRROR + ["install", "-"], stdin=stdin, env=dict(
            other, PYTHONPATH=os.getcwd()), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for home in (env, other):
        assert os.path.isdir(os.path.join(home["MGE_MIRROR_HOME"], "repos"))
    assert sorted(os.listdir(os.path.join(other["MGE_MIRROR_HOME"], "blobs"))) == \
        sorted(os.listdir(os.path.join(env["MGE_MIRROR_HOME"], "blobs")))


def test_the_concatenation_is_one_bundle_tar_lists(split, tmp_path):
    report, _, _ = split
    whole = tmp_path / "cat.hub"
    subprocess.run(f"cat {report.output}.0* > {whole}", shell=True, check=True)
    listed = subprocess.run(["tar", "--zstd", "-tf", str(whole)], capture_output=True,
                            text=True, check=True).stdout.split()
    manifest = bundle.read_manifest(str(whole))
    assert listed[0] == "manifest.json" and listed[1] == "manifest.sig"
    assert sorted(listed[2:]) == sorted(manifest.members())
    assert subprocess.run(["zstd", "-tq", str(whole)]).returncode == 0
    r = run(MIRROR + ["install", str(whole)], env=_env(tmp_path), netns=True)
    assert r.returncode == 0, r.stderr
    r = run(MIRROR + ["inspect", str(whole)])
    assert f"bundle id {report.bundle_id}" in r.stdout


def _store(tmp_path, master_bundle):
    """A store that holds master, and its bytes: what every refusal must leave."""
    env = _env(tmp_path, "held")
    assert run(MIRROR + ["install", "--no-megengine-cache", master_bundle],
               env=env).returncode == 0
    return env, tree_digest(env["MGE_MIRROR_HOME"])


def _refused(held, files, expected, commands=("verify", "install"), code=3, same=True):
    """Each command refuses ``files``: exit ``code``, ``expected`` in its first error
    line, verify's and install's the same; and the store is byte for byte as it was."""
    env, before = held
    said = {}
    for command in commands:
        r = run(MIRROR + [command] + [str(f) for f in files], env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code, (command, r.stdout, r.stderr)
        assert lines and expected in lines[0] and "Traceback" not in r.stderr, (command, lines)
        said[command] = lines[0]
    assert len(set(said.values())) == 1 or not same, said
    assert tree_digest(env["MGE_MIRROR_HOME"]) == before


def test_a_missing_part_is_named(split, master_bundle, tmp_path):
    """Several files must make whole bundles, for verify as for install; one part
    alone is checked alone."""
    report, _, _ = split
    given = _copy_parts(report, tmp_path / "in")
    os.unlink(given[1])
    held = _store(tmp_path, master_bundle)
    _refused(held, [*given[:1], *given[2:]],
             f"part 2 ({tmp_path}/in/m.hub.002?) of the {len(given)} of bundle "
             f"{report.bundle_id[:16]} is not among the files given")
    # the first part alone, or parts 1 and 2 concatenated: where the others should be
    _refused(held, given[:1], f"bad bundle {given[0]}: it ends after part 1 of {len(given)}: "
                              f"parts 2 to {len(given)} of {len(given)} are missing",
             commands=("install",))
    joined = tmp_path / "joined.hub"
    joined.write_bytes(open(given[0], "rb").read() + open(report.parts[1], "rb").read())
    _refused(held, [joined], f"bad bundle {joined}: it ends after part 2 of {len(given)}: ")


def test_a_corrupt_part_is_named(split, master_bundle, tmp_path):
    report, _, _ = split
    given = _copy_parts(report, tmp_path / "in")
    data = bytearray(open(given[2], "rb").read())
    data[len(data) // 2] ^= 0x10
    open(given[2], "wb").write(bytes(data))
    held = _store(tmp_path, master_bundle)
    _refused(held, given, f"bad bundle {given[2]}: part 3 of {len(given)} is corrupt: ")
    _refused(held, given[2:3], f"bad bundle {given[2]}: part 3 of {len(given)} is corrupt: ",
             commands=("verify",))


def test_a_foreign_part_is_named(split, master_bundle, tmp_path):
    """Part 2 of another bundle, renamed to stand in for this one's."""
    report, other, _ = split
    given = _copy_parts(report, tmp_path / "in")
    shutil.copy(other.parts[1], given[1])
    foreign = parts.header_of(given[1]).bundle_id[:16]
    _refused(_store(tmp_path, master_bundle), given,
             f"part 2 ({given[1]}?) of the {len(given)} of bundle {report.bundle_id[:16]} is "
             f"not among the files given; {given[1]} is part 2 of another bundle, {foreign}",
             same=False)  # install goes on to name the other bundle's part too


def test_parts_that_lie(split, master_bundle, tmp_path):
    """The hostile corpus of parts: out of order in a concatenation, an index that
    disagrees with the table, a header that carries another manifest, one that hides
    bytes in its padding, a skippable frame of someone else's, a part named twice."""
    report, other, _ = split
    held = _store(tmp_path, master_bundle)
    raw = [open(p, "rb").read() for p in report.parts]
    heads = [parts.header_of(p) for p in report.parts]
    n = len(raw)
    out = tmp_path / "lies"
    out.mkdir()

    def header(i, **changes):
        h = heads[i]
        fields = dict(index=h.index, size=h.size, table=h.table_bytes,
                      table_signature=h.table_signature, manifest=h.manifest_bytes,
                      signature=h.signature)
        fields.update(changes)
        return parts.header_frame(**fields)

    def payload(i):
        return raw[i][heads[i].size:]

    bad = out / "bad.hub"
    bad.write_bytes(raw[1] + raw[0] + b"".join(raw[2:]))
    # a file opening with part 2 is taken for part 2: alone, verify finds it too long
    _refused(held, [bad], f"bad bundle {bad}: it starts with part 2 of {n} of bundle",
             commands=("install",))
    _refused(held, [bad], f"bad bundle {bad}: part 2 of {n} holds ", commands=("verify",))
    bad.write_bytes(raw[0] + raw[2] + raw[1] + b"".join(raw[3:]))
    _refused(held, [bad], f"bad bundle {bad}: it is part 3, where part 2 of {n} should be")

    # part 2's header says it is part 3: as files, two parts 3; in one stream, out of place
    relabeled = [out / f"r.hub.{i:03d}" for i in range(1, n + 1)]
    for i, p in enumerate(relabeled):
        p.write_bytes(raw[i] if i != 1 else header(1, index=3) + payload(1))
    _refused(held, relabeled, f"{relabeled[1]} and {relabeled[2]} are both part 3 of bundle",
             code=1)
    bad.write_bytes(b"".join(p.read_bytes() for p in relabeled))
    _refused(held, [bad], f"it is part 3, where part 2 of {n} should be")

    # a header that carries the other bundle's manifest (its table's id made to match)
    o = parts.header_of(other.parts[0])
    table = parts.Table(o.bundle_id, heads[0].table.parts).to_bytes()
    grown = heads[0].size + len(o.manifest_bytes)
    for i in (0, 1):
        lying = header(i, size=grown, table=table, table_signature=None,
                       manifest=o.manifest_bytes, signature=None) + payload(i)
        bad.write_bytes(b"".join(raw[:i]) + lying + b"".join(raw[i + 1:]))
        _refused(held, [bad], "its part header carries another manifest or signature than "
                              "the bundle it opens" if i == 0 else
                              f"it is part 2 of bundle {o.bundle_id[:16]}, not of bundle "
                              f"{report.bundle_id[:16]}")
    one = out / "one.hub.001"  # alone, as it arrives: its header is checked against its payload
    one.write_bytes(header(0, size=grown, table=table, table_signature=None,
                           manifest=o.manifest_bytes, signature=None) + payload(0))
    _refused(held, [one], "its part header carries another manifest than the bundle it opens",
             commands=("verify",))

    # bytes hidden in a header's padding; a skippable frame that is not mirror's
    hidden = bytearray(raw[1])
    hidden[heads[1].size - 1] = 1
    bad.write_bytes(raw[0] + bytes(hidden) + b"".join(raw[2:]))
    _refused(held, [bad], "its part header holds more, or less, than it says")
    foreign_frame = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"abcd"
    bad.write_bytes(raw[0] + foreign_frame + b"".join(raw[1:]))
    _refused(held, [bad], "not a part of a bundle (no part header where one should be)")
    # a table that lists a part fewer: the last payload is then data after the end
    short = parts.Table(heads[0].bundle_id, heads[0].table.parts[:-1]).to_bytes()
    bad.write_bytes(b"".join(header(i, table=short, table_signature=None) + payload(i)
                             for i in range(n - 1)) + raw[-1])
    _refused(held, [bad], f"data after the last part's payload (part {n - 1})")
    # the same part given twice
    twice = _copy_parts(report, out / "twice")
    shutil.copy(twice[1], out / "copy.hub.002")
    _refused(held, [*twice, out / "copy.hub.002"], "are both part 2 of bundle", code=1)


def test_parts_cut_near_every_boundary_verify(tmp_path):
    """A member whose tar header would not fit in what a part has left, and a frame
    that would be empty there: the writer moves on, and what it writes verifies,
    within the size, for a sweep of sizes around a part's end."""
    from tests.conftest import handmade_bundle

    rng = random.Random(2)
    small = b"s" * 5000
    for size in range(1_040_000, 1_048_576, 331):
        src = handmade_bundle(tmp_path / "src.hub", {"a" * 40: {"hubconf.py": "x = 1\n"}},
                              weights=[("https://x.example/a.pkl", rng.randbytes(size)),
                                       ("https://x.example/b.pkl", small)])
        manifest, members = bundle.read_all(src)
        _, files = bundle.write_files(str(tmp_path / "p.hub"), manifest, members,
                                      split_size=1 << 20)
        assert all(os.path.getsize(f) <= 1 << 20 for f in files), size
        [given] = parts.group(files)
        assert bundle.verify(given, allow_unsafe_pickle=True).manifest == manifest, size


def test_parts_cut_inside_a_frame_are_refused(split, tmp_path):
    """Payloads re-cut in the middle of a frame, with a table made to match: zstd and tar
    could not read their concatenation, so mirror does not either."""
    report, _, _ = split
    heads = [parts.header_of(p) for p in report.parts]
    joined = b"".join(open(p, "rb").read()[h.size:] for p, h in zip(report.parts, heads))
    cut = len(joined) // 2 + 12345
    payloads = [joined[:cut], joined[cut:]]
    table = parts.Table(heads[0].bundle_id, tuple(
        (len(p), __import__("hashlib").sha256(p).hexdigest()) for p in payloads)).to_bytes()
    files = []
    for i, payload in enumerate(payloads, 1):
        f = tmp_path / f"x.hub.{i:03d}"
        f.write_bytes(parts.header_frame(i, heads[0].size, table, None,
                                         heads[0].manifest_bytes, heads[0].signature) + payload)
        files.append(str(f))
    r = run(MIRROR + ["verify", *files])
    assert r.returncode == 3
    assert r.stderr.strip().endswith(f"part 1 of 2 ({files[0]}) ends inside a zstd frame: "
                                     f"its parts were not cut where frames end")
