"""Tracing a model zoo (tests/upstream/zoo.py): `mirror pack --trace`, each entrypoint in
its own process, as the zoo grows, and on a zoo whose largest model is a 24-layer,
1,024-wide transformer encoder (about 335M parameters).

For each size: the wall time, the time per entrypoint against the baseline (one Python
that imports MegEngine and builds one of the zoo's models, run here), the largest
peak resident memory of one entrypoint's process (as the pack reports it), and the
peak of the packing process itself. Time should grow linearly with the entrypoints and
memory stay flat. Also `--entry transformer` alone. Also called by scripts/bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.test_trace import _file_repo  # noqa: E402
from tests.upstream import WeightServer, zoo  # noqa: E402

BIG_MIB = 64

# Run in a child: the pack, and its own peak memory (not its children's).
_PACK = """
import json, resource, sys
from mirror.packer import PackOptions, pack
log = []
pack([sys.argv[2]], sys.argv[3], PackOptions(git_host=sys.argv[1], protocol="file",
     progress=False, trace=True, entries=tuple(sys.argv[4:]), trace_timeout=600),
     log=log.append)
print(json.dumps({"log": log, "self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  / 1024}))
"""

_BASELINE = f"""
import megengine.module as M, numpy as np
from megengine import Parameter
class B(M.Module):
    def __init__(self):
        super().__init__()
        self.w = Parameter(np.ones({BIG_MIB * (1 << 20) // 4}, dtype=np.float32))
    def forward(self, x):
        return x
B()
"""


def _zoo(root: str, weights: WeightServer, name: str, big: int, transformer: bool) -> None:
    urls = {n: weights.add(f"{name}/{n}.pkl", zoo.weights(i))
            for i, n in enumerate(zoo.names(big, extras=False, transformer=transformer))}
    _file_repo(pathlib.Path(root), "zoo", name, {"hubconf.py": zoo.hubconf(
        urls, big, BIG_MIB, extras=False, transformer=transformer)})


def _pack(root: str, work: str, name: str, entries=()) -> dict:
    env = dict(os.environ, MGE_MIRROR_DOWNLOADS=os.path.join(work, "dl"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PACK, root, f"zoo/{name}",
                           os.path.join(work, f"{name}.hub"), *entries], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_trace: pack of {name} failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    peaks = []
    for line in out["log"]:
        found = re.search(r": traced (\S+): .*peak ([\d.]+) (MiB|GiB)\)", line)
        if found:
            peaks.append(float(found.group(2)) * (1024 if found.group(3) == "GiB" else 1))
    return {"seconds": seconds, "traced": len(peaks), "child_peak_mib": max(peaks),
            "self_mib": out["self_mib"]}


def bench(work: str, sizes=(10, 50, 100)) -> dict:
    root = os.path.join(work, "git")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _BASELINE], check=True, capture_output=True)
    baseline = time.perf_counter() - start
    results = {"baseline_s": baseline, "sizes": {}}
    with WeightServer() as weights:
        for n in sizes:
            _zoo(root, weights, f"z{n}", n, False)
            results["sizes"][n] = _pack(root, work, f"z{n}")
        _zoo(root, weights, "big", 99, True)
        results["target"] = _pack(root, work, "big")
        results["entry"] = _pack(root, work, "big", ["transformer"])
    return results


def report(r: dict) -> str:
    lines = [f"baseline: one Python importing MegEngine and building a {BIG_MIB} MiB model: "
             f"{r['baseline_s']:.2f} s",
             "| zoo | traced processes | time | per entrypoint | vs baseline | largest "
             "entrypoint peak | packing process peak |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = [(f"{n} x {BIG_MIB} MiB", v) for n, v in r["sizes"].items()]
    rows += [("99 x 64 MiB + 335M-param transformer", r["target"]),
             ("--entry transformer", r["entry"])]
    for label, v in rows:
        per = v["seconds"] / max(1, v["traced"])
        lines.append(f"| {label} | {v['traced']} | {v['seconds']:.1f} s | {per:.2f} s | "
                     f"{per / r['baseline_s']:.2f} | {v['child_peak_mib']:.0f} MiB | "
                     f"{v['self_mib']:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,50,100")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirror-bench-trace-") as work:
        r = bench(work, tuple(int(s) for s in args.sizes.split(",")))
    print(report(r))


if __name__ == "__main__":
    main()
