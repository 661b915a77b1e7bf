"""Moving bundles: deltas and export, each a ratio against a baseline run here.

delta: a repo of 8 weights is packed whole and installed; its inventory is taken;
a new commit retrains one weight (a new file). Then, interleaved, --runs times, each
into an empty download cache:
- `mirror pack REPO --since INVENTORY --since-key` (a signed inventory: the URLs it
  holds are not fetched) against `mirror pack` of a repo whose code names only the
  changed weight ("packing that weight alone"); also unsigned (every URL fetched);
- the delta's size against that weight compressed alone (`zstd -T0 -1`).
export: `mirror export REPO` of a store holding --export-mb of weights against
`tar -cf - BLOBS | zstd -T0 -1` of the same blobs; with peak RSS.
pipe: `cat BUNDLE | mirror install -` against `mirror install BUNDLE` of that bundle.
parts: `mirror install P.hub.0*` of 4 parts of it (`export --split-size`) against the
same `mirror install BUNDLE`.

Times are medians; the VM's speed swings, so runs are interleaved.
Also called by scripts/bench.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_tools import MIRROR, timed  # noqa: E402

from tests.upstream import GitServer, WeightServer  # noqa: E402
from tests.upstream.demorepo import git  # noqa: E402

HUBCONF = """
import megengine.module as M
from megengine import hub
"""
ENTRY = """

@hub.pretrained("{url}")
def net{i}(**kwargs):
    return M.Linear(1, 1)
