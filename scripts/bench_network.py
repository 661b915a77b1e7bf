"""Packing over a link of limited speed: pack against the download alone.

A repo names --files weights of --weight-mb each, served on loopback by a server whose
answers together send at most --rate-mb MB/s (a shared link, as a real one is). Then,
interleaved, --runs times, each into an empty download cache:
- the download alone: `curl` of every weight into a folder, 4 at once (pack's -j);
- `mirror pack REPO -o B` (manifest first: every weight downloaded, then the bundle
  written);
- `mirror pack REPO -o B --stream` (each weight compressed into the bundle as soon
  as it has arrived, while the others download; the manifest last), with 4
  downloads at once and with 2 (`-j 2`: on a shared link, weights then arrive one
  after another, and fewer of them are left to compress after the last byte).

Times are medians; the VM's speed swings, so runs are interleaved.
Also called by scripts/bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_delta import _repo, _weight  # noqa: E402
from bench_tools import MIRROR, timed  # noqa: E402

from tests.upstream import GitServer, WeightServer  # noqa: E402


def bench(work: str, per_weight_mb: int = 128, runs: int = 5, rate_mb: int = 200,
          files: int = 8) -> dict:
    os.makedirs(work, exist_ok=True)
    with WeightServer() as weights, GitServer(os.path.join(work, "git")) as server:
        urls = [_weight(weights, f"n/w{i}.pkl", per_weight_mb, i) for i in range(files)]
        _repo(os.path.join(work, "git"), work, "net", urls)
        weights.rate = rate_mb * 1000 * 1000
        env = dict(os.environ, MGE_MIRROR_DOWNLOADS=os.path.join(work, "dl"))
        pack = f"{MIRROR} pack net/models --git-host {server.host} --protocol http -q"
        got = os.path.join(work, "curl")
        fetch = f"printf '%s\\n' {' '.join(urls)} | xargs -P 4 -n 1 curl -sf -O --output-dir {got}"
        alone, default, streamed, two = [], [], [], []
        for _ in range(runs):
            for times, cmd in ((alone, fetch),
                               (default, f"{pack} -o {work}/b.hub"),
                               (streamed, f"{pack} -o {work}/s.hub --stream"),
                               (two, f"{pack} -o {work}/s.hub --stream -j 2")):
                shutil.rmtree(env["MGE_MIRROR_DOWNLOADS"], ignore_errors=True)
                shutil.rmtree(got, ignore_errors=True)
                os.makedirs(got)
                for old in ("b.hub", "s.hub"):
                    if os.path.exists(os.path.join(work, old)):
                        os.unlink(os.path.join(work, old))
                times.append(timed(cmd, env=env))
        out = {"mib": files * per_weight_mb, "files": files, "rate_mb_s": rate_mb,
               "download_s": statistics.median(t for t, _ in alone)}
        for name, times in (("pack", default), ("stream", streamed), ("stream_j2", two)):
            out[name] = {"s": statistics.median(t for t, _ in times),
                         "rss_mb": max(r for _, r in times),
                         "runs": [round(t, 2) for t, _ in times]}
            out[name]["ratio"] = out[name]["s"] / out["download_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight-mb", type=int, default=128, help="MiB of each weight")
    parser.add_argument("--files", type=int, default=8, help="weights")
    parser.add_argument("--rate-mb", type=int, default=200, help="the link's MB/s")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mirror-bench-network-")
    try:
        print(json.dumps(bench(work, args.weight_mb, args.runs, args.rate_mb, args.files),
                         indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
