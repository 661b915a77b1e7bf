"""Weights unpickled without running code: a restricted unpickler for what
``megengine.save`` writes, and the rules it shares with the pack and install scan.

``megengine.load`` is ``pickle.load`` (with ``Tensor.dmap_callback`` set for
``map_location``): any pickle can run code, and even a pickle that imports only
numpy can crash the process with pointers of its choosing (a ``numpy.dtype``
rebuilt by BUILD with its object flags changed, then an array of raw bytes of it).
:func:`load` gives what ``megengine.load`` gives for real MegEngine checkpoints
(numpy arrays and scalars, tensors, nested dicts, lists, tuples, ``OrderedDict``)
and refuses everything else with :class:`Refused`.

In the spirit of PyTorch's ``torch/_weights_only_unpickler.py``, and of what its
published bypasses taught:

- a global is one of :data:`GLOBALS`, looked up by name in a table, never imported
  by an arbitrary name;
- every call an opcode makes (REDUCE, NEWOBJ, NEWOBJ_EX) goes to a rule of its own
  that checks its arguments: a dtype only of plain numbers (``numpy.dtype('f4',
  False, True)``, never a shared builtin descriptor), an array's shape and dtype
  against the length of its bytes, a tensor only from a finished array on a device
  MegEngine names; INST, OBJ, persistent ids, copyreg extensions and out-of-band
  buffers are refused, as MegEngine never writes them;
- BUILD (``__setstate__``) only on a dtype just made and never used (its state
  must be what numpy writes for that type: byte order and metadata, never flags,
  fields or sizes), on an array just made by ``_reconstruct`` (once: building it
  again would free memory a tensor may borrow), and on a tensor just made (an
  empty state);
- APPEND(S) only on lists, SETITEM(S) only on dicts and ``OrderedDict``, ADDITEMS
  only on sets (the stock unpickler calls ``append``/``__setitem__`` of any object);
- dict keys and set elements are strings, numbers, bytes or small tuples of them:
  hashing a tuple nested a million deep overflows the C stack of stock pickle;
- opcodes, stack and memo are capped (:data:`MAX_OPCODES`, :data:`MAX_STACK`,
  :data:`MAX_MEMO`) far above what real checkpoints use, and no payload or frame
  may claim more bytes than the file has.

:class:`Rules` holds these checks once. The loader (:func:`_unpickle`, the pickle
machine as ``pickle``'s Python implementation reads it, in closures) applies them
to real objects; the scan of :mod:`mirror.safety` applies them to stand-ins while
it reads a stream without unpickling it (``dry``), so pack and install refuse what
would be unsafe to load, with stock ``megengine.load`` too (numpy is not needed for
that). The scan lets pass what stock pickle itself raises at, or does harmlessly
(a persistent id, a wide dict key): loading refuses those as well.
"""

from __future__ import annotations

import codecs
import importlib
import io
import math
import os
import pickle
import re
import struct
from typing import IO, Any, Callable, Dict, List, Tuple

# (module, name) -> what it is, for the rules below. What megengine.save writes for
# state dicts of numpy arrays and MegEngine tensors (numpy 2 renamed numpy.core to
# numpy._core), and harmless builtins.
GLOBALS: Dict[Tuple[str, str], str] = {
    ("numpy", "dtype"): "dtype",
    ("numpy", "ndarray"): "ndarray",
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.multiarray", "scalar"): "scalar",
    ("numpy._core.multiarray", "scalar"): "scalar",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("collections", "OrderedDict"): "OrderedDict",
    ("megengine.tensor", "Tensor"): "Tensor",
    ("megengine.tensor", "Parameter"): "Tensor",
    ("_codecs", "encode"): "encode",  # how protocol 2 spells bytes
}
# Protocols 0-2 name builtins as Python 2 did.
for _module in ("builtins", "__builtin__"):
    GLOBALS.update({(_module, n): n for n in ("set", "frozenset", "bytearray", "complex",
                                               "slice", "bytes")})
ALLOWED = frozenset(GLOBALS)

# Plain number types: numpy's code -> itemsize. What numpy's own pickles give for each
# (checked against numpy in the tests): ((code, False, True), (3, byte order, None,
# None, None, -1, -1, 0)), or version 4 with a metadata dict (MegEngine's quantized
# types put their scale there).
DTYPES: Dict[str, int] = {"b1": 1, "i1": 1, "u1": 1, "i2": 2, "u2": 2, "f2": 2, "i4": 4,
                          "u4": 4, "f4": 4, "i8": 8, "u8": 8, "f8": 8, "c8": 8, "c16": 16}
# What megengine.Tensor holds (it refuses 64-bit and complex types).
TENSOR_DTYPES = frozenset({"b1", "i1", "u1", "i2", "u2", "f2", "i4", "f4"})
# MegEngine's device names (megengine.device._valid_device), with small numbers: each
# new CPU or thread-pool device starts threads.
DEVICE = re.compile(r"(?:[cxg]pu|rocm|multithread)(?:x|\d{1,2})(?::\d{1,2})?\Z")
MAX_NDIM = 32  # numpy's limit; MegEngine's tensors: 7
MAX_TENSOR_NDIM = 7
MAX_BYTES = 1 << 62  # no array may claim more

