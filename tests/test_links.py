"""Symlinks stay inside their snapshot, resolved as the kernel resolves them: through
earlier links, at pack, at every read of a bundle (verify, install) and in the store's
verify (issue 13, "Links stay inside")."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time

import pytest
import zstandard

import mirror.hub
import mirror.installer
from mirror import bundle, links, model
from mirror.errors import NotInstalledError, StoreError
from mirror.installer import install
from mirror.model import MODE_FILE, MODE_LINK, FileEntry, Manifest
from mirror.store import Store
from mirror.tree import OutsideTreeError, materialize, write_bytes
from tests.conftest import MIRROR, handmade_bundle, run, tree_digest
from tests.upstream.demorepo import git

C = "1a2b3c4d" * 5  # a snapshot's commit
S = C[:12]  # as messages show it
ESCAPING_CHAIN = {"d1/d2/L": "..", "M": "d1/d2/L/../../x"}  # the example
CHAIN_MESSAGE = (f"symlink M -> d1/d2/L/../../x in snapshot {S} leaves the snapshot "
                 f"(through d1/d2/L -> ..)")


def _refused(targets, files=()):
    entries = [FileEntry(p, MODE_FILE, 0, "0" * 64) for p in files]
    entries += [FileEntry(p, MODE_LINK, 0, "0" * 64) for p in targets]
    found = links.refused(C, entries, targets)
    return found.message if found is not None else None


def _chain(n):
    """``l0 -> l1 -> ... -> l<n-1> -> f``: opening l0 follows n links."""
    return {f"l{i:02d}": (f"l{i + 1:02d}" if i + 1 < n else "f") for i in range(n)}


@pytest.mark.parametrize("targets, files, message", [
    (ESCAPING_CHAIN, ["d1/d2/keep.txt"], CHAIN_MESSAGE),
    # Each alone stays inside ("d1/d2/L/../.." is "d1" lexically); L is d1, so not so.
    ({"d1/d2/L": "..", "up": "d1/d2/L/../.."}, [],
     f"symlink up -> d1/d2/L/../.. in snapshot {S} leaves the snapshot (through d1/d2/L -> ..)"),
    # A link to a folder, then "..": the folder's parent, not the link's.
    ({"d/L": "../sub", "x": "d/L/../.."}, ["sub/f", "d/f"],
     f"symlink x -> d/L/../.. in snapshot {S} leaves the snapshot (through d/L -> ../sub)"),
    # Through two links, each met in the middle of the path.
    ({"a/L1": "../b", "b/L2": "../c/d", "x": "a/L1/L2/../../../y"}, ["c/d/f"],
     f"symlink x -> a/L1/L2/../../../y in snapshot {S} leaves the snapshot (through "
     f"a/L1 -> ../b, b/L2 -> ../c/d)"),
    ({"a": "b", "b": "a"}, [], f"symlink a -> b in snapshot {S} loops (a -> b, b -> a)"),
    ({"s": "s"}, [], f"symlink s -> s in snapshot {S} loops (s -> s)"),
    ({"L": "L/x"}, [], f"symlink L -> L/x in snapshot {S} loops (L -> L/x)"),
    # A link into a loop: the loop is named.
    ({"0": "a/f", "a": "b", "b": "a"}, [], f"symlink a -> b in snapshot {S} loops (a -> b, "
                                           f"b -> a)"),
    ({"x": "../y"}, [], f"symlink x -> ../y in snapshot {S} leaves the snapshot"),
    # What the snapshot does not hold is taken for a folder: this leaves.
    ({"x": "missing/../../y"}, ["f"],
     f"symlink x -> missing/../../y in snapshot {S} leaves the snapshot"),
    ({"d/x": ".."}, ["d/f"], f"symlink d/x -> .. in snapshot {S} leads to the snapshot's root"),
    ({"x": "/etc/passwd"}, [], f"symlink x -> /etc/passwd in snapshot {S} has an absolute "
                               f"target"),
    ({"x": ""}, [], f"symlink x -> '' in snapshot {S} has an empty target"),
    ({"x": "a\0b"}, [], f"symlink x -> a\\x00b in snapshot {S} has a NUL byte in its target"),
    # Linux follows 40 links in one lookup (ELOOP): opening l00 follows 41.
    (_chain(41), ["f"], f"symlink l00 -> l01 in snapshot {S} goes through more than 40 "
                        f"symlinks (through l01 -> l02, l02 -> l03, l03 -> l04, l04 -> l05, "
                        f"l05 -> l06, and 35 more)"),
    # A link to a folder met before "..": z is d, so z/.. is the root.
    ({"a": "z/../../x", "z": "d"}, ["d/f"],
     f"symlink a -> z/../../x in snapshot {S} leaves the snapshot (through z -> d)"),
])
def test_a_link_that_leaves_loops_or_is_malformed_is_refused(targets, files, message):
    assert _refused(targets, files) == message


@pytest.mark.parametrize("targets, files", [
    ({"x": "sub/f"}, ["sub/f"]),  # a file in a subfolder
    ({"x": "sub", "sub/up": "../other/g"}, ["sub/f", "other/g"]),  # a folder; up and over
    ({"x": "y", "y": "sub/z", "sub/z": "../f"}, ["f", "sub/g"]),  # a chain staying inside
    ({"x": "nothere/y", "z": "sub/missing"}, ["sub/f"]),  # dangling inside, as git allows
    # The L, used to stay inside: L is d1, so L/../y is y.
    ({"d1/d2/L": "..", "M": "d1/d2/L/../y"}, ["y"]),
    # Lexically "../../f", but L is a/b/c: a/b/c/../../../f is f.
    ({"L": "a/b/c", "x": "L/../../../f"}, ["a/b/c/g", "f"]),
    # A file used as a folder: the kernel stops there (ENOTDIR), nothing is reached.
    ({"x": "sub/f/../../../../etc/passwd"}, ["sub/f"]),
    ({"x": "f/"}, ["f"]),
    (_chain(40), ["f"]),  # 40 links: as many as Linux follows
])
def test_links_that_stay_inside_are_allowed(targets, files):
    assert _refused(targets, files) is None


def test_links_are_resolved_as_the_kernel_resolves_them(tmp_path):
    """Each allowed link, made on disk, resolves inside; each refused one, outside (or
    loops, or is the root)."""
    cases = [(ESCAPING_CHAIN, ["d1/d2/keep.txt", "x"]),
             ({"d/L": "../sub", "x": "d/L/../.."}, ["sub/f", "d/f"]),
             ({"d1/d2/L": "..", "M": "d1/d2/L/../y"}, ["y"]),
             ({"L": "a/b/c", "x": "L/../../../f"}, ["a/b/c/g", "f"])]
    for i, (targets, files) in enumerate(cases):
        root = str(tmp_path / f"case{i}" / "snapshot")
        write_bytes(root, [(p, MODE_FILE, b"") for p in files] +
                    [(p, MODE_LINK, t.encode()) for p, t in targets.items()])
        outside = [p for p in targets
                   if not os.path.realpath(os.path.join(root, p)).startswith(root + os.sep)]
        refusal = _refused(targets, files)
        assert bool(outside) == (refusal is not None), (targets, outside, refusal)


def test_thousands_of_files_and_hundreds_of_links_are_resolved_quickly():
    files = [f"pkg{i % 50}/sub{i % 7}/f{i}.py" for i in range(20000)]
    targets = {}
    for i in range(1000):  # chains of up to 30 links, each through the next one's folder
        nxt = f"pkg{(i + 1) % 50}/sub{(i + 1) % 7}/l{i + 1}" if i % 30 else files[i]
        targets[f"pkg{i % 50}/sub{i % 7}/l{i}"] = "../../" + nxt
    started = time.monotonic()
    found = _refused(targets, files)
    assert time.monotonic() - started < 5
    assert found is None


# --- filesystems that take two names for one -------------------------------------

DEEP = "/".join(f"d{i}" for i in range(1, 21))  # the attack review's d1/.../d20
# d20/A is d1. d20/a is not held, taken for a folder: 21 ".." from it reach the root,
# so M is home/victim/.ssh, inside. Where a is A (d1), they leave: /home/victim/.ssh.
FOLDED = {f"{DEEP}/A": "../" * 19, "M": f"{DEEP}/a/" + "../" * 21 + "home/victim/.ssh"}
M_SHOWN = f"M -> {FOLDED['M']}"


@pytest.mark.parametrize("targets, files, message", [
    # The review's example: a link's target names a path only a case twin holds.
    (FOLDED, [f"{DEEP}/f"],
     f"symlink {M_SHOWN} in snapshot {S} names '{DEEP}/a', which is '{DEEP}/A' on a "
     f"case-insensitive filesystem"),
    # ... and a file below M's case twin, which install would write through M.
    (FOLDED, [f"{DEEP}/f", "m/authorized_keys"],
     f"symlink {M_SHOWN} in snapshot {S} and the folder 'm' are one path on a "
     f"case-insensitive filesystem"),
    ({"M": "sub"}, ["sub/f", "m/authorized_keys"],  # M alone is harmless; m/ is not
     f"symlink M -> sub in snapshot {S} and the folder 'm' are one path on a "
     f"case-insensitive filesystem"),
    ({"M": "f"}, ["m", "f"],  # install would write m through M
     f"symlink M -> f in snapshot {S} and the file 'm' are one path on a case-insensitive "
     f"filesystem"),
    ({"M": "f", "m": "g"}, ["f", "g"],
     f"symlink M -> f in snapshot {S} and the symlink 'm' -> g are one path on a "
     f"case-insensitive filesystem"),
    # Folder twins (allowed) merge there: d/E/L is D/E/L, a link up to D.
    ({"D/E/L": "..", "x": "d/E/L/../../../y"}, ["D/f", "d/g", "d/E/h", "y"],
     f"symlink x -> d/E/L/../../../y in snapshot {S} names 'd/E/L', which is 'D/E/L' on a "
     f"case-insensitive filesystem"),
    # A file used as a folder stops the kernel, unless the filesystem takes it for one.
    ({"x": "D/../../etc"}, ["D", "d/f"],
     f"symlink x -> D/../../etc in snapshot {S} names 'D', which is 'd' on a "
     f"case-insensitive filesystem"),
    # Even dangling a link naming a twin is refused: what it reaches depends on where.
    ({"x": "readme"}, ["README"],
     f"symlink x -> readme in snapshot {S} names 'readme', which is 'README' on a "
     f"case-insensitive filesystem"),
    # NFD and NFC, one name on HFS+ and APFS: shown escaped, as they look alike.
    ({"d1/d2/\u00e9": "..", "M": "d1/d2/e\u0301/../../../x"}, ["d1/d2/f", "x"],
     f"symlink M -> d1/d2/e\u0301/../../../x in snapshot {S} names 'd1/d2/e\\u0301', "
     f"which is 'd1/d2/\\xe9' on a normalization-insensitive filesystem"),
    ({"\u00e9": "f"}, ["e\u0301/g", "f"],
     f"symlink \u00e9 -> f in snapshot {S} and the folder 'e\\u0301' are one path on a "
     f"normalization-insensitive filesystem"),
    ({"d/L/\u00c9": "..", "x": "d/L/e\u0301/../../../y"}, ["d/L/f", "y"],  # NFD, lower
     f"symlink x -> d/L/e\u0301/../../../y in snapshot {S} names 'd/L/e\\u0301', which is "
     f"'d/L/\\xc9' on a case- and normalization-insensitive filesystem"),
    # HFS+ ignores a ZWNJ in a name.
    ({"x": "a\u200cb/../../y"}, ["ab/f"],
     f"symlink x -> a\\u200cb/../../y in snapshot {S} names 'a\\u200cb', which is 'ab' on "
     f"HFS+ (which ignores some invisible characters)"),
])
def test_a_link_that_names_another_path_on_some_filesystems_is_refused(targets, files,
                                                                       message):
    assert _refused(targets, files) == message


@pytest.mark.parametrize("targets, files", [
    ({}, ["README", "readme", "Docs/a", "docs/b"]),  # case twins, none a link: as repos have
    ({"x": "README", "y": "docs/b", "z": "Docs/../readme"}, ["README", "readme", "Docs/a",
                                                             "docs/b"]),
    ({"x": "caf\u00e9/f"}, ["caf\u00e9/f", "cafe\u0301/g"]),  # NFC and NFD files, no link
    # A link named with its own case: d20/A is d1, so d20/A/../x is x.
    ({f"{DEEP}/A": "../" * 19, "M": f"{DEEP}/A/../x"}, [f"{DEEP}/f", "x"]),
])
def test_twins_without_a_link_and_links_naming_held_paths_are_allowed(targets, files):
    assert _refused(targets, files) is None


def _blob_of(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"ssh-ed25519 AAAA attacker\n")
    return lambda sha256: str(blob)


def test_materialize_writes_nothing_through_a_folder_leading_outside(tmp_path):
    """As a case-insensitive filesystem makes m/authorized_keys go through a link M:
    m is a link out, made before materialize writes below it."""
    root, outside = tmp_path / "snapshot", tmp_path / "victim" / ".ssh"
    outside.mkdir(parents=True)
    root.mkdir()
    os.symlink("../victim/.ssh", root / "m")
    files = [FileEntry("f", MODE_FILE, 0, "0" * 64),
             FileEntry("m/authorized_keys", MODE_FILE, 0, "0" * 64)]
    with pytest.raises(OutsideTreeError) as e:
        materialize(str(root), files, _blob_of(tmp_path))
    assert isinstance(e.value, OSError)
    assert (e.value.filename, e.value.strerror) == (
        str(root / "m"), f"folder leads outside the tree being written {root}, to {outside}")
    assert os.listdir(outside) == []
    # Deeper: below the link's folder, nothing is made either (makedirs would follow it).
    with pytest.raises(OutsideTreeError) as e:
        write_bytes(str(root), [("m/new/f", MODE_FILE, b"x")])
    assert e.value.filename == str(root / "m" / "new")
    assert os.listdir(outside) == []


def test_materialize_writes_nothing_over_a_name_taken_already(tmp_path):
    """As a case-insensitive filesystem makes readme be a link README out: its target
    is not written through."""
    root, target = tmp_path / "snapshot", tmp_path / "victim-file"
    target.write_text("victim\n")
    root.mkdir()
    os.symlink(str(target), root / "readme")
    with pytest.raises(OutsideTreeError) as e:
        materialize(str(root), [FileEntry("readme", MODE_FILE, 0, "0" * 64)],
                    _blob_of(tmp_path))
    assert (e.value.errno, e.value.filename, e.value.strerror) == (
        17, str(root / "readme"), "written already, as another path of the tree: the "
                                  "filesystem takes the two names for one")
    assert target.read_text() == "victim\n"


def test_materialize_follows_links_that_stay_inside(tmp_path):
    root = tmp_path / "snapshot"
    write_bytes(str(root), [("sub/f", MODE_FILE, b"f"), ("L", MODE_LINK, b"sub"),
                            ("sub/g", MODE_FILE, b"g")])
    # Not below L in the manifest, but a folder reached through a link inside is fine.
    write_bytes(str(root), [("L/h", MODE_FILE, b"h")])
    assert (root / "sub" / "h").read_bytes() == b"h"


def test_install_publishes_nothing_when_a_folder_leads_outside(home, tmp_path, monkeypatch):
    """install builds the snapshot in its own folder: the guard's error is the store's,
    naming the folder, and nothing is published (no snapshot, record or ref; the work
    folder is removed) or written outside."""
    outside = tmp_path / "victim" / ".ssh"
    outside.mkdir(parents=True)
    good = handmade_bundle(tmp_path / "b.hub", {C: {"hubconf.py": "x = 1\n",
                                                    "m/authorized_keys": "key\n"}},
                           refs=[("master", "branch", C)])
    real = mirror.installer.materialize

    def case_insensitive(root, files, blob):  # m is a link M made first, out
        os.symlink(str(outside), os.path.join(root, "m"))
        real(root, files, blob)

    install(handmade_bundle(tmp_path / "other.hub", {"2" * 40: {"hubconf.py": "y = 2\n"}},
                            name="other", refs=[("master", "branch", "2" * 40)]))
    monkeypatch.setattr(mirror.installer, "materialize", case_insensitive)

    def published():  # blobs go in first, content-addressed: garbage for gc, not visible
        return {k: v for k, v in tree_digest(home).items() if not k.startswith("blobs/")}

    before = published()
    with pytest.raises(StoreError) as e:
        install(good)
    folder = e.value.path
    assert os.path.basename(folder) == "m" and folder.startswith(str(tmp_path))
    build = os.path.dirname(folder)
    assert str(e.value) == (f"store {folder}: install of {good} failed: folder leads outside "
                            f"the tree being written {build}, to {outside}")
    assert os.listdir(outside) == []
    assert published() == before
    with pytest.raises(NotInstalledError):
        mirror.hub.load("hand/made", "anything")


def test_materializing_thousands_of_files_stays_quick(tmp_path):
    files = [FileEntry(f"pkg{i % 40}/sub{i % 9}/f{i}.py", MODE_FILE, 0, "0" * 64)
             for i in range(5000)]
    started = time.monotonic()
    materialize(str(tmp_path / "snapshot"), files, _blob_of(tmp_path))
    assert time.monotonic() - started < 10
    assert len(list(os.scandir(tmp_path / "snapshot" / "pkg0" / "sub0"))) == 14


# --- pack -----------------------------------------------------------------------



@pytest.fixture(scope="module")
def escaping_repo(upstream, tmp_path_factory):
    """links/escape on the loopback git server: the issue's chain, committed by git."""
    work = tmp_path_factory.mktemp("escape-work")
    os.makedirs(work / "d1" / "d2")
    (work / "d1" / "d2" / "keep.txt").write_text("kept\n")
    (work / "hubconf.py").write_text("dependencies = []\n\n\ndef answer():\n    return 42\n")
    for path, target in ESCAPING_CHAIN.items():
        os.symlink(target, work / path)
    git(work, "init", "-q", "-b", "master")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "links")
    assert "120000" in git(work, "ls-tree", "HEAD", "M")  # git holds a symlink
    git(work, "clone", "-q", "--bare", str(work), os.path.join(upstream.git.root, "links",
                                                               "escape"))
    return git(work, "rev-parse", "HEAD")


