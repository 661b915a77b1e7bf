"""What the benchmark scripts share: the command that runs mirror, and the timer."""

from __future__ import annotations

import os
import subprocess
import sys
import time

MIRROR = f"{sys.executable} -m mirror"


def timed(cmd: str, env=None):
    """Run a shell command after a sync; return (seconds, peak RSS in MiB of its
    largest process).

    /usr/bin/time measures the RSS: this script's own memory (the weight server holds
    the weights) would otherwise count for a child forked from it.
    """
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "sh", "-c", cmd], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: {cmd} failed: {proc.stderr[-2000:]}")
    return seconds, int(proc.stderr.strip().splitlines()[-1]) / 1024
