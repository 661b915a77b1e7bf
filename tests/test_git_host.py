"""``git_host`` is a host, never a path: one check for the loader, specs and pack.

The store keeps a repo under ``repos/<host>/<owner>/<name>``; a "host" such as
``/some/dir`` or ``../..`` would make the loader run whatever hubconf.py sits at
``<that path>/<owner>/<name>/snapshots/<commit>/``.
"""

import hashlib
import json
import os

import pytest

import mirror.hub
from mirror.errors import SpecError
from mirror.packer import PackOptions, pack
from mirror.refs import RepoSpec, check_host
from mirror.store import Store
from tests.conftest import MIRROR, run

HOST_REASON = "is not a git host: a DNS name or an IP address, with an optional :port"
GOOD_HOSTS = ["github.com", "git.corp.example", "127.0.0.1:8080", "[::1]:443", "GitHub.com",
              "localhost", "my-host.example:22", "10.0.0.1", "[2001:db8::1]", "[::ffff:1.2.3.4]",
              "a" * 63 + ".example", "xn--bcher-kva.example:65535"]
BAD_HOSTS = ["/tmp", "../..", "..", ".", "a/b", "", " ", "host name", "ex@mple.com",
             "a\\b", "github.com\n", "github.com\t", "git\x00hub.com", "-bad.example",
             "bad-.example", "a..b", ".example", "example.", "a" * 64 + ".example",
             ".".join(["a" * 63] * 4) + ".example", "github.com:0", "github.com:65536",
             "github.com:", "github.com:http", "github.com:-1", "a:1:2", "::1", "[::1",
             "[::1]:", "[::1%eth0/../x]", "[:::]", "[github.com]", "256.1.1.1", "1.2.3",
             "1.2.3.04", "gïthub.com", "~user", "file:", "C:\\x"]


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_hosts_are_accepted_as_given(host):
    assert check_host(host) == host


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_anything_else_is_refused_naming_it(host):
    with pytest.raises(SpecError) as e:
        check_host(host, "--git-host")
    assert e.value.exit_code == 2
    assert repr(host) in str(e.value) and f"--git-host {HOST_REASON}" in str(e.value)


@pytest.mark.parametrize("host", [None, 443, b"github.com"])
def test_a_host_that_is_not_a_string_is_refused(host):
    with pytest.raises(SpecError):
        check_host(host)


@pytest.mark.parametrize("text", ["../demo/tinynets", "./demo/tinynets", "under_score/demo/x",
                                  "host name/demo/tinynets", "a\\b/demo/tinynets",
                                  "github.com:0/demo/tinynets"])
def test_a_spec_host_is_checked_too(text):
    with pytest.raises(SpecError) as e:
        RepoSpec.parse(text)
    assert repr(text) in str(e.value) and HOST_REASON in str(e.value)


@pytest.mark.parametrize("text, host", [("[::1]:8080/demo/tinynets", "[::1]:8080"),
                                        ("GitHub.com/demo/tinynets", "GitHub.com")])
def test_a_spec_takes_any_host(text, host):
    assert RepoSpec.parse(text).host == host


# --- the loader --------------------------------------------------------------

COMMIT = "ab" * 20


def plant(repo_dir: str, marker: str) -> None:
    """A folder laid out like a store repo whose hubconf.py leaves ``marker`` when run."""
    os.makedirs(os.path.join(repo_dir, "refs", "heads"))
    with open(os.path.join(repo_dir, "refs", "heads", "master"), "w") as f:
        f.write(COMMIT + "\n")
    snap = os.path.join(repo_dir, "snapshots", COMMIT)
    os.makedirs(snap)
    code = f"open({marker!r}, 'w').write('ran')\n\ndef mlp(**kw):\n    return 'evil'\n"
    with open(os.path.join(snap, "hubconf.py"), "w") as f:
        f.write(code)
    # and the record the loader checks the code against: whoever can plant a folder
    # can plant that too, so only the host check stands between the two.
    files = [{"path": "hubconf.py", "mode": 0o100644, "size": len(code),
              "sha256": hashlib.sha256(code.encode()).hexdigest()}]
    with open(snap + ".json", "w") as f:
        json.dump({"schema": 1, "commit": COMMIT, "tree": "", "commit_time": 0,
                   "files": files}, f)


