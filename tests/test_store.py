"""The store as an operator sees it: dedup, ref rules, verify, remove, gc, crashes,
concurrency, a full disk and a read-only store."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import mirror.hub
from mirror import housekeeping
from mirror.cli import iec
from mirror.errors import NotInstalledError, StoreError
from mirror.installer import InstallOptions, install
from mirror.store import SnapshotRef, Store
from tests.conftest import MIRROR, ROOT, handmade_bundle, manifest_json, pack_spec, run, tree_digest


def _blobs(manifest):
    out = {f["sha256"]: f["size"] for r in manifest["repos"] for s in r["snapshots"]
           for f in s["files"]}
    out.update({w["sha256"]: w["size"] for w in manifest["weights"]})
    out.update({s["objects"]["sha256"]: s["objects"]["size"] for r in manifest["repos"]
                for s in r["snapshots"] if "objects" in s})  # git objects: a blob too
    return out


def _ref(home, host, kind, name):
    path = os.path.join(home, "repos", host, "demo", "tinynets", "refs", kind, name)
    with open(path) as fh:
        return fh.read().strip()


def test_a_second_snapshot_stores_only_its_new_bytes(upstream, master_bundle, home, tmp_path):
    dev = pack_spec(upstream, ":dev", tmp_path / "dev.hub")
    first = install(master_bundle)
    second = install(dev)
    old, new = _blobs(manifest_json(master_bundle)), _blobs(manifest_json(dev))
    expected = sum(size for sha, size in new.items() if sha not in old)
    assert second.bytes_written == expected
    assert 0 < expected < sum(new.values())  # shared files and weights were not stored again
    assert first.bytes_written == sum(old.values())
    stored = os.listdir(os.path.join(home, "blobs"))
    assert sorted(stored) == sorted(set(old) | set(new))


def test_branches_move_forward_not_back_and_tags_never(upstream, home, tmp_path):
    c = upstream.demo.commits
    host = upstream.git.host
    old = pack_spec(upstream, ":master@" + c["c1"], tmp_path / "old.hub")
    new = pack_spec(upstream, ":master", tmp_path / "new.hub")
    r = install(old)
    assert list(map(str, r.refs_set)) == [f"demo/tinynets:master -> {c['c1'][:12]}"]
    r = install(new)
    assert list(map(str, r.refs_set)) == [
        f"demo/tinynets:master -> {c['c3'][:12]} (was {c['c1'][:12]})"]
    r = install(old)
    assert list(map(str, r.refs_kept)) == [f"demo/tinynets:master stays at newer {c['c3'][:12]} "
                           f"(use --force to move it back)"]
    with open(os.path.join(home, "repos", host, "demo", "tinynets", "refs.log")) as fh:
        log = [json.loads(line) for line in fh]
    assert [(e["ref"], e["old"], e["new"], e["bundle_file"]) for e in log] == [
        ("master", None, c["c1"], "old.hub"), ("master", c["c1"], c["c3"], "new.hub")]
    assert _ref(home, host, "heads", "master") == c["c3"]
    r = run(MIRROR + ["install", "--force", old])
    assert r.returncode == 0, r.stderr
    assert _ref(home, host, "heads", "master") == c["c1"]

    tag = pack_spec(upstream, ":v1.0", tmp_path / "tag.hub")
    install(tag)
    git = ["git", "--git-dir", upstream.demo.bare]
    subprocess.run(git + ["tag", "-f", "v1.0", c["c3"]], check=True, capture_output=True)
    try:
        moved = pack_spec(upstream, ":v1.0", tmp_path / "moved.hub")
    finally:
        subprocess.run(git + ["tag", "-f", "-a", "v1.0", "-m", "release 1.0", c["c2"]],
                       check=True, capture_output=True)
    r = install(moved)
    assert list(map(str, r.refs_kept)) == [f"demo/tinynets:v1.0 stays at {c['c2'][:12]} "
                           f"(tags never move without --force)"]
    assert _ref(home, host, "tags", "v1.0") == c["c2"]
    install(moved, options=InstallOptions(force=True))
    assert _ref(home, host, "tags", "v1.0") == c["c3"]


def test_verify_accepts_a_sound_store_and_names_what_was_changed(all_refs_bundle, home,
                                                                 upstream):
    install(all_refs_bundle)
    r = run(MIRROR + ["verify"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{home}: OK, " in r.stdout and "4 snapshots" in r.stdout and "; 0 problems" in r.stdout

    snap = Store().resolve("demo", "tinynets", "dev", host=upstream.git.host)
    hubconf = os.path.join(snap.path, "hubconf.py")
    os.unlink(hubconf)  # "edited by hand": the editor writes a new file in its place
    with open(hubconf, "w") as fh:
        fh.write("# edited\n")
    with open(os.path.join(snap.path, "notes.txt"), "w") as fh:
        fh.write("mine\n")
    c1 = Store().resolve("demo", "tinynets", commit=upstream.demo.commits["c1"],
                         host=upstream.git.host)
    weight = Store().weight(upstream.demo.urls[c1.commit]["mlp"], c1)
    os.chmod(weight.path, 0o644)
    with open(weight.path, "ab") as fh:
        fh.write(b"\0")
    r = run(MIRROR + ["verify"])
    assert r.returncode == 3
    label = f"demo/tinynets@{snap.commit[:12]}"
    assert f"problem: snapshot {label}: hubconf.py was changed ({hubconf})" in r.stdout
    assert f"problem: snapshot {label}: notes.txt was added by hand" in r.stdout
    assert f"problem: blob {weight.path} has sha256 " in r.stdout
    assert (f"problem: snapshot demo/tinynets@{c1.commit[:12]}: weight {weight.url} (blob "
            f"{weight.path}) is missing or wrong") in r.stdout
    assert "FAILED" in r.stdout


def test_remove_a_ref_keeps_every_other_snapshot_loadable(all_refs_bundle, home, upstream):
    c = upstream.demo.commits
    install(all_refs_bundle)
    before = tree_digest(home)
    dry = housekeeping.remove(Store(), "demo/tinynets:dev", dry_run=True)
    assert tree_digest(home) == before
    assert dry.refs == ["demo/tinynets:dev"] and dry.snapshots == [f"demo/tinynets@{c['c4']}"]

    r = run(MIRROR + ["remove", "demo/tinynets:dev", "--json"])
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert (plan["refs"], plan["snapshots"]) == (dry.refs, dry.snapshots)
    assert plan["bytes_freed"] == dry.bytes_freed > 0
    assert sorted(plan["blobs"]) == sorted(dry.blobs)
    for path in plan["blobs"]:
        assert not os.path.exists(path)

    with pytest.raises(NotInstalledError):
        mirror.hub.load("demo/tinynets:dev", "mlp", source="local")
    for info, kwargs, label in (("demo/tinynets", {}, "c3"), ("demo/tinynets:v1.0", {}, "c2"),
                                ("demo/tinynets", {"commit": c["c1"]}, "c1")):
        model = mirror.hub.load(info, "mlp", pretrained=True, source="local", **kwargs)
        assert model.revision == upstream.demo.revisions[c[label]]
    assert housekeeping.verify(Store()).ok


def test_remove_a_commit_and_then_the_repo_leaves_an_empty_store(all_refs_bundle, home,
                                                                upstream):
    c = upstream.demo.commits
    install(all_refs_bundle)
    plan = housekeeping.remove(Store(), "demo/tinynets@" + c["c2"][:8])
    assert plan.refs == ["demo/tinynets:v1.0"]
    assert plan.snapshots == [f"demo/tinynets@{c['c2']}"]
    assert housekeeping.verify(Store()).ok
    housekeeping.remove(Store(), "demo/tinynets")
    assert os.listdir(os.path.join(home, "blobs")) == []
    assert not os.path.exists(os.path.join(home, "weights"))  # no URL index any more
    assert os.listdir(os.path.join(home, "bundles")) == []
    r = run(MIRROR + ["remove", "demo/tinynets"])
    assert r.returncode == 4 and "demo/tinynets is not installed" in r.stderr


def test_gc_deletes_only_what_nothing_references(master_bundle, home, tmp_path):
    install(master_bundle)
    stray = os.path.join(home, "blobs", "0" * 64)
    with open(stray, "wb") as fh:
        fh.write(b"orphan")
    abandoned = os.path.join(home, "tmp", "install-dead")
    os.makedirs(abandoned)
    before = tree_digest(home)
    r = run(MIRROR + ["gc", "--dry-run", "--long"])
    assert r.returncode == 0
    assert f"would remove blob {stray}" in r.stdout
    on_disk = os.stat(stray).st_blocks * 512  # 6 bytes take a block, as du counts
    assert r.stdout.splitlines()[-1] == ("would remove 0 refs, 0 snapshots, 1 blobs and 0 other "
                                         f"files; would free at most {iec(on_disk)}")
    assert tree_digest(home) == before
    r = run(MIRROR + ["gc"])
    assert r.returncode == 0 and r.stdout == (
        f"removed 0 refs, 0 snapshots, 1 blobs and 1 other files; freed {iec(on_disk)} "
        f"(--long names every file)\n")
    assert not os.path.exists(stray) and not os.path.exists(abandoned)
    assert housekeeping.verify(Store()).ok
    assert mirror.hub.list("demo/tinynets", source="local")


def test_gc_refuses_to_run_during_an_install(master_bundle, home):
    install(master_bundle)
    from mirror.locking import locked

    with locked(Store().layout.lock, shared=True):  # what a running install holds
        with pytest.raises(StoreError) as e:
            housekeeping.gc(Store())
    assert "an install is running" in str(e.value)


def _phase(home):
    """How far an interrupted install got, from what is on disk."""
    tmp = os.path.join(home, "tmp")
    if os.path.isdir(os.path.join(home, "bundles")):
        return "complete"
    if os.path.isdir(os.path.join(home, "blobs")):
        return "publishing"
    if os.path.isdir(tmp) and os.listdir(tmp):
        return "verifying"
    return "starting"


def test_install_killed_at_any_instant_leaves_a_store_that_verifies(big_bundle, tmp_path):
    home = str(tmp_path / "store")
    env = dict(os.environ, MGE_MIRROR_HOME=home, MGE_HOME=str(tmp_path / "mge"))
    cmd = MIRROR + ["install", big_bundle]

    # Calibrate: when does the install start its work, and when does it end?
    calib = str(tmp_path / "calib")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=dict(env, MGE_MIRROR_HOME=calib), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not os.path.isdir(os.path.join(calib, "tmp")):
        time.sleep(0.001)
    begin = time.monotonic() - start
    assert proc.wait(timeout=60) == 0
    end = time.monotonic() - start

    # Kill points spread over the work, with extra density at the end where it publishes.
    rng = random.Random(11)
    delays = [rng.uniform(begin, end) for _ in range(36)]
    delays += [rng.uniform(begin + 0.8 * (end - begin), end) for _ in range(16)]
    # One calibration run can be faster than the runs after it (a loaded machine): a
    # few kills well after its end still see what a finished install leaves.
    delays += [2 * end] * 3
    phases = []
    for delay in sorted(delays):
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        phases.append(_phase(home))
        report = housekeeping.verify(Store(home))
        assert report.ok, (delay, report.problems)
        for repo in Store(home).repos():  # refs only ever name whole snapshots
            for ref in repo.refs:
                assert ref.commit in repo.commits
        subprocess.run(["rm", "-rf", home], check=True)  # each run starts from empty
    assert {"verifying", "complete"} <= set(phases), phases
    print("phases at the kill:", {p: phases.count(p) for p in set(phases)})
    r = run(cmd, env=env)
    assert r.returncode == 0, r.stderr
    assert housekeeping.verify(Store(home)).ok
    r = run(MIRROR + ["gc"], env=env)
    assert r.returncode == 0 and os.listdir(os.path.join(home, "tmp")) == []


LOADER = """
import sys, mirror.hub
for _ in range(int(sys.argv[1])):
    # master was installed before any of this started: it must load every time.
    mirror.hub.load("demo/tinynets", "mlp", pretrained=True)
    try:
        mirror.hub.load("demo/tinynets:v1.0", "mlp", pretrained=True)
    except mirror.errors.NotInstalledError:
        pass  # the tag may not be installed yet
