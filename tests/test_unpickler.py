"""Weights are unpickled by a restricted unpickler (mirror.unpickler), and the pack and
install scan (mirror.safety) applies its rules without unpickling.

Every hostile stream is loaded in a child process under ``unshare -n`` (no network),
so that a crash is a failed test, not a dead test run.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import random
import select
import struct
import subprocess
import sys
import time

import megengine
import megengine.module as M
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror import unpickler
from mirror.errors import UnsafePickleError
from mirror.installer import install
from mirror.safety import BlockReader, unsafe_in
from mirror.unpickler import DTYPES, GLOBALS, MAX_MEMO, MAX_OPCODES, MAX_STACK
from tests.conftest import MIRROR, ROOT, handmade_bundle, run
from tests.upstream.demorepo import make_weights

# --- pickles by hand ------------------------------------------------------------------


def text(s: str) -> bytes:
    data = s.encode("utf-8", "surrogatepass")
    return (b"\x8c" + bytes([len(data)]) + data if len(data) < 256
            else b"X" + len(data).to_bytes(4, "little") + data)


def raw(data: bytes) -> bytes:
    return (b"C" + bytes([len(data)]) + data if len(data) < 256
            else b"B" + len(data).to_bytes(4, "little") + data)


def integer(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -2**31 <= n < 2**31:
        return b"J" + n.to_bytes(4, "little", signed=True)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def glob(module: str, name: str, stack: bool = True) -> bytes:
    if stack:
        return text(module) + text(name) + b"\x93"
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tup(*items: bytes) -> bytes:
    if not items:
        return b")"
    if len(items) <= 3:
        return b"".join(items) + b"\x84\x85\x86\x87"[len(items):len(items) + 1]
    return b"(" + b"".join(items) + b"t"


def stream(body: bytes, proto: int = 4) -> bytes:
    return b"\x80" + bytes([proto]) + body + b"."


def dtype(code: str, state: tuple | None = None, copy: bytes = b"\x88") -> bytes:
    out = glob("numpy", "dtype") + tup(text(code), b"\x89", copy) + b"R"
    return out + (tup(*state) + b"b" if state is not None else b"")


def plain_state(order: str = "<", flags: int = 0) -> tuple:
    return (integer(3), text(order), b"N", b"N", b"N", integer(-1), integer(-1),
            integer(flags))


def quantized(mgb_dtype: bytes) -> tuple:
    """A version 4 dtype state with MegEngine's metadata, ``{"mgb_dtype": ...}``."""
    return (integer(4), text("|"), b"N", b"N", b"N", integer(-1), integer(-1), integer(0),
            b"}(" + text("mgb_dtype") + mgb_dtype + b"u")


def array(dtype_fragment: bytes, shape: tuple, data: bytes, build: bool = True) -> bytes:
    out = (glob("numpy.core.multiarray", "_reconstruct")
           + tup(glob("numpy", "ndarray"), tup(integer(0)), raw(b"b")) + b"R")
    if build:
        out += tup(integer(1), tup(*map(integer, shape)), dtype_fragment, b"\x89",
                   raw(data)) + b"b"
    return out


def exploit(pointer: int = 0x4141414141414141) -> bytes:
    """The finding: a numpy.dtype('O8') rebuilt by BUILD with its object flags cleared
    (so numpy takes raw bytes for it), then an array of it from 8 raw bytes: one
    object pointer of the pickle's choosing. Imports only numpy's allowed globals."""
    return stream(array(dtype("O8", plain_state("|", 0)), (1,),
                        struct.pack("<Q", pointer)))


# --- loading in a child ---------------------------------------------------------------

