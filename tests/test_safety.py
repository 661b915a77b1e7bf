"""Weights are pickles: what they would import is checked, without unpickling, at pack
and at install."""

import io
import os
import pickle

import megengine
import megengine.module as M
import numpy as np
import pytest

from mirror.errors import UnsafePickleError
from mirror.installer import install
from mirror.safety import MAX_STRING, BlockReader, pickle_globals, unsafe_globals, unsafe_in
from tests.conftest import MIRROR, handmade_bundle, run, tree_digest


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/mirror-test-pwned",))


def _file(tmp_path, data, name="w.pkl"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("obj", [
    lambda: {"w": np.zeros((3, 4), np.float32), "step": np.int64(3)},
    lambda: M.Conv2d(3, 4, 3).state_dict(),
    lambda: {"t": megengine.tensor([1.0, 2.0])},
])
def test_megengine_weights_pass(tmp_path, protocol, obj):
    buf = io.BytesIO()
    megengine.save(obj(), buf, pickle_protocol=protocol)
    assert unsafe_globals(_file(tmp_path, buf.getvalue())) == []


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_code_in_a_pickle_is_named(tmp_path, protocol):
    data = pickle.dumps({"w": np.zeros(2), "x": Evil()}, protocol=protocol)
    assert unsafe_globals(_file(tmp_path, data)) == ["posix.system"]


def test_names_taken_from_the_memo_are_resolved_as_pickle_would(tmp_path):
    # "os" and "system" memoized, other strings pushed and popped in between: a scanner
    # that looks at the last strings seen would name the wrong global.
    data = (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x8c\x05decoy\x8c\x05decoy0"
            b"h\x00h\x01\x93\x8c\x04true\x85R.")
    assert pickle_globals(open(_file(tmp_path, data), "rb")) == ["os.system"]


def test_a_broken_pickle_still_reports_what_would_run_before_it_breaks(tmp_path):
    good = pickle.dumps(Evil(), protocol=2)
    assert unsafe_globals(_file(tmp_path, good[: len(good) // 2 + 5])) == ["posix.system"]
    assert unsafe_globals(_file(tmp_path, b"cat dog bird fish\n", "vocab.txt")) == []


def test_large_arrays_are_skipped_not_read(tmp_path):
    buf = io.BytesIO()
    megengine.save({"w": np.zeros(20_000_000, np.float32)}, buf)
    path = _file(tmp_path, buf.getvalue())
    with open(path, "rb") as fh:
        assert pickle_globals(fh) == ["numpy.core.multiarray._reconstruct", "numpy.ndarray",
                                      "numpy.dtype"]


@pytest.mark.parametrize("where", ["http", "local-stream"])
def test_pack_refuses_an_unsafe_weight_unless_allowed(upstream, tmp_path, where):
    """Downloaded, or a local file that --stream reads only as it packs it."""
    evil = pickle.dumps(Evil(), protocol=4)
    if where == "http":
        url, flags = upstream.weights.add("evil/model.pkl", evil), []
    else:
        url, flags = _file(tmp_path, evil), ["--stream"]
    args = ["pack", upstream.spec(":v1.0"), "-o", str(tmp_path / "x.hub"), "--git-host",
            upstream.git.host, "--protocol", "http", "-q", "--weights", url] + flags
    r = run(MIRROR + args)
    assert r.returncode == 5  # refused by the pickle policy
    assert r.stderr.strip() == (
        f"Error: weight {url} would import posix.system when loaded (unpickling runs code); "
        f"MegEngine weights import only numpy arrays, tensors and collections. Pass "
        f"--allow-unsafe-pickle only if you trust where it comes from")
    assert not (tmp_path / "x.hub").exists()
    assert run(MIRROR + args + ["--allow-unsafe-pickle"]).returncode == 0


def test_install_refuses_an_unsafe_weight_and_changes_nothing(master_bundle, home, tmp_path):
    url = "https://example.invalid/evil.pkl"
    bad = handmade_bundle(tmp_path / "evil.hub", {"e" * 40: {"hubconf.py": "x = 1\n"}},
                          refs=[("master", "branch", "e" * 40)],
                          weights=[(url, pickle.dumps(Evil(), protocol=2))])
    install(master_bundle)
    before = tree_digest(home)
    with pytest.raises(UnsafePickleError) as e:
        install(bad)
    assert str(e.value).startswith(f"weight {url} in {bad} would import posix.system")
    assert tree_digest(home) == before
    r = run(MIRROR + ["install", bad, "--allow-unsafe-pickle"])
    assert r.returncode == 0, r.stderr
    assert not os.path.exists("/tmp/mirror-test-pwned")  # nothing was ever unpickled


def test_random_bytes_never_crash_the_scanner(tmp_path):
    rng = np.random.RandomState(5)
    for i in range(300):
        data = rng.bytes(rng.randint(1, 4096))
        found = unsafe_globals(_file(tmp_path, data, f"r{i}"))  # raises nothing
        assert isinstance(found, list) and all(isinstance(n, str) for n in found)


def _unicode(text):
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data if len(data) < 256 else \
        b"X" + len(data).to_bytes(4, "little") + data


@pytest.mark.parametrize("name, data", [
    # numbers the C unpickler reads in any base, and pickletools does not
    ("int in hex", b"I0x1\n0cos\nsystem\n(S'echo x'\ntR."),
    ("long in hex", b"L0x1L\n0cos\nsystem\n(S'echo x'\ntR."),
    # a module name computed by an allowed callable (rot13 of "bf")
    ("computed name", b"\x80\x04c_codecs\nencode\n" + _unicode("bf") + _unicode("rot13")
     + b"\x86R" + _unicode("system") + b"\x93" + _unicode("echo x") + b"\x85R."),
    # a very long dotted name that protocol 4 walks to os.system
    ("long dotted name", b"\x80\x04" + _unicode("os") + _unicode("path.os." * 9000 + "system")
     + b"\x93" + _unicode("echo x") + b"\x85R."),
    # DUP of a string that becomes a name
    ("dup", b"\x80\x04" + _unicode("os") + b"20" + _unicode("system") + b"\x93"
     + _unicode("echo x") + b"\x85R."),
    # whatever the copyreg extension registry maps code 1 to
    ("extension code", b"\x80\x02\x82\x01)R."),
])
def test_what_the_scanner_cannot_follow_fails_closed(tmp_path, name, data):
    found = unsafe_globals(_file(tmp_path, data))
    assert found, name
    assert all("system" in n or "<computed at load time>" in n
               or n.startswith("<refused at load time>.") for n in found), found


def _blocks(data, size):
    return BlockReader(iter([data[i:i + size] for i in range(0, len(data), size)]))


def test_the_scan_of_a_stream_finds_what_the_scan_of_a_file_finds(tmp_path):
    """verify and install scan weights as they stream past, in blocks that split
    opcodes and arguments anywhere; pack scans files. They must agree."""
    rng = np.random.RandomState(9)
    samples = [pickle.dumps({"w": np.zeros(3), "x": Evil()}, protocol=p) for p in (0, 2, 4, 5)]
    buf = io.BytesIO()
    megengine.save(M.Conv2d(3, 4, 3).state_dict(), buf)
    samples += [buf.getvalue(), b"I0x1\n0cos\nsystem\n(S'echo x'\ntR."]
    samples += [rng.bytes(rng.randint(1, 2048)) for _ in range(100)]
    for i, data in enumerate(samples):
        expected = unsafe_globals(_file(tmp_path, data, f"s{i}"))
        for size in (1, 3, 64, 1 << 20):
            assert unsafe_in(_blocks(data, size)) == expected, (i, size)
    assert unsafe_in(_blocks(samples[2], 5)) == ["posix.system"]


def test_a_text_argument_too_long_to_read_fails_closed(tmp_path):
    data = b"S'" + b"x" * (MAX_STRING + 10) + b"'\np0\n0cos\nsystem\n(S'echo x'\ntR."
    expected = [f"<computed at load time>.STRING with an argument over {MAX_STRING} bytes"]
    assert unsafe_globals(_file(tmp_path, data)) == expected
    assert unsafe_in(_blocks(data, 1 << 20)) == expected


def test_verify_refuses_an_unsafe_weight_as_install_does(tmp_path, home):
    url = "https://example.invalid/evil.pkl"
    bad = handmade_bundle(tmp_path / "evil.hub", {"e" * 40: {"hubconf.py": "x = 1\n"}},
                          refs=[("master", "branch", "e" * 40)],
                          weights=[(url, pickle.dumps(Evil(), protocol=2))])
    verified, installed = run(MIRROR + ["verify", bad]), run(MIRROR + ["install", bad])
    assert verified.returncode == installed.returncode == 5
    assert verified.stderr == installed.stderr
    assert verified.stderr.startswith(f"Error: weight {url} in {bad} would import posix.system")
    r = run(MIRROR + ["verify", bad, "--allow-unsafe-pickle"])
    assert r.returncode == 0 and r.stdout.startswith(f"{bad}: OK, "), r.stderr
