"""Load time with mirror's restricted unpickler against stock MegEngine, warm cache.

The demo repo is packed with two more weights (a 100 MiB checkpoint of four float32
arrays, and a resnet50-shaped state dict of 267 arrays, 98 MiB), installed (which
seeds MegEngine's own cache), then, in one process and interleaved:

- `mirror.hub.load("demo/tinynets", "small_cnn", pretrained=True)` against stock
  `megengine.hub.load` of the same;
- `mirror.hub.load_serialized_obj_from_url(URL)` against stock
  `megengine.hub.load_serialized_obj_from_url(URL)` (a cached file: `megengine.load`)
  for each big checkpoint; this is the weight half of `megengine.hub.load`.

Each figure is the median of --repeats (20) loads after one of each to warm up.
Also called by scripts/bench.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.upstream import GitServer, WeightServer, build_demo_repo  # noqa: E402

CHILD = """
import json, statistics, sys, time
import megengine.hub as stock
import mirror.hub

n, urls = int(sys.argv[1]), sys.argv[2:]
cases = {"small_cnn": (lambda: stock.load("demo/tinynets", "small_cnn", pretrained=True),
                       lambda: mirror.hub.load("demo/tinynets", "small_cnn", pretrained=True))}
for url in urls:
    cases[url] = (lambda u=url: stock.load_serialized_obj_from_url(u),
                  lambda u=url: mirror.hub.load_serialized_obj_from_url(u))
out = {}
for name, (base, mine) in cases.items():
    base(), mine()  # warm: imports, the store's first sha256 check, the page cache
    tb, tm = [], []
    for _ in range(n):  # interleaved, so that neither side gets a warmer machine
        for fn, times in ((base, tb), (mine, tm)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    out[name] = {"stock": statistics.median(tb), "mirror": statistics.median(tm)}
print(json.dumps(out))
"""


def resnet50_state() -> dict:
    """A state dict with resnet50's parameter shapes (convolutions, batch norms, fc)."""
    import collections

    rng = np.random.RandomState(0)
    sd: dict = collections.OrderedDict()

    def conv(name, cin, cout, k):
        sd[name + ".weight"] = rng.standard_normal((cout, cin, k, k)).astype("f4")

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{name}.{p}"] = rng.standard_normal((1, c, 1, 1)).astype("f4")

    conv("conv1", 3, 64, 7)
    bn("bn1", 64)
    cin = 64
    for li, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], 1):
        for b in range(blocks):
            n = f"layer{li}.{b}"
            for i, (ci, co, k) in enumerate([(cin, width, 1), (width, width, 3),
                                             (width, width * 4, 1)], 1):
                conv(f"{n}.conv{i}", ci, co, k)
                bn(f"{n}.bn{i}", co)
            if b == 0:
                conv(n + ".downsample.0", cin, width * 4, 1)
                bn(n + ".downsample.1", width * 4)
            cin = width * 4
    sd["fc.weight"] = rng.standard_normal((1000, 2048)).astype("f4")
    sd["fc.bias"] = rng.standard_normal((1000,)).astype("f4")
    return sd


def checkpoints() -> dict:
    """name -> bytes of the two big checkpoints, saved with megengine.save."""
    import megengine

    rng = np.random.RandomState(1)
    flat = {f"layer{j}.weight": rng.standard_normal(25 << 18).astype(np.float32)
            for j in range(4)}  # 4 arrays of 25 MiB
    out = {}
    for name, state in (("flat100", flat), ("resnet50", resnet50_state())):
        buf = io.BytesIO()
        megengine.save(state, buf)
        out[name] = buf.getvalue()
    return out


def bench(work: str, repeats: int = 20) -> dict:
    """{case: {"stock": s, "mirror": s, "ratio": r, "mib": size}} for small_cnn and the
    two checkpoints."""
    mirror = [sys.executable, "-m", "mirror"]
    bundle = os.path.join(work, "load.hub")
    sizes = {}
    with WeightServer() as weights, GitServer(os.path.join(work, "git")) as git:
        demo = build_demo_repo(os.path.join(work, "git"), weights)
        urls = {}
        for name, data in checkpoints().items():
            urls[name] = weights.add(f"bench/{name}.pkl", data)
            sizes[urls[name]] = len(data) / 2**20
        flags = [a for u in urls.values() for a in ("--weights", u)]
        subprocess.run(mirror + ["pack", demo.repo, "-o", bundle, "--git-host", git.host,
                                 "--protocol", "http", "-q"] + flags,
                       check=True, stdout=subprocess.DEVNULL)
    env = dict(os.environ, MGE_MIRROR_HOME=os.path.join(work, "store"),
               MGE_HOME=os.path.join(work, "mge"), PYTHONPATH=ROOT)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # Python's default: bytecode cached
    subprocess.run(mirror + ["install", bundle, "--json"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    out = subprocess.run([sys.executable, "-c", CHILD, str(repeats)] + list(urls.values()),
                         env=env, check=True, capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    names = {u: n for n, u in urls.items()}
    result = {}
    for key, t in got.items():
        result[names.get(key, key)] = dict(t, ratio=t["mirror"] / t["stock"],
                                           mib=sizes.get(key))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirror-bench-load-") as work:
        result = bench(work, args.repeats)
    print(f"| load (median of {args.repeats}, warm cache) | mirror | stock | ratio |")
    print("| --- | --- | --- | --- |")
    for name, t in result.items():
        what = ("`small_cnn`, `pretrained=True`, whole `hub.load`" if name == "small_cnn"
                else f"`{name}` checkpoint, {t['mib']:.0f} MiB")
        print(f"| {what} | {t['mirror'] * 1e3:.2f} ms | {t['stock'] * 1e3:.2f} ms | "
              f"{t['ratio']:.3f} |")


if __name__ == "__main__":
    main()