CHILD = r'''
import io, math, sys, warnings
warnings.simplefilter("ignore")
import numpy as np
import megengine
from mirror import unpickler


def differ(a, b, seen):
    """None if a (restricted) and b (megengine.load) are the same object graph."""
    if isinstance(a, (list, dict, set, bytearray, np.ndarray, megengine.Tensor)):
        if id(a) in seen:  # the same object twice: so must megengine.load's be
            return None if seen[id(a)][1] is b else "aliasing"
        seen[id(a)] = (a, b)
    if type(a) is not type(b):
        return f"type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, np.ndarray):
        if not (a.dtype == b.dtype and a.dtype.str == b.dtype.str and a.shape == b.shape
                and a.strides == b.strides and a.tobytes() == b.tobytes()
                and a.flags.writeable == b.flags.writeable
                and a.dtype.metadata == b.dtype.metadata):
            return "array"
        return None
    if isinstance(a, np.dtype):
        return None if (a == b and a.str == b.str and a.metadata == b.metadata
                        and a.flags == b.flags) else "dtype"
    if isinstance(a, megengine.Tensor):
        if not (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape):
            return "tensor"
        return differ(a.numpy(), b.numpy(), {})
    if isinstance(a, np.generic):
        return None if a.dtype == b.dtype and a.tobytes() == b.tobytes() else "scalar"
    if isinstance(a, dict):
        if list(map(repr, a)) != list(map(repr, b)):  # repr: NaN != NaN
            return "keys"
        for (ka, va), vb in zip(a.items(), b.values()):
            d = differ(va, vb, seen)
            if d:
                return f"[{ka!r}] {d}"
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return "length"
        for i, (x, y) in enumerate(zip(a, b)):
            d = differ(x, y, seen)
            if d:
                return f"[{i}] {d}"
        return None
    if isinstance(a, float):
        return None if a == b or (math.isnan(a) and math.isnan(b)) else "float"
    if isinstance(a, (set, frozenset)):  # NaN hashes by identity: any order
        return None if sorted(map(repr, a)) == sorted(map(repr, b)) else "set"
    if isinstance(a, complex):
        return None if repr(a) == repr(b) else "complex"
    if isinstance(a, type) or callable(a):
        return None if a is b else "global"
    return None if a == b else f"{a!r} != {b!r}"[:100]


stdin = sys.stdin.buffer
while True:
    head = stdin.read(4)
    if len(head) < 4:
        break
    data = stdin.read(int.from_bytes(head, "little"))
    try:
        got = unpickler.loads(data)
    except unpickler.Refused as e:
        out = "refused " + str(e)
    else:
        try:
            want = megengine.load(io.BytesIO(data))
        except Exception as e:
            out = f"stock megengine.load raised {type(e).__name__}: {e}"
        else:
            d = differ(got, want, {})
            out = "loaded" if d is None else "differs from megengine.load: " + d
    sys.stdout.write("@@ " + out.replace("\n", " ")[:400] + "\n")
    sys.stdout.flush()
'''


class Child:
    """A child process under ``unshare -n`` that loads each stream with the restricted
    unpickler (and, if loaded, with ``megengine.load`` to compare) and says what came
    of it: "loaded", "refused ...", or, if it died, "crashed"; restarted after a crash."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.started = 0

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(["unshare", "--net", "--", sys.executable, "-c", CHILD],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        self.started += 1

    def load(self, data: bytes, timeout: float = 60) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        proc = self.proc
        try:
            proc.stdin.write(len(data).to_bytes(4, "little") + data)
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], max(0, deadline - time.monotonic()))
            line = proc.stdout.readline() if ready else b""
            if line.startswith(b"@@ "):
                return line[3:].decode().rstrip("\n")
            if not line:  # died, or hung
                if proc.poll() is None:
                    proc.kill()
                code = proc.wait()
                self.proc = None
                return f"crashed (exit status {code})"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def child():
    c = Child()
    yield c
    c.close()


def _dis(data: bytes) -> str:
    out = io.StringIO()
    try:
        pickletools.dis(data, out)
    except Exception as e:  # noqa: BLE001 - hostile streams are rarely well-formed
        out.write(f"({type(e).__name__}: {e})")
    return out.getvalue()[-3000:]


# --- the finding ----------------------------------------------------------------------


def test_the_exploit_passed_the_old_scan_and_crashes_stock_megengine(tmp_path):
    """What the finding reported: only allowed numpy globals, and megengine.load hands
    numpy a pointer of the pickle's choosing (a segfault at 0x4141414141414141)."""
    path = tmp_path / "evil.pkl"
    path.write_bytes(exploit())
    with open(path, "rb") as fh:
        assert sorted(pickle_names(fh)) == ["numpy.core.multiarray._reconstruct",
                                            "numpy.dtype", "numpy.ndarray"]
    r = run([sys.executable, "-c", "import megengine, sys; x = megengine.load(sys.argv[1]); "
             "print(x.tolist())", str(path)], netns=True)
    assert r.returncode == -11, (r.returncode, r.stderr[-2000:])  # SIGSEGV


def pickle_names(fh) -> list:
    from mirror.safety import pickle_globals

    return pickle_globals(fh)


