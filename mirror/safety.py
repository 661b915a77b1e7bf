"""Weights are pickles, and unpickling runs code: what a weight file would import,
and what it would hand to what it imports, is checked, without unpickling it,
against what MegEngine state dicts use.

The scan simulates the pickle machine's stack and memo over the opcode stream
(``pickletools``' own opcode table), so a global is named exactly as ``pickle``
would resolve it, also when its module and name strings come from the memo. The
values it can know (numbers, short strings and bytes, tuples, the lengths of long
payloads) it keeps, and every call, BUILD and container update goes through the
rules of the restricted unpickler (:class:`mirror.unpickler.Rules`, dry): a
``numpy.dtype`` rebuilt with object flags, an array whose shape does not match its
bytes, a dict key nested deep enough to crash the hash are refused here as at load.
Large payloads (the arrays) are skipped over, not read, and opcodes, stack and memo
are capped: time and memory stay flat. What exceeds a cap fails closed.
"""

from __future__ import annotations

import io
import pickletools
import warnings
from typing import IO, Any, Dict, Iterator, List, Tuple

from .errors import UnsafePickleError
from .model import Manifest, Member
from .unpickler import (
    ALLOWED,
    GLOBALS,
    MAX_MEMO,
    MAX_OPCODES,
    MAX_STACK,
    UNKNOWN,
    Box,
    Refused,
    Rules,
    Skipped,
)

__all__ = ["ALLOWED", "BlockReader", "PickleScans", "pickle_globals", "unsafe_globals",
           "unsafe_in"]

_MARK = object()
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
            "SHORT_BINUNICODE", "BINUNICODE8"}
_BYTES = {pickletools.bytes1.name: 1, pickletools.bytes4.name: 4, pickletools.bytes8.name: 8,
          pickletools.bytearray8.name: 8}
_LONGS = {pickletools.long1.name: 1, pickletools.long4.name: 4}
MAX_STRING = 16 << 20  # longer strings are kept as unknown: used as a name, they fail closed
KEPT = 256  # bytes and integers up to this many bytes are read; longer ones skipped
KEPT_TEXT = 1 << 16  # text up to this is kept (names, dtype codes); longer: its length
DYNAMIC = "<computed at load time>"
REFUSED = "<refused at load time>"
LIMITS = "<beyond the scan's limits>"


class NotAPickle(ValueError):
    """The stream is not a complete, well-formed pickle."""


class TooLong(NotAPickle):
    """A text argument too long to read: pickle would read it, so what follows it,
    unseen, may import anything."""


class _Limit(Exception):
    """A cap of the scan was exceeded."""


def pickle_globals(fh: IO[bytes], found: List[str] | None = None,
                   refused: List[str] | None = None) -> List[str]:
    """Every ``module.name`` the pickle in ``fh`` would import, in order; also
    appended to ``found`` as they are met, so a caller keeps them if the stream
    turns out to be broken further on (unpickling runs what came before). What the
    restricted unpickler's rules refuse, and any cap exceeded, is appended to
    ``refused`` (as ``<refused at load time>.why`` and ``<beyond the scan's
    limits>.which``); a cap ends the scan."""
    found = [] if found is None else found
    refused = [] if refused is None else refused
    try:
        _scan(fh, found, refused)
    except _Limit as e:
        refused.append(f"{LIMITS}.{e}")
    return found


def _scan(fh: IO[bytes], found: List[str], refused: List[str]) -> None:
    stack: List[Any] = []
    memo: Dict[Any, Any] = {}
    rules = Rules(dry=True)
    count = 0
    read = fh.read
    while True:
        code = read(1)
        if not code:
            raise NotAPickle("the pickle ends before its STOP opcode")
        op = _OPS.get(code)
        if op is None:
            raise NotAPickle(f"unknown pickle opcode {code!r}")
        name, reader, popped, step = op.name, _READERS.get(op.name), _POPS[op.name], \
            _STEPS.get(op.name)
        try:
            arg = _read_arg(op, fh) if reader is None else reader(fh)
        except TooLong:
            raise
        except (ValueError, OverflowError, OSError, EOFError) as e:  # random bytes, say
            raise NotAPickle(f"bad argument of {name}: {e}") from None
        count += 1
        if count > MAX_OPCODES:
            raise _Limit(f"more than {MAX_OPCODES:,} opcodes")
        if len(stack) > MAX_STACK:
            raise _Limit(f"a stack of more than {MAX_STACK:,} entries")
        if name == "STOP":
            return
        if name in _PUTS:
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else UNKNOWN
            if len(memo) > MAX_MEMO:
                raise _Limit(f"a memo of more than {MAX_MEMO:,} entries")
            continue
        if name in _GETS:
            stack.append(memo.get(arg, UNKNOWN))
            continue
        if popped is None:
            below, items = _pop_to_mark(stack, op)
        elif popped:
            below = stack[-popped:]
            del stack[-popped:]
            if len(below) < popped:
                below = [UNKNOWN] * (popped - len(below)) + below
            items = []
        else:
            below = items = []
        if step is None:  # a value: the argument, or a constant
            if name in _CONSTANTS:
                stack.append(_CONSTANTS[name])
            elif op.stack_after:
                stack.append(UNKNOWN if arg is None else arg)
            continue
        try:
            after = step(arg, below, items, rules, found)
        except Refused as e:
            # A value the scan could not know comes from what it reported already, or
            # from what pickle raises at: a refusal because of it adds nothing.
            if not _unknown_in(below) and not _unknown_in(items):
                reason = str(e)
                refused.append(f"{REFUSED}."
                               f"{reason if len(reason) <= 160 else reason[:157] + '...'}")
            # What stays on the stack (a dict, a list, BUILD's object), else unknown.
            keep = below[:1] if name in _KEEPS else []
            after = keep + [UNKNOWN] * (len(op.stack_after) - len(keep))
        stack.extend(after)


