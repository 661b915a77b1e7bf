"""Updates that carry only what changed: a delta bundle packed against what a target
store holds (its inventory, the bundle it installed, or the pack's lock file) carries
the changed code and weights alone, installs only where its prerequisites are, and
then exactly as the whole bundle would."""

import json
import os
import shutil
import sys
import textwrap

import pytest

from mirror import bundle
from mirror.errors import MirrorError
from mirror.packer import PackOptions, pack
from tests.conftest import MIRROR, handmade_bundle, run, same_weights, tree_digest, unpack
from tests.test_hostile import _info, _with
from tests.upstream.demorepo import git, make_weights

ENTRIES = 8
HUBCONF = """
import megengine.module as M
from megengine import hub


class Net(M.Module):
    def __init__(self):
        super().__init__()
        self.revision = "{revision}"
        self.fc1 = M.Linear(8, 16)
        self.fc2 = M.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x))
"""
ENTRY = """

@hub.pretrained("{url}")
def net{i}(**kwargs):
    return Net()
"""


@pytest.fixture(scope="module")
def deltas(upstream, tmp_path_factory):
    """delta/models at v1 (8 weights) packed whole with a lock, installed into a store
    whose inventory is taken; then v2, where one weight moved to a new file and
    hubconf.py changed, packed whole and as deltas against each kind of baseline."""
    root = tmp_path_factory.mktemp("delta")
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"  # every pack: the same times
    try:
        return _build(upstream, root)
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]


def _build(upstream, root):
    work, bare = root / "work", os.path.join(upstream.git.root, "delta", "models")
    work.mkdir()
    git(work, "init", "-q", "-b", "master")
    urls = {i: upstream.weights.add(f"delta/w{i}.pkl", make_weights("mlp", 300 + i))
            for i in range(ENTRIES)}
    served = {u: upstream.weights.files[u[len(upstream.weights.base_url):]]
              for u in urls.values()}
    opts = PackOptions(git_host=upstream.git.host, protocol="http", progress=False,
                       cache_dir=str(root / "downloads"))
    out = {"root": root, "commits": {}, "served": served}

    def commit(n, changed):
        urls.update(changed)
        (work / "hubconf.py").write_text(HUBCONF.format(revision=n) + "".join(
            ENTRY.format(url=urls[i], i=i) for i in range(ENTRIES)))
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", f"v{n}")
        out["commits"][n] = git(work, "rev-parse", "HEAD")

    commit(1, {})
    git(work, "clone", "-q", "--bare", str(work), bare)
    lock = str(root / "models.lock")
    out["v1"] = str(root / "v1.hub")
    pack(["delta/models"], out["v1"], PackOptions(**{**opts.__dict__, "lock": lock}))
    out["target"] = _store(root / "target", out["v1"])
    out["inventory"] = str(root / "inventory.json")
    r = run(MIRROR + ["inventory", "-o", out["inventory"]], env=out["target"])
    assert r.returncode == 0, r.stderr

    new = upstream.weights.add("delta/w7-retrained.pkl", make_weights("mlp", 999))
    served[new] = upstream.weights.files["/delta/w7-retrained.pkl"]
    commit(2, {7: new})
    git(work, "push", "-q", bare, "master")
    out["urls"] = dict(urls)
    out["v2"] = str(root / "v2.hub")
    pack(["delta/models"], out["v2"], opts)
    for since in ("inventory", "v1", "lock"):
        out[f"delta from {since}"] = str(root / f"delta-{since}.hub")
        baseline = lock if since == "lock" else out[since]
        pack(["delta/models"], out[f"delta from {since}"],
             PackOptions(**{**opts.__dict__, "since": baseline}))
    return out


def _store(path, *bundles):
    """env of a fresh store (and MegEngine home) with ``bundles`` installed, no network."""
    env = dict(os.environ, MGE_MIRROR_HOME=str(path / "store"), MGE_HOME=str(path / "mge"))
    for b in bundles:
        r = run(MIRROR + ["install", b], env=env, netns=True)
        assert r.returncode == 0, r.stderr
    return env


def _records(env, commit):
    """A snapshot record, without what says which bundle brought it and when."""
    store = env["MGE_MIRROR_HOME"]
    path = os.path.join(store, "repos", "127.0.0.1", "delta", "models", "snapshots",
                        commit + ".json")
    if not os.path.exists(path):  # the git host carries a port
        host = os.listdir(os.path.join(store, "repos"))
        path = os.path.join(store, "repos", host[0], "delta", "models", "snapshots",
                            commit + ".json")
    with open(path) as fh:
        record = json.load(fh)
    for key in ("bundle", "bundle_file", "installed_at"):
        record.pop(key)
    return record


