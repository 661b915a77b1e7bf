"""Install makes what it staged durable without waiting for other programs' writes:
one syncfs while little else is dirty, else an fsync of each of its own files."""

import os

import pytest

from mirror import atomic
from mirror.installer import install


@pytest.mark.parametrize("others_dirty", [0, 1 << 30])
def test_small_files_are_synced_alone_when_others_have_dirty_pages(
        master_bundle, tmp_path, monkeypatch, others_dirty):
    synced, whole = [], []
    real_fsync = atomic.fsync_path
    monkeypatch.setattr(atomic, "fsync_path", lambda p: (synced.append(p), real_fsync(p)))
    monkeypatch.setattr(atomic, "_dirty_bytes", lambda: others_dirty)
    real_syncfs = atomic._libc.syncfs
    monkeypatch.setattr(atomic._libc, "syncfs", lambda fd: (whole.append(fd), real_syncfs(fd))[1],
                        raising=False)
    home = str(tmp_path / "store")
    report = install(master_bundle, home)
    assert report.snapshots_installed
    # the install's own staged files (not the folders it fsyncs after renames)
    staged = {os.path.basename(p) for p in synced
              if os.path.basename(os.path.dirname(p)).startswith("install-")}
    blobs = set(os.listdir(os.path.join(home, "blobs")))
    if others_dirty:  # each staged file on its own, and no syncfs
        assert whole == [] and staged == blobs
    else:
        assert len(whole) == 1 and staged == set()
