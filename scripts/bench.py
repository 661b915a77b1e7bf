"""Benchmarks, each a ratio against a baseline measured in the same run on the same data.

pack: `mirror pack` of a repo plus its weights (downloaded over loopback HTTP, or
read from local files) into an empty download cache, hashed and compressed,
against `tar -cf - DIR | zstd -T0 -3` of the same files on local disk (and that
followed by `sha256sum` of them, the same work as pack's).
install: `mirror install` (verify every byte, fsync, publish atomically) against
`zstd -d | tar -x` of the same bundle, and against the same followed by `sync`
(the baseline made as durable as the install).
inspect and verify: `mirror inspect` and `mirror verify` of the same bundle, against
`zstd -d -c BUNDLE | sha256sum` (decompress and hash every byte once).
load: `mirror.hub.load(..., pretrained=True)` against stock `megengine.hub.load`
with its cache warm (seeded by install), same model, same process; the first
load of each and the median of repeated loads. mirror unpickles weights with its
restricted unpickler; scripts/bench_load.py also times it on a 100 MiB checkpoint
and a resnet50-shaped one against `megengine.load` of MegEngine's cached file.
small files: pack and install of a repo of --small-files Python files.
proof: install of a format 2 bundle (every git id recomputed from its bytes), against
the same bundle rewritten as format 1 (no git objects, nothing to prove), each into a
fresh store, for the small-files repo and the demo repo; and `mirror verify` of the
store each install made.
moving: a delta after 1 of 8 weights changed, and export from the store
(scripts/bench_delta.py).
registry: push to and install from a real registry on loopback
(scripts/bench_registry.py).
network: pack over a link of --rate-mb MB/s against `curl` of the same weights
(scripts/bench_network.py).
scale: pack and install at each --scale size, to show how time and memory grow.
trace: `pack --trace` of a synthetic model zoo of 10, 50 and 100 entrypoints, and of
one whose largest model has 335M parameters, each entrypoint in its own process
(scripts/bench_trace.py; --trace-sizes, empty to skip).

Every timed command starts after a `sync`, so that none pays for the previous
one's dirty pages. Times are medians of --runs; peak RSS is the largest of the
runs, from /usr/bin/time.
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

from tests.upstream import GitServer, WeightServer, build_demo_repo  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_delta import bench as bench_moving  # noqa: E402
from bench_load import bench as bench_unpickler  # noqa: E402
from bench_network import bench as bench_network  # noqa: E402
from bench_registry import bench as bench_registry  # noqa: E402
from bench_tools import MIRROR, timed  # noqa: E402
from bench_trace import bench as bench_trace  # noqa: E402
from bench_trace import report as trace_report  # noqa: E402


def median(pairs) -> float:
    return statistics.median(t for t, _ in pairs)


def peak(pairs) -> float:
    return max(r for _, r in pairs)


def make_weights(weights: WeightServer, per_file_mb: int, files: int, folder: str):
    """``files`` float32 state dicts of ``per_file_mb`` each, saved with megengine.save:
    served over HTTP, and written to ``folder``. Returns (urls, paths)."""
    import megengine

    rng = np.random.RandomState(0)
    urls, paths = [], []
    os.makedirs(folder)
    for i in range(files):
        state = {f"layer{j}.weight": rng.standard_normal(per_file_mb << 16).astype(np.float32)
                 for j in range(4)}  # 4 arrays of per_file_mb / 4 MiB
        buf = io.BytesIO()
        megengine.save(state, buf)
        urls.append(weights.add(f"bench/w{i:03d}.pkl", buf.getvalue()))
        paths.append(os.path.join(folder, f"w{i:03d}.pkl"))
        with open(paths[-1], "wb") as fh:
            fh.write(buf.getvalue())
    return urls, paths


def content_dir(work: str, code: str, weight_paths: list) -> str:
    """The repo's files and these weights in one directory: what the baseline archives."""
    folder = os.path.join(work, f"content-{len(weight_paths)}")
    if not os.path.isdir(folder):
        shutil.copytree(code, folder)
        for p in weight_paths:
            os.link(p, os.path.join(folder, os.path.basename(p)))
    return folder