print("loads done")
"""


def test_concurrent_installers_loaders_and_gc(upstream, all_refs_bundle, master_bundle,
                                             tmp_path):
    c = upstream.demo.commits
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"))
    assert run(MIRROR + ["install", master_bundle], env=env).returncode == 0
    dev = pack_spec(upstream, ":dev", tmp_path / "dev.hub")
    tag = pack_spec(upstream, ":v1.0", tmp_path / "tag.hub")
    installs = [[all_refs_bundle], [master_bundle, "--force"], [dev], [tag]] * 2
    procs = [subprocess.Popen(MIRROR + ["install", *args], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in installs]
    procs += [subprocess.Popen([sys.executable, "-c", LOADER, "5"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(8)]
    gcs = [run(MIRROR + ["gc"], env=env) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for g in gcs:  # gc either ran or stood aside for a running install
        assert g.returncode == 0 or "an install is running" in g.stderr, g.stderr
    store = Store(env["MGE_MIRROR_HOME"])
    report = housekeeping.verify(store)
    assert report.ok, report.problems
    (repo,) = store.repos()
    assert {r.name: r.commit for r in repo.refs} == {
        "master": c["c3"], "dev": c["c4"], "v1.0": c["c2"]}
    # Every seeded MegEngine cache entry is whole and marked with its commit.
    hub_dir = tmp_path / "mge" / "hub"
    assert all((hub_dir / d / ".mirror-seed").exists() for d in os.listdir(hub_dir)
               if not d.startswith("."))


@pytest.fixture()
def small_fs(tmp_path):
    """A 2 MiB tmpfs: a real filesystem that fills up (needs root, as CI has)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_is_a_clear_error_and_the_store_is_unchanged(master_bundle, big_bundle,
                                                                 small_fs):
    home = str(small_fs / "store")
    install(master_bundle, home)
    before = tree_digest(home)
    with pytest.raises(StoreError) as e:
        install(big_bundle, home)
    assert "No space left on device" in str(e.value) and big_bundle in str(e.value)
    assert tree_digest(home) == before


