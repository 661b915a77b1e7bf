"""A registry inside the gap: push and install through a real OCI registry (Debian's
docker-registry, CNCF Distribution 2.8, over loopback HTTP), each a ratio against a
baseline run here, on the same bundle (--mb MiB of float32 weights in 8 files).

push: `mirror push BUNDLE oci://...` (hash as it sends, one streamed PATCH, then the
config and the manifest) against `curl -T BUNDLE` of the same bytes to an upload the
same registry started (one PUT, the digest given, nothing hashed on this side).
install: `mirror install oci://...` (streamed from the registry, every byte verified,
fsync, publish atomically) against `curl BLOB | zstd -d | tar -x && sync`.

Each run pushes to a repository of its own with an empty digest memo, so every run
sends every byte. Times are medians of --runs, interleaved; peak RSS is the largest.
Also called by scripts/bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_delta import _repo, _weight  # noqa: E402
from bench_tools import MIRROR, timed  # noqa: E402

from mirror.hashing import sha256_file  # noqa: E402
from tests.upstream import GitServer, WeightServer  # noqa: E402
from tests.upstream.registry import RegistryServer  # noqa: E402


def bench(work: str, mb: int = 1024, runs: int = 5) -> dict:
    root = os.path.join(work, "git")
    bundle = os.path.join(work, "m.hub")
    with WeightServer() as weights, GitServer(root) as server:
        per = max(1, mb // 8)
        urls = [_weight(weights, f"r/w{i}.pkl", per, 200 + i) for i in range(8)]
        _repo(root, work, "reg", urls)
        subprocess.run(f"{MIRROR} pack --git-host {server.host} --protocol http -q "
                       f"reg/models -o {bundle}", shell=True, check=True,
                       env=dict(os.environ, MGE_MIRROR_DOWNLOADS=os.path.join(work, "dl")),
                       stdout=subprocess.DEVNULL)
    shutil.rmtree(os.path.join(work, "dl"), ignore_errors=True)
    digest = "sha256:" + sha256_file(bundle)[0]
    registry = RegistryServer(os.path.join(work, "registry")).start()
    try:
        url = f"http://{registry.host}/v2"
        pushed, curled, installed, piped = [], [], [], []
        for i in range(runs):
            env = dict(os.environ, XDG_CACHE_HOME=os.path.join(work, f"cache-{i}"),
                       MGE_MIRROR_HOME=os.path.join(work, f"store-{i}"))
            pushed.append(timed(f"{MIRROR} push -q --plain-http {bundle} "
                                f"{registry.ref(f'bench/m{i}:v1')}", env=env))
            curled.append(timed(
                f"loc=$(curl -sf -X POST -D - -o /dev/null {url}/bench/c{i}/blobs/uploads/ "
                f"| tr -d '\\r' | sed -n 's/^[Ll]ocation: //p') && "
                f"curl -sf -T {bundle} -H 'Content-Type: application/octet-stream' "
                f"\"$loc&digest={digest}\" -o /dev/null"))
            installed.append(timed(f"{MIRROR} install --no-megengine-cache --plain-http "
                                   f"{registry.ref(f'bench/m{i}:v1')}", env=env))
            out = os.path.join(work, f"tar-{i}")
            os.makedirs(out)
            piped.append(timed(f"curl -sf {url}/bench/m{i}/blobs/{digest} | zstd -d -q | "
                               f"tar -x -C {out} && sync"))
            shutil.rmtree(env["MGE_MIRROR_HOME"])
            shutil.rmtree(out)
    finally:
        registry.stop()
    result = {"mib": os.path.getsize(bundle) >> 20,
              "push_s": statistics.median(t for t, _ in pushed),
              "curl_put_s": statistics.median(t for t, _ in curled),
              "push_rss_mb": max(r for _, r in pushed),
              "install_s": statistics.median(t for t, _ in installed),
              "curl_zstd_tar_sync_s": statistics.median(t for t, _ in piped),
              "install_rss_mb": max(r for _, r in installed)}
    result["push_ratio"] = result["push_s"] / result["curl_put_s"]
    result["install_ratio"] = result["install_s"] / result["curl_zstd_tar_sync_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1024, help="MiB of weights in the bundle")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mirror-bench-registry-")
    try:
        print(json.dumps(bench(work, args.mb, args.runs), indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