def _unknown_in(values: List[Any], depth: int = 3) -> bool:
    """Whether an operand, or a tuple in one (a call's arguments, a BUILD's state), is
    a value the scan does not know."""
    for v in values:
        if v is UNKNOWN or depth and type(v) is tuple and _unknown_in(list(v[:16]), depth - 1):
            return True
    return False


_OPS = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_KEEPS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}
# How many operands each opcode pops (None: down to a mark).
_POPS = {op.name: None if pickletools.markobject in op.stack_before else len(op.stack_before)
         for op in pickletools.opcodes}
_FIXED = {pickletools.uint1.name: 1, pickletools.uint2.name: 2, pickletools.uint4.name: 4,
          pickletools.int4.name: 4, pickletools.uint8.name: 8}


def _fixed(width: int, signed: bool) -> Any:
    def reader(fh: IO[bytes]) -> int:
        return int.from_bytes(_exact(fh, width), "little", signed=signed)
    return reader


# Fast readers of the arguments real checkpoints are made of (the rest: _read_arg).
_READERS = {op.name: _fixed(_FIXED[op.arg.name], op.arg.name == pickletools.int4.name)
            for op in pickletools.opcodes if op.arg is not None and op.arg.name in _FIXED}
_READERS.update({op.name: lambda fh: None for op in pickletools.opcodes if op.arg is None})


def _step_tuple(arg, below, items, rules, found):
    return [tuple(items)]


def _step_small_tuple(arg, below, items, rules, found):
    return [tuple(below)]


def _step_global(arg, below, items, rules, found):
    module, _, attr = str(arg).partition(" ")
    return [_global(rules, found, module, attr)]


def _step_inst(arg, below, items, rules, found):
    module, _, attr = str(arg).partition(" ")
    if rules.tracked(_global(rules, found, module, attr)):
        raise Refused(f"INST of {module}.{attr}: MegEngine weights never call it so")
    return [UNKNOWN]


def _step_stack_global(arg, below, items, rules, found):
    module, attr = below
    # Names computed at run time (a REDUCE's result, say) cannot be checked: fail
    # closed, as an import of something unknown.
    return [_global(rules, found, module if isinstance(module, str) else DYNAMIC,
                    attr if isinstance(attr, str) else DYNAMIC)]


def _step_ext(arg, below, items, rules, found):
    found.append(f"{DYNAMIC}.copyreg-extension-{arg}")  # whatever is registered
    return [UNKNOWN]


def _step_obj(arg, below, items, rules, found):
    if items and rules.tracked(items[0]):
        kind = rules.kind(items[0]) or ""
        raise Refused(f"OBJ of {kind[7:] if kind.startswith('global:') else 'an object'}: "
                      f"MegEngine weights never call it so")
    return [UNKNOWN]


def _updates(method: str, with_items: bool) -> Any:
    def step(arg, below, items, rules, found):
        getattr(rules, method)(below[0], items if with_items else below[1:])
        return below[:1]
    return step


def _calls(how: str) -> Any:
    def step(arg, below, items, rules, found):
        return [rules.call(below[0], below[1], how, below[2] if len(below) > 2 else None)]
    return step


def _step_build(arg, below, items, rules, found):
    rules.build(below[0], below[1])
    return below[:1]


def _pushes(value: Any) -> Any:
    def step(arg, below, items, rules, found):
        return [value() if callable(value) else value]
    return step


