"""Benchmarks, each a ratio against a baseline measured in the same run on the same data.

pack: `mirror pack` of a repo plus its weights, downloaded over loopback HTTP into
an empty download cache, hashed and compressed, against `tar -cf - DIR | zstd -T0 -3`
of the same files on local disk (and `sha256sum` of them, shown apart).
install: `mirror install` (verify every byte, install atomically) against
`zstd -d | tar -x` of the same bundle, median of --runs; peak RSS of each.
inspect and verify: `mirror inspect` and `mirror verify` of the same bundle, against
`zstd -d -c BUNDLE | sha256sum` (decompress and hash every byte once).
load: `mirror.hub.load(..., pretrained=True)` against stock `megengine.hub.load`
with its cache warm (seeded by install), same model, same process; the first
load of each and the median of repeated loads.
"""

from __future__ import annotations

import argparse
import io
import json
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


def make_weights(weights: WeightServer, total_mb: int, files: int, folder: str) -> list:
    """float32 state dicts saved with megengine.save, ``total_mb`` in all: served, and
    written to ``folder`` for the baseline."""
    import megengine

    rng = np.random.RandomState(0)
    urls = []
    per_file = total_mb * (1 << 20) // files
    os.makedirs(folder)
    for i in range(files):
        state = {f"layer{j}.weight": rng.standard_normal(per_file // 4 // 4).astype(np.float32)
                 for j in range(4)}
        buf = io.BytesIO()
        megengine.save(state, buf)
        urls.append(weights.add(f"bench/w{i}.pkl", buf.getvalue()))
        with open(os.path.join(folder, f"w{i}.pkl"), "wb") as fh:
            fh.write(buf.getvalue())
    return urls


def bench_pack(spec: str, git_host: str, urls: list, folder: str, runs: int,
               work: str) -> dict:
    base, sums, mine = [], [], []
    for i in range(runs):
        base.append(timed(f"tar -cf - -C {folder} . | zstd -T0 -3 -q -o {work}/base{i}.tar.zst"))
        sums.append(timed(f"find {folder} -type f -print0 | xargs -0 sha256sum > /dev/null"))
        out = os.path.join(work, f"pack{i}.hub")
        env = dict(os.environ, MGE_MIRROR_DOWNLOADS=os.path.join(work, f"dl{i}"))
        weights = " ".join(f"--weights {u}" for u in urls)
        mine.append(timed(f"{sys.executable} -m mirror pack {spec} -o {out} --git-host "
                          f"{git_host} --protocol http -q {weights}", env=env))
        sizes = (os.path.getsize(f"{work}/base{i}.tar.zst"), os.path.getsize(out))
        shutil.rmtree(env["MGE_MIRROR_DOWNLOADS"], ignore_errors=True)
        os.unlink(out)
        os.unlink(f"{work}/base{i}.tar.zst")
    b = statistics.median(t for t, _ in base)
    m = statistics.median(t for t, _ in mine)
    return {"baseline_s": b, "sha256sum_s": statistics.median(t for t, _ in sums),
            "mirror_s": m, "ratio": m / b, "mirror_rss_mb": max(r for _, r in mine),
            "baseline_size": sizes[0], "mirror_size": sizes[1]}


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


LOAD = """
import json, statistics, sys, time
import megengine.hub as stock
import mirror.hub

def clock(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times

n = int(sys.argv[1])
args = ("demo/tinynets", "small_cnn")
first_stock = clock(lambda: stock.load(*args, pretrained=True), 1)[0]
first_mirror = clock(lambda: mirror.hub.load(*args, pretrained=True), 1)[0]
# Interleaved, so that neither side gets a warmer machine.
rep_stock, rep_mirror = [], []
for _ in range(n):
    rep_stock += clock(lambda: stock.load(*args, pretrained=True), 1)
    rep_mirror += clock(lambda: mirror.hub.load(*args, pretrained=True), 1)
print(json.dumps({"first_stock": first_stock, "first_mirror": first_mirror,
                  "stock": statistics.median(rep_stock), "mirror": statistics.median(rep_mirror)}))
"""


def bench_load(bundle: str, work: str, repeats: int) -> dict:
    env = dict(os.environ, MGE_MIRROR_HOME=os.path.join(work, "load-store"),
               MGE_HOME=os.path.join(work, "load-mge"))
    # Python's default: bytecode cached (this machine's environment turns it off).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "mirror", "install", bundle, "--json"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run([sys.executable, "-c", LOAD, str(repeats)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_read(bundle: str, runs: int) -> dict:
    inspect = [timed(f"{sys.executable} -m mirror inspect --json {bundle}") for _ in range(runs)]
    verify = [timed(f"{sys.executable} -m mirror verify {bundle}") for _ in range(runs)]
    base = [timed(f"zstd -d -c {bundle} | sha256sum > /dev/null") for _ in range(runs)]
    from mirror.bundle import read_manifest

    t = time.perf_counter()
    for _ in range(20):
        read_manifest(bundle)
    in_process = (time.perf_counter() - t) / 20
    return {"inspect_s": statistics.median(t for t, _ in inspect),
            "inspect_in_process_s": in_process,
            "verify_s": statistics.median(t for t, _ in verify),
            "verify_rss_mb": max(r for _, r in verify),
            "baseline_s": statistics.median(t for t, _ in base)}


def make_many_files(git_root: str, content: str, count: int) -> str:
    """A repo of ``count`` small Python files (one commit, by git fast-import), and the
    same files checked out in ``content`` for the baseline."""
    bare = os.path.join(git_root, "many", "files")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "master", bare], check=True)
    stream = [b"commit refs/heads/master\ncommitter b <b@example.invalid> 1700000000 +0000\n"
              b"data 4\nmany"]
    hubconf = b"def f():\n    return None\n"
    stream.append(b"\nM 644 inline hubconf.py\ndata %d\n%s\n" % (len(hubconf), hubconf))
    for i in range(count):
        data = (b"# module %d\nVALUE = %d\n\n\ndef f(x):\n    return x + VALUE\n" % (i, i)) * 8
        stream.append(b"M 644 inline pkg/sub%03d/mod%05d.py\ndata %d\n%s\n"
                      % (i // 100, i, len(data), data))
    subprocess.run(["git", "--git-dir", bare, "fast-import", "--quiet"],
                   input=b"".join(stream), check=True)
    os.makedirs(content)
    subprocess.run(f"git --git-dir {bare} archive master | tar -x -C {content}", shell=True,
                   check=True)
    return "many/files"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024, help="weights in the bundle")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small-files", type=int, default=5000,
                        help="files in the many-small-files repo")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mirror-bench-")
    try:
        with WeightServer() as weights:
            demo = build_demo_repo(os.path.join(work, "git"), weights)
            content = os.path.join(work, "content")
            urls = make_weights(weights, args.size_mb, args.files, content)
            with GitServer(os.path.join(work, "git")) as git:
                subprocess.run(["git", "-C", content, "init", "-q"], check=True)
                subprocess.run(["git", "-C", content, "fetch", "-q",
                                os.path.join(work, "git", demo.repo), "master"], check=True)
                subprocess.run(["git", "-C", content, "checkout", "-q", "FETCH_HEAD", "--",
                                "."], check=True)
                shutil.rmtree(os.path.join(content, ".git"))
                p = bench_pack(demo.repo, git.host, urls, content, args.runs, work)
                many_content = os.path.join(work, "many-content")
                many = make_many_files(os.path.join(work, "git"), many_content,
                                       args.small_files)
                mp = bench_pack(many, git.host, [], many_content, args.runs, work)
                many_bundle = os.path.join(work, "many.hub")
                pack([many], many_bundle, git_host=git.host, protocol="http", progress=False)
                bundle = os.path.join(work, "bench.hub")
                small = os.path.join(work, "demo.hub")
                pack([demo.repo], small, git_host=git.host, protocol="http", progress=False)
                t = time.perf_counter()
                pack([demo.repo], bundle, git_host=git.host, protocol="http",
                     extra_weights=urls, progress=False)
                pack_s = time.perf_counter() - t
        size = os.path.getsize(bundle)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}; bundle {size / 2**20:.0f} MiB "
              f"({args.size_mb} MiB of float32 weights in {args.files} files); "
              f"pack took {pack_s:.2f} s")
        print(f"pack: mirror {p['mirror_s']:.2f} s vs tar | zstd -T0 -3 {p['baseline_s']:.2f} s"
              f" -> ratio {p['ratio']:.2f} (sha256sum alone {p['sha256sum_s']:.2f} s); bundle "
              f"{p['mirror_size'] / 2**20:.1f} MiB vs {p['baseline_size'] / 2**20:.1f} MiB -> "
              f"{p['mirror_size'] / p['baseline_size']:.3f}; peak RSS mirror "
              f"{p['mirror_rss_mb']:.0f} MiB (median of {args.runs})")
        print(f"pack, {args.small_files} small files: mirror {mp['mirror_s']:.2f} s vs tar | "
              f"zstd -T0 -3 {mp['baseline_s']:.2f} s -> ratio {mp['ratio']:.2f}; bundle "
              f"{mp['mirror_size'] / 2**10:.0f} KiB vs {mp['baseline_size'] / 2**10:.0f} KiB "
              f"-> {mp['mirror_size'] / mp['baseline_size']:.3f}")
        mr = bench_install(many_bundle, args.runs, work)
        print(f"install, {args.small_files} small files: mirror {mr['mirror_s']:.2f} s vs "
              f"zstd -d | tar -x {mr['baseline_s']:.2f} s -> ratio {mr['ratio']:.2f}")
        r = bench_install(bundle, args.runs, work)
        load = bench_load(small, work, 20)
        rd = bench_read(bundle, args.runs)
        print(f"install: mirror {r['mirror_s']:.2f} s vs zstd -d | tar -x {r['baseline_s']:.2f} s"
              f" -> ratio {r['ratio']:.2f}; throughput {size / r['mirror_s'] / 2**20:.0f} MiB/s"
              f" vs {size / r['baseline_s'] / 2**20:.0f} MiB/s; peak RSS mirror "
              f"{r['mirror_rss_mb']:.0f} MiB, baseline {r['baseline_rss_mb']:.0f} MiB "
              f"(median of {args.runs})")
        print(f"inspect: {rd['inspect_s']:.2f} s as a command (Python start-up included), "
              f"{rd['inspect_in_process_s'] * 1e3:.1f} ms in process; verify: "
              f"{rd['verify_s']:.2f} s vs zstd -d | sha256sum {rd['baseline_s']:.2f} s -> ratio "
              f"{rd['verify_s'] / rd['baseline_s']:.2f}, peak RSS {rd['verify_rss_mb']:.0f} MiB")
        print(f"load (small_cnn, pretrained): mirror {load['mirror'] * 1e3:.1f} ms vs stock "
              f"megengine.hub, warm cache, {load['stock'] * 1e3:.1f} ms -> ratio "
              f"{load['mirror'] / load['stock']:.2f} (median of 20, same process); first "
              f"load {load['first_mirror'] * 1e3:.1f} ms vs {load['first_stock'] * 1e3:.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
