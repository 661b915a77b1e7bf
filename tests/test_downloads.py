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
    data = random.Random(path).randbytes(SIZE)
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
    proc = subprocess.Popen(_pack(upstream, url, out, env), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = _part(tmp_path, url)
    for _ in range(600):  # until half the file is in its part file (at most 30 s)
        if os.path.exists(part) and os.path.getsize(part) == SIZE // 2:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"the download never reached half: {proc.communicate()}")
    proc.send_signal(signal.SIGINT)
    # The server still holds the connection (for 60 s): the pack must not wait for it
    _, err = proc.communicate(timeout=30)
    return proc, err, out


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
    r = run(_pack(upstream, url, out, env), env=env)
    assert r.returncode == 0, r.stderr
    assert upstream.weights.range_requests == ranges + 1
    assert upstream.weights.if_range[-1] == validator
    assert not os.path.exists(part) and not os.path.exists(part + ".json")
    _, members = unpack(str(out))
    assert data in members.values()


def test_a_file_that_changed_on_the_server_is_fetched_whole(upstream, big, tmp_path):
    path, url, _ = big
    env = _env(tmp_path)
    proc, err, out = _interrupted_pack(upstream, big, tmp_path, env)
    assert proc.returncode == 130, err
    changed = random.Random("changed").randbytes(SIZE)
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
    listed = json.loads(r.stdout)
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
    assert [e["path"] for e in json.loads(r.stdout)["removed"]] == [_part(tmp_path, url)]
    assert not os.path.exists(_part(tmp_path, url) + ".json")
    assert [e.complete for e in list_downloads(root)] == [True] * len(whole)
    assert clean_downloads(root, older_than=3600) == []  # all of them are new
    r = run(MIRROR + ["downloads", "clean"], env=env)
    assert r.returncode == 0 and list_downloads(root) == []
    assert sorted(n for n in os.listdir(root) if not n.endswith(".lock")) == []