# What each opcode that is not a plain value does with what it popped: ``below`` (the
# operands under any mark, or all of them, in push order) and ``items`` (those above
# the mark). PROTO, FRAME, POP, POP_MARK push nothing; PERSID, BINPERSID and
# NEXT_BUFFER push what pickle would raise at (MegEngine's load has no persistent ids
# or buffers).
_STEPS = {
    "MARK": _pushes(_MARK), "DUP": lambda arg, below, *_: below + below,
    "TUPLE": _step_tuple, "TUPLE1": _step_small_tuple, "TUPLE2": _step_small_tuple,
    "TUPLE3": _step_small_tuple,
    "EMPTY_LIST": _pushes(lambda: Box("list")), "LIST": _pushes(lambda: Box("list")),
    "EMPTY_DICT": _pushes(lambda: Box("dict")),
    "DICT": lambda arg, below, items, rules, found: [rules.new_dict(items)],
    "EMPTY_SET": _pushes(lambda: Box("set")),
    "FROZENSET": lambda arg, below, items, rules, found: [rules.new_frozenset(items)],
    "APPEND": _updates("append", False), "APPENDS": _updates("append", True),
    "SETITEM": _updates("setitems", False), "SETITEMS": _updates("setitems", True),
    "ADDITEMS": _updates("additems", True),
    "GLOBAL": _step_global, "INST": _step_inst, "STACK_GLOBAL": _step_stack_global,
    "EXT1": _step_ext, "EXT2": _step_ext, "EXT4": _step_ext, "OBJ": _step_obj,
    "REDUCE": _calls("REDUCE"), "NEWOBJ": _calls("NEWOBJ"), "NEWOBJ_EX": _calls("NEWOBJ_EX"),
    "BUILD": _step_build, "READONLY_BUFFER": lambda arg, below, *_: below,
    "PROTO": lambda *_: [], "FRAME": lambda *_: [], "POP": lambda *_: [],
    "POP_MARK": lambda *_: [],
    "PERSID": _pushes(UNKNOWN), "BINPERSID": _pushes(UNKNOWN),
    "NEXT_BUFFER": _pushes(UNKNOWN),
}


def _global(rules: Rules, found: List[str], module: str, attr: str) -> Any:
    found.append(f"{module}.{attr}")
    role = GLOBALS.get((module, attr))
    return UNKNOWN if role is None else rules.global_(f"{module}.{attr}", role)


def _pop_to_mark(stack: List[Any], op: pickletools.OpcodeInfo) -> Tuple[List[Any], List[Any]]:
    """Pop what a [..., mark, slice] opcode consumes: everything down to the newest
    mark, then what is below it: (the operands below the mark, in push order; the
    items above it)."""
    n_below = op.stack_before.index(pickletools.markobject)
    at = len(stack) - 1
    while at >= 0 and stack[at] is not _MARK:
        at -= 1
    items = stack[at + 1:]
    del stack[max(at, 0):]
    below = stack[len(stack) - n_below:] if n_below else []
    del stack[len(stack) - n_below:]
    below = [UNKNOWN] * (n_below - len(below)) + below
    return below, items if at >= 0 else []  # no mark: pickle raises there


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
        if len(lines[0]) > KEPT_TEXT:
            return Skipped("str", None)
        try:
            return arg.reader(io.BytesIO(lines[0]))
        except (ValueError, UnicodeDecodeError):
            return None
    if arg.name in _BYTES:  # array data: skip it, never hold it in memory
        length = int.from_bytes(_exact(fh, _BYTES[arg.name]), "little")
        kind = "bytearray" if arg.name == pickletools.bytearray8.name else "bytes"
        if length > KEPT:
            fh.seek(length, 1)
            return Skipped(kind, length)
        data = _exact(fh, length)
        return bytearray(data) if kind == "bytearray" else data
    if arg.name in _LONGS:  # a number of up to 2**32 bytes: big ones skipped
        length = int.from_bytes(_exact(fh, _LONGS[arg.name]), "little",
                                signed=arg.name == pickletools.long4.name)
        if length < 0:
            raise NotAPickle("LONG4 with a negative length")
        if length > KEPT:
            fh.seek(length, 1)
            return None
        return int.from_bytes(_exact(fh, length), "little", signed=True)
    if arg.name in (pickletools.unicodestring4.name, pickletools.unicodestring8.name,
                    pickletools.string4.name):
        width = 8 if arg.name == pickletools.unicodestring8.name else 4
        length = int.from_bytes(_exact(fh, width), "little")
        if length > KEPT_TEXT:
            fh.seek(length, 1)
            return Skipped("str", None)
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
    refused: List[str] = []
    try:
        pickle_globals(fh, names, refused)
    except TooLong as e:
        names.append(f"{DYNAMIC}.{e}")  # fail closed
    except NotAPickle:
        pass  # what came before the break is in names, and is what would run
    unsafe = {n for n in names if tuple(n.rsplit(".", 1)) not in ALLOWED} | set(refused)
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
