"""The names, paths and URLs mirror accepts (mirror.names), with the exact messages a
refused one gets, and the model fields they guard."""

from __future__ import annotations

import glob
import json
import tarfile

import pytest

from mirror import names
from mirror.errors import InvalidRecordError
from mirror.model import (
    TIME_MAX,
    Manifest,
    RefEntry,
    RefLogEntry,
    RepoId,
    SnapshotEntry,
    SnapshotRecord,
    WeightEntry,
)
from mirror.names import (
    check_component,
    check_host,
    check_identifier,
    check_path,
    check_ref_name,
    check_refs,
    check_text,
    check_url,
    control_character,
    is_host,
    ref_conflict,
    shown,
)
from tests.test_legacy_store import FIXTURE


def refused(check, *args) -> str:
    with pytest.raises(InvalidRecordError) as e:
        check(*args)
    return str(e.value)


# --- text -------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\0", "\n", "\r", "\t", "\x1b", "\x1f", "\x7f", "\x80",
                                  "\x85", "\x9b", "\x9f"])
def test_control_characters_c0_del_c1_are_refused(char):
    assert control_character(f"a{char}b") == char
    assert refused(check_text, f"a{char}b", "tool") == \
        f"tool {('a' + char + 'b')!r} holds the control character {char!r}"


@pytest.mark.parametrize("text", ["plain", "é", "\xa0", "\xa0x", "日本", "😀", ""])
def test_printable_text_passes(text):
    assert control_character(text) is None
    assert check_text(text, "tool") == text


def test_a_lone_surrogate_is_not_utf8():
    assert refused(check_text, "a\udcffb", "tool") == \
        "tool 'a\\udcffb' is not valid UTF-8 (it holds a lone surrogate)"


def test_text_is_bounded_in_utf8_bytes():
    assert check_text("é" * 5, "tool", 10) == "é" * 5
    assert refused(check_text, "é" * 6, "tool", 10) == \
        "tool 'éééééé' is 12 bytes, over the 10 byte limit"


def test_long_values_are_shown_shortened_on_one_line():
    assert shown("x" * 80) == repr("x" * 80)
    assert shown("y\n" * 100) == repr("y\n" * 40) + "... (200 characters)"
    assert "\n" not in refused(check_text, "\n" * 10000, "tool")


# --- names and paths ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b"])
def test_a_component_is_one_plain_name(name):
    assert refused(check_component, name, "repo owner") == \
        f"repo owner {name!r} is not a plain name"


def test_a_component_is_at_most_255_bytes():
    assert check_component("o" * 255, "repo owner") == "o" * 255
    assert check_component("é" * 127 + "o", "repo owner")  # 255 bytes
    assert refused(check_component, "é" * 128, "repo owner").endswith(
        "... (128 characters) is 256 bytes, over the 255 byte limit")


@pytest.mark.parametrize("path", ["tinynets/mlp.py", "a", ".github/x.yml", "a/..b/c.",
                                  "é/日本.py", "d" * 255 + "/" + "e" * 255])
def test_relative_paths_pass(path):
    assert check_path(path, "file path") == path


@pytest.mark.parametrize("path", ["/etc/passwd", "a/../../b", "..", ".", "a//b", "a/",
                                  "./a", "a\\b", ""])
def test_paths_that_leave_their_folder_are_refused(path):
    assert refused(check_path, path, "file path") == \
        f"unsafe file path {path!r}: not a relative path inside its folder"


def test_a_path_component_is_at_most_255_bytes():
    path = "a/" + "d" * 256 + "/b"
    assert refused(check_path, path, "file path") == (
        f"file path {shown(path)} has a 256 byte component {shown('d' * 256)}, over the "
        f"255 bytes a file name may have")


def test_a_path_is_at_most_3072_bytes():
    fits = "/".join(["d" * 254] * 12 + ["e" * 12])  # 12 * 255 + 12 = 3072 bytes
    assert check_path(fits, "file path") == fits
    assert refused(check_path, fits + "f", "file path") == \
        f"file path {shown(fits + 'f')} is 3073 bytes, over the 3072 byte limit"


