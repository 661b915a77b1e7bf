"""Errors from git in one line that says what happened and what to try, then
libgit2's own words (issue 19): TLS spoken to a plain HTTP server, a repository that
is not there, nothing listening, and no DNS at all (in a network namespace)."""

from __future__ import annotations

import socket

from tests.conftest import MIRROR, run


def _pack(*args, netns=False, tmp_path=None):
    r = run(MIRROR + ["pack", *args, "-o", str(tmp_path / "out.hub"), "-q"], netns=netns)
    assert r.returncode == 1, r.stderr
    assert not (tmp_path / "out.hub").exists()
    return r.stderr.strip().splitlines()[-1]


def test_tls_spoken_to_plain_http(upstream, tmp_path):
    said = _pack(upstream.spec(), "--git-host", upstream.git.host, "--protocol", "https",
                 tmp_path=tmp_path)
    assert said.startswith(f"Error: git: https://{upstream.git.host}/demo/tinynets")
    assert ": the server answered an HTTPS request in plain HTTP; if it speaks HTTP, pack " \
           "with --protocol http (libgit2: SSL error: " in said


def test_a_repository_that_is_not_there(upstream, tmp_path):
    said = _pack("nobody/nothing", "--git-host", upstream.git.host, "--protocol", "http",
                 tmp_path=tmp_path)
    assert said.startswith(f"Error: git: http://{upstream.git.host}/nobody/nothing")
    assert said.endswith(
        ": no such repository there, or it is private: check owner/name and --git-host; a "
        "private one needs MGE_MIRROR_GIT_USERNAME/_PASSWORD or a git credential helper "
        "(libgit2: unexpected http status code: 404)")


def test_nothing_listening(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{s.getsockname()[1]}"
        said = _pack("demo/tinynets", "--git-host", host, "--protocol", "http",
                     tmp_path=tmp_path)
    assert said.endswith(
        ": nothing answers at that address and port (is the server up, and is this its "
        "port?) (libgit2: failed to connect to 127.0.0.1: Connection refused)")


def test_no_dns_inside_the_air_gap(tmp_path):
    said = _pack("megengine/models", netns=True, tmp_path=tmp_path)
    assert said.startswith("Error: git: https://github.com/megengine/models")
    assert ": the host name does not resolve: this host has no DNS or no way out; pack on "\
           "a host that reaches it, or point --git-host or --rewrite at a mirror this one " \
           "reaches (libgit2: failed to resolve address for github.com: " in said