def test_a_read_only_store_is_a_clear_error(master_bundle, all_refs_bundle, small_fs):
    home = str(small_fs / "store")
    install(master_bundle, home)
    before = tree_digest(home)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    r = run(MIRROR + ["install", all_refs_bundle, "--home", home])
    assert r.returncode == 1
    assert r.stderr.strip().endswith("Read-only file system")
    assert r.stderr.startswith(f"Error: store {home}")
    assert tree_digest(home) == before
    # Loading does not need to write.
    assert mirror.hub.list("demo/tinynets", source="local", store=Store(home))


A, B = "a" * 40, "b" * 40


def test_a_branch_and_a_tag_of_one_name_are_two_refs(home, tmp_path):
    hub = handmade_bundle(tmp_path / "x.hub", {A: {"hubconf.py": "x = 1\n"},
                                               B: {"hubconf.py": "x = 2\n"}},
                          refs=[("v1", "branch", A), ("v1", "tag", A), ("master", "branch", B)])
    install(hub)
    plan = housekeeping.remove(Store(), "hand/made:v1")
    assert plan.refs == ["hand/made:v1"] and plan.snapshots == []  # the tag still holds A
    report = housekeeping.verify(Store())
    assert report.ok and report.refs == 2, report.problems


def test_gc_keeps_weights_a_bundle_added_to_an_installed_snapshot(upstream, master_bundle,
                                                                  home, tmp_path):
    extra = upstream.weights.add("extra/vocab.bin", b"vocabulary")
    with_extra = str(tmp_path / "extra.hub")
    from mirror.pack_options import PackOptions
    from mirror.packer import pack

    pack([upstream.spec("@" + upstream.demo.branches["master"])], with_extra,
         PackOptions(git_host=upstream.git.host, protocol="http", extra_weights=(extra,),
                     progress=False))
    install(master_bundle)
    assert install(with_extra).snapshots_present  # nothing new but the weight
    plan = housekeeping.gc(Store())
    assert plan.blobs == []
    with open(Store().weight(extra).path, "rb") as fh:
        assert fh.read() == b"vocabulary"


