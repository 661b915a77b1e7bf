"""pack options: --rewrite (identity kept, bytes from a mirror), --exclude, unresolved
downloads, --allow-unreachable, inspect, and member times."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import megengine
import numpy as np
import pytest
import zstandard

import mirror.hub  # noqa: I001
from mirror import bundle
from mirror.errors import (
    AmbiguousCommitError,
    LockMismatchError,
    UnresolvedError,
    WeightNotInstalledError,
)
from mirror.installer import install
from mirror.packer import PackOptions, pack
from tests.conftest import MIRROR, PUBLIC_WEIGHTS, ROOT, manifest_json, run


def test_rewrite_packs_github_identity_from_loopback_and_loads_offline(upstream, tmp_path):
    c3 = upstream.mirrored.commits["c3"]
    out = str(tmp_path / "m.hub")
    args = ["pack", f"demo/mirrored@{c3[:10]}", "-o", out, "-q"]
    for rule in upstream.rewrites:
        args += ["--rewrite", rule]
    r = run(MIRROR + args)
    assert r.returncode == 0, r.stderr
    manifest = manifest_json(out)
    (repo,) = manifest["repos"]
    assert (repo["host"], repo["url"]) == ("github.com", "https://github.com/demo/mirrored")
    assert repo["refs"][0]["fetched_from"] == upstream.git.url("demo/mirrored")
    assert sorted(w["url"] for w in manifest["weights"]) == sorted(
        upstream.mirrored.urls[c3].values())
    assert all(w["url"].startswith(PUBLIC_WEIGHTS + "/weights/") for w in manifest["weights"])

    # On the isolated host, the default git_host finds it, by mirror and by stock MegEngine.
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"))
    assert run(MIRROR + ["install", out], env=env, netns=True).returncode == 0
    code = ("import json, numpy as np, mirror.hub, megengine.hub\n"
            "a = mirror.hub.load('demo/mirrored', 'mlp', pretrained=True)\n"
            "b = megengine.hub.load('demo/mirrored', 'mlp', pretrained=True)\n"
            "print(json.dumps({k: np.asarray(v).tolist() for k, v in a.state_dict().items()}))\n"
            "print(json.dumps({k: np.asarray(v).tolist() for k, v in b.state_dict().items()}))")
    r = run([sys.executable, "-c", code], env=env, netns=True)
    assert r.returncode == 0, r.stderr
    url = upstream.mirrored.urls[c3]["mlp"]
    served = megengine.load(io.BytesIO(upstream.mirrored.weights[url]))
    for line in r.stdout.strip().splitlines()[-2:]:
        got = json.loads(line)
        for k, v in served.items():
            np.testing.assert_array_equal(np.asarray(got[k], np.float32), v)


def test_exclude_leaves_weights_out_and_says_so(upstream, tmp_path, home):
    out = str(tmp_path / "x.hub")
    report = pack([upstream.spec()], out,
                  PackOptions(git_host=upstream.git.host, protocol="http",
                              exclude=["*small_cnn_*"], progress=False))
    master = upstream.demo.branches["master"]
    assert report.excluded == [upstream.demo.urls[master]["small_cnn"]]
    manifest = manifest_json(out)
    assert [w["url"] for w in manifest["weights"]] == [upstream.demo.urls[master]["mlp"]]
    assert manifest["repos"][0]["snapshots"][0]["excluded"] == report.excluded
    install(out)
    with pytest.raises(WeightNotInstalledError) as e:
        mirror.hub.load("demo/tinynets", "small_cnn", pretrained=True)
    assert "(asked for at hubconf.py:" in str(e.value)


@pytest.fixture(scope="module")
def dynamic_repo(tmp_path_factory):
    """A repo served over file://, whose code builds a weight URL at run time."""
    root = tmp_path_factory.mktemp("filegit")
    work = root / "work"
    work.mkdir()
    (work / "hubconf.py").write_text(
        "from megengine import hub\n\nBASE = 'https://data.example.invalid/w/'\n\n\n"
        "def model(name='a'):\n    return hub.load_serialized_obj_from_url(BASE + name)\n")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid",
               GIT_CONFIG_GLOBAL="/dev/null")
    for cmd in (["git", "init", "-q", "-b", "master"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "dynamic"]):
        subprocess.run(cmd, cwd=work, env=env, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "git" / "dyn" / "repo")],
                   check=True)
    return str(root / "git")


