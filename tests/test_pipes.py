"""Bundles through pipes: `mirror pack -o -` writes the bundle to stdout (its report to
stderr), and `mirror install -` and `mirror verify -` read stdin in one pass."""

import os
import shlex
import subprocess
import sys

from tests.conftest import MIRROR, ROOT, run, store_content


def _shell(command: str, env: dict) -> subprocess.CompletedProcess:
    env = dict(env, PYTHONPATH=ROOT)
    return subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=300,
                          cwd=ROOT)




def test_pack_to_stdout_piped_into_install_from_stdin(upstream, master_bundle, tmp_path):
    mirror = " ".join(shlex.quote(a) for a in MIRROR)
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "piped"),
               MGE_MIRROR_DOWNLOADS=str(tmp_path / "dl"))
    pack = (f"{mirror} pack {upstream.spec()} --git-host {upstream.git.host} "
            f"--protocol http -q -o -")
    r = _shell(f"{pack} | unshare -n -- {mirror} install --no-megengine-cache -", env)
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode().splitlines()
    assert out[0].startswith("verified ") and out[0].endswith(" from -")
    assert r.stderr.decode().splitlines()[-1].startswith("wrote stdout, ")
    alone = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "file"))
    assert run(MIRROR + ["install", "--no-megengine-cache", master_bundle],
               env=alone).returncode == 0
    assert store_content(env["MGE_MIRROR_HOME"]) == store_content(alone["MGE_MIRROR_HOME"])


def test_verify_and_install_from_stdin_refuse_a_bad_stream(master_bundle, tmp_path):
    data = open(master_bundle, "rb").read()
    home = tmp_path / "store"
    env = dict(os.environ, MGE_MIRROR_HOME=str(home), PYTHONPATH=ROOT)
    ok = subprocess.run(MIRROR + ["verify", "-"], input=data, env=env, capture_output=True,
                        cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.decode().startswith("-: OK, "), ok.stderr
    for name, bad in (("cut", data[:len(data) // 2]),
                      ("appended", data + b"\x50\x2a\x4d\x18\x01\x00\x00\x00x")):
        r = subprocess.run([sys.executable, "-m", "mirror", "install", "-"], input=bad,
                           env=env, capture_output=True, cwd=ROOT)
        assert r.returncode == 3, (name, r.stderr)
        assert r.stderr.decode().startswith("Error: bad bundle -"), (name, r.stderr)
        assert not os.path.exists(home / "repos") and not os.listdir(home / "tmp"), name


def test_the_frame_check_does_not_depend_on_how_the_bytes_arrive(master_bundle):
    """A pipe hands over bytes in pieces of any size: the same bundle passes, and the
    same damage is refused with the same message, for every size."""
    import pytest

    from mirror.bundle import _FrameWalker
    from mirror.errors import BundleError

    good = open(master_bundle, "rb").read()
    bad = {"appended skippable frame": good + b"\x50\x2a\x4d\x18\x01\x00\x00\x00x",
           "cut": good[:-3], "garbage after": good + b"xyz", "cut in a header": good[:5]}

    def walk(data: bytes, size: int) -> None:
        walker = _FrameWalker("b")
        for i in range(0, len(data), size):
            walker.feed(data[i:i + size])
        walker.feed(b"")

    for size in (1, 2, 3, 17, 4096, len(good)):
        walk(good, size)
    for name, data in bad.items():
        said = set()
        for size in (1, 3, 17, 4096, len(data)):
            with pytest.raises(BundleError) as e:
                walk(data, size)
            said.add(str(e.value))
        assert len(said) == 1, (name, said)


def test_export_to_stdout_installs_from_stdin(master_bundle, tmp_path):
    mirror = " ".join(shlex.quote(a) for a in MIRROR)
    source = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "source"))
    assert run(MIRROR + ["install", "--no-megengine-cache", master_bundle],
               env=source).returncode == 0
    target = tmp_path / "target"
    r = _shell(f"{mirror} export demo/tinynets -o - | MGE_MIRROR_HOME={target} "
               f"unshare -n -- {mirror} install --no-megengine-cache -", source)
    assert r.returncode == 0, r.stderr.decode()
    assert "the installed bundle made again" in r.stderr.decode()
    assert store_content(str(target)) == store_content(source["MGE_MIRROR_HOME"])
