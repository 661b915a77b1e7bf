"""The main job end to end, on an embedded upstream (git and weights over loopback).

connected side:  mirror pack demo/tinynets@<commit>   (real git http-backend, real HTTP)
isolated side:   mirror install, then mirror.hub.load  (in `unshare -n`: no network at all)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.upstream import GitServer, WeightServer, build_demo_repo  # noqa: E402

OUT = os.path.join(ROOT, "demo-out")
LOAD = """
import numpy as np, megengine, mirror.hub
print("entrypoints:", mirror.hub.list("demo/tinynets"))
for entry, x in (("mlp", np.linspace(-1, 1, 8, dtype="float32").reshape(1, 8)),
                 ("small_cnn", np.linspace(-1, 1, 192, dtype="float32").reshape(1, 3, 8, 8))):
    model = mirror.hub.load("demo/tinynets", entry, pretrained=True)
    model.eval()
    y = model(megengine.tensor(x)).numpy()
    print(f"{entry} (revision {model.revision}) on a fixed input:",
          " ".join(f"{v:+.4f}" for v in y.ravel()))
"""
STOCK = """
import numpy as np, megengine
from megengine import hub
model = hub.load("demo/tinynets", "mlp", pretrained=True)
model.eval()
y = model(megengine.tensor(np.linspace(-1, 1, 8, dtype="float32").reshape(1, 8))).numpy()
print(f"stock megengine.hub: mlp (revision {model.revision}) on the same input:",
      " ".join(f"{v:+.4f}" for v in y.ravel()))
"""


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def sh(args, env, isolated=False) -> None:
    if isolated:
        args = ["unshare", "--net", "--"] + args
    shown = [a if "\n" not in a else "<load script>" for a in args]
    print("$", " ".join(shown), flush=True)
    proc = subprocess.run(args, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    # MegEngine prints CUDA notices on CPU machines; show only the lines that matter.
    noise = ("info:", "debug:")
    for line in proc.stderr.splitlines():
        if not line.strip().startswith(noise) and "pkg_resources" not in line:
            print(line, file=sys.stderr)
    if proc.returncode:
        raise SystemExit(f"demo: step failed with exit code {proc.returncode}: {' '.join(args)}")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    isolated = os.geteuid() == 0 and shutil.which("unshare") is not None
    with tempfile.TemporaryDirectory(prefix="mirror-demo-") as tmp, WeightServer() as weights:
        step("upstream: a MegEngine hub repo on a loopback git server, weights on a loopback "
             "HTTP server")
        demo = build_demo_repo(os.path.join(tmp, "git"), weights)
        with GitServer(os.path.join(tmp, "git")) as git:
            master = demo.branches["master"]
            print(f"git    {git.url(demo.repo)}  master={master[:12]} dev="
                  f"{demo.branches['dev'][:12]} v1.0={demo.tags['v1.0'][:12]}")
            print(f"weights {weights.base_url}/weights/ ({len(demo.weights)} files)")

            step("connected host: mirror pack (pinned commit)")
            bundle = os.path.join(OUT, "demo.hub")
            env = dict(os.environ, MGE_MIRROR_HOME=os.path.join(OUT, "store"),
                       MGE_HOME=os.path.join(OUT, "megengine"))
            mirror = [sys.executable, "-m", "mirror"]
            sh(mirror + ["pack", f"{demo.repo}@{master[:10]}", "-o", bundle,
                         "--git-host", git.host, "--protocol", "http", "-q"], env)
            sh(["tar", "--zstd", "-tvf", bundle], env)

        step("isolated host: mirror install" + (" (in a network namespace with no network)"
                                                 if isolated else " (not root: no namespace)"))
        sh(mirror + ["install", bundle], env, isolated)
        sh(mirror + ["list"], env, isolated)

        step("isolated host: mirror.hub.load(..., pretrained=True), no network")
        sh([sys.executable, "-c", LOAD], env, isolated)

        step("isolated host: unmodified megengine.hub.load(..., pretrained=True), no network")
        sh([sys.executable, "-c", STOCK], env, isolated)
    print(f"\ndemo: OK (bundle and store in {OUT})")


if __name__ == "__main__":
    main()