def attack(tmp_path, home: str, host: str):
    """The host to pass and the marker that hubconf.py there would write; ``ABS`` stands
    for an absolute directory (a temporary one, not the shared /tmp)."""
    if host == "ABS":
        host = str(tmp_path / "elsewhere")
    repo_dir = os.path.normpath(os.path.join(Store(home).layout.repos, host, "demo", "tinynets"))
    marker = str(tmp_path / "marker")
    plant(repo_dir, marker)
    return host, marker


ATTACKS = ["ABS", "../..", "a/b", "", "host name", "ex@mple.com"]


def test_the_attack_runs_planted_code_when_the_check_is_off(tmp_path, home, monkeypatch):
    # The planted folder is what the store would read: without the check, it runs.
    monkeypatch.setattr(mirror.hub, "check_host", lambda host, what="": host)
    host, marker = attack(tmp_path, home, "ABS")
    assert mirror.hub.load("demo/tinynets", "mlp", git_host=host, source="local") == "evil"
    assert os.path.exists(marker)


@pytest.mark.parametrize("host", ATTACKS)
@pytest.mark.parametrize("call", ["load", "list", "help", "import_module"])
@pytest.mark.parametrize("source", ["local", "auto"])
def test_the_loader_refuses_a_path_as_git_host(tmp_path, home, host, call, source):
    host, marker = attack(tmp_path, home, host)
    args = {"load": ("mlp",), "help": ("mlp",)}.get(call, ())
    with pytest.raises(SpecError) as e:
        getattr(mirror.hub, call)("demo/tinynets", *args, git_host=host, source=source)
    assert repr(host) in str(e.value) and f"git_host= {HOST_REASON}" in str(e.value)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("host", ["/tmp", "/", ".", "..", "a/b", "", "host name",
                                  "ex@mple.com", "\\\\server\\share"])
def test_the_loader_refuses_before_looking_at_the_store(host, home):
    with pytest.raises(SpecError):
        mirror.hub.load("demo/tinynets", "mlp", git_host=host, source="local")
    assert not os.path.exists(home)  # nothing created, nothing read under it


# --- pack and remove ---------------------------------------------------------


def test_pack_refuses_a_path_as_git_host(tmp_path):
    out = tmp_path / "out.hub"
    r = run(MIRROR + ["pack", "x/y", "--git-host", "/tmp", "-q", "-o", str(out)])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'/tmp'" in lines[0] and "--git-host" in lines[0], r.stderr
    assert not out.exists()


def test_the_library_pack_refuses_it_too(tmp_path):
    with pytest.raises(SpecError, match="--git-host"):
        pack(["x/y"], str(tmp_path / "out.hub"),
             PackOptions(git_host="../..", protocol="https", progress=False))
    # A spec's own host does not make a bad --git-host acceptable.
    with pytest.raises(SpecError, match="--git-host"):
        pack(["example.com/x/y"], str(tmp_path / "out.hub"),
             PackOptions(git_host="/tmp", protocol="https", progress=False))


@pytest.mark.parametrize("spec", ["../x/y", "1.2.3/x/y"])
def test_pack_and_remove_refuse_a_spec_whose_host_is_not_one(spec, tmp_path, home):
    for args in (["pack", spec, "-q", "-o", str(tmp_path / "out.hub")], ["remove", spec]):
        r = run(MIRROR + args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and HOST_REASON in lines[0], (args, r.stderr)


def test_protocol_file_still_takes_a_directory(upstream, tmp_path):
    # --protocol file: --git-host is where owner/name repositories are, by design.
    out = str(tmp_path / "out.hub")
    git_root = os.path.dirname(os.path.dirname(upstream.demo.bare))  # <root>/owner/name
    report = pack([upstream.spec("@" + upstream.demo.commits["c1"])], out,
                  PackOptions(git_host=git_root, protocol="file", progress=False))
    assert os.path.exists(out) and report.refs