# A resnet50 state dict saved by megengine.save (267 arrays) takes 5,200 to 9,100
# opcodes, a memo of 1,400 to 2,400 entries and a stack of 550 (any dict, 2,000:
# pickle batches 1,000 items); 500 times that model, with its optimizer state, stays
# under these caps, and the scan of pack and install reaches the first in seconds.
MAX_OPCODES = 1 << 22
MAX_STACK = 1 << 20
MAX_MEMO = 1 << 20
MAX_KEY_ITEMS = 1024  # items of one dict key or set element (loading)
MAX_KEY_DEPTH = 32  # tuples within tuples of one key
MAX_HASHED = 1 << 24  # items of all keys of a stream, walked to check them
MAX_METADATA_ITEMS = 64  # string keys of a dict the scan keeps
# MegEngine's quantized types (megengine.core.tensor.dtype): name -> (numpy code, the
# largest zero point; None: symmetric, no zero point).
QUANTIZED = {"QuantizedS8": ("i1", None), "QuantizedS4": ("i1", None),
             "QuantizedS1": ("i1", None), "QuantizedS32": ("i4", None),
             "Quantized8Asymm": ("u1", 255), "Quantized4Asymm": ("u1", 15)}


class Refused(pickle.UnpicklingError):
    """The stream is not one mirror loads: what was refused, and why."""


class Stand:
    """What the scan holds for an object it does not build: a dtype, an array, a
    tensor, a numpy scalar, a global (``info`` says which)."""

    __slots__ = ("kind", "info")

    def __init__(self, kind: str, info: Any = None):
        self.kind, self.info = kind, info


class Box:
    """A dict, list or set as the scan sees it: dicts keep up to 64 string keys (a
    tensor's state, a dtype's metadata), ``lost`` once more or others came."""

    __slots__ = ("kind", "items", "lost")

    def __init__(self, kind: str):
        self.kind, self.items, self.lost = kind, {}, False


class Skipped:
    """Bytes (or text) the scan passed over without reading: only their length is
    known (None for text, whose length in characters is not)."""

    __slots__ = ("kind", "length")

    def __init__(self, kind: str, length: int | None):
        self.kind, self.length = kind, length


_ATOMS = (str, bytes, int, float, bool, type(None), complex)
UNKNOWN = Stand("unknown")  # what the scan cannot know: a value pickle would not use
_CALLS = {"dtype": ("REDUCE",), "reconstruct": ("REDUCE",), "scalar": ("REDUCE",),
          "frombuffer": ("REDUCE",), "OrderedDict": ("REDUCE",), "encode": ("REDUCE",),
          "set": ("REDUCE",), "frozenset": ("REDUCE",), "bytearray": ("REDUCE",),
          "slice": ("REDUCE",), "bytes": ("REDUCE",), "complex": ("REDUCE", "NEWOBJ"),
          "Tensor": ("NEWOBJ", "NEWOBJ_EX"), "ndarray": ()}


def _short(x: Any) -> str:
    if x is UNKNOWN:
        return "a value not known before load"
    if isinstance(x, Stand):
        return x.info if x.kind == "global" else f"a {x.kind}"
    if isinstance(x, Box):
        return f"a {x.kind}"
    if isinstance(x, (str, bytes)) or type(x) in (int, float, bool, type(None)):
        r = repr(x)
        return r if len(r) <= 40 else r[:30] + "..." + r[-6:]
    return f"a {type(x).__module__}.{type(x).__qualname__}"