def bench_pack(spec: str, git_host: str, weights: list, folder: str, runs: int,
               work: str, keep: str, stream: bool = False) -> dict:
    """Pack ``runs`` times into an empty download cache; the last bundle is kept at
    ``keep``. With ``stream``, `pack --stream` is timed too, in the same runs."""
    base, sums, mine, streamed = [], [], [], []
    flags = " ".join(f"--weights {w}" for w in weights)
    env = dict(os.environ, MGE_MIRROR_DOWNLOADS=os.path.join(work, "dl"))
    for _ in range(runs):
        for old in (f"{work}/base.tar.zst", keep):  # neither side pays to delete the last
            if os.path.exists(old):
                os.unlink(old)
        base.append(timed(f"tar -cf - -C {folder} . | zstd -T0 -3 -q -o {work}/base.tar.zst"))
        sums.append(timed(f"find {folder} -type f -print0 | xargs -0 sha256sum > /dev/null"))
        for times, extra in [(mine, "")] + ([(streamed, " --stream")] if stream else []):
            if os.path.exists(keep):
                os.unlink(keep)
            times.append(timed(f"{MIRROR} pack {spec} -o {keep} --git-host {git_host} "
                               f"--protocol http -q {flags}{extra}", env=env))
            shutil.rmtree(env["MGE_MIRROR_DOWNLOADS"], ignore_errors=True)
    sizes = (os.path.getsize(f"{work}/base.tar.zst"), os.path.getsize(keep))
    os.unlink(f"{work}/base.tar.zst")
    got = {"baseline_s": median(base), "sha256sum_s": median(sums), "mirror_s": median(mine),
           "ratio": median(mine) / median(base), "mirror_rss_mb": peak(mine),
           "baseline_size": sizes[0], "mirror_size": sizes[1]}
    if stream:
        got.update(stream_s=median(streamed), stream_ratio=median(streamed) / median(base),
                   stream_rss_mb=peak(streamed))
    return got


def bench_install(bundle: str, runs: int, work: str) -> dict:
    base, durable, mine = [], [], []
    out, store = os.path.join(work, "untar"), os.path.join(work, "store")
    for _ in range(runs):
        for times, then in ((base, ""), (durable, " && sync")):
            os.makedirs(out)
            times.append(timed(f"zstd -d -c {bundle} | tar -x -C {out}{then}"))
            shutil.rmtree(out)
        mine.append(timed(f"{MIRROR} install {bundle} --no-megengine-cache --home {store} "
                          f"--json"))
        shutil.rmtree(store)
    return {"baseline_s": median(base), "durable_s": median(durable),
            "mirror_s": median(mine), "ratio": median(mine) / median(base),
            "durable_ratio": median(mine) / median(durable),
            "baseline_rss_mb": peak(base), "mirror_rss_mb": peak(mine)}


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
    inspect = [timed(f"{MIRROR} inspect --json {bundle}") for _ in range(runs)]
    verify = [timed(f"{MIRROR} verify {bundle}") for _ in range(runs)]
    base = [timed(f"zstd -d -c {bundle} | sha256sum > /dev/null") for _ in range(runs)]
    from mirror.bundle import read_manifest

    t = time.perf_counter()
    for _ in range(20):
        read_manifest(bundle)
    in_process = (time.perf_counter() - t) / 20
    return {"inspect_s": median(inspect), "inspect_in_process_s": in_process,
            "verify_s": median(verify), "verify_rss_mb": peak(verify),
            "baseline_s": median(base)}


def as_format_1(bundle: str, out: str) -> None:
    """Write ``bundle`` (format 2) to ``out`` as format 1: the same members, less each
    snapshot's git objects, so install has nothing to prove. Members get mtime 0
    (install does not use it)."""
    from mirror import bundle as mb
    from mirror.model import Manifest, objects_member

    _, members = mb.read_all(bundle)  # verifies every member
    m = json.loads(mb.read_manifest_bytes(bundle))
    m["format_version"] = 1
    for repo in m["repos"]:
        for snap in repo["snapshots"]:
            del snap["objects"]
            del members[objects_member(snap["commit"])]
        for ref in repo["refs"]:
            ref.pop("target", None)
    mb.write(out, Manifest.from_json(m), members)


