"""Benchmarks, each a ratio against a baseline measured in the same run on the same data.

install: `mirror install` (verify every byte, install atomically) against
`zstd -d | tar -x` of the same bundle, median of --runs; peak RSS of each.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mirror.pack import pack  # noqa: E402
from tests.upstream import GitServer, WeightServer, build_demo_repo  # noqa: E402


def timed(cmd: str, env=None):
    """Run a shell command; return (seconds, peak RSS in MiB of its largest process).

    /usr/bin/time measures the RSS: this script's own memory (the weight server holds
    the weights) would otherwise count for a child forked from it.
    """
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "sh", "-c", cmd], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: {cmd} failed: {proc.stderr[-2000:]}")
    return seconds, int(proc.stderr.strip().splitlines()[-1]) / 1024


def make_weights(weights: WeightServer, total_mb: int, files: int) -> list:
    """float32 state dicts saved with megengine.save, ``total_mb`` in all."""
    import megengine

    rng = np.random.RandomState(0)
    urls = []
    per_file = total_mb * (1 << 20) // files
    for i in range(files):
        state = {f"layer{j}.weight": rng.standard_normal(per_file // 4 // 4).astype(np.float32)
                 for j in range(4)}
        buf = io.BytesIO()
        megengine.save(state, buf)
        urls.append(weights.add(f"bench/w{i}.pkl", buf.getvalue()))
    return urls


def bench_install(bundle: str, runs: int, work: str) -> dict:
    env = dict(os.environ)
    base, mine = [], []
    for i in range(runs):
        out = os.path.join(work, f"untar{i}")
        os.makedirs(out)
        base.append(timed(f"zstd -d -c {bundle} | tar -x -C {out}"))
        shutil.rmtree(out)
        store = os.path.join(work, f"store{i}")
        mine.append(timed(f"{sys.executable} -m mirror install {bundle} --no-megengine-cache "
                          f"--home {store} --json", env=env))
        shutil.rmtree(store)
    b = statistics.median(t for t, _ in base)
    m = statistics.median(t for t, _ in mine)
    return {"baseline_s": b, "mirror_s": m, "ratio": m / b,
            "baseline_rss_mb": max(r for _, r in base), "mirror_rss_mb": max(r for _, r in mine)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024, help="weights in the bundle")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mirror-bench-")
    try:
        with WeightServer() as weights:
            demo = build_demo_repo(os.path.join(work, "git"), weights)
            urls = make_weights(weights, args.size_mb, args.files)
            with GitServer(os.path.join(work, "git")) as git:
                bundle = os.path.join(work, "bench.hub")
                t = time.perf_counter()
                pack([demo.repo], bundle, git_host=git.host, protocol="http",
                     extra_weights=urls, progress=False)
                pack_s = time.perf_counter() - t
        size = os.path.getsize(bundle)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}; bundle {size / 2**20:.0f} MiB "
              f"({args.size_mb} MiB of float32 weights in {args.files} files); "
              f"pack took {pack_s:.2f} s")
        r = bench_install(bundle, args.runs, work)
        print(f"install: mirror {r['mirror_s']:.2f} s vs zstd -d | tar -x {r['baseline_s']:.2f} s"
              f" -> ratio {r['ratio']:.2f}; throughput {size / r['mirror_s'] / 2**20:.0f} MiB/s"
              f" vs {size / r['baseline_s'] / 2**20:.0f} MiB/s; peak RSS mirror "
              f"{r['mirror_rss_mb']:.0f} MiB, baseline {r['baseline_rss_mb']:.0f} MiB "
              f"(median of {args.runs})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