"""


def _weight(weights: WeightServer, name: str, mib: int, seed: int) -> str:
    import megengine

    rng = np.random.RandomState(seed)
    state = {f"layer{j}.weight": rng.standard_normal(mib << 16).astype(np.float32)
             for j in range(4)}
    buf = io.BytesIO()
    megengine.save(state, buf)
    return weights.add(name, buf.getvalue())


def _repo(git_root: str, work: str, owner: str, urls: list) -> str:
    """A bare repo owner/models whose hubconf names ``urls``; returns its work tree."""
    tree = os.path.join(work, owner)
    os.makedirs(tree)
    git(tree, "init", "-q", "-b", "master")
    _commit(tree, urls, "v1")
    git(tree, "clone", "-q", "--bare", tree, os.path.join(git_root, owner, "models"))
    return tree


def _commit(tree: str, urls: list, message: str) -> None:
    with open(os.path.join(tree, "hubconf.py"), "w") as fh:
        fh.write(HUBCONF + "".join(ENTRY.format(url=u, i=i) for i, u in enumerate(urls)))
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", message)


def bench(work: str, per_weight_mb: int = 64, runs: int = 5, export_mb: int = 1024) -> dict:
    out = {}
    with WeightServer() as weights, GitServer(os.path.join(work, "git")) as server:
        root = os.path.join(work, "git")
        urls = [_weight(weights, f"d/w{i}.pkl", per_weight_mb, i) for i in range(8)]
        tree = _repo(root, work, "delta", urls)
        pack = f"{MIRROR} pack --git-host {server.host} --protocol http -q"
        env = dict(os.environ, MGE_MIRROR_HOME=os.path.join(work, "store"),
                   MGE_MIRROR_DOWNLOADS=os.path.join(work, "dl"))
        v1 = os.path.join(work, "v1.hub")
        subprocess.run(f"{pack} delta/models -o {v1} && {MIRROR} install "
                       f"--no-megengine-cache {v1} && {MIRROR} keygen -o {work}/site && "
                       f"{MIRROR} inventory -o {work}/inv.json --sign {work}/site",
                       shell=True, check=True, env=env, stdout=subprocess.DEVNULL)
        new = _weight(weights, "d/w7-retrained.pkl", per_weight_mb, 99)
        _commit(tree, urls[:7] + [new], "v2")
        git(tree, "push", "-q", os.path.join(root, "delta", "models"), "master")
        _repo(root, work, "alone", [new])
        with open(os.path.join(work, "w7.pkl"), "wb") as fh:
            fh.write(weights.files["/d/w7-retrained.pkl"])
        mine, unsigned, base = [], [], []
        since = f"--since {work}/inv.json"
        for _ in range(runs):
            for times, cmd in ((mine, f"{pack} delta/models {since} --since-key "
                                      f"{work}/site.pub -o {work}/delta.hub"),
                               (unsigned, f"{pack} delta/models {since} -o {work}/d2.hub"),
                               (base, f"{pack} alone/models -o {work}/alone.hub")):
                shutil.rmtree(env["MGE_MIRROR_DOWNLOADS"], ignore_errors=True)
                times.append(timed(cmd, env=env))
        subprocess.run(["zstd", "-T0", "-1", "-q", "-f", f"{work}/w7.pkl", "-o",
                        f"{work}/w7.pkl.zst"], check=True)
        out["delta"] = {
            "pack_s": statistics.median(t for t, _ in mine),
            "unsigned_pack_s": statistics.median(t for t, _ in unsigned),
            "pack_rss_mb": max(r for _, r in mine),
            "alone_s": statistics.median(t for t, _ in base),
            "size": os.path.getsize(f"{work}/delta.hub"),
            "weight_zst_size": os.path.getsize(f"{work}/w7.pkl.zst"),
            "weight_size": os.path.getsize(f"{work}/w7.pkl")}
        out["delta"]["pack_ratio"] = out["delta"]["pack_s"] / out["delta"]["alone_s"]
        out["delta"]["unsigned_ratio"] = out["delta"]["unsigned_pack_s"] / out["delta"]["alone_s"]
        out["delta"]["size_ratio"] = out["delta"]["size"] / out["delta"]["weight_zst_size"]

        if export_mb:
            n = max(1, export_mb // 128)
            big = [_weight(weights, f"e/w{i}.pkl", 128, 100 + i) for i in range(n)]
            _repo(root, work, "export", big)
            store = dict(env, MGE_MIRROR_HOME=os.path.join(work, "export-store"))
            b = os.path.join(work, "export-src.hub")
            subprocess.run(f"{pack} export/models -o {b} && {MIRROR} install "
                           f"--no-megengine-cache {b}", shell=True, check=True, env=store,
                           stdout=subprocess.DEVNULL)
            blobs = os.path.join(store["MGE_MIRROR_HOME"], "blobs")
            mine, base = [], []
            for _ in range(runs):
                for f in (f"{work}/exported.hub", f"{work}/blobs.tar.zst"):
                    if os.path.exists(f):
                        os.unlink(f)
                mine.append(timed(f"{MIRROR} export export/models -o {work}/exported.hub",
                                  env=store))
                base.append(timed(f"tar -cf - -C {blobs} . | zstd -T0 -1 -q -o "
                                  f"{work}/blobs.tar.zst"))
            out["export"] = {"mib": n * 128, "export_s": statistics.median(t for t, _ in mine),
                             "tar_zstd_s": statistics.median(t for t, _ in base),
                             "export_rss_mb": max(r for _, r in mine)}
            out["export"]["ratio"] = out["export"]["export_s"] / out["export"]["tar_zstd_s"]

            # The same bundle installed from a file, from a pipe (one pass, no seek), and
            # from 4 parts of it (export --split-size: the same members, cut in 4).
            size = os.path.getsize(b)
            subprocess.run(f"{MIRROR} export export/models -o {work}/p.hub --split-size "
                           f"{size // 4 + (4 << 20)}", shell=True, check=True, env=store,
                           stdout=subprocess.DEVNULL)
            piped, filed, parted = [], [], []
            for i in range(runs):
                for times, cmd in ((filed, f"{MIRROR} install --no-megengine-cache {b}"),
                                   (piped, f"cat {b} | {MIRROR} install --no-megengine-cache -"),
                                   (parted, f"{MIRROR} install --no-megengine-cache "
                                            f"{work}/p.hub.0*")):
                    target = dict(env, MGE_MIRROR_HOME=os.path.join(work, f"pipe-{i}"))
                    times.append(timed(cmd, env=target))
                    shutil.rmtree(target["MGE_MIRROR_HOME"])
            out["pipe"] = {"file_s": statistics.median(t for t, _ in filed),
                           "stdin_s": statistics.median(t for t, _ in piped),
                           "stdin_rss_mb": max(r for _, r in piped)}
            out["pipe"]["ratio"] = out["pipe"]["stdin_s"] / out["pipe"]["file_s"]
            out["parts"] = {"count": len([n for n in os.listdir(work)
                                          if n.startswith("p.hub.")]),
                            "parts_s": statistics.median(t for t, _ in parted),
                            "file_s": out["pipe"]["file_s"],
                            "parts_rss_mb": max(r for _, r in parted)}
            out["parts"]["ratio"] = out["parts"]["parts_s"] / out["parts"]["file_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight-mb", type=int, default=64, help="MiB of each of 8 weights")
    parser.add_argument("--export-mb", type=int, default=1024, help="0 to skip export")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mirror-bench-delta-")
    try:
        print(json.dumps(bench(work, args.weight_mb, args.runs, args.export_mb), indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