@pytest.mark.parametrize("since", ["inventory", "v1", "lock"])
def test_a_delta_carries_only_what_changed(deltas, since):
    path = deltas[f"delta from {since}"]
    manifest, members = unpack(path)
    v1, v2 = deltas["commits"][1], deltas["commits"][2]
    new_weight = bundle.read_manifest(path).weights
    sha = {w.url: w.sha256 for w in new_weight}
    assert sorted(members) == sorted([f"code/{v2}/hubconf.py", f"git/{v2}",
                                      f"weights/{sha[deltas['urls'][7]]}"])
    assert manifest["format_version"] == 3
    pre = manifest["prerequisites"]
    assert pre["blobs"] == sorted(sha[deltas["urls"][i]] for i in range(7))
    v1_id = bundle.bundle_id(bundle.read_manifest_bytes(deltas["v1"]))
    brought = {"inventory": (v1_id, "v1.hub"), "v1": (v1_id, "v1.hub"),
               "lock": (None, None)}[since]
    assert [(p["owner"], p["name"], p["commit"], p["bundle"], p["bundle_file"])
            for p in pre["commits"]] == [("delta", "models", v1, *brought)]
    # The whole v2 says the same, but for the prerequisites.
    whole, _ = unpack(deltas["v2"])
    for m in (manifest, whole):
        m.pop("prerequisites", None), m.pop("format_version"), m.pop("created")
    assert manifest == whole


@pytest.mark.parametrize("since", ["inventory", "v1", "lock"])
def test_a_delta_installs_exactly_as_the_whole_bundle(deltas, since, tmp_path):
    by_delta = _store(tmp_path / "a", deltas["v1"], deltas[f"delta from {since}"])
    whole = _store(tmp_path / "b", deltas["v1"], deltas["v2"])
    v2 = deltas["commits"][2]
    for sub in ("repos",):
        a = tree_digest(os.path.join(by_delta["MGE_MIRROR_HOME"], sub))
        b = tree_digest(os.path.join(whole["MGE_MIRROR_HOME"], sub))
        strip = [k for k in a if k.endswith(".json") or k.endswith("refs.log")]
        assert {k: v for k, v in a.items() if k not in strip} == \
            {k: v for k, v in b.items() if k not in strip}
    assert _records(by_delta, v2) == _records(whole, v2)
    # The same seeds in MegEngine's cache (their markers name the bundle that brought them).
    seeds = [{k: v for k, v in tree_digest(env["MGE_HOME"]).items()
              if not k.endswith(".mirror-seed")} for env in (by_delta, whole)]
    assert seeds[0] == seeds[1] and len(seeds[0]) > ENTRIES
    code = textwrap.dedent("""
        import json, numpy as np, mirror.hub
        out = {}
        for e in ("net0", "net7"):
            m = mirror.hub.load("delta/models", e, pretrained=True, git_host=HOST)
            out[e] = {k: np.asarray(v).tolist() for k, v in m.state_dict().items()}
            out[e + " revision"] = m.revision
        print(json.dumps(out))
    """).replace("HOST", repr(os.listdir(os.path.join(whole["MGE_MIRROR_HOME"], "repos"))[0]))
    r = run([sys.executable, "-c", code], env=by_delta, netns=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["net0 revision"] == out["net7 revision"] == "2"
    assert same_weights(out["net0"], deltas["served"][deltas["urls"][0]])
    assert same_weights(out["net7"], deltas["served"][deltas["urls"][7]])


def test_a_delta_onto_a_store_without_its_prerequisites_is_refused(deltas, tmp_path):
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "empty"),
               MGE_HOME=str(tmp_path / "mge"))
    path = deltas["delta from inventory"]
    r = run(MIRROR + ["install", path], env=env, netns=True)
    v1 = deltas["commits"][1]
    assert r.returncode == 4
    line = r.stderr.strip()
    assert line.startswith(f"Error: {path} is a delta, and {tmp_path / 'empty'} lacks what "
                           f"it assumes: snapshot delta/models@{v1[:12]} (brought by v1.hub); ")
    assert line.endswith("; it was made against delta/models@" + v1[:12] + " (brought by "
                         "v1.hub): install that first, then this delta. Nothing was installed")
    assert not os.path.exists(tmp_path / "empty") and not os.path.exists(tmp_path / "mge")