def test_control_characters_in_paths_are_refused():
    assert refused(check_path, "Icon\r", "file path") == \
        "file path 'Icon\\r' holds the control character '\\r'"


@pytest.mark.parametrize("name", ["mlp", "_private", "small_cnn2", "é", "match"])
def test_entrypoints_are_identifiers(name):
    assert check_identifier(name, "entrypoint") == name


@pytest.mark.parametrize("name", ["", "1x", "a-b", "a b", "class", "a\udcff", "a\n"])
def test_non_identifiers_are_refused(name):
    assert refused(check_identifier, name, "entrypoint") == \
        f"entrypoint {name!r} is not a Python identifier"


# --- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["https://example.com/w.pkl", "http://127.0.0.1:8000/w.pkl",
                                 "HTTPS://Example.com/w.pkl", "http://[::1]:8/w.pkl",
                                 "file:///data/w.pkl", "s3://bucket/w.pkl", "/data/w.pkl",
                                 "https://example.com/w.pkl?sig=a%20b#frag",
                                 "https://例え.jp/重み.pkl"])
def test_urls_mirror_downloads_pass(url):
    assert check_url(url, "weight URL") == url


@pytest.mark.parametrize("url, scheme", [("ftp://example.com/w.pkl", "'ftp'"),
                                         ("weights/w.pkl", "'(none)'"),
                                         ("C:/weights/w.pkl", "'c'"),
                                         ("javascript:alert(1)", "'javascript'")])
def test_other_schemes_are_refused(url, scheme):
    assert refused(check_url, url, "weight URL") == (
        f"weight URL {url!r} has the scheme {scheme}; mirror downloads http, https, file, "
        f"s3 URLs and absolute paths")


@pytest.mark.parametrize("url", ["http:///w.pkl", "https:w.pkl", "http://:80/w.pkl"])
def test_http_urls_need_a_host(url):
    assert refused(check_url, url, "weight URL") == f"weight URL {url!r} has no host"


def test_malformed_urls_are_refused():
    assert refused(check_url, "http://[::1/w.pkl", "weight URL") == \
        "weight URL 'http://[::1/w.pkl' is not a URL"


@pytest.mark.parametrize("url", ["https://example.com/a b.pkl", "https://example.com/\xa0",
                                 "https://example.com/\u2028", "https://example.com/\u3000"])
def test_whitespace_is_refused_in_urls(url):
    assert refused(check_url, url, "weight URL") == \
        f"weight URL {url!r} holds whitespace, which no URL does"


@pytest.mark.parametrize("url, char", [("https://example.com/\0.pkl", "\0"),
                                       ("https://example.com/\n.pkl", "\n"),
                                       ("https://example.com/\x85.pkl", "\x85")])
def test_control_characters_are_refused_in_urls(url, char):
    assert refused(check_url, url, "weight URL") == \
        f"weight URL {url!r} holds the control character {char!r}"


def test_urls_are_bounded():
    url = "https://example.com/" + "x" * (8192 - 20)
    assert check_url(url, "weight URL") == url
    assert refused(check_url, url + "x", "weight URL") == \
        f"weight URL {shown(url + 'x')} is 8193 bytes, over the 8192 byte limit"


def test_lone_surrogates_are_refused_in_urls():
    assert refused(check_url, "https://example.com/\udcff", "weight URL") == \
        "weight URL 'https://example.com/\\udcff' is not valid UTF-8 (it holds a lone surrogate)"


# --- hosts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["github.com", "127.0.0.1:8080", "[::1]", "[::1]:22",
                                  "git.corp.example", "localhost"])
def test_hosts_pass(host):
    assert is_host(host) and check_host(host, "repo host") == host


@pytest.mark.parametrize("host", ["", "..", "../etc", "a/b", "a b", "host:0", "host:65536",
                                  "1.2.3.999", "[::1", "[fe80::1%eth0]", "é.com", "-a.com",
                                  "a.com\n", "x" * 254])
