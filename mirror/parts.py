"""Bundles in parts (``--split-size``): files that fit a medium, each verifiable alone.

A bundle cut into parts is the bundle's zstd frames, cut where a part is full
(a frame that would cross the line is ended there and the member goes on in a
new frame of the next part), each part opened by a **part header**: a zstd
skippable frame, which ``zstd``, ``tar --zstd`` and ``cat`` pass over. So the
parts concatenated in order are one bundle that standard tools read, and
``mirror install`` reads the parts as they are, in any order, without
reassembling them anywhere.

A part header carries the bundle's manifest (and its signature) and the
**table** of every part's payload (the bytes after its header): its size and
sha256, signed by the same key as the manifest. So one part, alone, can be
checked against a table its signer vouched for (``mirror verify OUT.003``), and
an install from all of them checks every part's payload as it streams past, as
well as every member against the manifest as for any bundle.

This module is the layer under :mod:`mirror.bundle`: writing, it is where the
frames go (:class:`PartWriter`); reading, it strips and checks the headers
(:class:`Unparted`), so the bundle reader sees a plain bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Sequence, Tuple, Union

from .errors import BundleError, MirrorError, UsageError, unreadable_bundle
from .hashing import CHUNK, sha256_bytes
from .signing import PARTS_TABLE
from .sizes import parse_size

MAGIC = (0x184D2A5E).to_bytes(4, "little")  # a zstd skippable frame (0x184D2A5?)
TAG = b"mge-mirror-part\n"
FORMAT = "mge-mirror-parts"
FORMAT_VERSION = 1
MAX_SIGNATURE = 4 << 10  # a signature document is a few hundred bytes
MAX_HEADER = (64 << 20) + (8 << 20)  # the manifest's limit, and the rest of a header
MAX_PARTS = 99_999
MIN_SPLIT = 1 << 20
HEADER_FIELDS = {"format_version", "index", "table_size", "table_signature_size",
                 "manifest_size", "signature_size"}

def split_size(text: str | None, output: str) -> int | None:
    """``--split-size`` as bytes (None: not split), for writing to ``output``."""
    if text is None:
        return None
    if output == "-":
        raise UsageError("--split-size writes part files: name them with -o FILE, not -o -")
    return parse_size(text)


def part_name(output: str, index: int, count: int) -> str:
    """``OUT.001``, ... (wider when there are over 999 parts, so names sort in order)."""
    return f"{output}.{index:0{max(3, len(str(count)))}d}"


# --- the header ----------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """Every part's payload, in order: its size and sha256; and whose parts they are."""

    bundle: str  # the bundle's id, the sha256 of its manifest
    parts: Tuple[Tuple[int, str], ...]  # (size, sha256) of each payload

    def to_bytes(self) -> bytes:
        return json.dumps({"bundle": self.bundle, "format": FORMAT,
                           "parts": [{"sha256": s, "size": n} for n, s in self.parts]},
                          sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Table:
        try:
            doc = json.loads(data)
            if set(doc) != {"bundle", "format", "parts"} or doc["format"] != FORMAT:
                raise ValueError("not a table of parts")
            # (other fields anywhere fail the spelling check below)
            table = cls(_hex(doc["bundle"]), tuple(
                (_size(p["size"]), _hex(p["sha256"])) for p in doc["parts"]))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise BundleError(where, f"its table of parts is malformed "
                                     f"({str(e)[:200]})") from None
        if any(n == 0 for n, _ in table.parts):
            raise BundleError(where, "its table lists a part with no payload")
        if not 1 <= len(table.parts) <= MAX_PARTS:
            raise BundleError(where, f"its table lists {len(table.parts)} parts")
        if table.to_bytes() != data:  # one spelling: what is signed is what is read
            raise BundleError(where, "its table of parts is not written as mirror writes it")
        return table


def _hex(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"{str(value)[:80]!r} is not a sha256")
    return value


def _size(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise ValueError(f"{str(value)[:40]!r} is not a size")
    return value


@dataclass(frozen=True)
class Header:
    """A part's header, as read from its skippable frame."""

    index: int  # from 1
    table: Table
    table_bytes: bytes = field(repr=False)
    table_signature: bytes | None = field(repr=False)
    manifest_bytes: bytes = field(repr=False)
    signature: bytes | None = field(repr=False)
    size: int = 0  # of the whole frame: where the payload starts

    @property
    def count(self) -> int:
        return len(self.table.parts)

    @property
    def bundle_id(self) -> str:
        return self.table.bundle

    @property
    def payload(self) -> Tuple[int, str]:
        """This part's payload: its size and sha256, as the table says."""
        return self.table.parts[self.index - 1]

    def same_bundle(self, other: Header) -> bool:
        """Everything but the index is the same: one bundle, one table, one signature."""
        return (self.table_bytes, self.table_signature, self.manifest_bytes,
                self.signature) == (other.table_bytes, other.table_signature,
                                    other.manifest_bytes, other.signature)


def header_frame(index: int, size: int, table: bytes, table_signature: bytes | None,
                 manifest: bytes, signature: bytes | None) -> bytes:
    """The skippable frame of part ``index``, exactly ``size`` bytes (zeros fill it)."""
    fields = {"format_version": FORMAT_VERSION, "index": index, "table_size": len(table),
              "table_signature_size": len(table_signature or b""),
              "manifest_size": len(manifest), "signature_size": len(signature or b"")}
    body = TAG + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"\n" \
        + table + (table_signature or b"") + manifest + (signature or b"")
    if len(body) + 8 > size:
        raise ValueError(f"part header of {len(body) + 8} bytes, over the {size} reserved")
    return MAGIC + (size - 8).to_bytes(4, "little") + body + bytes(size - 8 - len(body))


def parse_header(frame: bytes, where: str) -> Header:
    """The header in ``frame`` (the whole skippable frame), every field checked: what
    a header may hold is exactly what :func:`header_frame` writes."""
    if frame[:4] != MAGIC or int.from_bytes(frame[4:8], "little") != len(frame) - 8:
        raise BundleError(where, "not a part header")
    body = memoryview(frame)[8:]
    if bytes(body[:len(TAG)]) != TAG:
        raise BundleError(where, "a skippable zstd frame that is not mirror's part header")
    end = bytes(body[len(TAG):len(TAG) + 1024]).find(b"\n")
    try:
        fields = json.loads(bytes(body[len(TAG):len(TAG) + end])) if end >= 0 else None
        if not isinstance(fields, dict) or set(fields) != HEADER_FIELDS:
            raise ValueError
        sizes = [_size(fields[k]) for k in ("table_size", "table_signature_size",
                                             "manifest_size", "signature_size")]
        index = _size(fields["index"])
    except (ValueError, TypeError, RecursionError):
        raise BundleError(where, "its part header is malformed") from None
    if fields["format_version"] != FORMAT_VERSION:
        raise BundleError(where, f"parts of format version {fields['format_version']!r}; "
                                 f"this mirror reads version {FORMAT_VERSION}: upgrade mirror")
    at = len(TAG) + end + 1
    pieces = []
    for n in sizes:
        pieces.append(bytes(body[at:at + n]))
        at += n
    if at > len(body) or any(body[at:]):
        raise BundleError(where, "its part header holds more, or less, than it says")
    table_bytes, table_sig, manifest, signature = pieces
    table = Table.from_bytes(table_bytes, where)
    if not 1 <= index <= len(table.parts):
        raise BundleError(where, f"part index {index} of a table of {len(table.parts)} parts")
    if sha256_bytes(manifest) != table.bundle:
        raise BundleError(where, "its manifest is not the bundle its table names")
    if sizes[1] > MAX_SIGNATURE or sizes[3] > MAX_SIGNATURE:
        raise BundleError(where, "a signature in its part header is not small")
    return Header(index, table, table_bytes, table_sig or None, manifest, signature or None,
                  len(frame))


def read_header(fh: IO[bytes], where: str) -> Header | None:
    """The part header at ``fh``'s position, or None (nothing read) if there is none."""
    start = fh.peek(8)[:8] if hasattr(fh, "peek") else None
    if start is not None and start[:4] != MAGIC:
        return None
    head = fh.read(8)
    if head[:4] != MAGIC:
        if start is None and head:
            raise BundleError(where, "not a part header")  # no peek: it was one or nothing
        return None
    size = int.from_bytes(head[4:8], "little") if len(head) == 8 else -1
    if not 0 <= size <= MAX_HEADER:
        raise BundleError(where, "a part header cut short, or of more than "
                                 f"{MAX_HEADER} bytes")
    rest = fh.read(size)
    if len(rest) != size:
        raise BundleError(where, "truncated: the file ends inside its part header")
    return parse_header(head + rest, where)


def is_part(path: str) -> bool:
    """Whether ``path`` is a regular file that starts with a part header (a pipe is not
    read here: its bytes are the reader's)."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def header_of(path: str) -> Header:
    """The header of the part file at ``path`` (raises :class:`BundleError`)."""
    try:
        with open(path, "rb") as fh:
            header = read_header(fh, path)
    except OSError as e:
        raise unreadable_bundle(path, e) from None
    if header is None:
        raise BundleError(path, "not a part of a bundle (no part header)")
    return header


# --- a set of parts, as given ----------------------------------------------------

@dataclass(frozen=True)
class Parts:
    """The part files of one bundle that were given, by index (any may be missing)."""

    headers: Tuple[Tuple[str, Header], ...]  # (path, header), sorted by index
    # the part files given that are of other bundles, to name a stray among them
    strays: Tuple[Tuple[str, Header], ...] = ()
    others: Tuple[str, ...] = ()  # the other files given, which are not parts

    @property
    def first(self) -> Header:
        return self.headers[0][1]

    @property
    def count(self) -> int:
        return self.first.count

    @property
    def paths(self) -> List[str]:
        return [p for p, _ in self.headers]

    def __str__(self) -> str:
        paths = self.paths
        stem = paths[0].rsplit(".", 1)[0]
        if len(paths) > 1 and all(p.rsplit(".", 1)[0] == stem for p in paths):
            return f"{stem}.{{{paths[0].rsplit('.', 1)[1]}..{paths[-1].rsplit('.', 1)[1]}}}"
        return ", ".join(paths)

    def explain(self) -> None:
        """After the parts did not read as their bundle: raise the error that names the
        damaged part, if one does not match its table (each part checked alone)."""
        for path in self.paths:
            verify_alone(path)

    def problem(self) -> str | None:
        """What keeps these parts from being read as their bundle, in a sentence."""
        have = {h.index: p for p, h in self.headers}
        missing = [i for i in range(1, self.count + 1) if i not in have]
        if not missing:
            return None
        stem = self.paths[0].rsplit(".", 1)[0]
        names = ", ".join(f"{i} ({part_name(stem, i, self.count)}?)" for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        strays = {os.path.basename(p): (p, h) for p, h in self.strays}
        foreign = [strays[n] for n in (os.path.basename(part_name(stem, i, self.count))
                                       for i in missing) if n in strays]
        said = "".join(f"; {p} is part {h.index} of another bundle, {h.bundle_id[:16]}"
                       for p, h in foreign[:3])
        expected = {os.path.basename(part_name(stem, i, self.count)) for i in missing}
        said += "".join(f"; {p} is no part at all (empty, or its header damaged)"
                        for p in self.others if os.path.basename(p) in expected)
        return (f"part{'s' if len(missing) > 1 else ''} {names}{more} of the {self.count} "
                f"of bundle {self.first.bundle_id[:16]} {'are' if len(missing) > 1 else 'is'}"
                f" not among the files given{said}")


class Remote:
    """A bundle read once, forward only, from elsewhere (:class:`mirror.oci.Artifact`'s
    source, a registry): opened when read, its size known once opened."""

    size: int | None = None  # its bytes, once open() has said
    signature: bytes | None = None  # a detached signature that came with it
    file_name: str = "bundle.hub"  # the name a store's records keep for it

    def open(self) -> IO[bytes]:
        raise NotImplementedError

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``, apart from the stream ``open`` gives (format
        4's manifest, at its end, is read first so): where the source can."""
        raise BundleError(str(self), "its manifest is at its end (format 4, pack "
                                     "--stream), and it cannot be read apart here")

    def explain(self) -> None:
        """After the bytes read were found bad: raise the error that says the source
        damaged them on the way, if it can tell (a registry's blob digest)."""


BundleInput = Union[str, Parts, Remote]  # a path (or '-'), its parts, or a remote bundle


def group(paths: Sequence[str]) -> List[BundleInput]:
    """``paths`` with each bundle's part files gathered into one :class:`Parts`, where
    its first part was given (or the first of them, if that is missing); other
    paths as they are. Two files that are the same part of one bundle are refused."""
    out: List[Any] = []
    found: Dict[str, List[Tuple[str, Header]]] = {}
    for path in paths:
        if path != "-" and os.path.isfile(path) and is_part(path):
            header = header_of(path)
            if header.count == 1 or not _one_part(path, header):
                out.append(path)  # parts concatenated: read (and checked) as a stream
                continue
            same = found.setdefault(header.bundle_id, [])
            twin = [p for p, h in same if h.index == header.index]
            if twin:
                raise MirrorError(f"{twin[0]} and {path} are both part {header.index} of "
                                  f"bundle {header.bundle_id[:16]}: name each part once")
            if not same:
                out.append(header.bundle_id)  # its place among the inputs
            same.append((path, header))
        else:
            out.append(path)
    everything = [ph for group in found.values() for ph in group]
    others = tuple(x for x in out if x not in found)
    return [Parts(tuple(sorted(found[x], key=lambda ph: ph[1].index)),
                  tuple(ph for ph in everything if ph[1].bundle_id != x), others)
            if x in found else x for x in out]


def _one_part(path: str, header: Header) -> bool:
    """Whether the file is one part (else parts concatenated). Only a first part can
    open a concatenation; one that holds more or less than its payload is read as a
    stream, whose checks say what is wrong."""
    return header.index > 1 or os.path.getsize(path) == header.size + header.payload[0]


# --- reading ------------------------------------------------------------------------

class Unparted:
    """The payloads of a bundle's parts, read in order as one stream, every header and
    payload checked on the way: a part of another bundle, out of its place, with a
    header unlike the first's, or whose payload is not what its table says, is
    refused, naming the part's file. ``streams`` are the part files in index order
    (each opened when its turn comes, and closed after), or one stream holding them
    all (a concatenation, or stdin): (name, a function that opens it)."""

    def __init__(self, streams: Sequence[Tuple[str, Callable[[], IO[bytes]]]], label: str,
                 hash_payloads: bool = True):
        self.streams, self.label = list(streams), label
        # Part files need not be hashed as they stream: every member is checked against
        # the manifest all the same, and when the bundle does not read, the files are
        # read again to name the damaged part (Parts.explain). One stream (stdin)
        # cannot be read again: it is hashed.
        self.hash_payloads = hash_payloads
        self.file = 0  # in self.streams
        self.fh: IO[bytes] = self.streams[0][1]()
        self.first: Header | None = None
        self.part = 0  # index of the part being read (0: none yet)
        self.left = 0  # bytes of its payload still to read
        self.digest = hashlib.sha256()
        self.payload_ended = False  # the last read ended a part's payload ...
        self.ended = ""  # ... this part's, for messages
        self._next_header()

    @property
    def name(self) -> str:
        return self.streams[self.file][0]

    @property
    def where(self) -> str:
        """The part being read, for messages."""
        count = self.first.count if self.first else "?"
        return f"part {self.part} of {count} ({self.name})"

    def close(self) -> None:
        self.fh.close()

    def check_head(self, manifest_bytes: bytes, signature: bytes | None) -> None:
        """The bundle's own manifest (and signature inside it) must be what every part's
        header carries: a header is a copy, never a say of its own."""
        if (manifest_bytes, signature) != (self.first.manifest_bytes, self.first.signature):
            raise BundleError(self.streams[0][0], "its part header carries another manifest "
                                                  "or signature than the bundle it opens")

    def _next_header(self) -> None:
        name = self.name
        header = read_header(self.fh, name)
        if header is None and self.part and not self.fh.read(1):
            raise BundleError(name, f"it ends after part {self.part} of {self.first.count}: "
                                    f"{_which(self.part + 1, self.first.count)} missing")
        if header is None and len(self.streams) > 1 and self.part:
            raise BundleError(name, f"bytes after part {self.part}'s payload that are not a "
                                    f"part header")
        if header is None:
            raise BundleError(name, "not a part of a bundle (no part header where one "
                                    "should be)")
        if self.first is None:
            if header.index != 1:
                raise BundleError(name, f"it starts with part {header.index} of "
                                        f"{header.count} of bundle {header.bundle_id[:16]}, "
                                        f"not part 1: one part alone, or parts concatenated "
                                        f"out of order; name every part (e.g. mirror install "
                                        f"{name.rsplit('.', 1)[0]}.*)")
            self.first = header
        elif not header.same_bundle(self.first):
            raise BundleError(name, f"it is part {header.index} of bundle "
                                    f"{header.bundle_id[:16]}, not of bundle "
                                    f"{self.first.bundle_id[:16]} ({self.streams[0][0]}): "
                                    f"a part of another bundle, or one whose header was "
                                    f"changed")
        if header.index != self.part + 1:
            raise BundleError(name, f"it is part {header.index}, where part {self.part + 1} "
                                    f"of {self.first.count} should be")
        self.part, self.left = header.index, header.payload[0]
        self.digest = hashlib.sha256()

    def _end_of_payload(self) -> None:
        size, sha256 = self.first.table.parts[self.part - 1]
        name = self.name
        self.payload_ended, self.ended = True, self.where
        if self.hash_payloads and self.digest.hexdigest() != sha256:
            raise BundleError(name, f"part {self.part} of {self.first.count} is corrupt: its "
                                    f"sha256 {self.digest.hexdigest()} is not the table's "
                                    f"{sha256}")
        if self.part == self.first.count:
            return
        if len(self.streams) > 1:  # each file is one part, and ends with it
            if self.fh.read(1):
                raise BundleError(name, f"data after part {self.part}'s payload")
            self.fh.close()
            self.file += 1
            if self.file == len(self.streams):
                raise BundleError(self.label, f"{_which(self.part + 1, self.first.count)} "
                                              f"missing")
            self.fh = self.streams[self.file][1]()
        self._next_header()

    def read(self, n: int = -1) -> bytes:
        self.payload_ended = False
        if n < 0:
            n = CHUNK
        if self.left == 0 and self.part == self.first.count:
            if self.fh.read(1):
                raise BundleError(self.name, f"data after the last part's payload "
                                             f"(part {self.part})")
            if self.file != len(self.streams) - 1:
                raise BundleError(self.streams[self.file + 1][0],
                                  "more files than the table has parts")
            return b""
        data = self.fh.read(min(n, self.left))
        if not data:
            raise BundleError(self.name, f"truncated: part {self.part} of {self.first.count} "
                                         f"ends {self.left} bytes before its payload does")
        self.left -= len(data)
        if self.hash_payloads:
            self.digest.update(data)
        if self.left == 0:
            self._end_of_payload()
        return data


def _which(first: int, count: int) -> str:
    return f"part {first} of {count} is" if first == count else \
        f"parts {first} to {count} of {count} are"


def verify_alone(path: str) -> Header:
    """Check one part file on its own: its header, and its payload against its table
    (the signature is the caller's to check, with :func:`header_of`'s fields)."""
    header = header_of(path)
    size, sha256 = header.payload
    digest, got = hashlib.sha256(), 0
    try:
        with open(path, "rb") as fh:
            fh.seek(header.size)
            for block in iter(lambda: fh.read(CHUNK), b""):
                digest.update(block)
                got += len(block)
    except OSError as e:
        raise unreadable_bundle(path, e) from None
    if got != size:
        raise BundleError(path, f"part {header.index} of {header.count} holds {got} bytes "
                                f"of payload, not the table's {size}: truncated or appended")
    if digest.hexdigest() != sha256:
        raise BundleError(path, f"part {header.index} of {header.count} is corrupt: its "
                                f"sha256 {digest.hexdigest()} is not the table's {sha256}")
    return header


# --- writing -----------------------------------------------------------------------

class PartWriter:
    """Where a split bundle's frames go: part files, each ``split_size`` bytes at most,
    its first ``reserve`` bytes kept for the header, written when every payload is
    known (:meth:`finish`). One part is open at a time. The parts appear under their
    names only when all are whole; on an error none does."""

    def __init__(self, output: str, split_size: int, reserve: int):
        self.output, self.split_size, self.reserve = output, split_size, reserve
        self.folder = os.path.dirname(os.path.abspath(output))
        os.makedirs(self.folder, exist_ok=True)
        self.tmps: List[str] = []  # every part's temporary file
        self.fh: IO[bytes] | None = None  # the part being written
        self.payloads: List[Tuple[int, str]] = []
        self.written = 0
        self.digest = hashlib.sha256()
        self.next_part()

    def room(self) -> int:
        """Payload bytes the current part can still take."""
        return self.split_size - self.reserve - self.written

    def _close_part(self) -> None:
        if self.fh is not None:
            self.fh.close()  # a close reports a full disk that writes did not
            self.fh = None
            self.payloads.append((self.written, self.digest.hexdigest()))

    def next_part(self) -> None:
        self._close_part()
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-" +
                                   os.path.basename(self.output) + ".part.")
        self.tmps.append(tmp)
        self.fh = os.fdopen(fd, "wb")
        self.fh.seek(self.reserve)
        self.written, self.digest = 0, hashlib.sha256()

    def write(self, data: Any) -> int:
        n = self.fh.write(data)
        self.digest.update(data)
        self.written += n
        return n

    def flush(self) -> None:
        self.fh.flush()

    def finish(self, manifest_bytes: bytes, signature: bytes | None,
               sign: Callable[..., bytes] | None) -> List[str]:
        """Write every header, make the parts durable, and give them their names."""
        self._close_part()
        if len(self.payloads) > MAX_PARTS:
            raise MirrorError(f"{len(self.payloads)} parts: over {MAX_PARTS}; choose a "
                              f"larger --split-size")
        table = Table(sha256_bytes(manifest_bytes), tuple(self.payloads)).to_bytes()
        table_signature = sign(table, PARTS_TABLE) if sign is not None else None
        names = [part_name(self.output, i, len(self.tmps))
                 for i in range(1, len(self.tmps) + 1)]
        for i, tmp in enumerate(self.tmps, 1):
            with open(tmp, "r+b") as fh:
                fh.write(header_frame(i, self.reserve, table, table_signature,
                                      manifest_bytes, signature))
                fh.flush()
                os.fchmod(fh.fileno(), 0o644)
                os.fsync(fh.fileno())
        for tmp, name in zip(self.tmps, names):
            os.replace(tmp, name)
        self.tmps = []
        # Parts of an earlier pack to the same name, beyond this one's count, would be
        # taken for parts of this bundle by OUT.*: they go
        for i in range(len(names) + 1, MAX_PARTS + 1):
            gone = [p for p in dict.fromkeys(part_name(self.output, i, n) for n in (1, 10 ** 4))
                    if is_part(p)]
            if not gone:
                break
            for p in gone:
                os.unlink(p)
        return names

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        for tmp in self.tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.tmps = []


SLACK = 64 << 10  # at most left unused at a part's end, where a frame is cut
TABLE_ENTRY = 100  # bytes of one part's entry in the table, at most


def reserve_for(manifest_bytes: bytes, signed: bool, members_size: int,
                split_size: int) -> int:
    """Bytes to keep for each part's header: the manifest, two signatures, and a table
    with room for as many parts as ``members_size`` bytes of tar stream could need at
    ``split_size``. Raises :class:`MirrorError` if ``split_size`` leaves no room."""
    fixed = 8 + len(TAG) + 256 + len(manifest_bytes) + (2 * MAX_SIGNATURE if signed else 0)
    # zstd never makes a block larger than its data and a 3-byte header
    payload = members_size + 3 * (members_size // (64 << 10) + 64) + (1 << 20)
    table = TABLE_ENTRY * 2
    for _ in range(3):  # the table's room and the parts' count depend on each other
        usable = split_size - fixed - table - SLACK
        if usable <= 0:
            break
        table = TABLE_ENTRY * (-(-payload // usable) + 2)
    reserve = fixed + table
    least = max(MIN_SPLIT, 2 * reserve + SLACK + manifest_tar(len(manifest_bytes)))
    if split_size < least:
        raise MirrorError(f"--split-size {split_size} is too small for this bundle: each "
                          f"part carries its manifest ({len(manifest_bytes)} bytes); use at "
                          f"least {-(-least // (1 << 20))}M")
    return reserve


def manifest_tar(size: int) -> int:
    """At most the bytes of the first frame (the manifest and a signature), which a
    split never cuts: ``inspect`` reads it alone."""
    return size + 3 * (size // (64 << 10) + 8) + 8 * 512 + MAX_SIGNATURE + 64
