"""Weights are pickles, and unpickling runs code: what a weight file would import is
checked, without unpickling it, against what MegEngine state dicts use.

The scan simulates the pickle machine's stack and memo over the opcode stream
(``pickletools``' own opcode table), so a global is named exactly as ``pickle``
would resolve it, also when its module and name strings come from the memo.
Large byte payloads (the arrays) are skipped over, not read: memory stays flat.
"""

from __future__ import annotations

import io
import pickletools
import warnings
from typing import IO, Any, Dict, Iterator, List, Set, Tuple

from .errors import UnsafePickleError
from .model import Manifest, Member

# What megengine.save writes for state dicts of numpy arrays and MegEngine tensors
# (checked on MegEngine 1.13 with numpy 1.x; numpy 2 renamed numpy.core to numpy._core).
ALLOWED: Set[Tuple[str, str]] = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("megengine.tensor", "Tensor"), ("megengine.tensor", "Parameter"),
    ("_codecs", "encode"),  # how protocol 2 spells bytes
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
    ("builtins", "complex"), ("builtins", "slice"),
}
_MARK = object()
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
            "SHORT_BINUNICODE", "BINUNICODE8"}
_SKIPPED = {pickletools.bytes1.name, pickletools.bytes4.name, pickletools.bytes8.name,
            pickletools.bytearray8.name}
MAX_STRING = 16 << 20  # longer strings are kept as unknown: used as a name, they fail closed
DYNAMIC = "<computed at load time>"


class NotAPickle(ValueError):
    """The stream is not a complete, well-formed pickle."""


class TooLong(NotAPickle):
    """A text argument too long to read: pickle would read it, so what follows it,
    unseen, may import anything."""


def pickle_globals(fh: IO[bytes], found: List[str] | None = None) -> List[str]:
    """Every ``module.name`` the pickle in ``fh`` would import, in order; also
    appended to ``found`` as they are met, so a caller keeps them if the stream
    turns out to be broken further on (unpickling runs what came before)."""
    stack: List[Any] = []
    memo: dict = {}
    found = [] if found is None else found
    while True:
        code = fh.read(1)
        if not code:
            raise NotAPickle("the pickle ends before its STOP opcode")
        op = pickletools.code2op.get(code.decode("latin-1"))
        if op is None:
            raise NotAPickle(f"unknown pickle opcode {code!r}")
        try:
            arg = _read_arg(op, fh)
        except TooLong:
            raise
        except (ValueError, OverflowError, OSError, EOFError) as e:  # random bytes, say
            raise NotAPickle(f"bad argument of {op.name}: {e}") from None
        name = op.name
        if name == "STOP":
            return found
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else None
            continue
        popped = _pop(stack, op)
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append(f"{module}.{attr}")
        elif name == "STACK_GLOBAL":
            module, attr = (popped + [None, None])[:2]
            # Names computed at run time (a REDUCE's result, say) cannot be checked:
            # fail closed, as an import of something unknown.
            found.append(f"{module if isinstance(module, str) else DYNAMIC}."
                         f"{attr if isinstance(attr, str) else DYNAMIC}")
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.append(f"{DYNAMIC}.copyreg-extension-{arg}")  # whatever is registered
        if name == "MARK":
            stack.append(_MARK)
        elif name == "DUP":
            stack.extend(popped + popped)
        elif name in _STRINGS:
            stack.append(arg if isinstance(arg, str) else None)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        else:
            stack.extend([None] * len(op.stack_after))


def _pop(stack: List[Any], op: pickletools.OpcodeInfo) -> List[Any]:
    """Pop what ``op`` consumes; return the items above any mark, in push order."""
    before = op.stack_before
    if pickletools.markobject in before:
        # [..., mark, slice] ops: everything down to the newest mark, then what is below.
        below = before.index(pickletools.markobject)
        while stack and stack[-1] is not _MARK:
            stack.pop()
        if stack:
            stack.pop()
        del stack[len(stack) - below:]
        return []
    n = len(before)
    popped = stack[len(stack) - n:] if n else []
    del stack[len(stack) - n:]
    return popped