def test_non_hosts_are_refused(host):
    assert not is_host(host)
    assert refused(check_host, host, "repo host") == (
        f"repo host {shown(host)} is not a git host: a DNS name or an IP address, with an "
        f"optional :port")


# --- refs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["master", "feature/x", "v1.0", "release/1.0", "é", "@",
                                  "a-b", "x/" + "r" * 255])
def test_ref_names_git_takes_pass(name):
    assert check_ref_name(name, "branch") == name
    assert check_ref_name(name, "tag") == name


@pytest.mark.parametrize("name", ["a..b", "x.lock", "x.lock/y", ".x", "x/.y", "x.", "x/",
                                  "/x", "x//y", "a b", "a~b", "a^b", "a:b", "a?b", "a*b",
                                  "a[b", "a\\b", "a@{b", "-x", ""])
def test_ref_names_git_refuses_are_refused(name):
    for kind in ("branch", "tag"):
        assert refused(check_ref_name, name, kind) == \
            f"{kind} {name!r} is not a valid git {kind} name"


def test_head_is_no_branch_name_but_may_be_a_tag():
    assert refused(check_ref_name, "HEAD", "branch") == \
        "branch 'HEAD' is not a valid git branch name"
    assert check_ref_name("HEAD", "tag") == "HEAD"


@pytest.mark.parametrize("name, char", [("x\x7f", "\x7f"), ("x\0y", "\0"), ("x\x85", "\x85"),
                                        ("x\ny", "\n")])
def test_control_characters_libgit2_lets_through_are_refused(name, char):
    assert refused(check_ref_name, name, "branch") == \
        f"branch {name!r} holds the control character {char!r}"


def test_a_ref_component_is_at_most_255_bytes():
    name = "a/" + "r" * 256
    assert refused(check_ref_name, name, "tag") == (
        f"tag {shown(name)} has a 256 byte component {shown('r' * 256)}, over the 255 bytes "
        f"a file name may have")


def test_a_ref_name_with_a_lone_surrogate_is_refused():
    assert refused(check_ref_name, "x\udcff", "branch") == \
        "branch 'x\\udcff' is not valid UTF-8 (it holds a lone surrogate)"


@pytest.mark.parametrize("installed, new, clash", [
    (["x"], "x/y", "x"),
    (["x/y"], "x", "x/y"),
    (["a/b/c"], "a", "a/b/c"),
    (["a"], "a/b/c", "a"),
    (["dev", "x"], "x/y", "x"),
    (["x"], "x", None),  # the same ref: it moves, no clash
    (["xy"], "x/y", None),
    (["x"], "xy", None),
    (["x-y"], "x", None),
    ([], "x", None),
])
def test_ref_conflict_finds_the_installed_ref_that_clashes(installed, new, clash):
    assert ref_conflict(installed, new) == clash
    assert ref_conflict(iter(installed), new) == clash  # any iterable, read once


def test_check_refs_refuses_a_ref_listed_twice():
    assert refused(check_refs, [("branch", "master"), ("tag", "v1"), ("branch", "master")]) \
        == "branch 'master' is listed twice"


@pytest.mark.parametrize("refs", [[("branch", "x"), ("branch", "x/y")],
                                  [("branch", "x/y"), ("branch", "x")]])
def test_check_refs_refuses_x_beside_x_slash_y(refs):
    assert refused(check_refs, refs) == (
        "branch 'x/y' cannot coexist with branch 'x' (git keeps refs as files: one cannot be "
        "both a file and a folder)")


def test_check_refs_takes_refs_that_can_coexist():
    check_refs([("branch", "x"), ("tag", "x/y"), ("branch", "xy/z"), ("branch", "y/x"),
                ("tag", "y")])
    check_refs([("branch", f"r{i}/x") for i in range(20000)])  # many refs, quickly


# --- the model's fields -----------------------------------------------------------------------

COMMIT = "a" * 40
URL = "https://example.com/w.pkl"


def snapshot(**fields) -> dict:
    return dict({"commit": COMMIT, "tree": "b" * 40, "commit_time": 0, "files": []}, **fields)