class Rules:
    """The checks of every call, BUILD and container update, for one stream.

    ``dry``: the scan's mode. Arguments may be stand-ins (:class:`Stand`,
    :class:`Box`, :class:`Skipped`) and nothing is built: a call's result is a
    stand-in. Otherwise every object is real and made as unpickling would.
    Every check raises :class:`Refused`.
    """

    def __init__(self, dry: bool = False):
        self.dry = dry
        # id -> (object, kind, extra) of every object an allowed global made or is:
        # "global:<role>", "dtype-fresh", "dtype", "array-unbuilt", "array",
        # "tensor-unbuilt", "tensor", "scalar", "odict", "made". Holding the object
        # keeps its id unique for the stream's life.
        self._kinds: Dict[int, Tuple[Any, str, Any]] = {}
        self._metadata: Dict[int, Any] = {}  # id -> dtype built with metadata
        self._hashed = 0

    # --- what an object is -------------------------------------------------

    def mark(self, obj: Any, kind: str, extra: Any = None) -> Any:
        self._kinds[id(obj)] = (obj, kind, extra)
        return obj

    def kind(self, obj: Any) -> str | None:
        entry = self._kinds.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else None

    def _extra(self, obj: Any) -> Any:
        return self._kinds[id(obj)][2]

    def tracked(self, obj: Any) -> bool:
        """Made by, or being, an allowed global (the scan refuses misuse of these)."""
        return self.kind(obj) is not None

    def global_(self, name: str, role: str, obj: Any = None) -> Any:
        """The object a GLOBAL of an allowed name pushes (a stand-in when dry)."""
        if obj is None:
            obj = Stand("global", name)
        return self.mark(obj, "global:" + role, (role, name))

    # --- calls ---------------------------------------------------------------

    def call(self, func: Any, args: Any, how: str, kwargs: Any = None) -> Any:
        entry = self._kinds.get(id(func))
        _, kind, extra = entry if entry is not None and entry[0] is func else (0, None, 0)
        if kind is None or not kind.startswith("global:"):
            if self.dry and kind is None:
                return UNKNOWN  # not callable: pickle raises there, safely
            raise Refused(f"{how} of {_short(func)}, which is no allowed global")
        role, name = extra
        if how not in _CALLS[role]:
            raise Refused(f"{how} of {name}: MegEngine weights never call it so")
        if how == "NEWOBJ_EX":
            d = self._dict(kwargs)
            if d is None or d:
                raise Refused(f"NEWOBJ_EX of {name} with keyword arguments")
        if type(args) is not tuple:
            raise Refused(f"{how} of {name} with arguments that are {_short(args)}, "
                          f"not a tuple")
        return _HANDLERS[role](self, func, name, args)

    def _call_dtype(self, func, name, args):
        if not (len(args) == 3 and type(args[0]) is str and args[0] in DTYPES
                and args[1] is False and args[2] is True):
            raise Refused(f"{name}{_args(args)}: only a plain number type "
                          f"({', '.join(DTYPES)}), as numpy pickles it: (code, False, True)")
        code = args[0]
        d = Stand("dtype", code) if self.dry else func(code, False, True)
        return self.mark(d, "dtype-fresh", code)

    def _call_reconstruct(self, func, name, args):
        if not (len(args) == 3 and self.kind(args[0]) == "global:ndarray"
                and type(args[1]) is tuple and len(args[1]) == 1 and type(args[1][0]) is int
                and args[1][0] == 0 and type(args[2]) is bytes and args[2] == b"b"):
            raise Refused(f"{name}{_args(args)}: only as numpy pickles an array, "
                          f"(numpy.ndarray, (0,), b'b')")
        a = Stand("ndarray") if self.dry else func(args[0], (0,), b"b")
        return self.mark(a, "array-unbuilt")

    def _call_frombuffer(self, func, name, args):
        if len(args) != 4:
            raise Refused(f"{name} with {len(args)} arguments, not 4")
        buf, dtype, shape, order = args
        length = self._length(buf, ("bytes", "bytearray"))
        if length is False:
            raise Refused(f"{name} of {_short(buf)}, not bytes")
        code = self._use_dtype(dtype, name)
        size = _shape(shape, DTYPES[code], name)
        if length is not None and length != size:
            raise Refused(f"{name}: shape {shape} of {code} needs {size} bytes, "
                          f"not {length}")
        if not (type(order) is str and order in ("C", "F")):
            raise Refused(f"{name} in order {_short(order)}, not 'C' or 'F'")
        a = Stand("ndarray") if self.dry else func(buf, dtype, shape, order)
        return self.mark(a, "array", (code, len(shape), id(dtype) in self._metadata))

    def _call_scalar(self, func, name, args):
        if len(args) != 2:
            raise Refused(f"{name} with {len(args)} arguments, not 2")
        code = self._use_dtype(args[0], name)
        if not (type(args[1]) is bytes and len(args[1]) == DTYPES[code]):
            raise Refused(f"{name} of {code} from {_short(args[1])}, not "
                          f"{DTYPES[code]} bytes")
        s = Stand("scalar") if self.dry else func(args[0], args[1])
        return self.mark(s, "scalar")

    def _call_OrderedDict(self, func, name, args):
        if args:
            raise Refused(f"{name}{_args(args)}: only empty, filled by SETITEMS")
        return self.mark(Box("odict") if self.dry else func(), "odict")

    def _call_encode(self, func, name, args):
        if not (len(args) == 2 and args[1] in ("latin1", "latin-1")):
            raise Refused(f"{name}{_args(args)}: only (text, 'latin1'), protocol 2's bytes")
        text = args[0]
        if self.dry and isinstance(text, Skipped) and text.kind == "str":
            return Skipped("bytes", text.length)
        if type(text) is not str:
            raise Refused(f"{name} of {_short(text)}, not text")
        try:
            return text.encode("latin-1")  # what _codecs.encode(text, "latin1") gives
        except UnicodeError:
            raise Refused(f"{name}: text that is not latin-1") from None

    def _call_set(self, func, name, args):
        return self.mark(self._set(func, name, args), "made")

    _call_frozenset = _call_set

    def _set(self, func, name, args):
        box = "frozenset" if name.endswith("frozenset") else "set"
        if not args:
            return Box(box) if self.dry else func()
        items = args[0] if len(args) == 1 else None
        if self.dry and isinstance(items, Box) and items.kind == "list":
            return Box(box)
        if type(items) is not list:
            raise Refused(f"{name}{_args(args)}: only () or a list")
        for item in items:
            self.key(item, name)
        return Box(box) if self.dry else func(items)

    def _call_bytearray(self, func, name, args):
        if not args:
            data: Any = b""
        elif len(args) == 1 and (type(args[0]) is bytes or isinstance(args[0], Skipped)
                                 and args[0].kind == "bytes"):
            data = args[0]
        elif len(args) == 2 and type(args[0]) is str and args[1] in ("latin-1", "latin1"):
            try:
                data = args[0].encode("latin-1")
            except UnicodeError:
                raise Refused(f"{name}: text that is not latin-1") from None
        else:
            raise Refused(f"{name}{_args(args)}: only of bytes")
        if isinstance(data, Skipped):
            return Skipped("bytearray", data.length)
        return bytearray(data)

    def _call_bytes(self, func, name, args):
        if args:  # protocols 0-2 write b"" so, and other bytes by _codecs.encode
            raise Refused(f"{name}{_args(args)}: only ()")
        return b""

    def _call_complex(self, func, name, args):
        if not (len(args) == 2 and type(args[0]) is float and type(args[1]) is float):
            raise Refused(f"{name}{_args(args)}: only (float, float)")
        return complex(*args)

    def _call_slice(self, func, name, args):
        if not (len(args) == 3 and all(a is None or type(a) is int for a in args)):
            raise Refused(f"{name}{_args(args)}: only of ints and None")
        return slice(*args)

    def _call_Tensor(self, func, name, args):
        if len(args) != 3:
            raise Refused(f"{name} with {len(args)} arguments, not (array, dtype, device)")
        array, dtype, device = args
        if self.kind(array) != "array":
            raise Refused(f"{name} of {_short(array)}, not a finished numpy array")
        code, ndim, metadata = self._extra(array)
        if metadata or dtype is not None and id(dtype) in self._metadata:
            # MegEngine reads its quantized types from the metadata, and crashes on
            # some; megengine.save cannot write such a tensor in the first place.
            raise Refused(f"{name} of a dtype with metadata")
        if code not in TENSOR_DTYPES or ndim > MAX_TENSOR_NDIM:
            raise Refused(f"{name} of an array of {code} in {ndim} dimensions: MegEngine "
                          f"holds {', '.join(sorted(TENSOR_DTYPES))} in at most "
                          f"{MAX_TENSOR_NDIM}")
        if dtype is not None and self._use_dtype(dtype, name) not in TENSOR_DTYPES:
            raise Refused(f"{name} as {self._extra(dtype)}: not a type MegEngine holds")
        if not (type(device) is str and DEVICE.match(device)):
            raise Refused(f"{name} on device {_short(device)}, not one MegEngine names")
        if self.dry:
            return self.mark(Stand("tensor"), "tensor-unbuilt")
        try:
            t = func.__new__(func, array, dtype, device)
        except Exception as e:  # MegEngine's own refusal (a device this host lacks)
            raise Refused(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                          ) from None
        return self.mark(t, "tensor-unbuilt")

    # --- BUILD ---------------------------------------------------------------

    def build(self, obj: Any, state: Any) -> None:
        entry = self._kinds.get(id(obj))
        _, kind, extra = entry if entry is not None and entry[0] is obj else (0, None, 0)
        if kind == "dtype-fresh":
            self._build_dtype(obj, extra, state)
        elif kind == "array-unbuilt":
            self._build_array(obj, state)
        elif kind == "tensor-unbuilt":
            d = self._dict(state)
            if d is None or not set(d) <= {"qparams"} or d.get("qparams") is not None:
                raise Refused(f"BUILD of a tensor with {_short(state)}: only an empty state")
            if not self.dry:
                obj.__setstate__(state)
            self.mark(obj, "tensor")
        elif self.dry and kind is None:
            return  # plain data: pickle raises there, safely
        else:
            what = {"dtype": "a dtype already built or used", "array": "a finished array",
                    "tensor": "a tensor already built"}.get(kind or "", _short(obj))
            raise Refused(f"BUILD of {what}: only a new dtype, array or tensor")

    def _build_dtype(self, d: Any, code: str, state: Any) -> None:
        orders = "|" if DTYPES[code] == 1 else "<>"
        ok = (type(state) is tuple and len(state) in (8, 9) and type(state[0]) is int
              and state[0] == len(state) - 5 and type(state[1]) is str
              and len(state[1]) == 1 and state[1] in orders
              and state[2] is None and state[3] is None and state[4] is None
              and type(state[5]) is int and type(state[6]) is int and type(state[7]) is int
              and state[5] == -1 and state[6] == -1 and state[7] == 0)
        if not ok:
            raise Refused(f"BUILD of numpy.dtype('{code}') with {_args(state)}: only byte "
                          f"order {' or '.join(orders)} and metadata, (3, order, None, None, "
                          f"None, -1, -1, 0)")
        if len(state) == 9 and state[8] is not None:
            self._check_metadata(state[8], code)
            self._metadata[id(d)] = d
        if not self.dry:
            if len(state) == 9:  # its own copy: the stream's dict may be changed later
                state = state[:8] + (_plain_copy(state[8]),)
            d.__setstate__(state)
            if (d.hasobject or d.flags or d.fields is not None or d.subdtype is not None
                    or d.itemsize != DTYPES[code]):
                raise Refused(f"numpy.dtype('{code}') became {d!r} once built")
        self.mark(d, "dtype", code)

    def _check_metadata(self, meta: Any, code: str) -> None:
        """Only what MegEngine's quantized types hold (megengine.core.tensor.dtype):
        MegEngine reads it when it makes a tensor, and crashes on some other."""
        outer = self._dict(meta)
        inner = self._dict(outer.get("mgb_dtype")) if outer is not None and \
            list(outer) == ["mgb_dtype"] else None
        if inner is None:
            raise Refused(f"dtype metadata {_short(meta)}: only MegEngine's quantized "
                          f"types, {{'mgb_dtype': {{'name': ..., 'scale': ...}}}}")
        name, scale = inner.get("name"), inner.get("scale")
        base, top = QUANTIZED.get(name, (None, None)) if type(name) is str else (None, None)
        keys = {"name", "scale"} | ({"zero_point"} if top is not None else set())
        zero = inner.get("zero_point", 0)
        if not (base == code and set(inner) == keys and type(scale) is float
                and math.isfinite(scale) and type(zero) is int
                and 0 <= zero <= (top or 0)):
            raise Refused(f"dtype metadata of {code} that is no MegEngine quantized type")

    def _build_array(self, a: Any, state: Any) -> None:
        if not (type(state) is tuple and len(state) in (4, 5)):
            raise Refused(f"BUILD of an array with {_short(state)}: only (1, shape, dtype, "
                          f"is_fortran, bytes)")
        if len(state) == 5 and not (type(state[0]) is int and state[0] == 1):
            raise Refused(f"BUILD of an array with version {_short(state[0])}, not 1")
        shape, dtype, fortran, data = state[-4:]
        code = self._use_dtype(dtype, "an array's BUILD")
        size = _shape(shape, DTYPES[code], "an array's BUILD")
        if type(fortran) is not bool:
            raise Refused(f"BUILD of an array with is_fortran {_short(fortran)}")
        length = self._length(data, ("bytes",))
        if length is False:
            raise Refused(f"BUILD of an array from {_short(data)}, not bytes")
        if length is not None and length != size:
            raise Refused(f"BUILD of an array: shape {shape} of {code} needs {size} bytes, "
                          f"not {length}")
        if not self.dry:
            a.__setstate__(state)
        self.mark(a, "array", (code, len(shape), id(dtype) in self._metadata))

    # --- containers ----------------------------------------------------------

    def key(self, key: Any, where: str) -> None:
        """Refuse a dict key or set element that hashing could crash on (a tuple
        nested deep: stock pickle overflows the C stack) or take hours over, or that
        MegEngine weights never use. The scan lets wide keys of plain data pass
        (pickle hashes them safely); loading refuses them too."""
        if type(key) in _ATOMS:
            return
        todo, walked = [(key, 0)], 0
        while todo:
            k, depth = todo.pop()
            walked += 1
            if depth > MAX_KEY_DEPTH or walked > MAX_KEY_ITEMS and not self.dry \
                    or self._hashed + walked > MAX_HASHED:
                raise Refused(f"a key of {where} nested too deep or too big to hash")
            if type(k) is tuple:
                todo.extend((i, depth + 1) for i in k)
            elif type(k) in _ATOMS or self.dry and isinstance(k, Skipped):
                continue
            elif self.dry and not self.tracked(k):
                continue  # unhashable or unknown: pickle raises there, safely
            else:
                raise Refused(f"a key of {where} that is {_short(k)}")
        self._hashed += walked

    def setitems(self, target: Any, items: List[Any]) -> None:
        if not (type(target) is dict or self.kind(target) == "odict" or self.dry and
                isinstance(target, Box) and target.kind in ("dict", "odict")):
            if self.dry and not self.tracked(target):
                return  # plain data: pickle raises there, safely
            raise Refused(f"SETITEM on {_short(target)}: only on a dict")
        if len(items) % 2:
            raise Refused("SETITEMS of an odd number of items")
        for i in range(0, len(items) - 1, 2):
            self.key(items[i], "a dict")
        if not self.dry:
            for i in range(0, len(items) - 1, 2):
                target[items[i]] = items[i + 1]
            return
        for i in range(0, len(items) - 1, 2):
            if type(items[i]) is str and len(target.items) < MAX_METADATA_ITEMS:
                target.items[items[i]] = items[i + 1]
            else:
                target.lost = True

    def append(self, target: Any, items: List[Any]) -> None:
        if type(target) is list:
            target.extend(items)
        elif not (self.dry and (isinstance(target, Box) and target.kind == "list"
                                or not self.tracked(target))):
            raise Refused(f"APPEND on {_short(target)}: only on a list")

    def additems(self, target: Any, items: List[Any]) -> None:
        if not (type(target) is set or self.dry and isinstance(target, Box)
                and target.kind == "set"):
            if self.dry and not self.tracked(target):
                return  # plain data: pickle raises there, safely
            raise Refused(f"ADDITEMS on {_short(target)}: only on a set")
        for item in items:
            self.key(item, "a set")
        if not self.dry:
            target.update(items)

    def new_dict(self, items: List[Any]) -> Any:
        if len(items) % 2:
            raise Refused("DICT of an odd number of items")
        for i in range(0, len(items) - 1, 2):
            self.key(items[i], "a dict")
        if self.dry:
            box = Box("dict")
            self.setitems(box, items)
            return box
        return {items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)}

    def new_frozenset(self, items: List[Any]) -> Any:
        for item in items:
            self.key(item, "a frozenset")
        return Box("frozenset") if self.dry else frozenset(items)

    # --- helpers ---------------------------------------------------------------

    def _use_dtype(self, d: Any, where: str) -> str:
        """A dtype's code, once it is used: it may not be built after."""
        entry = self._kinds.get(id(d))
        _, kind, code = entry if entry is not None and entry[0] is d else (0, None, 0)
        if kind != "dtype":
            if kind != "dtype-fresh":
                raise Refused(f"{where} with dtype {_short(d)}, not a plain numpy.dtype")
            self._kinds[id(d)] = (d, "dtype", code)
        if not self.dry and d.hasobject:  # never, by the rules above: a last guard
            raise Refused(f"{where} with an object dtype")
        return code

    def _length(self, data: Any, kinds: Tuple[str, ...]) -> Any:
        """The length of bytes (None: unknown, in the scan), or False: not bytes."""
        if type(data) is bytes and "bytes" in kinds or \
                type(data) is bytearray and "bytearray" in kinds:
            return len(data)
        if self.dry and isinstance(data, Skipped) and data.kind in kinds:
            return data.length
        return False

    def _dict(self, x: Any) -> Dict[Any, Any] | None:
        if type(x) is dict:
            return x
        if self.dry and isinstance(x, Box) and x.kind == "dict" and not x.lost:
            return x.items
        return None


