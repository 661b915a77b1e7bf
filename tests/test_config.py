"""Configuration is read in one place, when asked: the truthy rule, the homes, and the
offline switch as a user sets it."""

from __future__ import annotations

import os
import sys

import pytest

from mirror.config import is_true, settings
from mirror.errors import ConfigError
from tests.conftest import run


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
    ("y", True), ("2", True),  # set, and not saying off: on (a typo stays offline)
    ("0", False), ("false", False), ("False", False), ("no", False), ("off", False),
    (" ", False), ("", False), (None, False),
])
def test_one_truthy_rule(value, expected):
    assert is_true(value) is expected


def test_settings_are_read_when_asked(monkeypatch):
    monkeypatch.setenv("MGE_MIRROR_OFFLINE", "1")
    assert settings().offline
    monkeypatch.setenv("MGE_MIRROR_OFFLINE", "false")
    assert not settings().offline


def test_one_home_resolver_for_the_store_and_megengine(monkeypatch):
    for name in ("MGE_MIRROR_HOME", "MGE_HOME", "XDG_CACHE_HOME", "MGE_MIRROR_DOWNLOADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    got = settings()
    assert (got.store_home, got.megengine_home, got.downloads_dir) == (
        "/x/megengine/mirror", "/x/megengine", "/x/megengine/mirror-downloads")
    monkeypatch.setenv("MGE_HOME", "/m")
    assert (settings().store_home, settings().megengine_home) == ("/m/mirror", "/m")


# Run in a network namespace: with the switch off, source="remote" goes to megengine.hub,
# which finds no network there (and never reaches one from a test).
PROBE = """
import mirror.hub
try:
    mirror.hub.load("other/repo", "x", source="remote", git_host="127.0.0.1:9")
except Exception as e:
    print(type(e).__name__)
"""


@pytest.mark.parametrize("value, local", [
    ("1", True), ("yes", True), ("y", True), ("0", False), ("false", False), ("no", False),
    ("", False),
])
def test_mge_mirror_offline_means_what_it_says(value, local, home):
    env = dict(os.environ, MGE_MIRROR_OFFLINE=value)
    r = run([sys.executable, "-c", PROBE], env=env, netns=True)
    answer = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr
    assert (answer == "NotInstalledError") is local, (value, r.stdout, r.stderr)


def test_a_bad_source_date_epoch_fails_only_what_reads_it(monkeypatch, home):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "2024-01-01")
    assert run([sys.executable, "-m", "mirror", "list"]).returncode == 0
    with pytest.raises(ConfigError) as e:
        settings().now()
    assert str(e.value) == ("config SOURCE_DATE_EPOCH: '2024-01-01' is not a whole number "
                            "of seconds")


def test_settings_never_show_the_git_password(monkeypatch):
    monkeypatch.setenv("MGE_MIRROR_GIT_PASSWORD", "hunter2")
    assert settings().git_password == "hunter2" and "hunter2" not in repr(settings())