def test_the_exploit_is_refused_by_the_scan_at_pack_verify_and_install(upstream, tmp_path,
                                                                        home):
    url = upstream.weights.add("evil/exploit.pkl", exploit())
    pack = run(MIRROR + ["pack", upstream.spec(":v1.0"), "-o", str(tmp_path / "x.hub"),
                         "--git-host", upstream.git.host, "--protocol", "http", "-q",
                         "--weights", url])
    assert pack.returncode == 5, pack.stderr
    assert f"weight {url} would import <refused at load time>.numpy.dtype('O8', False, " \
           f"True): only a plain number type" in pack.stderr
    bad = handmade_bundle(tmp_path / "evil.hub", {"e" * 40: {"hubconf.py": "x = 1\n"}},
                          refs=[("master", "branch", "e" * 40)],
                          weights=[("https://example.invalid/evil.pkl", exploit())])
    with pytest.raises(UnsafePickleError) as e:
        install(bad)
    assert "<refused at load time>.numpy.dtype('O8'" in str(e.value)
    verified = run(MIRROR + ["verify", bad])
    assert verified.returncode == 5 and "<refused at load time>.numpy.dtype('O8'" in \
        verified.stderr


# A hub repo whose pretrained weight is the exploit: loaded through mirror.hub.load,
# through megengine.hub under `mirror run`, and by URL.
EVIL_HUBCONF = '''\
from megengine import hub
import megengine.module as M

dependencies = ["megengine"]


@hub.pretrained("https://example.invalid/evil.pkl")
def net(**kwargs):
    return M.Linear(1, 1)
'''

LOAD_EVIL = '''
import sys
from mirror.errors import MirrorError
how = sys.argv[1]
try:
    if how == "mirror.hub.load":
        import mirror.hub
        mirror.hub.load("hand/made", "net", pretrained=True)
    elif how == "megengine.hub.load":  # under mirror run: megengine.hub is the store
        import megengine.hub
        megengine.hub.load("hand/made", "net", pretrained=True)
    else:
        import mirror.hub
        mirror.hub.load_serialized_obj_from_url("https://example.invalid/evil.pkl")
except MirrorError as e:
    print(type(e).__name__, e)
    sys.exit(e.exit_code)
print("loaded")
'''