def test_verify_and_inspect_say_what_a_delta_assumes(deltas):
    path = deltas["delta from v1"]
    v1 = deltas["commits"][1]
    r = run(MIRROR + ["verify", path])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"{path}: OK, 3 members verified",
        f"delta: assumes 7 contents the target store holds, and delta/models@{v1[:12]} "
        f"(brought by v1.hub); install checks those against the store's copies (git ids, "
        f"pickle scan)"]
    r = run(MIRROR + ["inspect", path])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("format 3, 8 weights, " + lines[0].split(", ")[-1])
    assert sum(1 for line in lines if line.startswith("  needs ")) == 8
    assert f"weight {deltas['urls'][0]}" in r.stdout


# --- deltas that lie ------------------------------------------------------------


def _rewritten(deltas, tmp_path, edit, extra=()):
    """The inventory delta with its manifest edited (members as they were)."""
    manifest, members = unpack(deltas["delta from inventory"])
    edit(manifest, members)
    path = tmp_path / "lying.hub"
    path.write_bytes(_with(manifest, members, extra))
    return str(path)


def _claim_code_is(manifest, members, sha, size):
    """hubconf.py of v2 claimed to be content the target has, and left out."""
    snap = manifest["repos"][0]["snapshots"][-1]
    f = next(f for f in snap["files"] if f["path"] == "hubconf.py")
    members.pop(f"code/{snap['commit']}/hubconf.py")
    f.update(sha256=sha, size=size)
    manifest["prerequisites"]["blobs"] = sorted(set(manifest["prerequisites"]["blobs"]) | {sha})


def _refusals(deltas):
    v1_manifest, _ = unpack(deltas["v1"])
    w0 = next(w for w in v1_manifest["weights"] if w["url"] == deltas["urls"][0])
    v1_code = v1_manifest["repos"][0]["snapshots"][0]["files"][0]
    new = lambda m: next(w for w in m["weights"] if w["url"] == deltas["urls"][7])  # noqa
    return {
        # A code file said to be a weight the target has: its tree names other bytes.
        "code claimed from a weight": (
            lambda m, mem: _claim_code_is(m, mem, w0["sha256"], w0["size"]),
            "does not match its content: 'hubconf.py' is not the file its tree names"),
        # A weight said to be a code file the target has: the target holds no such weight.
        "weight claimed from code": (
            lambda m, mem: (mem.pop(f"weights/{new(m)['sha256']}"),
                            new(m).update(sha256=v1_code["sha256"], size=v1_code["size"]),
                            m["prerequisites"].update(blobs=sorted(
                                set(m["prerequisites"]["blobs"]) | {v1_code["sha256"]}))),
            f"lacks what it assumes: weight {deltas['urls'][7]} (sha256 "
            f"{v1_code['sha256'][:16]}, {v1_code['size']} bytes)"),
    }


@pytest.mark.parametrize("lie", ["code claimed from a weight", "weight claimed from code"])
def test_a_delta_whose_prerequisite_is_not_what_it_claims_is_refused(deltas, lie, tmp_path):
    edit, expected = _refusals(deltas)[lie]
    path = _rewritten(deltas, tmp_path, edit)
    env = _store(tmp_path / "t", deltas["v1"])
    before = tree_digest(env["MGE_MIRROR_HOME"])
    r = run(MIRROR + ["install", path], env=env, netns=True)
    assert r.returncode != 0 and expected in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert tree_digest(env["MGE_MIRROR_HOME"]) == before


