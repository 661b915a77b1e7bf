"""Packing over a real network, as a user meets it (issue 19, in part): Ctrl-C stops a
pack at once, even while the server holds a download open, exits 130 and leaves no
bundle; the next pack resumes that download with Range, and only if the server's file
is the same one (If-Range); `mirror downloads list|clean` shows and cleans the cache."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest

from mirror.download import DownloadCache, clean_downloads, list_downloads
from mirror.locking import locked
from tests.conftest import MIRROR, ROOT, run, unpack

SIZE = 6 << 20


@pytest.fixture()
def big(upstream):
    """A weight of its own (the test's name in its path), and its URL."""
    path = f"downloads/{random.Random().getrandbits(48):x}.bin"
    # 0xff, no pickle opcode: the scan sees at once that it is not a pickle (random bytes
    # from the start can read as opcodes that import)
    data = b"\xff" + random.Random(path).randbytes(SIZE - 1)
    url = upstream.weights.add(path, data)
    yield path, url, data
    upstream.weights.fault(path, None)


def _pack(upstream, url, out, env):
    return MIRROR + ["pack", upstream.spec(), "--git-host", upstream.git.host, "--protocol",
                     "http", "--weights", url, "-o", str(out), "-q"]


def _env(tmp_path):
    return dict(os.environ, MGE_MIRROR_DOWNLOADS=str(tmp_path / "dl"))


def _part(tmp_path, url):
    data, _ = DownloadCache(str(tmp_path / "dl"))._paths(url)
    return data + ".part"


def _interrupted_pack(upstream, big, tmp_path, env):
    """A pack stopped with SIGINT while the server holds the big download open,
    half sent. Returns the finished process and its stderr."""
    path, url, _ = big
    upstream.weights.fault(path, "stall", 1)
    out = tmp_path / "out.hub"
    part = _part(tmp_path, url)
    # The server still holds the connection (for 60 s): the pack must not wait for it
    proc, err = _sigint_when(_pack(upstream, url, out, env), env, lambda: os.path.exists(
        part) and os.path.getsize(part) == SIZE // 2, "the download reached half")
    return proc, err, out


def _sigint_when(cmd, env, ready, what):
    """Start ``cmd``, send it SIGINT once ``ready()`` (polled for at most 30 s), and
    give it 30 s more to end. Returns the process and its stderr."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if ready():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"never: {what}: {proc.communicate()}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    return proc, err


def test_ctrl_c_stops_a_pack_at_once_and_the_next_run_resumes(upstream, big, tmp_path):
    path, url, data = big
    env = _env(tmp_path)
    proc, err, out = _interrupted_pack(upstream, big, tmp_path, env)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "Error: interrupted; nothing half-written was left at the output, and downloads "
        "resume where they stopped when this runs again")
    assert sorted(os.listdir(tmp_path)) == ["dl"]  # no bundle, no temporary one
    part = _part(tmp_path, url)
    assert os.path.getsize(part) == SIZE // 2
    with open(part + ".json") as fh:
        validator = json.load(fh)["validator"]
    assert validator.startswith('"')  # the server's ETag

    ranges = upstream.weights.range_requests
    r = run(_pack(upstream, url, out, env) + ["-v"], env=env)  # -v: what it asks for
    assert r.returncode == 0, r.stderr
    assert upstream.weights.range_requests == ranges + 1
    assert upstream.weights.if_range[-1] == validator
    assert f"mirror: GET {url} (bytes {SIZE // 2}-, If-Range {validator})" in \
        r.stderr.splitlines()
    assert not os.path.exists(part) and not os.path.exists(part + ".json")
    _, members = unpack(str(out))
    assert data in members.values()


def test_a_file_that_changed_on_the_server_is_fetched_whole(upstream, big, tmp_path):
    path, url, _ = big
    env = _env(tmp_path)
    proc, err, out = _interrupted_pack(upstream, big, tmp_path, env)
    assert proc.returncode == 130, err
    changed = b"\xff" + random.Random("changed").randbytes(SIZE - 1)
    upstream.weights.add(path, changed)  # republished: another ETag
    ranges = upstream.weights.range_requests
    r = run(_pack(upstream, url, out, env), env=env)
    assert r.returncode == 0, r.stderr
    assert upstream.weights.range_requests == ranges  # If-Range did not match: all of it
    _, members = unpack(str(out))
    assert changed in members.values()


def test_downloads_list_and_clean(upstream, big, tmp_path):
    path, url, _ = big
    env = _env(tmp_path)
    proc, err, _ = _interrupted_pack(upstream, big, tmp_path, env)
    assert proc.returncode == 130, err
    r = run(MIRROR + ["downloads", "list", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)["downloads"]
    parts = [e for e in listed if not e["complete"]]
    assert [(e["url"], e["size"], e["path"]) for e in parts] == \
        [(url, SIZE // 2, _part(tmp_path, url))]
    whole = [e for e in listed if e["complete"]]
    assert whole and all(e["url"].startswith(upstream.weights.base_url) for e in whole)

    r = run(MIRROR + ["downloads", "list"], env=env)
    assert r.stdout.splitlines()[-1] == (
        f"holds {len(listed)} downloads (1 parts), "
        f"{sum(e['size'] for e in listed) / 2**20:.1f} MiB")

    # a download in progress (its lock held) is left alone
    root = str(tmp_path / "dl")
    with locked(_part(tmp_path, url)[:-len(".part")] + ".lock"):
        assert clean_downloads(root, partial_only=True) == []
    r = run(MIRROR + ["downloads", "clean", "--partial", "-n"], env=env)
    assert r.returncode == 0 and os.path.exists(_part(tmp_path, url))
    r = run(MIRROR + ["downloads", "clean", "--partial", "--json"], env=env)
    assert [e["path"] for e in json.loads(r.stdout)["downloads"]] == [_part(tmp_path, url)]
    assert not os.path.exists(_part(tmp_path, url) + ".json")
    assert [e.complete for e in list_downloads(root)] == [True] * len(whole)
    assert sorted(os.listdir(root)) == sorted(  # the part's lock went with it
        n for e in whole for n in (os.path.basename(e["path"]),
                                   os.path.basename(e["path"])[:-len(".data")] + ".json",
                                   os.path.basename(e["path"]) + ".lock"))
    assert clean_downloads(root, older_than=3600) == []  # all of them are new
    orphan = os.path.join(root, "0" * 64 + ".data.lock")  # a download that never began
    open(orphan, "w").close()
    odd = ["f" * 64 + ".data.lock", "notes.data.lock"]  # not the cache's: left alone
    os.mkdir(os.path.join(root, odd[0]))
    open(os.path.join(root, odd[1]), "w").close()
    r = run(MIRROR + ["downloads", "clean"], env=env)
    assert r.returncode == 0 and list_downloads(root) == [], r.stderr
    assert sorted(os.listdir(root)) == odd  # the locks of what went, too


def test_a_lock_file_removed_by_its_holder_is_never_held_twice(tmp_path):
    """The download cache's clean removes a lock file while it holds it: whoever was
    waiting on that file takes the lock on the file at its path again, so it and a
    newcomer never both hold one."""
    import threading
    import time

    lock = str(tmp_path / "x.data.lock")
    held = threading.Event()
    got = []

    def waiter():
        held.wait(5)
        with locked(lock):  # the file at the path is the one it holds: none can take it
            try:
                with locked(lock, wait=False):
                    got.append("taken twice")
            except BlockingIOError:
                got.append("held")

    thread = threading.Thread(target=waiter)
    thread.start()
    with locked(lock):
        first = os.stat(lock).st_ino
        held.set()
        time.sleep(0.3)  # the waiter is in flock on this file now
        os.unlink(lock)
        with locked(lock, wait=False):  # a newcomer: the file at the path is free
            newcomer = os.stat(lock).st_ino
    thread.join(10)
    assert not thread.is_alive()
    assert newcomer != first and got == ["held"]


@pytest.mark.parametrize("stream", [False, True], ids=["", "stream"])
def test_a_pack_in_a_terminal_shows_one_bar_of_bytes_at_any_jobs(upstream, big, tmp_path,
                                                                 stream):
    """stderr a terminal (a pty): a bar of bytes with its rate, at -j 4, and one of the
    bytes written (with --stream, as they arrive); not a pty (every other test):
    nothing but the report."""
    import fcntl
    import pty
    import struct
    import termios

    path, url, _ = big
    env = _env(tmp_path)
    master, slave = pty.openpty()
    # a terminal 100 columns wide (a new pty is 0 by 0, and tqdm would draw nothing)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    cmd = MIRROR + ["pack", upstream.spec(), "--git-host", upstream.git.host, "--protocol",
                    "http", "--weights", url] + (["--stream"] if stream else []) + [
                        "-o", str(tmp_path / "t.hub"), "-j", "4"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            block = os.read(master, 1 << 16)
        except OSError:  # the pty closed: the pack is done
            break
        if not block:
            break
        seen += block
    os.close(master)
    assert proc.wait(timeout=60) == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert "weights 3/3: 100%" in text and "B/s]" in text, text
    assert "git fetch: " in text and "obj" in text and "write: " in text, text
    assert f"{SIZE / 2**20:.1f}M/{SIZE / 2**20:.1f}M" in text or "6.00M/6.00M" in text, text

    r = run(cmd[:-4] + ["-o", str(tmp_path / "u.hub")], env=env)  # stderr a pipe
    assert r.returncode == 0 and "weights 3/3" not in r.stderr and "B/s" not in r.stderr


def test_a_server_deaf_to_if_range_never_gets_a_file_spliced(upstream, big, tmp_path):
    """The file changed, and the server answers the Range anyway (206): its ETag is not
    the part's, so the part is dropped and the file fetched whole."""
    path, url, _ = big
    env = _env(tmp_path)
    proc, err, out = _interrupted_pack(upstream, big, tmp_path, env)
    assert proc.returncode == 130, err
    changed = b"\xff" + random.Random("changed again").randbytes(SIZE - 1)
    upstream.weights.add(path, changed)
    upstream.weights.honor_if_range = False
    try:
        ranges = upstream.weights.range_requests
        r = run(_pack(upstream, url, out, env), env=env)
    finally:
        upstream.weights.honor_if_range = True
    assert r.returncode == 0, r.stderr
    assert upstream.weights.range_requests == ranges + 1  # asked, answered, refused
    _, members = unpack(str(out))
    assert changed in members.values()


def test_ctrl_c_does_not_wait_for_another_packs_download(upstream, big, tmp_path):
    """Another pack downloads the same URL (its lock held here): this one waits for it,
    and Ctrl-C stops the wait at once."""
    path, url, _ = big
    env = _env(tmp_path)
    lock = _part(tmp_path, url)[:-len(".part")] + ".lock"
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    def waiting() -> bool:  # it has fetched the small weights, and waits on ours
        names = os.listdir(tmp_path / "dl") if os.path.isdir(tmp_path / "dl") else []
        if sum(n.endswith(".data") for n in names) < 2:
            return False
        time.sleep(0.5)
        return True

    with locked(lock):  # held here until the pack has ended
        proc, err = _sigint_when(_pack(upstream, url, tmp_path / "out.hub", env), env,
                                 waiting, "the small weights were fetched")
    assert proc.returncode == 130, err


def test_clean_leaves_what_a_running_pack_is_made_of(upstream, big, tmp_path):
    import contextlib

    _, url, _ = big
    root = str(tmp_path / "dl")
    keep = contextlib.ExitStack()
    with keep:
        got = DownloadCache(root, keep=keep).fetch(url, url, progress=False)
        assert clean_downloads(root) == [] and os.path.exists(got.path)
    assert [e.path for e in clean_downloads(root)] == [got.path]
    assert not os.path.exists(got.path)


def test_a_clean_between_the_cache_check_and_its_lock_is_fetched_again(upstream, tmp_path,
                                                                        monkeypatch):
    """`mirror downloads clean` removes a cached file after a pack has found it good but
    before the pack has locked it: the pack lets go of the lock it took and downloads
    the file again (it used to keep that lock, and wait forever on its own download's)."""
    import contextlib
    import threading

    from mirror.download import Batch, Interrupted

    data = random.Random(9).randbytes(1 << 20)
    url = upstream.weights.add("race/cleaned.bin", data)
    root = str(tmp_path / "dl")
    DownloadCache(root).fetch(url, url, progress=False)  # cached
    found = []
    real = DownloadCache._fetch

    def cleaned_after(self, *args):
        got = real(self, *args)
        if not found:  # as a clean in another process would, at the worst moment
            assert [e.url for e in clean_downloads(root)] == [url]
        found.append(got)
        return got

    monkeypatch.setattr(DownloadCache, "_fetch", cleaned_after)
    batch = Batch()
    timer = threading.Timer(20, batch.stop)  # a hang ends as Interrupted, not forever
    timer.start()
    try:
        with contextlib.ExitStack() as keep:
            got = DownloadCache(root, keep=keep).fetch(url, url, progress=False, batch=batch)
            assert open(got.path, "rb").read() == data and len(found) == 2
    except Interrupted:
        pytest.fail("the pack waited on its own lock")
    finally:
        timer.cancel()