def test_a_snapshot_keeps_the_weight_bytes_it_was_installed_with(home, tmp_path):
    url = "https://example.invalid/w.pkl"
    one = handmade_bundle(tmp_path / "1.hub", {A: {"hubconf.py": ""}},
                          refs=[("master", "branch", A)], weights=[(url, b"first")])
    two = handmade_bundle(tmp_path / "2.hub", {B: {"hubconf.py": ""}},
                          refs=[("dev", "branch", B)], weights=[(url, b"second")])
    install(one)
    install(two)
    store = Store()
    rdir = store.repo_dir("github.com", "hand", "made")
    for commit, expected in ((A, b"first"), (B, b"second")):
        snap = SnapshotRef("hand/made", commit, rdir)
        with open(store.weight(url, snap).path, "rb") as fh:
            assert fh.read() == expected
    assert housekeeping.gc(store).blobs == []  # both stay: each snapshot pins its own


def test_force_reinstall_repairs_a_changed_snapshot(master_bundle, home, upstream):
    install(master_bundle)
    snap = Store().resolve("demo", "tinynets", "master", host=upstream.git.host)
    target = os.path.join(snap.path, "README.md")
    os.unlink(target)
    assert not housekeeping.verify(Store()).ok
    r = run(MIRROR + ["install", "--force", master_bundle])
    assert r.returncode == 0, r.stderr
    assert housekeeping.verify(Store()).ok
    assert os.listdir(os.path.join(home, "tmp")) == []