@pytest.mark.parametrize("lie", ["carried and assumed", "used by nothing", "two sizes"])
def test_a_delta_that_contradicts_itself_is_refused_by_verify_and_install(deltas, lie,
                                                                         tmp_path):
    manifest, members = unpack(deltas["delta from inventory"])
    extra = ()
    pre = manifest["prerequisites"]["blobs"]
    if lie == "carried and assumed":
        data = deltas["served"][deltas["urls"][0]]
        extra = [(_info(f"weights/{pre[0]}", len(data)), data)]
        expected = f"[weights/{pre[0]}]"
    elif lie == "used by nothing":
        manifest["prerequisites"]["blobs"] = sorted(pre + ["0" * 64])
        expected = f"prerequisite blob {'0' * 64} is used by no file or weight of the bundle"
    else:
        w = next(w for w in manifest["weights"] if w["sha256"] == pre[0])
        manifest["weights"].append(dict(w, url=w["url"] + ".copy", size=w["size"] + 1))
        manifest["weights"].sort(key=lambda w: w["url"])
        expected = f"prerequisite blob {pre[0]} is listed with sizes"
    path = tmp_path / "contradicts.hub"
    path.write_bytes(_with(manifest, members, extra))
    env = _store(tmp_path / "t", deltas["v1"])
    before = tree_digest(env["MGE_MIRROR_HOME"])
    said = {}
    for command in ("verify", "install"):
        r = run(MIRROR + [command, str(path)], env=env, netns=True)
        assert r.returncode == 3 and expected in r.stderr, (command, r.stderr)
        said[command] = r.stderr
    assert said["verify"] == said["install"]
    assert tree_digest(env["MGE_MIRROR_HOME"]) == before


def test_export_since_an_inventory_hands_on_only_what_changed(deltas, tmp_path):
    """A transfer host holding v2 exports to a site that holds v1: the same delta as
    pack makes, and it installs there as the whole bundle does."""
    source = _store(tmp_path / "transfer", deltas["v1"], deltas["v2"])
    out = str(tmp_path / "update.hub")
    r = run(MIRROR + ["export", "delta/models:master", "--since", deltas["inventory"],
                      "-o", out], env=source)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("delta: assumes 7 contents the target store "
                                                "holds, and delta/models@")
    _, members = unpack(out)
    _, packed = unpack(deltas["delta from inventory"])
    assert sorted(members) == sorted(packed)
    site = _store(tmp_path / "site", deltas["v1"], out)
    whole = _store(tmp_path / "whole", deltas["v1"], deltas["v2"])
    v2 = deltas["commits"][2]
    assert _records(site, v2) == _records(whole, v2)


def test_an_unsigned_baseline_never_decides_what_a_url_holds(deltas, upstream, tmp_path):
    """An inventory edited on the way out (w0's URL said to hold w1's bytes) makes pack
    download w0 all the same: the delta pins the bytes upstream serves, and leaves out
    only what the target holds. Signed by a key pack is told to trust, the inventory's
    pins stand in for downloads; signed by another key, it is refused."""
    with open(deltas["inventory"]) as fh:
        inventory = json.load(fh)
    sha = {w["url"]: w["sha256"] for w in inventory["weights"]}
    w0, w1 = deltas["urls"][0], deltas["urls"][1]
    for w in inventory["weights"]:
        if w["url"] == w0:
            w["sha256"] = sha[w1]
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(inventory))
    opts = dict(git_host=upstream.git.host, protocol="http", progress=False,
                cache_dir=str(tmp_path / "downloads"))
    out = str(tmp_path / "d.hub")
    pack(["delta/models"], out, PackOptions(**opts, since=str(forged)))
    pinned = {w.url: w.sha256 for w in bundle.read_manifest(out).weights}
    assert pinned[w0] == sha[w0]

    key, other = tmp_path / "site", tmp_path / "other"
    for k in (key, other):
        assert run(MIRROR + ["keygen", "-o", str(k)]).returncode == 0
    signed = str(tmp_path / "signed.json")
    r = run(MIRROR + ["inventory", "-o", signed, "--sign", str(key)], env=deltas["target"])
    assert r.returncode == 0, r.stderr
    logged = []
    pack(["delta/models"], out, PackOptions(**opts, since=signed,
                                            since_key=str(key) + ".pub"),
         log=logged.append)
    assert sorted(m for m in logged if m.startswith("not downloaded")) == sorted(
        f"not downloaded: {deltas['urls'][i]} (the signed --since baseline holds it)"
        for i in range(7))
    with pytest.raises(MirrorError) as e:
        pack(["delta/models"], out, PackOptions(**opts, since=signed,
                                                since_key=str(other) + ".pub"))
    assert "which is not trusted" in str(e.value)