@pytest.mark.parametrize("trace", [[], ["--trace"]])
def test_pack_refuses_a_link_that_leaves_through_another(upstream, escaping_repo, tmp_path,
                                                         trace):
    out = tmp_path / "x.hub"
    r = run(MIRROR + ["pack", "links/escape", "-o", str(out), "--git-host", upstream.git.host,
                      "--protocol", "http", "-q"] + trace)
    assert r.returncode == 1, r.stdout + r.stderr
    # Refused before tracing (which writes the tree out and imports it) and writing.
    assert r.stderr.strip().splitlines() == [
        f"Error: cannot pack links/escape: symlink M -> d1/d2/L/../../x in snapshot "
        f"{escaping_repo[:12]} leaves the snapshot (through d1/d2/L -> ..)"]
    assert os.listdir(tmp_path) == []


def _entry(path, mode, data):
    return {"path": path, "mode": mode, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def _manifest(files, owner="hand", name="made"):
    """A format 1 manifest (no git objects) of one snapshot, ``C``, on master."""
    return {"format": model.FORMAT, "format_version": 1, "tool": "tests", "created": 0,
            "weights": [],
            "repos": [{"host": "github.com", "owner": owner, "name": name,
                       "url": f"https://github.com/{owner}/{name}",
                       "refs": [{"name": "master", "kind": "branch", "commit": C,
                                 "asked": f"{owner}/{name}", "resolved_at": 0}],
                       "snapshots": [{"commit": C, "tree": "0" * 40, "commit_time": 1700000000,
                                      "files": [_entry(p, m, d) for p, (m, d) in
                                                sorted(files.items())], "weights": []}]}]}


def test_bundle_write_refuses_a_link_that_leaves_through_another(tmp_path):
    files = {p: (MODE_LINK, t.encode()) for p, t in ESCAPING_CHAIN.items()}
    sources = {bundle.code_member(C, p): d for p, (_, d) in files.items()}
    with pytest.raises(ValueError) as e:
        bundle.write(str(tmp_path / "x.hub"), Manifest.from_json(_manifest(files)), sources)
    assert str(e.value) == f"hand/made: {CHAIN_MESSAGE}"
    assert os.listdir(tmp_path) == []


# --- verify and install ------------------------------------------------------------


def _raw_bundle(path, manifest, members):
    """A bundle written as tar and zstd, not by mirror (which refuses to write these)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("manifest.json", model.canonical_json(manifest))] + \
                sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    return str(path)


def test_verify_and_install_refuse_a_hubconf_that_leads_outside(home, tmp_path):
    """hubconf.py reaches a file outside the store through an earlier link; each link
    alone stays inside. Nothing is installed, nothing outside ever runs."""
    outside = tmp_path / "outside"
    outside.mkdir()
    ran = tmp_path / "ran"
    (outside / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    root = Store(home).repo_dir("github.com", "hand", "made").snapshot(C)
    ups = os.path.relpath(tmp_path, root).count("..")  # from the snapshot's root
    deep = "/".join(f"a{i}" for i in range(1, ups + 5))  # lexically deeper than it is
    link = f"{deep}/L"
    targets = {link: "../" * (ups + 3), "hubconf.py": f"{link}/" + "../" * (ups + 1) +
               "outside/evil.py"}
    # It does lead outside: made on disk as deep below tmp_path as the snapshot will be.
    probe = os.path.join(str(tmp_path), *["p"] * ups)
    write_bytes(probe, [(p, MODE_LINK, t.encode()) for p, t in targets.items()])
    assert os.path.realpath(os.path.join(probe, "hubconf.py")) == str(outside / "evil.py")

    files = {p: (MODE_LINK, t.encode()) for p, t in targets.items()}
    members = {bundle.code_member(C, p): d for p, (_, d) in files.items()}
    bad = _raw_bundle(tmp_path / "bad.hub", _manifest(files), members)
    install(handmade_bundle(tmp_path / "good.hub", {"2" * 40: {"hubconf.py": "x = 1\n"}},
                            name="good", refs=[("master", "branch", "2" * 40)]))
    before = tree_digest(home), tree_digest(str(tmp_path / "mge"))
    expected = (f"Error: bad bundle {bad} [code/{C}/hubconf.py]: symlink hubconf.py -> "
                f"{targets['hubconf.py']} in snapshot {S} leaves the snapshot (through "
                f"{link} -> {targets[link]})")
    for command in ("verify", "install"):
        r = run(MIRROR + [command, bad])
        assert r.returncode == 3, (command, r.stdout, r.stderr)
        assert r.stderr.strip().splitlines() == [expected], command
    assert (tree_digest(home), tree_digest(str(tmp_path / "mge"))) == before
    with pytest.raises(NotInstalledError):
        mirror.hub.load("hand/made", "anything")
    assert not ran.exists()


def test_links_that_stay_inside_still_verify_install_and_load(home, tmp_path):
    files = {"hubconf.py": (MODE_LINK, b"src/hub.py"),  # a chain: hubconf -> src -> impl
             "src/hub.py": (MODE_LINK, b"../impl/hubconf_impl.py"),
             "impl/hubconf_impl.py": (MODE_FILE, b"dependencies = []\n\n\n"
                                                 b"def answer():\n    return 42\n"),
             "d1/d2/L": (MODE_LINK, b".."), "M": (MODE_LINK, b"d1/d2/L/../impl"),
             "dangling": (MODE_LINK, b"not/there")}
    sources = {bundle.code_member(C, p): d for p, (_, d) in files.items()}
    good = str(tmp_path / "good.hub")
    bundle.write(good, Manifest.from_json(_manifest(files)), sources)
    r = run(MIRROR + ["verify", good])
    assert r.returncode == 0, r.stderr
    install(good)
    assert mirror.hub.load("hand/made", "answer") == 42
    root = Store(home).repo_dir("github.com", "hand", "made").snapshot(C)
    assert os.path.realpath(os.path.join(root, "M")) == os.path.join(root, "impl")
    r = run(MIRROR + ["verify"])
    assert r.returncode == 0 and "; 0 problems" in r.stdout, r.stdout + r.stderr


# --- the store ---------------------------------------------------------------------


def test_store_verify_flags_a_snapshot_whose_link_leaves_through_another(home, tmp_path):
    """A snapshot installed by a mirror that checked each link alone: its record and
    folder hold the chain, every byte as recorded."""
    install(handmade_bundle(tmp_path / "b.hub", {C: {"hubconf.py": "x = 1\n"}},
                            owner="hand", name="planted", refs=[("master", "branch", C)]))
    r = run(MIRROR + ["verify"])
    assert r.returncode == 0, r.stdout + r.stderr

    store = Store(home)
    repo = store.repo_dir("github.com", "hand", "planted")
    record_path, root = repo.snapshot_record(C), repo.snapshot(C)
    with open(record_path) as fh:
        record = json.load(fh)
    for path, target in ESCAPING_CHAIN.items():
        data = target.encode()
        record["files"].append(_entry(path, MODE_LINK, data))
        blob = store.layout.blob(hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as fh:
            fh.write(data)
        os.chmod(blob, 0o444)
        os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
        os.symlink(target, os.path.join(root, path))
    record["files"].sort(key=lambda f: f["path"])
    os.chmod(record_path, 0o644)
    with open(record_path, "wb") as fh:
        fh.write(model.canonical_json(record))
    os.chmod(record_path, 0o444)

    r = run(MIRROR + ["verify"])
    assert r.returncode == 3, r.stdout + r.stderr
    problems = [line for line in r.stdout.splitlines() if line.startswith("problem: ")]
    assert problems == [f"problem: snapshot hand/planted@{S}: {CHAIN_MESSAGE}"]