def test_ref_entries_name_the_ref_and_field():
    ref = {"name": "main", "kind": "branch", "commit": COMMIT}
    assert RefEntry.from_json(ref).name == "main"
    assert refused(RefEntry.from_json, dict(ref, name="a..b")) == \
        "branch 'a..b' is not a valid git branch name"
    assert refused(RefEntry.from_json, dict(ref, kind="note")) == \
        "ref 'main' is of kind 'note', neither 'branch' nor 'tag'"
    assert refused(RefEntry.from_json, dict(ref, commit="HEAD")) == \
        "branch 'main' points at 'HEAD', not a full commit id"
    assert refused(RefEntry.from_json, dict(ref, asked="x\x1by")) == \
        "branch 'main' 'asked' 'x\\x1by' holds the control character '\\x1b'"
    assert refused(RefEntry.from_json, dict(ref, resolved_at=-1)) == \
        f"branch 'main' 'resolved_at' -1 is out of range (0 to {TIME_MAX})"


def test_snapshot_entries_name_the_snapshot_and_field():
    assert SnapshotEntry.from_json(snapshot(commit_time=-(2 ** 40))).commit_time == -(2 ** 40)
    assert refused(SnapshotEntry.from_json, snapshot(commit_time=2 ** 63)) == (
        f"snapshot {COMMIT[:12]} commit_time {2 ** 63} is out of range "
        f"({-(2 ** 63)} to {2 ** 63 - 1})")
    assert refused(SnapshotEntry.from_json, snapshot(weights=["ftp://x/w"])) == (
        f"snapshot {COMMIT[:12]} weight URL 'ftp://x/w' has the scheme 'ftp'; mirror "
        f"downloads http, https, file, s3 URLs and absolute paths")
    assert refused(SnapshotEntry.from_json, snapshot(entrypoints=["a-b"])) == \
        f"snapshot {COMMIT[:12]} entrypoint 'a-b' is not a Python identifier"
    assert refused(SnapshotEntry.from_json, snapshot(entrypoints=["a"], coverage={"b": []})) \
        == f"snapshot {COMMIT[:12]} coverage names 'b', which is not one of its entrypoints"
    assert refused(SnapshotEntry.from_json, snapshot(tree="x")) == \
        f"snapshot {COMMIT[:12]} tree 'x' is not a full id"
    # What pack could not fetch is only text: any scheme, but no control character.
    assert SnapshotEntry.from_json(snapshot(excluded=["ftp://x/w"], entrypoints=["a"],
                                            coverage={"a": ["ftp://x/w"]})).excluded
    assert refused(SnapshotEntry.from_json, snapshot(unresolved=["x\0"])) == \
        f"snapshot {COMMIT[:12]} unresolved download 'x\\x00' holds the control character " \
        f"'\\x00'"
    assert refused(SnapshotEntry.from_json, snapshot(trace={
        "weights": {"\udcff": []}, "nested": {}, "errors": {}})) == \
        "trace '\\udcff' is not valid UTF-8 (it holds a lone surrogate)"


def test_sizes_and_dates_are_in_range():
    weight = {"url": URL, "size": 2 ** 63 - 1, "sha256": "c" * 64}
    assert WeightEntry.from_json(weight).size == 2 ** 63 - 1
    assert refused(WeightEntry.from_json, dict(weight, size=2 ** 63)) == \
        f"{URL}: size {2 ** 63} is out of range (0 to {2 ** 63 - 1})"
    assert refused(WeightEntry.from_json, dict(weight, size=10 ** 60)) == \
        f"{URL}: size 10000000000000000000... (61 digits) is out of range (0 to " \
        f"{2 ** 63 - 1})"
    line = {"ref": "main", "kind": "branch", "old": None, "new": COMMIT, "bundle": "d" * 64,
            "bundle_file": "x.hub", "time": TIME_MAX}
    assert RefLogEntry.from_json(line).time == TIME_MAX
    assert refused(RefLogEntry.from_json, dict(line, created=TIME_MAX + 1)) == \
        f"ref log 'created' {TIME_MAX + 1} is out of range (0 to {TIME_MAX})"