def test_a_weight_left_out_is_scanned_from_the_store(tmp_path):
    """A weight the store took in under --allow-unsafe-pickle is refused when a delta
    leaves it out, as the whole bundle carrying it would be."""
    import hashlib
    import pickle

    evil = pickle.dumps(os.system)  # imports os.system when loaded
    url = "http://127.0.0.1:9/w/evil.pkl"
    home = tmp_path / "store"
    env = dict(os.environ, MGE_MIRROR_HOME=str(home))
    made = handmade_bundle(tmp_path / "evil.hub", {"e" * 40: {
        "hubconf.py": f"from megengine import hub\n@hub.pretrained({url!r})\n"
                      f"def f(**kw):\n    return None\n"}},
        owner="hand", name="evil", refs=[("master", "branch", "e" * 40)],
        weights=[(url, evil)])
    r = run(MIRROR + ["install", "--no-megengine-cache", "--allow-unsafe-pickle", made],
            env=env)
    assert r.returncode == 0, r.stderr
    sha = hashlib.sha256(evil).hexdigest()
    manifest = {"format": "mge-mirror-bundle", "format_version": 3, "tool": "tests",
                "created": 0, "repos": [],
                "weights": [{"url": url + "?again", "size": len(evil), "sha256": sha,
                             "locations": []}],
                "prerequisites": {"commits": [], "blobs": [sha]}}
    delta = tmp_path / "delta.hub"
    delta.write_bytes(_with(manifest, {}))
    before = tree_digest(str(home))
    r = run(MIRROR + ["install", "--no-megengine-cache", str(delta)], env=env)
    assert r.returncode == 5, r.stderr  # refused by the pickle policy
    assert r.stderr.startswith(f"Error: weight {url}?again in {delta} (left out of it: the "
                               f"store's copy) would import posix.system")
    assert tree_digest(str(home)) == before


def test_a_content_is_left_out_only_where_every_use_of_it_is_met(deltas):
    """The same bytes as a code file the target holds, now also a weight, or as a
    symlink's target: carried, so the delta installs where it was made for."""
    from dataclasses import replace

    from mirror.delta import Baseline, make_delta
    from mirror.model import MODE_LINK

    manifest = bundle.read_manifest(deltas["v2"])
    snap = manifest.repos[0].snapshots[0]
    code = snap.files[0]
    w0, w1 = (next(w for w in manifest.weights if w.url == deltas["urls"][i]) for i in (0, 1))
    link = replace(code, path="link", mode=MODE_LINK, size=w1.size, sha256=w1.sha256)
    edited = replace(manifest, repos=(replace(manifest.repos[0], snapshots=(
        replace(snap, files=snap.files + (link,)),)),), weights=tuple(
        replace(w, sha256=code.sha256, size=code.size) if w is w0 else w
        for w in manifest.weights))
    held = frozenset({code.sha256, w1.sha256})
    delta = make_delta(edited, Baseline("held.json", held, frozenset({w1.sha256}), {}, {}))
    assert delta.prerequisites is None  # nothing could be left out: the whole bundle
    delta = make_delta(edited, Baseline("held.json", held, held, {}, {}))
    assert delta.prerequisites.blobs == (code.sha256,)  # held as code and as a weight


def test_install_takes_whole_bundles_before_deltas(deltas, tmp_path):
    """A folder's bundles go by name, but a delta named first still goes after the
    bundle it was made against."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(deltas["delta from v1"], folder / "a-update.hub")
    shutil.copy(deltas["v1"], folder / "b-base.hub")
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"))
    r = run(MIRROR + ["install", str(folder)], env=env, netns=True)
    assert r.returncode == 0, r.stderr
    order = [line for line in r.stdout.splitlines() if line.startswith("== ")]
    assert order == [f"== {folder / 'b-base.hub'}", f"== {folder / 'a-update.hub'}"]
    assert r.stdout.splitlines()[-1] == "installed 2 of 2 bundles"
    whole = _store(tmp_path / "whole", deltas["v1"], deltas["v2"])
    v2 = deltas["commits"][2]
    assert _records(env, v2) == _records(whole, v2)


def test_under_a_trust_policy_an_unsigned_delta_is_refused_for_its_signature(deltas,
                                                                              tmp_path):
    """The prerequisites an unsigned manifest names are not shown as instructions: the
    signature is checked first, as for a whole bundle."""
    from tests.conftest import keypairs

    keys = keypairs(tmp_path)
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"))
    path = deltas["delta from v1"]
    r = run(MIRROR + ["install", "--trusted-key", keys["release"][1], path], env=env,
            netns=True)
    assert r.returncode == 5
    assert r.stderr.strip() == f"Error: refusing {path}: it is not signed"