@pytest.mark.parametrize("how", ["mirror.hub.load", "megengine.hub.load", "by URL"])
def test_the_exploit_is_refused_when_loaded_even_if_installed_anyway(tmp_path, home, how):
    bad = handmade_bundle(tmp_path / "evil.hub", {"e" * 40: {"hubconf.py": EVIL_HUBCONF}},
                          refs=[("master", "branch", "e" * 40)],
                          weights=[("https://example.invalid/evil.pkl", exploit())])
    assert run(MIRROR + ["install", bad, "--allow-unsafe-pickle"]).returncode == 0
    cmd = [sys.executable, "-c", LOAD_EVIL, how]
    if how == "megengine.hub.load":
        cmd = MIRROR + ["run", "--"] + cmd
    r = run(cmd, netns=True)
    assert r.returncode == 5, (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.stdout.startswith("RefusedWeightError weight https://example.invalid/evil.pkl ("
                               ), r.stdout
    assert "refused when loaded: numpy.dtype('O8', False, True): only a plain number " \
           "type" in r.stdout


# --- what MegEngine saves loads as megengine.load gives it -----------------------------


def _checkpoints():
    q8 = megengine.core.tensor.dtype.qint8(0.5)
    return {
        "demo mlp": make_weights("mlp", 2),
        "demo small_cnn": make_weights("small_cnn", 3),
        "Conv2d": lambda: M.Conv2d(3, 4, 3).state_dict(),
        "tensors": lambda: {"t": megengine.tensor([1.0, 2.0]),
                            "p": megengine.Parameter(np.ones((2, 2), "f4")),
                            "i": megengine.tensor(np.arange(6, dtype="i4").reshape(2, 3)),
                            "h": megengine.tensor(np.ones(3, "f2")),
                            "s": megengine.tensor(np.float32(2.5))},
        "nested": lambda: {"model": collections.OrderedDict(
            a=np.arange(10, dtype=">i4"), b=np.asfortranarray(np.ones((3, 5), "f8")),
            c=np.zeros(0, "u1"), d=np.array(3.5, "f2"), e=np.ones(3000, "c16"),
            f=np.ones((2, 3), bool), q=np.zeros(3, q8)),
            "epoch": 3, "lr": 0.1, "step": np.int64(7), "names": ["a", "b", ("c", 1)],
            "misc": [None, True, b"xx", "\u00e9", {"k": [1, 2.5]}], "shared": [[1]] * 2},
        "optimizer": lambda: _optimizer_state(),
    }


def _optimizer_state():
    model = M.Linear(4, 2)
    opt = megengine.optimizer.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("name", list(_checkpoints()))
def test_megengine_checkpoints_load_as_megengine_load_gives_them(child, name, protocol):
    obj = _checkpoints()[name]
    if isinstance(obj, bytes):
        data = pickle.dumps(megengine.load(io.BytesIO(obj)), protocol) if protocol != 4 else obj
    else:
        buf = io.BytesIO()
        megengine.save(obj(), buf, pickle_protocol=protocol)
        data = buf.getvalue()
    assert unsafe_in(io.BytesIO(data)) == []
    assert child.load(data) == "loaded"


def test_a_resnet50_sized_checkpoint_loads_and_stays_far_below_the_caps(child):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_load import resnet50_state

    buf = io.BytesIO()
    megengine.save(resnet50_state(), buf)
    data = buf.getvalue()
    ops = list(pickletools.genops(data))
    memo = sum(op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT") for op, _, _ in ops)
    assert len(ops) * 400 < MAX_OPCODES and memo * 400 < MAX_MEMO
    assert unsafe_in(io.BytesIO(data)) == []
    assert child.load(data) == "loaded"
    got = unpickler.loads(data)  # safe: just checked
    assert list(got) == list(megengine.load(io.BytesIO(data)))


@pytest.mark.parametrize("code", list(DTYPES))
def test_the_dtype_rule_is_what_numpy_pickles(code):
    d = np.dtype(code)
    order = "|" if d.itemsize == 1 else "<"
    assert d.__reduce__() == (np.dtype, (code, False, True),
                              (3, order, None, None, None, -1, -1, 0))
    assert DTYPES[code] == d.itemsize


def test_the_allowed_globals_are_what_the_scan_allows():
    from mirror.safety import ALLOWED

    assert ALLOWED == frozenset(GLOBALS)


# --- hostile streams: refused by the loader and by the scan ----------------------------

F4 = dtype("f4", plain_state())
ARR = array(F4, (2,), b"\0" * 8)
DEEP = b")" + b"\x85" * 100_000  # a tuple in a tuple... 100,000 deep
HOSTILE = {
    "the finding": exploit(),
    "object flags on a number type": stream(array(dtype("i8", plain_state("<", 63)), (1,),
                                                  b"A" * 8)),
    "a dtype of objects": stream(dtype("O8")),
    "numpy's shared float32 (copy=False), rebuilt": stream(
        dtype("f4", plain_state(">"), copy=b"\x89")),
    "a dtype rebuilt after an array used it": stream(
        F4 + b"\x94" + b"0" + array(b"h\x00", (1,), b"\0" * 4) + b"0"
        + b"h\x00" + tup(*plain_state("|", 63)) + b"b"),
    "a dtype rebuilt twice": stream(F4 + tup(*plain_state(">")) + b"b"),
    "a dtype with fields": stream(dtype("f4", (integer(3), text("<"), b"N",
                                               tup(text("a")), b"N", integer(-1),
                                               integer(-1), integer(0)))),
    "a dtype with a wrong size": stream(dtype("f4", (integer(3), text("<"), b"N", b"N",
                                                     b"N", integer(64), integer(1),
                                                     integer(0)))),
    "an array with fewer bytes than its shape": stream(array(F4, (1000,), b"\0" * 8)),
    "an array with a huge shape": stream(array(F4, (2**40, 2**40, 0), b"")),
    "an array built twice": stream(ARR + tup(integer(1), tup(integer(100)), F4, b"\x89",
                                             raw(b"\0" * 400)) + b"b"),
    "an array from a list (objects)": stream(
        array(b"", (), b"", build=False) + tup(integer(1), tup(integer(1)), F4, b"\x89",
                                               b"](K\x01e") + b"b"),
    "numpy.ndarray called with a buffer": stream(
        glob("numpy", "ndarray") + tup(tup(integer(2)), text("f4"), raw(b"\0" * 8))
        + b"\x81"),
    "_frombuffer with a wrong length": stream(
        glob("numpy.core.numeric", "_frombuffer") + tup(raw(b"\0" * 4), F4,
                                                        tup(integer(4)), text("C")) + b"R"),
    "a scalar of too few bytes": stream(glob("numpy.core.multiarray", "scalar")
                                        + tup(F4, raw(b"\0")) + b"R"),
    "a tensor of an array not yet built": stream(
        glob("megengine.tensor", "Tensor") + tup(array(b"", (), b"", build=False), F4,
                                                 text("xpux:0")) + b"\x81"),
    "a tensor on a made-up device": stream(
        glob("megengine.tensor", "Tensor") + tup(ARR, F4, text("multithread99999:0"))
        + b"\x81"),
    "a tensor whose state carries data": stream(
        glob("megengine.tensor", "Tensor") + tup(ARR, F4, text("xpux:0")) + b"\x81"
        + b"}(" + text("data") + b"N" + b"ub"),
    "SETITEM on an array": stream(ARR + b"(" + integer(0) + integer(7) + b"u"),
    "BUILD on an OrderedDict": stream(glob("collections", "OrderedDict") + b")R"
                                      + b"}(" + text("items") + b"Nub"),
    "BUILD on a class": stream(glob("megengine.tensor", "Tensor") + b"N}("
                               + text("dmap_callback") + b"N" + b"u\x86b"),
    "_codecs.encode to compute a name": stream(glob("_codecs", "encode")
                                               + tup(text("bf"), text("rot13")) + b"R"),
    "NEWOBJ_EX with keyword arguments": stream(
        glob("megengine.tensor", "Tensor") + tup(ARR, F4, text("xpux:0"))
        + b"}(" + text("no_cache") + b"\x88u" + b"\x92"),
    "INST of numpy.dtype": stream(b"(" + text("O8") + b"inumpy\ndtype\n", 4),
    "OBJ of numpy.dtype": stream(b"(" + glob("numpy", "dtype") + text("O8") + b"o"),
    "a copyreg extension": stream(b"\x82\x01"),
    "a key nested 100,000 deep (crashes stock pickle's hash)": stream(
        b"\x8f(" + DEEP + b"\x90"),
    "a dict key that is a dtype": stream(b"}" + F4 + b"Ns"),
    "os.system": pickle.dumps(__import__("os").system, 4),
    # Found by the property test below: MegEngine segfaults on a quantized dtype
    # without its name, in a tensor (or later, in load_state_dict).
    "a quantized dtype without its name": stream(dtype("i1", quantized(
        b"}(" + text("scale") + b"G" + struct.pack(">d", 0.5) + b"u"))),
    "a tensor of a quantized dtype": stream(
        glob("megengine.tensor", "Parameter")
        + tup(glob("numpy.core.numeric", "_frombuffer")
              + tup(raw(b"\1"), dtype("b1", plain_state("|")), tup(integer(1)), text("C"))
              + b"R",
              dtype("i1", quantized(b"}(" + text("name") + text("QuantizedS8") + text("scale")
                                    + b"G" + struct.pack(">d", 0.5) + b"u")),
              text("cpux")) + b"\x81"),
}


# Refused by the loader, and let pass by the scan: stock pickle raises, or does no harm.
HARMLESS_IN_STOCK = {
    "a persistent id": stream(b"N" + b"Q"),  # megengine.load has no persistent_load
    "APPEND on a bytearray": stream(glob("builtins", "bytearray") + tup(raw(b"ab")) + b"R"
                                    + integer(65) + b"a"),
    "a dict key of 2,000 items": stream(b"}(" + b"K\x01" * 2000 + b"tNs"),
}


@pytest.mark.parametrize("name", list(HOSTILE) + list(HARMLESS_IN_STOCK))
def test_a_hostile_stream_is_refused_by_the_loader_and_the_scan(child, name):
    data = HOSTILE.get(name) or HARMLESS_IN_STOCK[name]
    outcome = child.load(data)
    assert outcome.startswith("refused "), (outcome, _dis(data))
    if name in HOSTILE:
        assert unsafe_in(io.BytesIO(data)), _dis(data)
    else:
        assert unsafe_in(io.BytesIO(data)) == []
    # The scan of a stream of blocks (verify, install) agrees with that of a file (pack).
    blocks = BlockReader(iter([data[i:i + 7] for i in range(0, len(data), 7)]))
    assert unsafe_in(blocks) == unsafe_in(io.BytesIO(data))


def test_a_truncated_or_broken_checkpoint_is_refused_cleanly(child):
    data = make_weights("mlp", 1)
    for cut in range(0, len(data), 37):
        assert child.load(data[:cut]).startswith("refused "), cut
    assert child.load(b"cat dog bird fish\n").startswith("refused ")


# --- the scan's caps --------------------------------------------------------------------


def test_a_flood_of_opcodes_is_refused_in_seconds_with_flat_memory(tmp_path, home):
    """The attack review: b"\\x80\\x02" + b"N" * 10**7 + b"." took 24 s and 117 MB in
    mirror verify (one stack entry per opcode). Now a cap ends the scan."""
    flood = b"\x80\x02" + b"N" * 10**7 + b"."
    bad = handmade_bundle(tmp_path / "flood.hub", {"e" * 40: {"hubconf.py": "x = 1\n"}},
                          refs=[("master", "branch", "e" * 40)],
                          weights=[("https://example.invalid/flood.pkl", flood)])
    start = time.monotonic()
    r = run(["/usr/bin/time", "-f", "%M"] + MIRROR + ["verify", bad])
    seconds = time.monotonic() - start
    assert r.returncode == 5, r.stderr
    assert f"<beyond the scan's limits>.a stack of more than {MAX_STACK:,} entries" in r.stderr
    peak_mib = int(r.stderr.strip().splitlines()[-1]) / 1024
    assert seconds < 20 and peak_mib < 200, (seconds, peak_mib)
    for body, cap in ((b"N0" * (MAX_OPCODES // 2 + 10), f"more than {MAX_OPCODES:,} opcodes"),
                      (b"N" + b"\x94" * (MAX_MEMO + 10),
                       f"a memo of more than {MAX_MEMO:,} entries")):
        found = unsafe_in(io.BytesIO(b"\x80\x04" + body + b"."))
        assert found == [f"<beyond the scan's limits>.{cap}"]


class _Counting(io.BytesIO):
    """A file that counts the bytes read, not those skipped with seek."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = super().read(n)
        self.read_bytes += len(data)
        return data


@pytest.mark.parametrize("opcode", [b"\x8b", b"\x8e", b"\x96", b"X", b"\x8d"])
def test_big_payloads_are_skipped_not_read(opcode):
    """LONG4 numbers, as bytes and text, are passed over with the reader's seek."""
    size = 50 << 20
    width = 8 if opcode in (b"\x8e", b"\x96", b"\x8d") else 4
    data = b"\x80\x04" + opcode + size.to_bytes(width, "little") + b"\x01" * size + b"0N."
    fh = _Counting(data)
    assert unsafe_in(fh) == []
    assert fh.read_bytes < 100
    assert unsafe_in(BlockReader(iter([data[i:i + (1 << 20)]
                                       for i in range(0, len(data), 1 << 20)]))) == []


# --- the property: every stream is refused cleanly, or loads as megengine.load ---------

CODES = list(DTYPES) + ["O8", "V4", "U3", "S3", "M8", "f16"]
TEXTS = CODES + ["<", ">", "|", "=", "latin1", "latin-1", "rot13", "xpux:0", "cpu0",
                 "gpu0", "cpux:999", "C", "F", "b", "qparams", "data", "", "\u00e9"]
DEVICES = ["xpux:0", "cpu0", "cpux", "cpu0:0", "gpu0", "foo", "", "cpu99999999"]
EXTRA_GLOBALS = [("os", "system"), ("builtins", "getattr"), ("numpy", "frombuffer"),
                 ("numpy.core.multiarray", "_reconstruct")]
INTERESTING_INTS = [0, 1, 2, 3, 4, 8, 16, 63, 64, -1, 255, 2**31 - 1, 2**40, -2**63]


# Every strategy is made once: hypothesis draws fast from strategies it has seen.
ATOMS = st.one_of(
    st.sampled_from([b"N", b"\x88", b"\x89", b")", b"]", b"}", b"\x8f"]),
    st.sampled_from(INTERESTING_INTS).map(integer),
    st.integers(-2**70, 2**70).map(integer),
    # Not st.floats(): MegEngine turns subnormals off in this process.
    st.sampled_from([0.0, -0.0, 0.5, 1e300, -math.inf, math.inf, math.nan, 5e-324])
    .map(lambda f: b"G" + struct.pack(">d", f)),
    st.sampled_from(TEXTS).map(text),
    st.binary(max_size=24).map(raw),
)
GLOBAL_FRAGMENTS = st.tuples(st.sampled_from(sorted(GLOBALS) + EXTRA_GLOBALS),
                             st.booleans()).map(lambda t: glob(t[0][0], t[0][1], t[1]))
GETS = st.integers(0, 5).map(lambda i: b"h" + bytes([i]))
SMALL = st.integers(0, 5)
CHANCE = st.integers(0, 99)  # percent
SEEDS = st.integers(0, 2**32)
HALF = b"G" + struct.pack(">d", 0.5)
METADATA = st.sampled_from([
    b"N", b"}(" + text("mgb_dtype") + b"}(" + text("name") + text("QuantizedS8") + text("scale")
    + HALF + b"uu", b"}(" + text("mgb_dtype") + b"}(" + text("name") + text("Quantized8Asymm")
    + text("scale") + HALF + text("zero_point") + integer(3) + b"uu",
    b"}(" + text("mgb_dtype") + b"}(" + text("scale") + HALF + b"uu",  # no name: MegEngine crashed
    b"}(" + integer(1) + b"Nu", b"}(" + text("a") + glob("numpy", "dtype") + b"u"])
ODD_SHAPES = st.sampled_from([(2**40, 0), (2**62,), (-1,), (1,) * 40])
SHAPES = st.lists(st.integers(0, 3), max_size=3).map(tuple)
DELTAS = st.sampled_from([0, 0, 0, 0, 1, -1, 4])
FORTRAN = st.sampled_from([b"\x89", b"\x88", integer(0)])
ORDERS = st.sampled_from(["C", "F", "A"]).map(text)
TENSOR_STATES = st.sampled_from([None, b"}", b"}(" + text("qparams") + b"Nu",
                                 b"}(" + text("data") + b"Nu", b"N"])
HOW = st.sampled_from([b"\x81", b"\x81", b"R", b"}\x92"])
CALLS = st.sampled_from(["OrderedDict", "set", "frozenset", "bytearray", "complex",
                         "slice", "bytes", "encode", "scalar"])
SET_ARGS = st.sampled_from([[], [b"](" + integer(1) + text("a") + b"e"],
                            [b"]" + DEEP[:50] + b"a"]])
ENCODINGS = st.sampled_from(["latin1", "latin1", "rot13", "utf-8"]).map(text)


def _bytes(draw, n: int) -> bytes:
    return random.Random(draw(SEEDS)).randbytes(n) if n else b""


def _rare(draw, percent: int) -> bool:
    """True ``percent`` % of the time, and not for hypothesis' simplest draw (0): its
    simplest streams are then well-formed ones."""
    return draw(CHANCE) >= 100 - percent


def _memoized(draw, fragment: bytes) -> bytes:
    """``fragment``, a third of the time followed by a BINPUT (later BINGETs alias it)."""
    if _rare(draw, 33):
        fragment += b"q" + bytes([draw(SMALL)])
    return fragment


@st.composite
def _dtype(draw):
    code = draw(st.sampled_from(CODES))
    size = DTYPES.get(code, 8)
    args = [text(code), b"\x89", b"\x88"]
    if _rare(draw, 15):
        args[draw(st.integers(0, 2))] = draw(ATOMS)
    out = glob("numpy", "dtype", draw(st.booleans())) + tup(*args) + b"R"
    if draw(CHANCE) < 75:
        order = "|" if size == 1 else draw(st.sampled_from("<>"))
        state = list(plain_state(order))
        if _rare(draw, 20):  # version 4: metadata
            state[0] = integer(4)
            state.append(draw(METADATA))
        if _rare(draw, 25):  # a field changed
            state[draw(st.integers(0, len(state) - 1))] = draw(ATOMS)
        out += tup(*state) + b"b"
    return _memoized(draw, out), size


DTYPE = _dtype()


@st.composite
def _dtype_ref(draw):
    """A dtype: a new one, one from the memo, or anything."""
    how = draw(CHANCE)
    if how >= 85:
        return draw(GETS), 4
    if how >= 75:
        return draw(ATOMS), 4
    return draw(DTYPE)


DTYPE_REF = _dtype_ref()


@st.composite
def _array(draw):
    dt, size = draw(DTYPE_REF)
    shape = draw(SHAPES) if draw(CHANCE) < 94 else draw(ODD_SHAPES)
    n = size * math.prod(shape) if all(0 <= s < 64 for s in shape) else 4
    data = _bytes(draw, max(0, n + draw(DELTAS)))
    shape_frag = tup(*map(integer, shape)) if len(shape) <= 3 else \
        b"(" + b"".join(map(integer, shape)) + b"t"
    if draw(st.booleans()):
        prefix = glob("numpy.core.multiarray", "_reconstruct", draw(st.booleans()))
        args = [glob("numpy", "ndarray"), tup(integer(0)), raw(b"b")]
        if _rare(draw, 15):
            args[draw(st.integers(0, 2))] = draw(ATOMS)
        out = _memoized(draw, prefix + tup(*args) + b"R")
        if draw(CHANCE) < 85:
            body = raw(data) if draw(CHANCE) < 85 else draw(ATOMS)
            out += tup(integer(1), shape_frag, dt, draw(FORTRAN), body) + b"b"
        return out
    buf = raw(data) if draw(st.booleans()) else \
        b"\x96" + len(data).to_bytes(8, "little") + data
    return _memoized(draw, glob("numpy.core.numeric", "_frombuffer", draw(st.booleans()))
                     + tup(buf, dt, shape_frag, draw(ORDERS)) + b"R")


ARRAY = _array()


@st.composite
def _tensor(draw):
    cls = "Tensor" if draw(st.booleans()) else "Parameter"
    arr = draw(ARRAY) if draw(CHANCE) < 85 else draw(GETS)
    dt = b"N" if draw(CHANCE) < 30 else draw(DTYPE_REF)[0]
    args = tup(arr, dt, text(draw(st.sampled_from(DEVICES))))
    out = glob("megengine.tensor", cls) + args + draw(HOW)
    state = draw(TENSOR_STATES)
    return _memoized(draw, out + (state + b"b" if state is not None else b""))


@st.composite
def _call(draw):
    """One of the other allowed globals, called with arguments from the pool."""
    name = draw(CALLS)
    module = {"OrderedDict": "collections", "encode": "_codecs",
              "scalar": "numpy.core.multiarray"}.get(name, "builtins")
    if name == "scalar":
        dt, size = draw(DTYPE_REF)
        args = [dt, raw(_bytes(draw, max(0, size + draw(DELTAS))))]
    elif name == "encode":
        args = [text(draw(st.sampled_from(TEXTS))), draw(ENCODINGS)]
    elif name in ("set", "frozenset"):
        args = draw(SET_ARGS)
    else:
        args = [draw(ATOMS) for _ in range(draw(st.integers(0, 3)))]
    how = b"R" if draw(CHANCE) < 85 else b"\x81"
    out = glob(module, name, draw(st.booleans())) + tup(*args) + how
    if name == "OrderedDict" and draw(st.booleans()):
        out += b"(" + text("a") + draw(ATOMS) + b"u"
    return _memoized(draw, out)


LEAVES = st.one_of(ATOMS, ATOMS, GLOBAL_FRAGMENTS, DTYPE.map(lambda t: t[0]), ARRAY, ARRAY,
                   _tensor(), _call(), GETS)


def _containers(children):
    items = st.lists(children, max_size=4).map(b"".join)
    pairs = st.lists(st.tuples(st.one_of(ATOMS, children), children),
                     max_size=3).map(lambda ps: b"".join(k + v for k, v in ps))
    return st.one_of(
        items.map(lambda b: b"(" + b + b"l"), items.map(lambda b: b"](" + b + b"e"),
        items.map(lambda b: b"(" + b + b"t"), items.map(lambda b: b"(" + b + b"\x91"),
        items.map(lambda b: b"\x8f(" + b + b"\x90"),
        pairs.map(lambda b: b"}(" + b + b"u"), pairs.map(lambda b: b"(" + b + b"d"),
        st.tuples(children, children).map(lambda t: t[0] + t[1] + b"\x86"),
    )


VALUES = st.recursive(LEAVES, _containers, max_leaves=4)
RAW_OPS = st.sampled_from([b"0", b"2", b"1", b"a", b"s", b"b", b"R", b"\x81", b"\x85",
                           b"(", b"e", b"u", b"t", b"\x90", b"\x94", b"h\x00", b"q\x00"])
@st.composite
def pickle_streams(draw):
    parts = [draw(RAW_OPS) if _rare(draw, 10) else draw(VALUES)
             for _ in range(draw(st.integers(0, 4)))]
    body = b"(" + b"".join(parts) + b"l"
    proto = draw(st.integers(2, 5))
    if proto >= 4 and draw(st.booleans()):
        body = b"\x95" + (len(body) + 1).to_bytes(8, "little") + body + b"."
        return b"\x80" + bytes([proto]) + body
    return b"\x80" + bytes([proto]) + body + b"."


STREAMS = int(os.environ.get("MIRROR_FUZZ_STREAMS", "2000"))


def test_every_stream_is_refused_cleanly_or_loads_as_megengine_load(child):
    """Streams built from the allowed globals and opcodes (valid and broken dtypes,
    arrays, tensors, calls, memo aliasing, containers, stray opcodes), all loaded by
    one child process (restarted if one crashed it): every outcome is a clean refusal
    or megengine.load's own object."""
    counts = collections.Counter()
    start = time.monotonic()

    @settings(max_examples=STREAMS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(pickle_streams())
    def check(data):
        outcome = child.load(data)
        counts["streams"] += 1
        counts[outcome.split(" ")[0]] += 1
        assert outcome == "loaded" or outcome.startswith("refused "), \
            f"{outcome}\n{data!r}\n{_dis(data)}"

    check()
    seconds = time.monotonic() - start
    print(f"\n{counts['streams']} streams in {seconds:.1f} s: {counts['loaded']} loaded "
          f"as megengine.load, {counts['refused']} refused; {child.started} child "
          f"process(es)")
    assert counts["streams"] >= STREAMS
    assert counts["loaded"] >= STREAMS // 20  # the property is tested on real objects too
    assert seconds <= 60