_HANDLERS = {role: getattr(Rules, "_call_" + role) for role in _CALLS if role != "ndarray"}


def _plain_copy(value: Any) -> Any:
    """A copy of checked dtype metadata (a dict of a dict of plain values)."""
    if type(value) is dict:
        return {k: _plain_copy(v) for k, v in value.items()}
    return value


def _args(args: Any) -> str:
    if type(args) is not tuple:
        return f" {_short(args)}"
    return "(" + ", ".join(_short(a) for a in args[:10]) + (", ..." if len(args) > 10
                                                             else "") + ")"


def _shape(shape: Any, itemsize: int, where: str) -> int:
    """The bytes an array of ``shape`` needs, once ``shape`` is checked."""
    if type(shape) is not tuple or len(shape) > MAX_NDIM:
        raise Refused(f"{where} with shape {_args(shape)}: only a tuple of at most "
                      f"{MAX_NDIM} sizes")
    size, bound = itemsize, itemsize
    for n in shape:
        if type(n) is not int or n < 0:
            raise Refused(f"{where} with shape {_args(shape)}: only a tuple of sizes")
        size *= n
        bound *= n or 1
        if bound > MAX_BYTES:
            raise Refused(f"{where} with shape {shape}: too big")
    return size


# --- the loader ---------------------------------------------------------------------