def test_unresolved_downloads_fail_the_pack_unless_allowed(dynamic_repo, tmp_path):
    out = tmp_path / "d.hub"
    with pytest.raises(UnresolvedError) as e:
        pack(["dyn/repo"], str(out),
             PackOptions(git_host=dynamic_repo, protocol="file", progress=False))
    assert "hubconf.py:7: BASE + name" in str(e.value) and "--allow-unresolved" in str(e.value)
    assert not out.exists()
    pack(["dyn/repo"], str(out),
         PackOptions(git_host=dynamic_repo, protocol="file", progress=False, allow_unresolved=True))
    snap = manifest_json(str(out))["repos"][0]["snapshots"][0]
    assert snap["unresolved"] == ["hubconf.py:7: BASE + name"]


def test_allow_unreachable_pins_a_ref_to_any_commit(upstream, tmp_path):
    c3 = upstream.demo.commits["c3"]
    out = str(tmp_path / "u.hub")
    pack([upstream.spec(":v1.0@" + c3[:10])], out,
         PackOptions(git_host=upstream.git.host, protocol="http", progress=False,
                     allow_unreachable=True))
    ref = manifest_json(out)["repos"][0]["refs"][0]
    assert (ref["kind"], ref["name"], ref["commit"]) == ("tag", "v1.0", c3)


def test_inspect_reads_only_the_head(big_bundle, tmp_path):
    head = tmp_path / "head.hub"
    with open(big_bundle, "rb") as fh:
        head.write_bytes(fh.read(64 << 10))  # the rest of the 30 MiB is not there at all
    r = run(MIRROR + ["inspect", str(head)])
    assert r.returncode == 0, r.stderr
    assert "    mlp: http://127.0.0.1:" in r.stdout and "    mlp_from_url: http://127.0.0.1:" \
        in r.stdout
    r = run(MIRROR + ["inspect", "--json", str(head)])
    assert json.loads(r.stdout)["manifest"]["format_version"] == bundle.FORMAT_VERSION


def test_code_members_carry_their_commit_time(master_bundle, upstream):
    with open(master_bundle, "rb") as fh:
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            times = {m.name.split("/")[0]: m.mtime for m in tar}
    assert times["code"] == 1704240000  # 2024-01-03, when the demo's master tip was made
    assert times["weights"] == 0 and times["manifest.json"] == 0


def _weight_hits(upstream, urls):
    return sum(upstream.weights.hits.get("/" + u.split("/", 3)[3], 0) for u in urls)


