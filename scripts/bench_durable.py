"""Install time of two checkouts of mirror side by side (say, before and after a change
to how install makes files durable): 1 GiB of weights and 5,000 small files, each on a
quiet disk and right after 2 GiB of unrelated writes still dirty. Median of --runs,
interleaved.

    git worktree add /tmp/old <commit>
    .venv/bin/python scripts/bench_durable.py --old /tmp/old
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import make_many_files, make_weights  # noqa: E402

from tests.upstream import GitServer, WeightServer, build_demo_repo  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--old", required=True, help="the other checkout of mirror")
parser.add_argument("--runs", type=int, default=3)
args = parser.parse_args()
TREES = {"old": os.path.abspath(args.old), "new": ROOT}
PY = sys.executable
work = tempfile.mkdtemp(prefix="durable-", dir=ROOT)  # the store's disk, not a tmpfs


def install(tree: str, bundle: str, dirty: bool) -> float:
    store = os.path.join(work, "store")
    shutil.rmtree(store, ignore_errors=True)
    subprocess.run(["sync"])
    if dirty:
        subprocess.run(["dd", "if=/dev/urandom", f"of={work}/dirty", "bs=1M", "count=2048",
                        "status=none"], check=True)
    env = dict(os.environ, MGE_MIRROR_HOME=store, PYTHONPATH=tree)
    t = time.perf_counter()
    subprocess.run([PY, "-m", "mirror", "install", "--no-megengine-cache", bundle], env=env,
                   check=True, stdout=subprocess.DEVNULL, cwd=tree)
    took = time.perf_counter() - t
    if dirty:
        os.unlink(f"{work}/dirty")
    return took


with WeightServer() as weights, GitServer(os.path.join(work, "git")) as git:
    demo = build_demo_repo(os.path.join(work, "git"), weights)
    urls, paths = make_weights(weights, 128, 8, os.path.join(work, "w"))
    big = os.path.join(work, "big.hub")
    subprocess.run([PY, "-m", "mirror", "pack", demo.repo, "-o", big, "--git-host", git.host,
                    "--protocol", "http", "-q"] + sum((["--weights", p] for p in paths), []),
                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    many = make_many_files(os.path.join(work, "git"), os.path.join(work, "many-content"), 5000)
    small = os.path.join(work, "many.hub")
    subprocess.run([PY, "-m", "mirror", "pack", many, "-o", small, "--git-host", git.host,
                    "--protocol", "http", "-q"], check=True, stdout=subprocess.DEVNULL,
                   cwd=ROOT)
    out = {}
    for name, b in (("1 GiB", big), ("5000 files", small)):
        for dirty in (False, True):
            times = {"old": [], "new": []}
            for _ in range(args.runs):
                for tree in ("old", "new"):
                    times[tree].append(install(TREES[tree], b, dirty))
            key = f"{name}{', after 2 GiB dirty' if dirty else ''}"
            out[key] = {t: round(statistics.median(v), 2) for t, v in times.items()}
            print(key, out[key], flush=True)
shutil.rmtree(work, ignore_errors=True)