def test_verify_reports_unreadable_records_instead_of_crashing(master_bundle, home):
    install(master_bundle)
    bundles = os.path.join(home, "bundles")
    first = os.path.join(bundles, sorted(os.listdir(bundles))[0])
    os.chmod(first, 0o644)
    with open(first, "w") as fh:
        fh.write("{trunc")
    r = run(MIRROR + ["verify"])
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert f"problem: bundle record {first} was changed: its digest no longer matches its " \
        f"name" in r.stdout


def test_a_malformed_record_is_a_problem_or_one_line_never_a_traceback(master_bundle, home):
    install(master_bundle)
    store = Store()
    (repo,) = store.repos()
    path = store.layout.repo(repo.id.host, "demo", "tinynets").snapshot_record(repo.commits[0])
    record = json.loads(open(path).read())
    record["weight_digests"] = {"https://example.invalid/w.pkl": "oops"}
    os.chmod(path, 0o644)
    with open(path, "w") as fh:
        json.dump(record, fh)
    r = run(MIRROR + ["verify"])
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "cannot be checked" in r.stdout and path in r.stdout
    r = run(MIRROR + ["list"])  # lists what it can, and names the record it cannot read
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"warning: store {path}: this snapshot record is unreadable; "
                                f"run 'mirror verify' and reinstall its bundle with --force")
    (row,) = [line for line in r.stdout.splitlines() if repo.commits[0][:12] in line]
    assert row.split()[:3] == [f"{repo.id.host}/demo/tinynets", "master", repo.commits[0][:12]]
    r = run(MIRROR + ["list", "--long"])
    assert f"    commit {repo.commits[0]}: its record is unreadable; run 'mirror verify'" \
        in r.stdout


def test_seeding_that_cannot_read_a_record_is_a_warning_not_a_failed_install(
        master_bundle, all_refs_bundle, upstream, home, tmp_path):
    assert run(MIRROR + ["install", all_refs_bundle, "--no-megengine-cache"]).returncode == 0
    store = Store()
    (repo,) = store.repos()
    dev = upstream.demo.branches["dev"]
    path = store.layout.repo(repo.id.host, "demo", "tinynets").snapshot_record(dev)
    os.chmod(path, 0o644)
    with open(path, "w") as fh:
        fh.write('{"commit": "zz"}')
    receipt = tmp_path / "r.json"
    r = run(MIRROR + ["install", master_bundle, "--megengine-version", "1.13.0",
                      "--receipt", str(receipt)])
    assert r.returncode == 0, r.stderr
    assert "megengine cache: not seeded demo/tinynets:dev: store " in r.stdout
    assert json.loads(receipt.read_text())["result"] == "installed"


@pytest.mark.parametrize("command", [["verify"], ["gc"], ["gc", "-n"], ["remove", "demo/x"],
                                     ["seed"]])
def test_a_mistyped_home_is_said_and_never_made_a_store(command, tmp_path):
    """Only install creates a store: the commands that work on one, pointed at a path
    with none, say so, exit 4 (not installed) and create nothing. (list says nothing
    is installed there; inventory gives an empty inventory, what a new site sends.)"""
    home = tmp_path / "typo" / "store"
    r = run(MIRROR + command + ["--home", str(home)])
    assert r.returncode == 4, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: no store at {home}; 'mirror install' creates one (is --home or "
        f"MGE_MIRROR_HOME what you meant?)")
    assert sorted(os.listdir(tmp_path)) == []