def _read_arg(op: pickletools.OpcodeInfo, fh: IO[bytes]) -> Any:
    arg = op.arg
    if arg is None:
        return None
    if arg.n == pickletools.UP_TO_NEWLINE:
        # Text arguments (protocol 0): where one ends is certain, what it means is not
        # always (the C unpickler reads "0x1" or "007" as numbers, pickletools does
        # not). An argument read differently must not end the scan early, so its
        # value is then unknown, and the scan goes on as pickle would.
        lines = [fh.readline(MAX_STRING + 1)
                 for _ in range(2 if op.name in ("GLOBAL", "INST") else 1)]
        if any(len(line) > MAX_STRING for line in lines):
            raise TooLong(f"{op.name} with an argument over {MAX_STRING} bytes")
        if not all(line.endswith(b"\n") for line in lines):
            raise NotAPickle(f"{op.name} without its newline")
        if op.name in ("GLOBAL", "INST"):
            return " ".join(line[:-1].decode("utf-8", "replace") for line in lines)
        try:
            return arg.reader(io.BytesIO(lines[0]))
        except (ValueError, UnicodeDecodeError):
            return None
    if arg.name in _SKIPPED:  # array data: skip it, never hold it in memory
        size = 1 if arg.n == -5 else (arg.n if arg.n > 0 else None)
        width = {pickletools.bytes1.name: 1, pickletools.bytes4.name: 4}.get(arg.name, 8)
        length = int.from_bytes(_exact(fh, width), "little")
        fh.seek(length, 1)
        return size
    if arg.name in (pickletools.unicodestring4.name, pickletools.unicodestring8.name,
                    pickletools.string4.name):
        width = 8 if arg.name == pickletools.unicodestring8.name else 4
        length = int.from_bytes(_exact(fh, width), "little")
        if length > MAX_STRING:
            fh.seek(length, 1)
            return None
        data = _exact(fh, length)
        return data.decode("utf-8", "surrogatepass") if "unicode" in arg.name else \
            data.decode("latin-1")
    with warnings.catch_warnings():  # odd escapes in a broken STRING: not the user's news
        warnings.simplefilter("ignore", DeprecationWarning)
        return arg.reader(fh)


def _exact(fh: IO[bytes], n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise NotAPickle("the pickle ends in the middle of an opcode")
    return data


def unsafe_globals(path: str) -> List[str]:
    """The globals the weight file at ``path`` would import, when unpickled, that
    MegEngine weights never do. A file that is no pickle at all (a vocabulary, a
    JSON config) imports nothing: unpickling it fails before running any code."""
    with open(path, "rb") as fh:
        return unsafe_in(fh)


def unsafe_in(fh: IO[bytes]) -> List[str]:
    """What the pickle read from ``fh`` would import that MegEngine weights never do."""
    names: List[str] = []
    try:
        pickle_globals(fh, names)
    except TooLong as e:
        names.append(f"{DYNAMIC}.{e}")  # fail closed
    except NotAPickle:
        pass  # what came before the break is in names, and is what would run
    unsafe = {n for n in names if tuple(n.rsplit(".", 1)) not in ALLOWED}
    return sorted(n if len(n) <= 200 else n[:100] + "..." + n[-40:] for n in unsafe)


class BlockReader:
    """A forward-only file over an iterator of byte blocks, with what the scan uses:
    ``read``, ``readline`` and a forward ``seek``. Skipped bytes (array data) are
    passed over block by block, never held."""

    def __init__(self, blocks: Iterator[Any]):
        self._blocks = blocks
        self._block = memoryview(b"")

    def _fill(self) -> bool:
        if not self._block:
            block = next(self._blocks, None)
            if block is None:
                return False
            self._block = memoryview(block)
        return True

    def _take(self, n: int) -> memoryview:
        part, self._block = self._block[:n], self._block[n:]
        return part

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n != 0 and self._fill():
            part = self._take(n if n > 0 else len(self._block))
            parts.append(bytes(part))
            n -= len(part) if n > 0 else 0
        return b"".join(parts)

    def readline(self, limit: int = -1) -> bytes:
        parts, left = [], limit if limit >= 0 else float("inf")
        while left and self._fill():
            window = bytes(self._block[:int(min(left, len(self._block)))])
            at = window.find(b"\n")
            part = self._take(at + 1 if at >= 0 else len(window))
            parts.append(bytes(part))
            left -= len(part)
            if at >= 0:
                break
        return b"".join(parts)

    def seek(self, offset: int, whence: int = io.SEEK_CUR) -> None:
        if whence != io.SEEK_CUR or offset < 0:
            raise OSError("a stream of blocks only skips forward")
        while offset and self._fill():
            offset -= len(self._take(offset))


class PickleScans:
    """What the weights of a bundle would import, scanned as their bytes stream past
    (the ``scan`` of :func:`mirror.bundle.read`); ``verify`` and ``install`` both use
    it, so they refuse the same weights, and only once every digest has matched."""

    def __init__(self, bundle_path: str):
        self.bundle_path = bundle_path
        self.unsafe: Dict[str, List[str]] = {}  # weight sha256 -> what it would import

    def __call__(self, member: Member, fh: IO[bytes]) -> None:
        if member.name.startswith("weights/"):
            self.unsafe[member.sha256] = unsafe_in(fh)

    def check(self, manifest: Manifest) -> None:
        """Raise :class:`UnsafePickleError` for the first weight that would run code."""
        for w in manifest.weights:
            if self.unsafe.get(w.sha256):
                raise UnsafePickleError(f"weight {w.url} in {self.bundle_path}",
                                        self.unsafe[w.sha256])