def test_a_second_pack_downloads_nothing_and_a_changed_cache_is_not_trusted(
        upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("MGE_MIRROR_DOWNLOADS", str(tmp_path / "cache"))
    urls = list(upstream.demo.urls[upstream.demo.commits["c1"]].values())
    spec = [upstream.spec("@" + upstream.demo.commits["c1"])]
    kw = dict(git_host=upstream.git.host, protocol="http", progress=False)
    before = _weight_hits(upstream, urls)
    pack(spec, str(tmp_path / "a.hub"), PackOptions(**kw))
    assert _weight_hits(upstream, urls) == before + 2
    pack(spec, str(tmp_path / "b.hub"), PackOptions(**kw))
    assert _weight_hits(upstream, urls) == before + 2  # all from the cache
    for name in os.listdir(tmp_path / "cache"):
        if name.endswith(".data"):
            with open(tmp_path / "cache" / name, "r+b") as fh:
                fh.write(b"tampered")
    pack(spec, str(tmp_path / "c.hub"), PackOptions(**kw))
    assert _weight_hits(upstream, urls) == before + 4  # re-hashed, found changed, fetched
    for w in manifest_json(str(tmp_path / "c.hub"))["weights"]:
        assert w["sha256"] == hashlib.sha256(upstream.demo.weights[w["url"]]).hexdigest()


def test_parallel_downloads_give_the_same_bundle(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    outs = []
    for jobs in (1, 8):
        monkeypatch.setenv("MGE_MIRROR_DOWNLOADS", str(tmp_path / f"cache{jobs}"))
        outs.append(tmp_path / f"j{jobs}.hub")
        pack([upstream.spec(""), upstream.spec(":dev")], str(outs[-1]),
             PackOptions(git_host=upstream.git.host, protocol="http", progress=False, jobs=jobs))
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_lock_is_written_then_enforced(upstream, tmp_path):
    lock = tmp_path / "demo.lock"
    c = upstream.demo.commits
    kw = dict(git_host=upstream.git.host, protocol="http", progress=False, lock=str(lock),
              cache_dir=str(tmp_path / "cache"))
    specs = [upstream.spec(":dev"), upstream.spec(":v1.0")]
    pack(specs, str(tmp_path / "a.hub"), PackOptions(**kw))
    pins = json.loads(lock.read_text())
    assert pins["refs"] == {specs[0]: c["c4"], specs[1]: c["c2"]}
    assert pins["weights"] == {u: hashlib.sha256(upstream.demo.weights[u]).hexdigest()
                               for label in ("c4", "c2")
                               for u in upstream.demo.urls[c[label]].values()}
    pack(specs, str(tmp_path / "b.hub"), PackOptions(**kw))  # nothing changed: passes

    # Upstream serves other bytes under a pinned URL: a refreshed pack fails, naming it.
    url = upstream.demo.urls[c["c4"]]["mlp"]
    path = url.split("/", 3)[3]
    original = upstream.weights.files["/" + path]
    upstream.weights.add(path, original + b"changed")
    try:
        with pytest.raises(LockMismatchError) as e:
            pack(specs, str(tmp_path / "c.hub"), PackOptions(refresh=True, **kw))
        assert f"{url} now has sha256 " in str(e.value) and "content changed upstream" \
            in str(e.value)
        assert not (tmp_path / "c.hub").exists()
    finally:
        upstream.weights.add(path, original)

    # A ref that moved upstream fails the pack too.
    git = ["git", "--git-dir", upstream.demo.bare]
    subprocess.run(git + ["update-ref", "refs/heads/dev", c["c3"]], check=True)
    try:
        with pytest.raises(LockMismatchError) as e:
            pack(specs, str(tmp_path / "d.hub"), PackOptions(**kw))
        assert str(e.value).startswith(f"lock {lock}: {specs[0]} now resolves to {c['c3']}, "
                                       f"the lock pins {c['c4']}")
    finally:
        subprocess.run(git + ["update-ref", "refs/heads/dev", c["c4"]], check=True)


@pytest.fixture(scope="module")
def many_commits(tmp_path_factory):
    """A repo with 1500 commits (made with git fast-import), so that two of them
    share a 4-digit prefix, served over file://."""
    root = tmp_path_factory.mktemp("many")
    bare = root / "git" / "many" / "commits"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    stream = []
    hubconf = b"def f():\n    return 1\n"
    for i in range(1, 1501):
        msg = f"commit {i}\n".encode()
        stream.append(b"commit refs/heads/master\nmark :%d\n" % i)
        stream.append(b"committer t <t@example.invalid> %d +0000\n" % (1700000000 + i))
        stream.append(b"data %d\n%s" % (len(msg), msg))
        if i == 1:
            stream.append(b"M 644 inline hubconf.py\ndata %d\n%s\n" % (len(hubconf), hubconf))
        else:
            stream.append(b"from :%d\n\n" % (i - 1))
    subprocess.run(["git", "--git-dir", str(bare), "fast-import", "--quiet"],
                   input=b"".join(stream), check=True)
    ids = subprocess.run(["git", "--git-dir", str(bare), "rev-list", "master"],
                         capture_output=True, text=True, check=True).stdout.split()
    by_prefix = {}
    for c in ids:
        by_prefix.setdefault(c[:4], []).append(c)
    shared = sorted(p for p, cs in by_prefix.items() if len(cs) > 1)
    assert shared, "1500 commits with no shared 4-digit prefix"
    return str(root / "git"), shared[0], sorted(by_prefix[shared[0]]), ids


def test_an_ambiguous_abbreviation_lists_the_candidates(many_commits, tmp_path):
    git_dir, prefix, candidates, ids = many_commits
    with pytest.raises(AmbiguousCommitError) as e:
        pack([f"many/commits@{prefix}"], str(tmp_path / "x.hub"),
             PackOptions(git_host=git_dir, protocol="file", progress=False))
    assert e.value.candidates == candidates
    assert f"commit '{prefix}' is ambiguous, it matches {', '.join(candidates)}" in str(e.value)
    # One more digit (or the full id) picks one, and pins the default branch to it.
    out = str(tmp_path / "y.hub")
    pack([f"many/commits@{candidates[0][:12]}"], out,
         PackOptions(git_host=git_dir, protocol="file", progress=False))
    (ref,) = manifest_json(out)["repos"][0]["refs"]
    assert (ref["name"], ref["commit"]) == ("master", candidates[0])


def test_a_recipe_packs_what_it_names_with_command_line_additions(upstream, tmp_path):
    out = tmp_path / "demo.hub"
    args = ["pack", "--recipe", os.path.join(ROOT, "bundles", "demo.toml"), "-o", str(out),
            "-q"]
    for rule in upstream.rewrites:
        args += ["--rewrite", rule]
    r = run(MIRROR + args)
    assert r.returncode == 0, r.stderr
    manifest = manifest_json(str(out))
    (repo,) = manifest["repos"]
    m = upstream.mirrored
    assert sorted((x["name"], x["commit"]) for x in repo["refs"]) == sorted(
        [("master", m.commits["c3"]), ("v1.0", m.commits["c2"])])
    # The recipe's exclude applies: no small_cnn weights.
    assert sorted(w["url"] for w in manifest["weights"]) == sorted(
        {m.urls[m.commits[c]]["mlp"] for c in ("c2", "c3")})


def test_the_model_zoo_recipe_says_what_a_platform_team_would_pack():
    from mirror.recipe import Recipe

    recipe = Recipe.load(os.path.join(ROOT, "bundles", "megengine-models.toml"))
    assert recipe.specs == ["megengine/models:master", "megengine/models:v1.2.0"]
    assert recipe.output.endswith("bundles/megengine-models.hub")
    merged = recipe.merged({"rewrites": ["https://github.com=https://git.corp.example/gh"],
                            "jobs": 2}).to_json()
    assert merged == {"entries": ["resnet18", "resnet50", "shufflenet_v2_x1_0"],
                      "trace": True, "jobs": 2,
                      "rewrites": ["https://github.com=https://git.corp.example/gh"],
                      "lock": os.path.join(ROOT, "bundles", "megengine-models.lock")}


@pytest.mark.parametrize("options, message", [
    ("turbo = true", "unknown option(s) turbo (known: allow_unreachable, allow_unresolved, "
                     "entries, exclude, follow_nested, git_host, history, jobs, protocol, "
                     "rewrites, split_size, stream, strict, trace, trace_jobs, trace_memory, "
                     "trace_timeout, weights)"),
    ('exclude = "*_fp16.pkl"', "option exclude must be a list of strings, not '*_fp16.pkl'"),
    ("jobs = 0", "option jobs must be a whole number of at least 1, not 0"),
])
def test_a_bad_recipe_is_a_clear_error(tmp_path, options, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[[repo]]\nspec = "a/b"\n[options]\n{options}\n')
    r = run(MIRROR + ["pack", "--recipe", str(bad)])
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: recipe {bad}: {message}"


@pytest.fixture()
def private_git(upstream):
    from tests.upstream import GitServer

    server = GitServer(os.path.dirname(os.path.dirname(upstream.demo.bare)), user="ci",
                       password="s3cret").start()
    yield server
    server.stop()


def test_private_repos_take_credentials_from_env_or_git_helpers(private_git, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))  # no helpers yet
    monkeypatch.delenv("MGE_MIRROR_GIT_PASSWORD", raising=False)
    kw = dict(git_host=private_git.host, protocol="http", progress=False,
              cache_dir=str(tmp_path / "cache"))
    r = run(MIRROR + ["pack", "demo/tinynets:v1.0", "-o", str(tmp_path / "x.hub"),
                      "--git-host", private_git.host, "--protocol", "http", "-q"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"Error: git: {private_git.url('demo/tinynets')}: ")
    assert "auth" in r.stderr.lower()

    monkeypatch.setenv("MGE_MIRROR_GIT_USERNAME", "ci")
    monkeypatch.setenv("MGE_MIRROR_GIT_PASSWORD", "s3cret")
    pack(["demo/tinynets:v1.0"], str(tmp_path / "env.hub"), PackOptions(**kw))

    monkeypatch.delenv("MGE_MIRROR_GIT_PASSWORD")
    store = tmp_path / "git-credentials"
    store.write_text(f"http://ci:s3cret@{private_git.host}\n")
    (tmp_path / "gitconfig").write_text(f"[credential]\n\thelper = store --file={store}\n")
    pack(["demo/tinynets:v1.0"], str(tmp_path / "helper.hub"), PackOptions(**kw))
    assert manifest_json(str(tmp_path / "helper.hub"))["repos"][0]["refs"][
        0]["name"] == "v1.0"


def test_without_master_the_remote_default_branch_is_used(tmp_path):
    bare = tmp_path / "git" / "only" / "main"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    hubconf = b"def f():\n    return 1\n"
    stream = (b"commit refs/heads/main\ncommitter t <t@example.invalid> 1700000000 +0000\n"
              b"data 3\nmsg\nM 644 inline hubconf.py\ndata %d\n%s\n" % (len(hubconf), hubconf))
    subprocess.run(["git", "--git-dir", str(bare), "fast-import", "--quiet"], input=stream,
                   check=True)
    out = str(tmp_path / "m.hub")
    pack(["only/main"], out,
         PackOptions(git_host=str(tmp_path / "git"), protocol="file", progress=False))
    (ref,) = manifest_json(out)["repos"][0]["refs"]
    assert (ref["kind"], ref["name"]) == ("branch", "main")


def test_a_lock_refuses_what_it_does_not_pin(upstream, tmp_path):
    lock = tmp_path / "x.lock"
    kw = dict(git_host=upstream.git.host, protocol="http", progress=False, lock=str(lock),
              cache_dir=str(tmp_path / "cache"))
    pack([upstream.spec(":v1.0")], str(tmp_path / "a.hub"), PackOptions(**kw))
    extra = upstream.weights.add("extra/new.bin", b"new")
    with pytest.raises(LockMismatchError) as e:
        pack([upstream.spec(":v1.0")], str(tmp_path / "b.hub"),
             PackOptions(extra_weights=[extra], **kw))
    assert str(e.value).startswith(f"lock {lock}: it does not pin {extra}")


# --- the options' one declaration ------------------------------------------------


def test_an_unknown_pack_option_is_a_clear_error_naming_the_known_ones():
    from mirror.errors import MirrorError

    with pytest.raises(MirrorError) as e:
        PackOptions.from_mapping({"bogus": 1, "git_host": "h"})
    assert str(e.value) == (
        "unknown pack option(s) bogus (known: allow_unreachable, allow_unresolved, "
        "allow_unsafe_pickle, cache_dir, entries, exclude, extra_weights, follow_nested, "
        "git_host, history, jobs, lock, progress, protocol, refresh, rewrites, sign, since, "
        "since_key, split_size, stream, strict, trace, trace_jobs, trace_memory, "
        "trace_timeout, update_lock)")
    with pytest.raises(MirrorError) as e:
        PackOptions.from_mapping({"jobs": "8"})
    assert str(e.value) == "pack option jobs must be a whole number of at least 1, not '8'"
    assert PackOptions.from_mapping({"exclude": ["*.pkl"], "jobs": 2}) == PackOptions(
        exclude=("*.pkl",), jobs=2)


def test_each_recipe_option_sets_the_pack_option_its_declaration_names(tmp_path):
    import dataclasses

    from mirror.pack_options import kind, recipe_keys
    from mirror.recipe import Recipe

    sample = {tuple: ["x=y"], bool: True, int: 3, str: "file"}
    declared = {f.metadata["recipe"]: f.name for f in dataclasses.fields(PackOptions)
                if f.metadata["recipe"]}
    assert recipe_keys() == declared and declared["weights"] == "extra_weights"
    for key, name in declared.items():
        value = sample[kind(name)]
        path = tmp_path / f"{key}.toml"
        path.write_text(f'[[repo]]\nspec = "a/b"\n[options]\n{key} = {json.dumps(value)}\n')
        options = Recipe.load(str(path)).options
        got = getattr(options, name)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
        assert options == PackOptions.from_mapping({name: value})


def test_pack_help_lists_every_option_with_a_flag():
    from mirror.pack_options import flags

    r = run(MIRROR + ["pack", "--help"])
    assert r.returncode == 0, r.stderr
    listed = set(r.stdout.replace(",", " ").split())
    declared = flags()
    assert set(declared) == {f for f in PackOptions.__dataclass_fields__} - {
        "cache_dir", "progress"}
    for name, flag in declared.items():
        assert set(flag.names) <= listed, name
        assert " ".join(flag.help.split()[:3]) in " ".join(r.stdout.split()), name