def test_repo_ids_name_the_field():
    repo = {"host": "github.com", "owner": "demo", "name": "tinynets",
            "url": "https://github.com/demo/tinynets"}
    assert RepoId.from_json(repo).label == "demo/tinynets"
    assert refused(RepoId.from_json, dict(repo, host="../x")) == \
        "repo host '../x' is not a git host: a DNS name or an IP address, with an optional :port"
    assert refused(RepoId.from_json, dict(repo, owner="de\nmo")) == \
        "repo owner 'de\\nmo' holds the control character '\\n'"
    assert refused(RepoId.from_json, dict(repo, name="İ" * 127)) == \
        f"repo name {shown('İ' * 127)} is over 255 bytes in lower case, as the store names " \
        f"its folder"
    assert refused(RepoId.from_json, dict(repo, url="x\x9by")) == \
        "repo url 'x\\x9by' holds the control character '\\x9b'"


def test_store_records_check_their_urls():
    pin = {"sha256": "c" * 64, "size": 1}
    assert refused(SnapshotRecord.from_json, snapshot(weight_digests={"a b": pin})) == \
        f"snapshot {COMMIT[:12]} weight_digests URL 'a b' holds whitespace, which no URL does"


def test_a_manifest_lists_a_weight_and_a_repo_once():
    repo = {"host": "github.com", "owner": "demo", "name": "x", "url": "u", "refs": [],
            "snapshots": []}
    weight = {"url": URL, "size": 1, "sha256": "c" * 64}
    manifest = {"format": "mge-mirror-bundle", "format_version": 2, "repos": [repo],
                "weights": [weight]}
    assert Manifest.from_json(manifest).weights
    assert refused(Manifest.from_json, dict(manifest, weights=[weight, weight])) == \
        f"weight URL {URL!r} is listed twice"
    assert refused(Manifest.from_json, dict(manifest, repos=[repo, dict(repo, owner="Demo")])) \
        == "repo github.com/Demo/x is listed twice (as github.com/demo/x too: the store names " \
           "repos in lower case)"


def test_records_an_earlier_mirror_wrote_still_parse(tmp_path):
    """The rules hold for what mirror has always written: the store of before the typed
    model (tests/fixtures/store-v0.tar.gz) parses record by record."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path)
    parsed = 0
    for pattern, parse in (("repos/*/*/*/snapshots/*.json", SnapshotRecord.from_json),
                           ("repos/*/*/*/repo.json", RepoId.from_record),
                           ("bundles/*.json", Manifest.from_json)):
        for path in glob.glob(str(tmp_path / pattern)):
            with open(path) as fh:
                parse(json.load(fh))
            parsed += 1
    for path in glob.glob(str(tmp_path / "repos/*/*/*/refs.log")):
        with open(path) as fh:
            for line in fh:
                RefLogEntry.from_json(json.loads(line))
                parsed += 1
    assert parsed == 9  # 4 snapshot records, a repo.json, a bundle record, 3 refs.log lines


def test_check_refs_finds_a_clash_among_neighbours_by_characters():
    # By characters "x-a" sorts between "x" and "x/y"; the clash is found all the same.
    assert "branch 'x/y' cannot coexist with branch 'x'" in refused(
        check_refs, [("branch", "x/y"), ("branch", "x-a"), ("branch", "x")])
    assert "branch 'a/b/c/d' cannot coexist with branch 'a/b'" in refused(
        check_refs, [("branch", "a/b/c/d"), ("branch", "a/b/c-"), ("branch", "a/b"),
                     ("branch", "a/b-")])


def test_check_refs_is_quick_for_deep_names():
    deep = "/".join("a" * 1500)
    check_refs([("branch", f"{i}/{deep}") for i in range(2000)])


def test_a_traced_error_message_is_made_one_line_fit_for_a_manifest():
    message = "Traceback (most recent call last):\n  File \"x\"\tline 1\n\x1b[31mKeyError\udcff"
    line = names.one_line(message)
    assert line == 'Traceback (most recent call last): File "x" line 1 [31mKeyError?'
    assert names.check_text(line, "unresolved") == line
