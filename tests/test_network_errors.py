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


# --- proxies, for git and weights alike -------------------------------------------------


def test_git_and_weights_go_through_the_proxy_and_no_proxy_is_honoured(upstream, tmp_path):
    """git over HTTPS (a CA made here, trusted through SSL_CERT_FILE) through the proxy's
    CONNECT, the weights' plain HTTP through its GET; with no_proxy, neither. (git is
    reached as localhost: libgit2 1.9 accepts no certificate for an IP address.)"""
    import os

    from tests.upstream import GitServer
    from tests.upstream.proxy import LoggingProxy
    from tests.upstream.tls import make_certificates

    certs = make_certificates(str(tmp_path / "tls"))
    git = GitServer(upstream.git.root, certificates=certs).start()
    try:
        with LoggingProxy() as proxy:
            env = dict(os.environ, https_proxy=proxy.base_url, http_proxy=proxy.base_url,
                       SSL_CERT_FILE=certs.ca, MGE_MIRROR_DOWNLOADS=str(tmp_path / "dl"))
            env.pop("no_proxy", None)
            env.pop("NO_PROXY", None)
            host = f"localhost:{git.port}"
            cmd = MIRROR + ["pack", upstream.spec(), "--git-host", host, "--protocol",
                            "https", "-q"]
            r = run(cmd + ["-o", str(tmp_path / "a.hub")], env=env)
            assert r.returncode == 0, r.stderr
            assert ("CONNECT", host) in proxy.seen
            weights = [t for m, t in proxy.seen if m == "GET"]
            assert weights and all(t.startswith(upstream.weights.base_url) for t in weights)

            # all_proxy alone, as curl reads it: the weights through it as well
            proxy.seen.clear()
            only_all = {k: v for k, v in env.items() if k not in ("https_proxy",
                                                                 "http_proxy")}
            only_all.update(all_proxy=proxy.base_url,
                            MGE_MIRROR_DOWNLOADS=str(tmp_path / "dl-all"))
            r = run(cmd + ["-o", str(tmp_path / "c.hub")], env=only_all)
            assert r.returncode == 0, r.stderr
            assert ("CONNECT", host) in proxy.seen and any(m == "GET" for m, _ in proxy.seen)

            proxy.seen.clear()
            env.update(no_proxy="127.0.0.1,localhost",
                       MGE_MIRROR_DOWNLOADS=str(tmp_path / "dl2"))
            r = run(cmd + ["-o", str(tmp_path / "b.hub")], env=env)
            assert r.returncode == 0, r.stderr
            assert proxy.seen == []
    finally:
        git.stop()


def test_plain_http_git_behind_a_proxy_is_said_and_fetched_directly(upstream, tmp_path):
    import os

    from tests.upstream.proxy import LoggingProxy

    with LoggingProxy() as proxy:
        env = dict(os.environ, http_proxy=proxy.base_url,
                   MGE_MIRROR_DOWNLOADS=str(tmp_path / "dl"))
        env.pop("no_proxy", None)
        env.pop("NO_PROXY", None)
        r = run(MIRROR + ["pack", upstream.spec(), "--git-host", upstream.git.host,
                          "--protocol", "http", "-q", "-o", str(tmp_path / "a.hub")], env=env)
    assert r.returncode == 0, r.stderr
    url = f"http://{upstream.git.host}/demo/tinynets"
    assert f"git: {url}: libgit2 does not send plain-HTTP git through a proxy " \
           f"(libgit2#5650); fetching it directly, past {proxy.base_url}" in r.stderr
    assert [m for m, _ in proxy.seen] and all(m == "GET" for m, _ in proxy.seen)


def test_weight_download_errors_say_what_to_try(upstream, tmp_path):
    """The weights' side: TLS spoken to plain HTTP, nothing listening, no DNS."""
    from mirror.download import download
    from mirror.errors import DownloadError

    def said(url, netns=False):
        if netns:  # no network at all: name resolution fails at once
            code = ("import sys\nfrom mirror.download import download\n"
                    "from mirror.errors import DownloadError\ntry:\n"
                    f"    download({url!r}, {str(tmp_path / 'w')!r}, progress=False, "
                    f"retries=0)\nexcept DownloadError as e:\n    print(e)\n")
            import sys
            return run([sys.executable, "-c", code], netns=True).stdout.strip()
        try:
            download(url, str(tmp_path / "w"), progress=False, retries=0)
        except DownloadError as e:
            return str(e)
        raise AssertionError("downloaded")

    https = upstream.weights.base_url.replace("http://", "https://") + "/x.pkl"
    assert said(https).startswith(
        f"download failed: {https}: the server answered an HTTPS request in plain HTTP: "
        f"rewrite the URL to http:// with --rewrite ([SSL: ")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/x.pkl"
        assert said(dead) == (
            f"download failed: {dead}: nothing answers at that address and port (is the "
            f"server up, and is this its port?) ([Errno 111] Connection refused) (gave up "
            f"after 1 attempt)")
    far = "https://download.megengine.org/models/x.pkl"
    assert said(far, netns=True).startswith(
        f"download failed: {far}: the host name does not resolve: this host has no DNS or "
        f"no way out; pack on a host that reaches it, or --rewrite the URL to a mirror this "
        f"one reaches ([Errno -3] Temporary failure in name resolution)")


def test_a_proxy_that_does_not_answer_is_named(upstream, tmp_path):
    """git over HTTPS through a proxy that is not there: the proxy is named, not the
    server; the weights say the same in their words."""
    import os

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        env = dict(os.environ, https_proxy=dead, http_proxy=dead,
                   MGE_MIRROR_DOWNLOADS=str(tmp_path / "dl"))
        env.pop("no_proxy", None)
        env.pop("NO_PROXY", None)
        r = run(MIRROR + ["pack", "megengine/models", "-o", str(tmp_path / "x.hub")],
                env=env)
        assert r.returncode == 1
        assert r.stderr.strip().splitlines()[-1].startswith(
            f"Error: git: https://github.com/megengine/models: the proxy {dead} does not "
            f"answer: check https_proxy and git's http.proxy (libgit2: ")

        from mirror.download import download
        from mirror.errors import DownloadError
        os.environ["http_proxy"] = dead
        try:
            download(upstream.weights.url("x.pkl"), str(tmp_path / "w"), progress=False,
                     retries=0)
        except DownloadError as e:
            said = str(e)
        finally:
            del os.environ["http_proxy"]
    assert said == (f"download failed: {upstream.weights.url('x.pkl')}: the proxy {dead} "
                    f"does not answer: check https_proxy, http_proxy and no_proxy ([Errno "
                    f"111] Connection refused) (gave up after 1 attempt)")