_resolved: Dict[Tuple[str, str], Any] = {}


def _resolve(module: str, name: str) -> Any:
    key = (module, name)
    if key not in _resolved:
        real = "builtins" if module == "__builtin__" else module
        _resolved[key] = getattr(importlib.import_module(real), name)
    return _resolved[key]


def _find_class(rules: Rules, module: str, name: str, proto: int) -> Any:
    role = GLOBALS.get((module, name))
    if module == "__builtin__" and proto >= 3:
        role = None  # pickle renames Python 2's modules in protocols 0-2 only
    if role is None:
        raise Refused(f"global {module}.{name}, which MegEngine weights never use")
    try:
        obj = _resolve(module, name)
    except (ImportError, AttributeError) as e:
        raise Refused(f"global {module}.{name}: {e}") from None
    return rules.global_(f"{module}.{name}", role, obj)


def _size(file: IO[bytes]) -> int:
    """How many bytes the stream can hold at most: no payload may claim more (a tiny
    pickle must not make the loader allocate gigabytes before reading)."""
    try:
        return os.fstat(file.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    if isinstance(file, io.BytesIO):
        return file.getbuffer().nbytes
    return MAX_BYTES


def _unpickle(file: IO[bytes], rules: Rules) -> Any:
    """The pickle machine, as ``pickle``'s own Python implementation reads opcodes and
    their arguments (frames included), with every opcode that calls, builds, updates
    or hashes going through ``rules``, and opcodes MegEngine never writes refused
    (INST, OBJ, PERSID, BINPERSID, EXT1, EXT2, EXT4, NEXT_BUFFER, READONLY_BUFFER).
    One function of closures (no private API of ``pickle``), and quicker."""
    file_read, file_readline = file.read, file.readline
    size = _size(file)
    file_readinto = getattr(file, "readinto", None)
    read, readline, readinto = file_read, file_readline, file_readinto
    frame: io.BytesIO | None = None
    stack: List[Any] = []
    metastack: List[List[Any]] = []
    memo: Dict[int, Any] = {}
    push = stack.append
    result: List[Any] = []
    below_marks = 0  # items in metastack's lists, which only change as they move
    proto = 0

    def end_frame() -> None:
        nonlocal frame, read, readline, readinto
        frame, read, readline, readinto = None, file_read, file_readline, file_readinto

    def take(n: int) -> bytes:
        if n > size:
            raise Refused(f"a payload of {n:,} bytes in a stream of {size:,}")
        data = read(n)
        if len(data) == n:
            return data
        if frame is not None and not data and n:
            end_frame()
            return take(n)
        raise Refused("the pickle ends in the middle of an opcode"
                      if frame is None else "an opcode runs past the end of its frame")

    def line() -> bytes:
        data = readline()
        if frame is not None and not data:
            end_frame()
            data = readline()
        if not data.endswith(b"\n"):
            raise Refused("the pickle ends in the middle of an opcode")
        return data[:-1]

    def u8() -> int:
        return read(1)[0]  # IndexError at the end: refused

    def u32() -> int:
        return int.from_bytes(take(4), "little")

    def u64() -> int:
        return int.from_bytes(take(8), "little")

    def pop_mark() -> List[Any]:
        nonlocal stack, push, below_marks
        items = stack
        stack = metastack.pop()
        below_marks -= len(stack)
        push = stack.append
        return items

    def op_proto() -> None:
        nonlocal proto
        proto = u8()
        if proto > pickle.HIGHEST_PROTOCOL:
            raise Refused(f"unsupported pickle protocol {proto}")

    def op_frame() -> None:
        nonlocal frame, read, readline, readinto
        frame_size = u64()
        if frame is not None and frame.read(1):
            raise Refused("a frame begins before the end of the one before")
        if frame_size > size:
            raise Refused(f"a frame of {frame_size:,} bytes in a stream of {size:,}")
        frame = io.BytesIO(file_read(frame_size))
        read, readline, readinto = frame.read, frame.readline, frame.readinto

    def op_stop() -> None:
        result.append(stack.pop())

    def op_mark() -> None:
        nonlocal stack, push, below_marks
        metastack.append(stack)
        below_marks += len(stack)
        stack = []
        push = stack.append

    def op_pop() -> None:
        if stack:
            del stack[-1]
        else:
            pop_mark()

    def op_pop_mark() -> None:
        pop_mark()

    def op_dup() -> None:
        push(stack[-1])

    def op_int() -> None:
        data = line()
        push(False if data == b"00" else True if data == b"01" else int(data, 0))

    def op_long() -> None:
        data = line()
        push(int(data[:-1] if data.endswith(b"L") else data, 0))

    def op_long1() -> None:
        push(int.from_bytes(take(u8()), "little", signed=True))

    def op_long4() -> None:
        n = int.from_bytes(take(4), "little", signed=True)
        if n < 0:
            raise Refused("LONG4 with a negative length")
        push(int.from_bytes(take(n), "little", signed=True))

    def op_string() -> None:
        data = line()
        if len(data) < 2 or data[0] != data[-1] or data[0] not in b"\"'":
            raise Refused("a STRING argument not quoted")
        push(codecs.escape_decode(data[1:-1])[0].decode("ascii"))

    def op_binstring() -> None:
        n = int.from_bytes(take(4), "little", signed=True)
        if n < 0:
            raise Refused("BINSTRING with a negative length")
        push(take(n).decode("ascii"))

    def op_readinto(n: int) -> bytearray:
        if n > size:
            raise Refused(f"a payload of {n:,} bytes in a stream of {size:,}")
        buf = bytearray(n)
        if n and readinto is not None:
            got = readinto(buf)
            if got != n:
                if frame is not None and not got:
                    end_frame()
                    return op_readinto(n)
                raise Refused("the pickle ends in the middle of an opcode")
        elif n:
            buf[:] = take(n)
        return buf

    def op_global() -> None:
        module = line().decode("utf-8")
        name = line().decode("utf-8")
        push(_find_class(rules, module, name, proto))

    def op_stack_global() -> None:
        name = stack.pop()
        module = stack.pop()
        if type(name) is not str or type(module) is not str:
            raise Refused("STACK_GLOBAL of names that are not text")
        push(_find_class(rules, module, name, proto))

    def op_put() -> None:
        i = int(line())
        if i < 0:
            raise Refused("a negative PUT")
        memo[i] = stack[-1]

    def op_tuple() -> None:
        items = pop_mark()
        push(tuple(items))

    def op_list() -> None:
        items = pop_mark()
        push(items)

    def op_reduce() -> None:
        args = stack.pop()
        stack[-1] = rules.call(stack[-1], args, "REDUCE")

    def op_newobj() -> None:
        args = stack.pop()
        stack[-1] = rules.call(stack[-1], args, "NEWOBJ")

    def op_newobj_ex() -> None:
        kwargs = stack.pop()
        args = stack.pop()
        stack[-1] = rules.call(stack[-1], args, "NEWOBJ_EX", kwargs)

    def op_build() -> None:
        state = stack.pop()
        rules.build(stack[-1], state)

    def op_append() -> None:
        value = stack.pop()
        rules.append(stack[-1], [value])

    def op_appends() -> None:
        items = pop_mark()
        rules.append(stack[-1], items)

    def op_setitem() -> None:
        value = stack.pop()
        key = stack.pop()
        rules.setitems(stack[-1], [key, value])

    def op_setitems() -> None:
        items = pop_mark()
        rules.setitems(stack[-1], items)

    def op_additems() -> None:
        items = pop_mark()
        rules.additems(stack[-1], items)

    def op_dict() -> None:
        items = pop_mark()
        push(rules.new_dict(items))

    def op_frozenset() -> None:
        items = pop_mark()
        push(rules.new_frozenset(items))

    def op_short_binunicode() -> None:
        n = read(1)[0]
        data = read(n)
        if len(data) != n:
            if data:
                raise Refused("an opcode runs past the end of its frame or of the pickle")
            data = take(n)  # at the end of a frame: the rest is in the file
        push(data.decode("utf-8", "surrogatepass"))

    def op_memoize() -> None:
        memo[len(memo)] = stack[-1]

    def op_binget() -> None:
        push(memo[read(1)[0]])

    def op_binint1() -> None:
        push(read(1)[0])

    def op_tuple1() -> None:
        stack[-1] = (stack[-1],)

    def op_tuple2() -> None:
        stack[-2:] = [(stack[-2], stack[-1])]

    def op_tuple3() -> None:
        stack[-3:] = [(stack[-3], stack[-2], stack[-1])]

    ops: Dict[bytes, Callable[[], None]] = {
        pickle.PROTO: op_proto, pickle.FRAME: op_frame, pickle.STOP: op_stop,
        pickle.MARK: op_mark, pickle.POP: op_pop, pickle.POP_MARK: op_pop_mark,
        pickle.DUP: op_dup,
        pickle.NONE: lambda: push(None),
        pickle.NEWTRUE: lambda: push(True),
        pickle.NEWFALSE: lambda: push(False),
        pickle.INT: op_int,
        pickle.BININT: lambda: push(int.from_bytes(take(4), "little", signed=True)),
        pickle.BININT1: op_binint1,
        pickle.BININT2: lambda: push(int.from_bytes(take(2), "little")),
        pickle.LONG: op_long, pickle.LONG1: op_long1, pickle.LONG4: op_long4,
        pickle.FLOAT: lambda: push(float(line())),
        pickle.BINFLOAT: lambda: push(struct.unpack(">d", take(8))[0]),
        pickle.STRING: op_string, pickle.BINSTRING: op_binstring,
        pickle.SHORT_BINSTRING: lambda: push(take(u8()).decode("ascii")),
        pickle.BINBYTES: lambda: push(take(u32())),
        pickle.SHORT_BINBYTES: lambda: push(take(u8())),
        pickle.BINBYTES8: lambda: push(take(u64())),
        pickle.BYTEARRAY8: lambda: push(op_readinto(u64())),
        pickle.UNICODE: lambda: push(line().decode("raw-unicode-escape")),
        pickle.BINUNICODE: lambda: push(take(u32()).decode("utf-8", "surrogatepass")),
        pickle.SHORT_BINUNICODE: op_short_binunicode,
        pickle.BINUNICODE8: lambda: push(take(u64()).decode("utf-8", "surrogatepass")),
        pickle.EMPTY_TUPLE: lambda: push(()),
        pickle.TUPLE: op_tuple, pickle.TUPLE1: op_tuple1, pickle.TUPLE2: op_tuple2,
        pickle.TUPLE3: op_tuple3,
        pickle.EMPTY_LIST: lambda: push([]), pickle.LIST: op_list,
        pickle.EMPTY_DICT: lambda: push({}), pickle.DICT: op_dict,
        pickle.EMPTY_SET: lambda: push(set()), pickle.FROZENSET: op_frozenset,
        pickle.APPEND: op_append, pickle.APPENDS: op_appends,
        pickle.SETITEM: op_setitem, pickle.SETITEMS: op_setitems,
        pickle.ADDITEMS: op_additems,
        pickle.GET: lambda: push(memo[int(line())]),
        pickle.BINGET: op_binget,
        pickle.LONG_BINGET: lambda: push(memo[u32()]),
        pickle.PUT: op_put,
        pickle.BINPUT: lambda: memo.__setitem__(u8(), stack[-1]),
        pickle.LONG_BINPUT: lambda: memo.__setitem__(u32(), stack[-1]),
        pickle.MEMOIZE: op_memoize,
        pickle.GLOBAL: op_global, pickle.STACK_GLOBAL: op_stack_global,
        pickle.REDUCE: op_reduce, pickle.NEWOBJ: op_newobj, pickle.NEWOBJ_EX: op_newobj_ex,
        pickle.BUILD: op_build,
    }
    count = 0
    while not result:
        key = read(1)
        if not key:
            if frame is None:
                raise Refused("the pickle ends before its STOP opcode")
            end_frame()
            continue
        op = ops.get(key)
        if op is None:
            raise Refused(f"opcode {key!r}, which MegEngine weights never use")
        op()
        count += 1
        if not count & 0x3FF:
            if count > MAX_OPCODES:
                raise Refused(f"more than {MAX_OPCODES:,} opcodes")
            if len(memo) > MAX_MEMO:
                raise Refused(f"a memo of more than {MAX_MEMO:,} entries")
            if len(stack) + len(metastack) + below_marks > MAX_STACK:
                raise Refused(f"a stack of more than {MAX_STACK:,} entries")
    return result[0]


def loads(data: bytes, map_location: Any = None) -> Any:
    """:func:`load` of bytes."""
    return load(io.BytesIO(data), map_location)


def load(f: Any, map_location: Any = None) -> Any:
    """What ``megengine.load(f, map_location)`` gives for a MegEngine checkpoint, read
    by the restricted unpickler: :class:`Refused` for anything else (the reason says
    what). ``f`` is a path or a binary file."""
    if isinstance(f, (str, os.PathLike)):
        with open(f, "rb") as fh:
            return load(fh, map_location)
    try:
        from megengine.serialization import _get_callable_map_location, dmap
    except ImportError:  # no MegEngine: no tensors, and nothing to map
        return _load(f)
    with dmap(_get_callable_map_location(map_location)):
        return _load(f)


def _load(f: IO[bytes]) -> Any:
    try:
        return _unpickle(f, Rules())
    except Refused:
        raise
    except Exception as e:  # a broken stream: refused as cleanly as a hostile one
        raise Refused(f"not a pickle that loads: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