def bench_proof(bundle: str, runs: int, work: str) -> dict:
    """Install ``bundle`` (format 2, proven) and the same as format 1 (unproven), each
    into a fresh store, then verify that store; interleaved, ``runs`` times each."""
    old = os.path.join(work, "format1.hub")
    as_format_1(bundle, old)
    store = os.path.join(work, "store")
    t = {k: [] for k in ("install2", "install1", "verify2", "verify1")}
    for _ in range(runs):
        for v, path in (("2", bundle), ("1", old)):
            t[f"install{v}"].append(timed(f"{MIRROR} install {path} --no-megengine-cache "
                                          f"--home {store} --json"))
            t[f"verify{v}"].append(timed(f"{MIRROR} verify --home {store}"))
            shutil.rmtree(store)
    out = {"size2": os.path.getsize(bundle), "size1": os.path.getsize(old)}
    os.unlink(old)
    out.update({f"{k}_s": median(v) for k, v in t.items()})
    out.update({f"{k}_rss_mb": peak(v) for k, v in t.items()})
    return out


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


def row(what: str, mine: str, base: str, ratio: float | None, target: str,
        rss: str = "") -> str:
    r = f"{ratio:.2f}" if ratio is not None else ""
    return f"| {what} | {mine} | {base} | {r} | {target} | {rss} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="weights in the main bundle")
    parser.add_argument("--files", type=int, default=8, help="weight files in the main bundle")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small-files", type=int, default=5000,
                        help="files in the many-small-files repo")
    parser.add_argument("--rate-mb", type=int, default=200,
                        help="MB/s of the link weights are packed over; 0 to skip")
    parser.add_argument("--trace-sizes", default="10,50,100",
                        help="entrypoints of the traced zoos; empty to skip")
    parser.add_argument("--scale", default="256,512,1024,2048",
                        help="MiB of weights for the scale series (each a multiple of "
                             "size-mb/files); empty to skip")
    args = parser.parse_args()
    per_file = args.size_mb // args.files
    scale = [int(s) for s in args.scale.split(",") if s]
    for s in scale:
        if s % per_file:
            parser.error(f"--scale {s} is not a multiple of {per_file} MiB (size-mb/files)")
    n_files = max([args.size_mb] + scale) // per_file
    work = tempfile.mkdtemp(prefix="mirror-bench-")
    started = time.perf_counter()
    table = []
    try:
        with WeightServer() as weights, GitServer(os.path.join(work, "git")) as git:
            demo = build_demo_repo(os.path.join(work, "git"), weights)
            urls, paths = make_weights(weights, per_file, n_files, os.path.join(work, "w"))
            code = os.path.join(work, "code")
            subprocess.run(["git", "clone", "-q", os.path.join(work, "git", demo.repo), code],
                           check=True)
            shutil.rmtree(os.path.join(code, ".git"))
            print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}; {n_files} weight files of {per_file} MiB "
                  f"made in {time.perf_counter() - started:.0f} s", flush=True)

            n = args.size_mb // per_file
            folder = content_dir(work, code, paths[:n])
            bundle = os.path.join(work, "bench.hub")
            p = bench_pack(demo.repo, git.host, urls[:n], folder, args.runs, work, bundle)
            pl = bench_pack(demo.repo, git.host, paths[:n], folder, args.runs, work,
                            os.path.join(work, "local.hub"), stream=True)
            size = os.path.getsize(bundle)
            gib = f"{args.size_mb / 1024:g} GiB"
            table += [
                row(f"pack {gib}, weights over loopback HTTP", f"{p['mirror_s']:.2f} s",
                    f"`tar -cf - DIR \\| zstd -T0 -3`: {p['baseline_s']:.2f} s", p["ratio"],
                    "1.0", f"{p['mirror_rss_mb']:.0f} MiB"),
                row(f"pack {gib}, weights from local files", f"{pl['mirror_s']:.2f} s",
                    f"the same: {pl['baseline_s']:.2f} s", pl["ratio"], "1.0",
                    f"{pl['mirror_rss_mb']:.0f} MiB"),
                row(f"pack {gib}, weights from local files, against compressing and hashing",
                    f"{pl['mirror_s']:.2f} s", f"the same, then `sha256sum` of the files "
                    f"({pl['sha256sum_s']:.2f} s): {pl['baseline_s'] + pl['sha256sum_s']:.2f} s",
                    pl["mirror_s"] / (pl["baseline_s"] + pl["sha256sum_s"]), ""),
                row(f"pack {gib}, weights from local files, `--stream` (each read once)",
                    f"{pl['stream_s']:.2f} s", f"the same: {pl['baseline_s']:.2f} s",
                    pl["stream_ratio"], "1.05", f"{pl['stream_rss_mb']:.0f} MiB"),
                row(f"bundle size, {gib}", f"{size / 2**20:.1f} MiB",
                    f"the same tar.zst: {p['baseline_size'] / 2**20:.1f} MiB",
                    p["mirror_size"] / p["baseline_size"], "1.02"),
            ]
            print("\n".join(table[-5:]), flush=True)

            r = bench_install(bundle, args.runs, work)
            table += [
                row(f"install {gib} (verify, fsync, publish atomically)",
                    f"{r['mirror_s']:.2f} s", f"`zstd -d \\| tar -x`: {r['baseline_s']:.2f} s",
                    r["ratio"], "1.1",
                    f"{r['mirror_rss_mb']:.0f} MiB (baseline {r['baseline_rss_mb']:.0f})"),
                row(f"install {gib}, against a durable baseline", f"{r['mirror_s']:.2f} s",
                    f"`zstd -d \\| tar -x && sync`: {r['durable_s']:.2f} s",
                    r["durable_ratio"], "", ""),
            ]
            print("\n".join(table[-2:]), flush=True)
            rd = bench_read(bundle, args.runs)
            table += [
                row("verify a bundle", f"{rd['verify_s']:.2f} s",
                    f"`zstd -d -c \\| sha256sum`: {rd['baseline_s']:.2f} s",
                    rd["verify_s"] / rd["baseline_s"], "", f"{rd['verify_rss_mb']:.0f} MiB"),
                row("inspect", f"{rd['inspect_in_process_s'] * 1e3:.1f} ms in process, "
                    f"{rd['inspect_s']:.2f} s as a command", "", None, "0.1 s"),
            ]
            small = os.path.join(work, "demo.hub")
            subprocess.run(MIRROR.split() + ["pack", demo.repo, "-o", small, "--git-host",
                                             git.host, "--protocol", "http", "-q"],
                           check=True, stdout=subprocess.DEVNULL)
            load = bench_load(small, work, 20)
            table += [
                row("load `small_cnn`, pretrained, repeated (median of 20)",
                    f"{load['mirror'] * 1e3:.2f} ms",
                    f"stock `megengine.hub.load`, warm cache: {load['stock'] * 1e3:.2f} ms",
                    load["mirror"] / load["stock"], "1.05"),
                row("load, first in the process", f"{load['first_mirror'] * 1e3:.0f} ms",
                    f"stock: {load['first_stock'] * 1e3:.0f} ms",
                    load["first_mirror"] / load["first_stock"], ""),
            ]
            os.makedirs(os.path.join(work, "unpickler"))
            for name, u in bench_unpickler(os.path.join(work, "unpickler"), 20).items():
                if name != "small_cnn":
                    table.append(row(
                        f"load the `{name}` checkpoint ({u['mib']:.0f} MiB) by URL, "
                        f"warm (median of 20)", f"{u['mirror'] * 1e3:.1f} ms",
                        f"stock `megengine.hub.load_serialized_obj_from_url`: "
                        f"{u['stock'] * 1e3:.1f} ms", u["ratio"], "1.05"))
            print("\n".join(table[-6:]), flush=True)

            if args.small_files:
                many_content = os.path.join(work, "many-content")
                many = make_many_files(os.path.join(work, "git"), many_content,
                                       args.small_files)
                many_bundle = os.path.join(work, "many.hub")
                mp = bench_pack(many, git.host, [], many_content, args.runs, work, many_bundle)
                mr = bench_install(many_bundle, args.runs, work)
                k = f"{args.small_files:,} small files"
                table += [
                    row(f"pack, {k}", f"{mp['mirror_s']:.2f} s",
                        f"{mp['baseline_s']:.2f} s", mp["ratio"], "1.0"),
                    row(f"bundle size, {k}", f"{mp['mirror_size'] / 2**10:.0f} KiB",
                        f"{mp['baseline_size'] / 2**10:.0f} KiB",
                        mp["mirror_size"] / mp["baseline_size"], "1.02"),
                    row(f"install, {k}", f"{mr['mirror_s']:.2f} s",
                        f"{mr['baseline_s']:.2f} s (with sync: {mr['durable_s']:.2f} s)",
                        mr["ratio"], "1.1"),
                ]
                print("\n".join(table[-3:]), flush=True)

            # The proof's cost: the same snapshot installed, and its store verified, with
            # git ids recomputed (format 2) and without (format 1).
            proofs = ([(f"{args.small_files:,} small files", many_bundle)]
                      if args.small_files else []) + [("demo repo", small)]
            for name, b in proofs:
                pr = bench_proof(b, args.runs, work)
                table += [
                    row(f"install, {name}: proof's cost", f"{pr['install2_s']:.2f} s",
                        f"format 1 (no git objects, no proof): {pr['install1_s']:.2f} s",
                        pr["install2_s"] / pr["install1_s"], "",
                        f"{pr['install2_rss_mb']:.0f} MiB (format 1: "
                        f"{pr['install1_rss_mb']:.0f})"),
                    row(f"verify the store, {name}: proof's cost", f"{pr['verify2_s']:.2f} s",
                        f"format 1: {pr['verify1_s']:.2f} s",
                        pr["verify2_s"] / pr["verify1_s"], "",
                        f"{pr['verify2_rss_mb']:.0f} MiB (format 1: "
                        f"{pr['verify1_rss_mb']:.0f})"),
                    row(f"bundle size, {name}: the git objects' cost",
                        f"{pr['size2'] / 2**10:.1f} KiB",
                        f"format 1: {pr['size1'] / 2**10:.1f} KiB",
                        pr["size2"] / pr["size1"], ""),
                ]
                print("\n".join(table[-3:]), flush=True)

            os.makedirs(os.path.join(work, "moving"))
            mv = bench_moving(os.path.join(work, "moving"), per_file, 5, args.size_mb)
            d, e = mv["delta"], mv["export"]
            table += [
                row("pack a delta, 1 of 8 weights changed, signed inventory (median of 5)",
                    f"{d['pack_s']:.2f} s", f"packing that weight alone: {d['alone_s']:.2f} s",
                    d["pack_ratio"], "1.2", f"{d['pack_rss_mb']:.0f} MiB"),
                row("the same, unsigned inventory (every URL fetched)",
                    f"{d['unsigned_pack_s']:.2f} s", f"{d['alone_s']:.2f} s",
                    d["unsigned_ratio"], ""),
                row("delta size", f"{d['size'] / 2**20:.1f} MiB",
                    f"that weight, `zstd -T0 -1`: {d['weight_zst_size'] / 2**20:.1f} MiB",
                    d["size_ratio"], "1.05"),
                row(f"export {e['mib']} MiB from the store (median of 5)",
                    f"{e['export_s']:.2f} s",
                    f"`tar -cf - BLOBS \\| zstd -T0 -1`: {e['tar_zstd_s']:.2f} s", e["ratio"],
                    "1.1", f"{e['export_rss_mb']:.0f} MiB"),
            ]
            pp = mv["pipe"]
            table.append(row(f"install {e['mib']} MiB from stdin (median of 5)",
                             f"{pp['stdin_s']:.2f} s", f"from the file: {pp['file_s']:.2f} s",
                             pp["ratio"], "1.05", f"{pp['stdin_rss_mb']:.0f} MiB"))
            pt = mv["parts"]
            table.append(row(f"install {e['mib']} MiB from {pt['count']} parts (median of 5)",
                             f"{pt['parts_s']:.2f} s", f"from the file: {pt['file_s']:.2f} s",
                             pt["ratio"], "1.05", f"{pt['parts_rss_mb']:.0f} MiB"))
            print("\n".join(table[-6:]), flush=True)

            if args.rate_mb:
                link = f"a {args.rate_mb} MB/s link"
                for files in (args.files, 1):  # the weights in files of per_file, or one
                    nw = bench_network(os.path.join(work, f"network-{files}"),
                                       args.size_mb // files, 5, args.rate_mb, files)
                    table += [row(f"pack {nw['mib']} MiB in {files} file(s) over {link}{how} "
                                  f"(median of 5)", f"{nw[k]['s']:.2f} s",
                                  f"`curl` of the weights, 4 at once: "
                                  f"{nw['download_s']:.2f} s",
                                  nw[k]["ratio"], "1.05", f"{nw[k]['rss_mb']:.0f} MiB")
                              for k, how in (("pack", ""), ("stream", ", `--stream`"),
                                             ("stream_j2", ", `--stream -j 2`"))]
                    print("\n".join(table[-3:]), flush=True)

            os.makedirs(os.path.join(work, "registry"))
            rg = bench_registry(os.path.join(work, "registry"), args.size_mb, 5)
            table += [
                row(f"push {rg['mib']} MiB to a registry (median of 5)",
                    f"{rg['push_s']:.2f} s", f"`curl -T` to it: {rg['curl_put_s']:.2f} s",
                    rg["push_ratio"], "1.15", f"{rg['push_rss_mb']:.0f} MiB"),
                row(f"install {rg['mib']} MiB from a registry (median of 5)",
                    f"{rg['install_s']:.2f} s",
                    f"`curl \\| zstd -d \\| tar -x && sync`: "
                    f"{rg['curl_zstd_tar_sync_s']:.2f} s",
                    rg["install_ratio"], "1.15", f"{rg['install_rss_mb']:.0f} MiB"),
            ]
            print("\n".join(table[-2:]), flush=True)

            series = []
            for s in scale:
                n = s // per_file
                if s == args.size_mb:
                    sp, si = p, r
                else:
                    out = os.path.join(work, f"scale{s}.hub")
                    sp = bench_pack(demo.repo, git.host, urls[:n],
                                    content_dir(work, code, paths[:n]), args.runs, work, out)
                    si = bench_install(out, args.runs, work)
                    os.unlink(out)
                series.append(f"| {s} MiB | {sp['mirror_s']:.2f} s | {sp['ratio']:.2f} | "
                              f"{sp['mirror_rss_mb']:.0f} MiB | {si['mirror_s']:.2f} s | "
                              f"{si['ratio']:.2f} | {si['durable_ratio']:.2f} | "
                              f"{si['mirror_rss_mb']:.0f} MiB |")
                print(series[-1], flush=True)
        traced = None
        if args.trace_sizes:
            os.makedirs(os.path.join(work, "trace"))
            traced = bench_trace(os.path.join(work, "trace"),
                                 tuple(int(s) for s in args.trace_sizes.split(",")))
            print(trace_report(traced), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n## Results ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"median of {args.runs}, {time.perf_counter() - started:.0f} s in all)\n")
    print("| what | mirror | baseline | ratio | target | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(table))
    if series:
        print("\n| weights | pack | pack ratio | pack RSS | install | install ratio | "
              "ratio to durable | install RSS |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(series))
    if traced is not None:
        print("\n" + trace_report(traced))


if __name__ == "__main__":
    main()
