"""The bundle format: a tar stream inside zstd, ``manifest.json`` first.

A security officer can open it with standard tools (``tar --zstd -tf X.hub``).
The manifest lists every other member with its size and sha256, so a reader
verifies every byte while streaming, without unpacking anything first. The
same inputs give a byte-identical bundle: members are sorted, owner, mode and
mtime are normalized, and compression parameters are fixed.

Members::

    manifest.json
    code/<commit>/<path>        every file of every snapshot
    weights/<sha256>            every weight file, once however many URLs name it
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import logging
import os
import queue
import stat
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
    Union,
)

import zstandard

from . import parts
from .atomic import atomic_file
from .errors import (
    BundleError,
    InvalidRecordError,
    SignatureError,
    UsageError,
    unreadable_bundle,
)
from .hashing import CHUNK, sha256_bytes
from .links import decode, refused
from .model import (  # noqa: F401  (the format's names, re-exported for readers of bundles)
    FORMAT,
    FORMAT_VERSION,
    PATH_MAX,
    STREAMED_VERSION,
    Manifest,
    Member,
    SnapshotEntry,
    code_member,
    weight_member,
)
from .parts import BundleInput, Parts, PartWriter, Remote, Unparted
from .parts import reserve_for as parts_reserve
from .safety import BlockReader, PickleScans, unsafe_in
from .signing import PARTS_TABLE

if TYPE_CHECKING:
    from .download import Growth

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # optional, right after the manifest (see mirror.signing)
STREAM = "-"  # a bundle path that means stdin (read) or stdout (write)
MAX_SIGNATURE_BYTES = 64 << 10  # a signature document is a few hundred bytes
MAX_MANIFEST_BYTES = 64 << 20
# Measured on float32 weights saved with megengine.save and on Python source
# (docs/benchmarks.md): level 1 gives weights the same ratio as level 3, faster;
# level 9 gives code most of level 19's ratio in a twentieth of the time.
# Multi-threaded zstd gives the same bytes for any number of threads (>= 1), so
# bundles stay byte-identical across machines.
WEIGHTS_LEVEL, CODE_LEVEL = 1, 9
MAX_HEADER_BYTES = 1 << 20  # long names and PAX records: a bundle's are a few KiB
# what format 4's manifest frame may hold: the manifest and its signature, their tar
# headers, and the padding after each
HEAD_MAX = MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES + MAX_HEADER_BYTES + 2 * 512

# What tarfile raises on malformed header fields, headers cut short, or thousands of
# chained headers: all of them a bad bundle, never a traceback.
TAR_HEADER_ERRORS = (tarfile.TarError, ValueError, IndexError, OverflowError, RecursionError)
PAX_RECORDS = {"path", "size", "mtime"}  # all that tarfile writes for a bundle's members


def _not_plain(info: tarfile.TarInfo) -> str | None:
    """Why a member is not a regular file stored whole (a sparse member's bytes are not
    what tar extracts) with a header that carries only what the writer puts there."""
    if not info.isreg():
        return "member is not a regular file"
    if info.issparse():
        return "member is a sparse file: tar would extract other bytes than it stores"
    extra = sorted(set(info.pax_headers) - PAX_RECORDS)
    return f"member's tar header carries {extra[:3]}, which a bundle's never do" \
        if extra else None


def _plain_file(info: tarfile.TarInfo) -> bool:
    return _not_plain(info) is None


# --- writing -----------------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    """A member's bytes in a file that was hashed where it is, not copied (a weight
    given by its local path). Anyone may write to it meanwhile, and a write through
    a mapping need not even change its times: so the bytes are hashed again as they
    are written into the bundle, and must be those of ``sha256``."""

    path: str
    sha256: str


# the member's bytes, or the path of a file holding them
Source = Union[bytes, str, LocalFile]


def write(path: str, manifest: Manifest, sources: Mapping[str, Source],
          mtimes: Mapping[str, int] | None = None,
          sign: Callable[..., bytes] | None = None, manifest_bytes: bytes | None = None,
          signature: bytes | None = None, split_size: int | None = None) -> str:
    """Write a bundle to ``path`` atomically and return its id, the sha256 of its
    manifest (which holds the digest of every other member). :func:`write_files`
    says more, and returns the names of the files written too."""
    return write_files(path, manifest, sources, mtimes, sign, manifest_bytes, signature,
                       split_size)[0]


def write_files(path: str, manifest: Manifest, sources: Mapping[str, Source],
                mtimes: Mapping[str, int] | None = None,
                sign: Callable[..., bytes] | None = None,
                manifest_bytes: bytes | None = None, signature: bytes | None = None,
                split_size: int | None = None, progress: bool = False
                ) -> Tuple[str, List[str]]:
    """Write a bundle to ``path`` atomically; return its id, the sha256 of its
    manifest (which holds the digest of every other member), and the files written:
    ``path``, or with ``split_size`` its parts ``path.001``, ... of at most that many
    bytes each (:mod:`mirror.parts`).

    ``sources`` maps every member that ``manifest`` promises to its content, and
    ``mtimes`` gives members a modification time (code: its commit's time; others
    0), so the same inputs give the same bytes. The bundle appears at ``path``
    only when it is complete. ``manifest_bytes``, if given, are written verbatim
    (a bundle made again keeps its id) and must parse to ``manifest``;
    ``signature``, a signature document of them, is written as ``sign``'s would be.
    A format 4 manifest is written in its layout (:class:`StreamedWriter`).
    """
    mtimes = mtimes or {}
    manifest, manifest_bytes = _checked(manifest, sources, manifest_bytes, sign, signature)
    members = manifest.members()
    if manifest.format_version == STREAMED_VERSION:
        if split_size is not None or path == STREAM:
            raise ValueError("format 4 is written to a file, whole (its manifest last)")
        with StreamedWriter(path) as streamed:
            for name in manifest.member_order():
                streamed.add(name, sources[name], members[name].size, mtimes.get(name, 0))
            return streamed.finish(manifest, sign, manifest_bytes, signature), [path]
    if split_size is not None and path == STREAM:
        raise UsageError("--split-size writes part files: name them with -o FILE, not -o -")
    # To stdout ("-"): a stream, written as it is made; a file appears only when whole.
    if split_size is not None:
        tar_bytes = sum(m.size + 4 * tarfile.BLOCKSIZE for m in members.values())
        opened: Any = _parts(path, split_size, parts_reserve(
            manifest_bytes, sign is not None or signature is not None, tar_bytes, split_size))
    else:
        opened = contextlib.nullcontext(sys.stdout.buffer) if path == STREAM else \
            atomic_file(path)
    from tqdm import tqdm

    with opened as raw, tqdm(total=sum(m.size for m in members.values()), unit="B",
                             unit_scale=True, unit_divisor=1024, desc="write", leave=False,
                             disable=not progress or None) as bar:
        out = _FrameWriter(raw, raw if split_size is not None else None, bar)
        out.member(MANIFEST, len(manifest_bytes), io.BytesIO(manifest_bytes), 0)
        if sign is not None:  # signs the manifest, whose digests cover every other byte
            signature = sign(manifest_bytes)
        if signature is not None:
            out.member(SIGNATURE, len(signature), io.BytesIO(signature), 0)
        for name in sorted(members):
            _write_member(out, name, sources[name], members[name].size, mtimes.get(name, 0))
        out.end()
        raw.flush()
        files = raw.finish(manifest_bytes, signature, sign) if split_size is not None \
            else [path]
    # The id install records and list shows. Not the file's own sha256: that took a
    # second pass over every byte, a quarter of pack's time on two cores.
    return bundle_id(manifest_bytes), files


def _checked(manifest: Manifest, sources: Mapping[str, Source], manifest_bytes: bytes | None,
             sign: Callable[..., bytes] | None, signature: bytes | None
             ) -> Tuple[Manifest, bytes]:
    """The manifest as a reader will parse it, and its bytes: what a writer writes,
    verify and install accept. Every member needs a source, and each snapshot's links,
    resolved together, stay inside it."""
    manifest = Manifest.from_json(manifest.to_json())
    missing = sorted(set(manifest.members()) - set(sources))
    if missing:
        raise ValueError(f"no content for members {missing[:5]}")
    for repo in manifest.repos:  # as read will resolve them: each snapshot's links together
        for snap in repo.snapshots:
            bad = refused(snap.commit, snap.files, {
                f.path: _link_target(sources[code_member(snap.commit, f.path)])
                for f in snap.files if f.is_link})
            if bad is not None:
                raise ValueError(f"{repo.id.label}: {bad.message}")
    if manifest_bytes is None:
        manifest_bytes = manifest.to_bytes()
    elif Manifest.from_bytes(manifest_bytes) != manifest:
        raise ValueError("manifest_bytes do not hold the manifest given")
    if sign is not None and signature is not None:
        raise ValueError("give sign or signature, not both")
    return manifest, manifest_bytes


# Format 4 opens with this skippable frame (which tar and zstd pass over): where the
# frame holding the manifest (and signature) is, and how long it is.
POINTER_MAGIC = (0x184D2A5D).to_bytes(4, "little")
POINTER_TAG = b"mge-mirror-head\n"
POINTER_SIZE = 8 + len(POINTER_TAG) + 16
# A bundle's first four bytes: the manifest's frame, format 4's pointer, a part header
OPENINGS = (b"\x28\xb5\x2f\xfd", POINTER_MAGIC, parts.MAGIC)


def _pointer(offset: int, length: int) -> bytes:
    return POINTER_MAGIC + (POINTER_SIZE - 8).to_bytes(4, "little") + POINTER_TAG + \
        offset.to_bytes(8, "little") + length.to_bytes(8, "little")


class StreamedWriter:
    """A bundle written as its members become ready, its manifest last (format 4).

    pack compresses each weight into the bundle as soon as it has arrived, while the
    others still download; the manifest, which holds their digests, can only come
    after them. The file opens with a small skippable frame, filled in last, that
    says where the manifest's frame is: a reader still reads (and checks, and under
    a trust policy verifies the signature of) the manifest before any other member,
    by seeking (in a registry's blob, by a range request), and ``tar`` and ``zstd``
    pass over it. So it is only for a file; a pipe, or a bundle in parts, gets the
    manifest first (format 2).

    Members are added in :meth:`Manifest.member_order`: code and git objects by name,
    then weights in the manifest's order; :meth:`finish` checks that they were.
    """

    def __init__(self, path: str, bar: Any = None):
        self.path = path
        self._files = contextlib.ExitStack()
        self.raw = self._files.enter_context(atomic_file(path))
        self.raw.write(_pointer(0, 0))
        self.out = _FrameWriter(self.raw, bar=bar)  # ``bar``: of the bytes compressed
        self.sources: Dict[str, Source] = {}
        self.names: List[str] = []

    def __enter__(self) -> StreamedWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._files.__exit__(*exc)  # on an error, the temporary file is removed

    def add(self, name: str, source: Source, size: int, mtime: int = 0) -> None:
        """Compress one member into the bundle now. A weight's tar header goes in a
        frame of its own, as :meth:`add_arriving` writes it: a weight's bytes are the
        same whichever of the two wrote them."""
        self.sources[name] = source
        self.names.append(name)
        _write_member(self.out, name, source, size, mtime, name.startswith("weights/"))

    def add_arriving(self, growth: Growth,
                     arrived: Callable[[], Tuple[str, Source, int, str]]) -> None:
        """Compress a weight into the bundle while its bytes arrive, its tar header
        (whose name is its digest) filled in once they all have.

        ``growth`` says how much of its file is there (:class:`download.Growth`);
        ``arrived()`` waits for the whole file, checks it, and returns its member
        name, source, size and sha256. The bytes compressed are hashed here: unless
        they are exactly those (a download that started over, a member already in
        the bundle), what was written is dropped and the member is added from its
        whole file, or not at all if it is already in.
        """
        mark, at = self._placeholder(self.out.following)
        digest, taken, generation = hashlib.sha256(), 0, None
        void = ""  # why what was read cannot be kept
        with contextlib.ExitStack() as stack:
            fh = None
            while True:
                part, size, now, done = growth.wait(taken, generation)
                if generation is None and size:
                    generation = now
                if generation is not None and now != generation:
                    void = "its download started over"
                    break
                if size >= USTAR_MAX_SIZE:  # its header will be longer: not worth going on
                    void = "its header is too long to fill in"
                    break
                if size > taken:
                    try:
                        fh = fh or stack.enter_context(open(part, "rb"))
                        block = fh.read(min(CHUNK, size - taken))
                    except OSError as e:  # renamed whole meanwhile, or unreadable
                        void = f"its part file: {e.strerror or e}"
                        break
                    if not block:
                        void = "its part file is shorter than its download says"
                        break
                    digest.update(block)
                    self.out.put_data(block)
                    taken += len(block)
                elif done:
                    break
        name, source, size, sha256 = arrived()
        header = _tar_header(name, size, 0)
        void = void or ("already in the bundle" if name in self.sources else
                        "it was whole before it was reached" if not taken else
                        "its bytes are not the download's" if (taken, digest.hexdigest())
                        != (size, sha256) else
                        "its header is too long to fill in" if len(header) !=
                        tarfile.BLOCKSIZE else "")
        if not void:
            self._filled_in(at, header, name, source, size)
            log.debug("%s: compressed as its bytes arrived", name)
            return
        log.debug("%s: not compressed as it arrived (%s)", name, void)
        self.out.rollback(mark)
        if name not in self.sources:
            self.add(name, source, size)

    def add_read(self, path: str, fh: IO[bytes], size: int) -> Tuple[str, int, List[str]]:
        """Compress a weight into the bundle from ``fh`` (a local file's, read where it
        is, ``size`` bytes long when opened), hashing it and scanning its pickle on
        the way: one read of its bytes, where a bundle whose manifest comes first must
        hash them before. Return its sha256, its size and what its pickle would
        import that MegEngine weights never do (:func:`mirror.safety.unsafe_in`).

        Its tar header, which names it by that digest, is filled in at the end; bytes
        the bundle holds already are dropped again. A weight too large for a 512-byte
        header is only hashed and scanned here, then added from its file (which must
        still hold those bytes)."""
        whole = size >= USTAR_MAX_SIZE  # its header will be longer: added after
        if not whole:
            mark, at = self._placeholder()
        digest, got = hashlib.sha256(), 0

        def read() -> bytes:  # an error of the file read, told apart from the bundle's
            try:
                return fh.read(CHUNK)
            except OSError as e:
                raise SourceError(path, e) from None

        def passing() -> Iterator[bytes]:
            nonlocal got
            for block in iter(read, b""):
                digest.update(block)
                got += len(block)
                if not whole:
                    self.out.put_data(block)
                yield block

        blocks = passing()
        unsafe = unsafe_in(BlockReader(blocks))  # the very bytes packed
        for _ in blocks:  # what the scan did not read
            pass
        sha256 = digest.hexdigest()
        name = weight_member(sha256)
        header = _tar_header(name, got, 0)
        if whole or name in self.sources or len(header) != tarfile.BLOCKSIZE:
            if not whole:
                self.out.rollback(mark)  # a duplicate, or a file that grew past 8 GiB
            if name not in self.sources:
                self.add(name, LocalFile(path, sha256), got)
        else:
            self._filled_in(at, header, name, LocalFile(path, sha256), got)
        return sha256, got, unsafe

    def _placeholder(self, cctx: Any = None) -> Tuple[Tuple[int, int], int]:
        """Start a weight whose name is not known yet: where to roll back to, and the
        offset of its placeholder header frame (:meth:`_filled_in` fills it); its data
        frame is open, compressed by ``cctx`` (default: every worker)."""
        mark = self.out.mark()
        at = self.out.header_frame(_tar_header(weight_member("0" * 64), 0, 0))
        self.out._frame_for("weights", cctx)
        return mark, at

    def _filled_in(self, at: int, header: bytes, name: str, source: Source,
                   size: int) -> None:
        """End a weight whose bytes went in after a placeholder header at ``at``: its
        padding, its frame, and the header that names it."""
        self.out._put(b"\0" * (-size % tarfile.BLOCKSIZE))
        self.out.close_frame()
        self.out.patch(at, header)
        self.out.offset += len(header) + size + (-size % tarfile.BLOCKSIZE)
        self.sources[name] = source
        self.names.append(name)

    def finish(self, manifest: Manifest, sign: Callable[..., bytes] | None = None,
               manifest_bytes: bytes | None = None, signature: bytes | None = None) -> str:
        """Write the manifest (and signature), end the archive, point the first frame at
        the manifest, and put the bundle in place; return its id."""
        manifest, manifest_bytes = _checked(manifest, self.sources, manifest_bytes, sign,
                                            signature)
        if manifest.format_version != STREAMED_VERSION:
            raise ValueError(f"a manifest written last is format {STREAMED_VERSION}")
        if self.names != manifest.member_order():
            raise ValueError("the members were not added as the manifest orders them")
        if sign is not None:
            signature = sign(manifest_bytes)
        self.out.close_frame()
        start = self.raw.written
        self.out.member(MANIFEST, len(manifest_bytes), io.BytesIO(manifest_bytes), 0)
        if signature is not None:
            self.out.member(SIGNATURE, len(signature), io.BytesIO(signature), 0)
        self.out.close_frame()
        length = self.raw.written - start
        self.out.end()
        self.raw.flush()
        os.pwrite(self.raw.fileno(), _pointer(start, length), 0)
        self._files.close()  # fsync, then the name
        return bundle_id(manifest_bytes)


def _write_member(out: _FrameWriter, name: str, source: Source, size: int,
                  mtime: int, header_frame: bool = False) -> None:
    if isinstance(source, bytes):
        out.member(name, len(source), io.BytesIO(source), mtime, header_frame)
    else:
        with _Source(source) as fh:
            out.member(name, size, fh, mtime, header_frame)


@contextlib.contextmanager
def _parts(path: str, split_size: int, reserve: int) -> Iterator[PartWriter]:
    writer = PartWriter(path, split_size, reserve)
    try:
        yield writer
    finally:
        writer.abort()  # what finish did not name: nothing, or every part on an error


def _link_target(src: Source) -> str:
    if isinstance(src, bytes):
        return decode(src)
    with _Source(src) as fh:
        return decode(fh.read(PATH_MAX + 1))


class SourceError(Exception):
    """A member's source file could not be read, or changed (told apart from the
    bundle's own file)."""

    def __init__(self, path: str, error: OSError | str):
        super().__init__(f"cannot read {path}: {error}" if isinstance(error, str)
                         else f"cannot read {path}: {error.strerror or error}")
        self.path = path


class _Source:
    def __init__(self, source: str | LocalFile):
        self.path = source.path if isinstance(source, LocalFile) else source
        self.expect = source.sha256 if isinstance(source, LocalFile) else None
        self.digest = hashlib.sha256() if self.expect is not None else None
        try:
            self.fh = open(self.path, "rb")
        except OSError as e:
            raise SourceError(self.path, e) from None

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fh.close()
        if exc[0] is None and self.digest is not None and \
                self.digest.hexdigest() != self.expect:
            raise SourceError(self.path, "it changed after it was hashed; pack again once "
                                         "it is written")

    def read(self, n: int) -> bytes:
        try:
            block = self.fh.read(n)
        except OSError as e:
            raise SourceError(self.path, e) from None
        if self.digest is not None:
            self.digest.update(block)
        return block


def bundle_id(manifest_bytes: bytes) -> str:
    """A bundle's id: the sha256 of its manifest's bytes, which hold every other digest."""
    return sha256_bytes(manifest_bytes)


class _FrameWriter:
    """Writes the tar stream as zstd frames: the manifest (and signature) alone in the
    first, code members together in one frame per run of them, each weight alone (in
    format 4, its tar header in a stored frame of its own before it).

    Concatenated frames decode as one stream, so ``zstd -d | tar -x`` and
    ``tar --zstd`` read the bundle as usual. The manifest alone in the first frame
    can be read without touching the rest (``inspect``); code compressed together
    keeps what small files share (thousands of them, frame by frame, came out ten
    times larger and slower); weights, which barely compress, go fast and alone.
    """

    def __init__(self, out: IO[bytes], parts: PartWriter | None = None, bar: Any = None):
        self.out, self.offset, self.parts = out, 0, parts
        self.bar = bar  # a progress bar of member bytes written, if any
        self.pending = 0  # bytes the open frame took since zstd last wrote all it had
        self.taken = 0  # bytes the open frame took
        # Every compressed frame carries zstd's checksum, so accidental damage anywhere
        # (the manifest included, which no digest of its own covers) fails to
        # decompress; format 4's stored header frames hold only a tar header, which
        # has its own checksum and must name a member the manifest lists.
        self.weights = zstandard.ZstdCompressor(level=WEIGHTS_LEVEL, threads=-1,
                                                write_checksum=True)
        # A weight followed as it downloads needs only the link's pace: one worker
        # leaves the other core to receiving (zstd writes the same bytes for any
        # number of workers from one up).
        self.following = zstandard.ZstdCompressor(level=WEIGHTS_LEVEL, threads=1,
                                                  write_checksum=True)
        self.code = zstandard.ZstdCompressor(level=CODE_LEVEL, write_checksum=True)
        self.frame: Any = None  # the open frame's stream writer
        self.frame_kind = ""

    def _frame_for(self, kind: str, cctx: Any = None) -> Any:
        if self.frame is None or kind != self.frame_kind or kind == "weights":
            self.close_frame()
            cctx = cctx or (self.weights if kind == "weights" else self.code)
            self.frame, self.frame_kind = cctx.stream_writer(self.out, closefd=False), kind
            self.pending = self.taken = 0
        return self.frame

    def _put(self, data: Any) -> None:
        """Into the open frame. In a split bundle, a frame that would cross the end of
        the part is ended there, and its data goes on in a new frame of the next part:
        zstd writes at most ``_bound(n)`` bytes for ``n`` taken since it last wrote all
        it had, and flushing (which costs some ratio) is done only near the line."""
        if self.parts is None:
            self.frame.write(data)
            self.taken += len(data)
            return
        view = memoryview(data).cast("B")
        while len(view):
            fits = self.parts.room() - _bound(self.pending) - FRAME_END
            if _bound(len(view)) > fits and self.pending:
                self.frame.flush(zstandard.FLUSH_BLOCK)
                self.pending = 0
                continue
            n = len(view) if _bound(len(view)) <= fits else max(0, _fit(fits))
            if n < len(view) and n < MIN_PIECE:  # the part is full
                if self.frame_kind == "head":
                    raise ValueError("the manifest does not fit in the first part")
                kind = self.frame_kind
                self.close_frame()
                self.parts.next_part()
                self._frame_for(kind)
                continue
            self.frame.write(view[:n])
            self.pending += n
            self.taken += n
            view = view[n:]

    def close_frame(self) -> None:
        """End the open frame, if any: what follows starts a frame of its own."""
        if self.frame is not None:
            if self.taken:  # zstd writes nothing until data comes: an empty frame is none
                self.frame.close()  # ends the frame (with closefd=False, not the file)
            self.frame = None

    def member(self, name: str, size: int, fh: IO[bytes], mtime: int,
               header_frame: bool = False) -> None:
        """Write a member; with ``header_frame``, its tar header in a frame of its own
        (:meth:`header_frame`), as format 4 writes weights."""
        header = _tar_header(name, size, mtime)
        padding = -size % tarfile.BLOCKSIZE
        kind = "weights" if name.startswith("weights/") else \
            "head" if name in (MANIFEST, SIGNATURE) else "code"
        if header_frame:
            self.header_frame(header)
        self._frame_for(kind)
        if not header_frame:
            self._put(header)
        self.data(name, size, fh)
        self._put(b"\0" * padding)
        self.offset += len(header) + size + padding

    def header_frame(self, header: bytes) -> int:
        """Write a member's tar header alone, in a frame of one stored block, which is
        as long whatever the header holds; return the frame's offset in the file. Format 4
        writes a weight's header so, first with a placeholder while the weight's bytes
        (and so its digest, its name) are still arriving, then filled in (:meth:`patch`)."""
        self.close_frame()
        at = self.out.written
        self.out.write(_stored_frame(header))
        return at

    def patch(self, at: int, header: bytes) -> None:
        """Fill in the header frame written at ``at`` (a header of the same length)."""
        self.out.flush()  # else the buffer could later write the placeholder over it
        frame = _stored_frame(header)
        if os.pwrite(self.out.fileno(), frame, at) != len(frame):
            raise OSError(errno.EIO, "a short write filling in a header")

    def mark(self) -> Tuple[int, int]:
        """Where the file and the archive are, between members, for :meth:`rollback`."""
        self.close_frame()
        return self.out.written, self.offset

    def rollback(self, mark: Tuple[int, int]) -> None:
        """Forget everything written since ``mark``: the open frame, and the file's
        bytes after it."""
        # Ended, then cut off, never dropped mid-frame: a multi-threaded zstd context
        # left with jobs on its workers crashes them (SIGSEGV, zstd 1.5.7) when its
        # next frame starts, which here is the next weight's.
        self.close_frame()
        self.out.truncate(mark[0])
        self.offset = mark[1]

    def put_data(self, block: bytes) -> None:
        """A block of a member's bytes into the open frame, counted on the bar."""
        self._put(block)
        if self.bar is not None:
            self.bar.update(len(block))

    def data(self, name: str, size: int, fh: IO[bytes]) -> None:
        copied = 0
        for block in iter(lambda: fh.read(CHUNK), b""):
            self.put_data(block)
            copied += len(block)
        if copied != size:
            raise ValueError(f"member {name} changed while packing: {copied} bytes, "
                             f"expected {size}")

    def end(self) -> None:
        """The end-of-archive blocks, padded to a whole record as tar writes it."""
        self.close_frame()
        end = 2 * tarfile.BLOCKSIZE
        end += -(self.offset + end) % tarfile.RECORDSIZE
        self._frame_for("end")
        self._put(b"\0" * end)
        self.close_frame()


USTAR_MAX_SIZE = 8 ** 11  # a larger member's size needs a PAX record: a longer header


def _tar_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _stored_frame(data: bytes) -> bytes:
    """A zstd frame holding ``data`` (256 to 65,791 bytes) as one stored (raw) block:
    its length depends only on the data's, so it can be written again in place. Its
    header says the content size (2 bytes, minus 256; single segment) and carries no
    checksum, the frame holding only a tar header, which has its own."""
    if not 256 <= len(data) < 65792:
        raise ValueError(f"a stored frame holds 256 to 65,791 bytes, not {len(data)}")
    return ZSTD_MAGIC + b"\x60" + (len(data) - 256).to_bytes(2, "little") + \
        (len(data) << 3 | 1).to_bytes(3, "little") + data


FRAME_END = 64  # a frame's header, its last block's header and its checksum, and more
MIN_PIECE = 4 << 10  # less than this of a member is not worth a frame at a part's end


def _bound(n: int) -> int:
    """At most what zstd writes for ``n`` bytes: no block is larger than its data and a
    3-byte header, and blocks hold up to 128 KiB (fewer where a job or flush ends)."""
    return n + 3 * (n // (64 << 10) + 2)


def _fit(room: int) -> int:
    """About the most bytes whose :func:`_bound` fits in ``room``."""
    return room - 3 * (room // (64 << 10) + 3)


# --- reading -----------------------------------------------------------------

# Called once per verified-to-be-expected member; returns a file to copy it into, or None.
SinkFactory = Callable[[Member], Optional[IO[bytes]]]
# Called once per member with a forward-only file of its bytes (see mirror.safety).
Scanner = Callable[[Member, IO[bytes]], None]


@dataclass(frozen=True)
class Head:
    """What a reader knows before any other member: the manifest, its exact bytes, and
    the signature document (inside the bundle, or beside it as BUNDLE.sig), if any."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes | None
    detached: bool = False  # the signature is BUNDLE.sig, beside the bundle

    @property
    def bundle_id(self) -> str:
        return bundle_id(self.manifest_bytes)


def read(path: BundleInput, sink: SinkFactory | None = None,
         on_head: Callable[[Head], None] | None = None,
         progress: bool = False, file_digest: Any = None,
         scan: Scanner | None = None) -> Manifest:
    """Stream the bundle at ``path`` once, verifying every member against the manifest.

    ``on_head`` sees the manifest and signature before any other member is read
    (to refuse a bundle before anything is written). Each member's bytes go to the
    file ``sink`` returns for it (if any) while they are hashed; any missing,
    unexpected, duplicated, resized or altered member raises :class:`BundleError`
    naming it. Callers must treat what a sink received as untrusted until this
    function returns. ``file_digest`` (a hashlib object) is fed the bundle file's own
    bytes as they are read, so its digest needs no second pass over the file.
    ``scan`` reads each member's bytes as they pass (a forward-only file), to
    inspect what needs more than a digest (a weight's pickle): it reads as much as
    it wants, the rest is hashed all the same.

    ``path`` may be a bundle's parts (:class:`mirror.parts.Parts`), or a file or
    stdin holding them all: their headers are checked and stripped as they pass
    (:class:`mirror.parts.Unparted`), and the payloads read as the bundle they are.
    """
    from tqdm import tqdm  # here: inspect and list, which show no progress, start sooner

    with contextlib.ExitStack() as files:
        fh, total, head = _open(path, files)
        unparted = fh if isinstance(fh, Unparted) else None

        def head_seen(head: Head) -> None:
            if isinstance(path, Remote) and head.signature is None and \
                    path.signature is not None:  # BUNDLE.sig, carried beside it
                head = Head(head.manifest, head.manifest_bytes, path.signature, True)
            if unparted is not None:
                unparted.check_head(head.manifest_bytes,
                                    None if head.detached else head.signature)
            if on_head is not None:
                on_head(head)

        bar = files.enter_context(tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
            disable=not progress or None, leave=False))
        if head is not None:  # format 4: the pointer frame, read before the stream
            bar.update(POINTER_SIZE)
            if file_digest is not None:
                file_digest.update(head[1])
        try:
            return _read(str(path), fh, bar, sink, head_seen, file_digest, scan, unparted,
                         head[0] if head else None)
        except BundleError:
            if isinstance(path, (Remote, Parts)):
                path.explain()  # the damaged part or layer, where that is the cause
            raise


def _open(path: BundleInput, files: contextlib.ExitStack
          ) -> Tuple[Any, int | None, Tuple[Head, bytes] | None]:
    """The bundle's bytes, as a file to read forward, and their size if known: its
    parts' payloads, checked, where it is in parts. In format 4, the head read first
    from the end (and the pointer frame's bytes), the file then at the first member."""
    def opener(name: str) -> IO[bytes]:
        try:
            return files.enter_context(open(name, "rb", buffering=CHUNK))
        except OSError as e:
            raise unreadable_bundle(name, e) from None

    if isinstance(path, Parts):
        problem = path.problem()
        if problem:
            raise BundleError(str(path), problem)
        try:
            total = sum(os.stat(p).st_size for p in path.paths)
        except OSError as e:
            raise unreadable_bundle(e.filename or str(path), e) from None
        # one part open at a time: a bundle of a thousand parts needs no thousand files
        unparted = Unparted([(p, functools.partial(open, p, "rb", buffering=CHUNK))
                             for p in path.paths], str(path), hash_payloads=False)
        files.callback(unparted.close)
        return unparted, total, None
    if isinstance(path, Remote):
        fh = files.enter_context(path.open())
        total = path.size
    else:
        fh = files.enter_context(_stdin()) if path == STREAM else opener(path)
        st = os.fstat(fh.fileno())
        total = st.st_size if stat.S_ISREG(st.st_mode) else None
    start = fh.peek(4)[:4]
    if start == parts.MAGIC:  # parts concatenated, in a file or a pipe
        return Unparted([("stdin" if path == STREAM else str(path), lambda: fh)], str(path)), \
            total, None
    if start == POINTER_MAGIC:
        if total is None:
            raise BundleError(str(path), "its manifest is at its end (format 4, pack "
                                         "--stream): it cannot be read in one pass from a "
                                         "pipe; install the file, or pack it without "
                                         "--stream")
        if isinstance(path, Remote):  # its head fetched apart, the stream read on
            try:
                return fh, total, _streamed_head(str(path), fh, total, path.read_at)
            except BundleError:  # read before the layer's digest could be checked
                path.explain()  # the registry's damaged copy, where that is the cause
                raise
        return fh, total, _streamed_head(str(path), fh, total)
    return fh, total, None


def _streamed_head(path: str, fh: IO[bytes], size: int,
                   read_at: Callable[[int, int], bytes] | None = None) -> Tuple[Head, bytes]:
    """Format 4's head: the manifest (and signature) in the frame the first frame points
    to, checked as the stream's are; and the pointer frame's bytes. ``fh``, a file
    of ``size`` bytes, is left at the first member's frame. ``read_at(offset,
    length)`` reads the manifest's frame where ``fh`` cannot seek (a registry's
    blob, by range); else ``fh`` seeks to it, and back."""
    pointer = fh.read(POINTER_SIZE)
    offset = int.from_bytes(pointer[-16:-8], "little")
    length = int.from_bytes(pointer[-8:], "little")
    if len(pointer) != POINTER_SIZE or pointer != _pointer(offset, length) or \
            not POINTER_SIZE <= offset <= size - length or \
            not 0 < length <= MAX_MANIFEST_BYTES + MAX_HEADER_BYTES:
        raise BundleError(path, "its first frame does not point to a manifest in the file")
    if read_at is None:
        fh.seek(offset)
        frame = fh.read(length)
    else:
        frame = read_at(offset, length)
    walker = _FrameWalker(path, offset)  # whole standard frames, and only one
    walker.feed(frame)
    walker.end()
    if walker.frames != 1:
        raise BundleError(path, f"the manifest's place (byte {offset}) holds "
                                f"{walker.frames} zstd frames, not one")
    try:
        data = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(frame), read_across_frames=False).read(HEAD_MAX + 1)
        if len(data) > HEAD_MAX:  # a frame a few KiB long can hold gigabytes of zeros
            raise BundleError(path, f"the manifest's frame (byte {offset}) holds more than "
                                    f"a manifest and its signature")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            manifest_bytes = tar.extractfile(_manifest_member(path, tar)).read()
            info = tar.next()
            signature = None
            if info is not None:
                if info.name != SIGNATURE or not _plain_file(info) or \
                        info.size > MAX_SIGNATURE_BYTES:
                    raise BundleError(path, "only the signature may follow the manifest "
                                            "in its frame", info.name)
                signature = tar.extractfile(info).read()
                if tar.next() is not None:
                    raise BundleError(path, "more than the manifest and its signature in "
                                            "the manifest's frame")
            if tar.offset != len(data):
                raise BundleError(path, "more than the manifest in the manifest's frame")
    except (zstandard.ZstdError, EOFError) + TAR_HEADER_ERRORS as e:
        raise BundleError(path, f"the manifest's frame (byte {offset}) is unreadable "
                                f"({type(e).__name__}: {e})") from None
    manifest = manifest_from_bytes(path, manifest_bytes)
    # BUNDLE.sig beside a file (a registry's comes with its artifact: see read)
    detached = signature is None and read_at is None and os.path.exists(path + ".sig")
    if detached:
        with open(path + ".sig", "rb") as sig:
            signature = sig.read(MAX_SIGNATURE_BYTES)
    if read_at is None:
        fh.seek(POINTER_SIZE)
    return Head(manifest, manifest_bytes, signature, detached), pointer


def _read(path: str, fh: IO[bytes], bar: Any, sink: SinkFactory | None,
          on_head: Callable[[Head], None], file_digest: Any, scan: Scanner | None,
          unparted: Unparted | None, head: Head | None) -> Manifest:
    """:func:`read`'s work, on an opened bundle (format 4's ``head`` read already)."""
    frames = _FrameWalker(path, POINTER_SIZE if head is not None else 0)

    def seen(data: bytes) -> None:
        frames.feed(data)  # before the decompressor sees them
        if unparted is not None and unparted.payload_ended:
            frames.at_frame_end(unparted.ended)
        bar.update(len(data))
        if file_digest is not None:
            file_digest.update(data)

    try:
        with _Decompressed(path, fh, seen) as stream:
            # Seekable mode on a forward-only stream: tarfile parses the headers
            # (PAX included) and member data is read straight from the stream,
            # not copied through tarfile's own buffers.
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                manifest = _read_members(path, tar, stream, sink, on_head, scan, head)
                _check_end(path, tar.offset, stream)
                return manifest
    except BundleError:
        raise
    except _SinkFailed as e:  # the disk being written, not the bundle, is at fault
        raise e.error from None
    except (zstandard.ZstdError, EOFError, OSError) + TAR_HEADER_ERRORS as e:
        where = f" in {unparted.where}" if unparted is not None else ""
        raise BundleError(path, f"unreadable{where} ({type(e).__name__}: {e}); "
                                f"the file is truncated, corrupt or not a bundle") from None


def _stdin() -> IO[bytes]:
    """Standard input, read in large pieces: a pipe holds 64 KiB by default, so the
    reader would wake for every few blocks; 1 MiB (Linux's default limit for an
    unprivileged process) keeps it as fast as a file."""
    if stat.S_ISFIFO(os.fstat(0).st_mode):
        with contextlib.suppress(OSError):
            fcntl.fcntl(0, fcntl.F_SETPIPE_SZ, 1 << 20)
    return open(0, "rb", buffering=CHUNK, closefd=False)


class _SinkFailed(Exception):
    """An OSError from writing a member out (a full disk), kept apart from read errors."""

    def __init__(self, error: OSError):
        self.error = error


def _sink_call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as e:
        raise _SinkFailed(e) from None


def _sink(sink: SinkFactory | None, member: Member) -> IO[bytes] | None:
    return _sink_call(sink, member) if sink else None


class _Seen:
    """A file reader that shows each block it reads to ``seen`` (progress, file digest)."""

    def __init__(self, fh: IO[bytes], seen: Callable[[bytes], None]):
        self.fh, self.seen = fh, seen

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.seen(data)
        return data


class _Decompressed:
    """The bundle's tar stream, decompressed on a background thread.

    zstd, sha256 and file writes all release the GIL, so decompressing the next
    blocks while this thread hashes and writes the last ones keeps both cores busy
    (as ``zstd -d | tar -x`` does with two processes). Blocks are handed over as
    they are, and member data is served as views of them: no copy is made in
    Python. Forward-only, with the ``read``/``tell``/``seek`` that tarfile needs.
    """

    DEPTH = 4  # decompressed blocks in flight: memory stays a few MiB

    def __init__(self, path: str, fh: IO[bytes], seen: Callable[[bytes], None]):
        self.path = path
        self.last_read = b""  # tarfile reads each header block with one read()
        self.header_bytes = 0  # read() since the last member's data: headers
        self._blocks: queue.Queue = queue.Queue(maxsize=self.DEPTH)
        self._stop = threading.Event()
        self._block = memoryview(b"")
        self._at = 0  # in self._block
        self._eof = False
        self.count = 0  # bytes handed out so far: the stream position
        self._thread = threading.Thread(target=self._decompress, args=(_Seen(fh, seen),),
                                        name="mirror-zstd", daemon=True)
        self._thread.start()

    def _decompress(self, source: _Seen) -> None:
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
            while not self._stop.is_set():
                block = reader.read(CHUNK)
                self._put(block)
                if not block:
                    return
        except BaseException as e:  # handed to the reading thread, raised there
            self._put(e)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._blocks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __enter__(self) -> _Decompressed:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        while self._thread.is_alive():  # it may wait to hand over a block
            try:
                self._blocks.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

    def view(self, n: int) -> memoryview:
        """Up to ``n`` next bytes (at least one, unless the stream has ended), uncopied."""
        if self._at == len(self._block) and not self._eof:
            item = self._blocks.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            self._block, self._at, self._eof = memoryview(item), 0, not item
        out = self._block[self._at:self._at + n]
        self._at += len(out)
        self.count += len(out)
        return out

    def read(self, n: int = -1) -> bytes:
        """For tar headers (tarfile reads long names and PAX records whole) and padding."""
        self.header_bytes += n
        if n < 0 or self.header_bytes > MAX_HEADER_BYTES:
            raise BundleError(self.path, f"tar headers of over {MAX_HEADER_BYTES} bytes "
                                         f"before byte {self.count + n} of the stream; a "
                                         f"bundle's are a few KiB")
        parts = []
        while n > 0:
            part = self.view(n)
            if not part:
                break
            parts.append(part)
            n -= len(part)
        self.last_read = b"".join(parts)
        return self.last_read

    def tell(self) -> int:
        return self.count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # Every byte is read and checked; tarfile seeking past some (a sparse member's
        # stored data) would let unverified bytes ride along.
        if whence != io.SEEK_SET or offset != self.count:
            raise BundleError(self.path, f"tar wants to move from byte {self.count} of the "
                                         f"stream to byte {offset}; a bundle is read whole, "
                                         f"in order")
        return self.count


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _FrameWalker:
    """Checks the zstd frames' headers as the file's bytes stream past, before the
    decompressor sees them: the file must be whole standard frames, each with data,
    and end where the last one ends. One pass, so a pipe is read as a file is.

    zstd's own readers silently skip skippable and empty frames and do not notice a
    last frame cut short, so data could hide in or after a bundle that verifies.
    Only headers (at most 18 bytes) are ever copied: block data is counted past.
    """

    HEADER_MAX = 18  # a frame's magic and largest header; a block header is 3

    def __init__(self, path: str, at: int = 0):
        self.path = path
        self.pending = b""  # the start of a header not yet whole
        self.at = at  # file offset of the next byte not yet walked (``pending``'s first)
        self.skip = 0  # bytes of block data (and checksum) still to pass
        self.state = "frame"  # the next header: a frame's, or a block's
        self.frames = 0
        self.content = 0  # of the frame being walked
        self.checksum = 0  # its checksum's size, 0 or 4
        self.ended = False

    def feed(self, data: bytes) -> None:
        if not data:
            self.end()
            return
        view, i = memoryview(data), 0
        while i < len(view):
            if self.skip:
                passed = min(self.skip, len(view) - i)
                self.skip -= passed
                self.at += passed
                i += passed
                continue
            taken = min(self.HEADER_MAX - len(self.pending), len(view) - i)
            self.pending += bytes(view[i:i + taken])
            i += taken
            used = self._header()
            if used:  # give back what the header did not use
                i -= len(self.pending) - used
                self.at += used
                self.pending = b""

    def _header(self) -> int:
        """Parse the header at the start of ``pending``: its length, or 0 when it needs
        more bytes."""
        buf, path, offset = self.pending, self.path, self.at
        if self.state == "frame":
            if len(buf) >= 4 and buf[:4] != ZSTD_MAGIC:
                what = "a skippable zstd frame" if buf[1:4] == b"\x2a\x4d\x18" else \
                    "not a zstd frame"
                raise BundleError(path, f"{what} at byte {offset}; a bundle holds only "
                                        f"standard frames" + (", so this is not a bundle"
                                                              if not self.frames else ""))
            if len(buf) < 5:
                return 0
            descriptor = buf[4]
            single = descriptor >> 5 & 1
            header = 4 + 1 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] \
                + ((1 if single else 0), 2, 4, 8)[descriptor >> 6]
            if len(buf) < header:
                return 0
            self.checksum = 4 if descriptor >> 2 & 1 else 0
            self.content, self.state = 0, "block"
            return header
        if len(buf) < 3:
            return 0
        value = int.from_bytes(buf[:3], "little")
        last, kind, length = value & 1, value >> 1 & 3, value >> 3
        if kind == 3:
            raise BundleError(path, f"corrupt zstd block at byte {offset}")
        self.content += length if kind != 2 else 1  # a compressed block holds data
        self.skip = 1 if kind == 1 else length
        if last:
            self.skip += self.checksum
            if self.content == 0:
                raise BundleError(path, f"an empty zstd frame ends at byte "
                                        f"{offset + 3 + self.skip}; a bundle has none")
            self.frames += 1
            self.state = "frame"
        return 3

    def at_frame_end(self, where: str) -> None:
        """A part's payload ends here: so must a frame, so that ``cat`` of the parts
        is a file that zstd reads as mirror does (the next part's header between
        frames, never inside one)."""
        if self.skip or self.pending or self.state != "frame":
            raise BundleError(self.path, f"{where} ends inside a zstd frame: its parts "
                                         f"were not cut where frames end")

    def end(self) -> None:
        """At the end of the file: nothing may be left half-read."""
        if self.ended:
            return
        self.ended = True
        if self.frames == 0 and self.at == 0 and not self.pending:
            raise BundleError(self.path, "empty file")
        if self.skip:
            if self.state == "frame":  # the last block or its checksum is cut short
                raise BundleError(self.path, f"truncated: the last zstd frame needs "
                                             f"{self.skip} more bytes")
            raise BundleError(self.path, f"truncated: a zstd block runs past the end of the "
                                         f"file ({self.at} bytes)")
        if self.pending and self.state == "frame" and \
                not ZSTD_MAGIC.startswith(self.pending[:4]):
            raise BundleError(self.path, f"not a zstd frame at byte {self.at}; a bundle "
                                         f"holds only standard frames")
        if self.pending or self.state != "frame":
            what = "frame header" if self.state == "frame" else "zstd block header"
            raise BundleError(self.path, f"truncated: {what} at byte {self.at}")


def _check_end(path: str, end_offset: int, stream: _Decompressed) -> None:
    """The archive must end exactly as written: zero blocks to a whole record, then EOF.

    zstd does not notice a last frame cut short, and tar stops reading at its end
    marker, so a truncated end, or data appended after it, is caught only here.
    """
    expected = end_offset + 2 * tarfile.BLOCKSIZE
    expected += -expected % tarfile.RECORDSIZE
    # tarfile takes any block it cannot parse for the end; the one it read must be zeros.
    consumed = stream.count - end_offset
    if consumed and stream.last_read[-consumed:].count(0) != consumed:
        raise BundleError(path, f"data where the archive should end (byte {end_offset} of "
                                f"the decompressed stream)")
    while stream.count <= expected:
        block = stream.view(CHUNK)
        if not block:
            break
        if bytes(block).count(0) != len(block):
            raise BundleError(path, "data after the end of the archive")
    if stream.count != expected:
        what = "truncated" if stream.count < expected else "data after the end of the archive"
        raise BundleError(path, f"{what}: the archive ends at byte {stream.count} of the "
                                f"decompressed stream, not {expected}")


def _member_data(path: str, stream: _Decompressed,
                 info: tarfile.TarInfo) -> Iterator[memoryview]:
    """A member's bytes, as views of the stream, then its padding (which must be zeros)."""
    stream.header_bytes = 0
    left = info.size
    while left:
        block = stream.view(min(left, CHUNK))
        if not block:
            raise BundleError(path, "truncated: the stream ends inside this member", info.name)
        left -= len(block)
        yield block
    padding = stream.read(-info.size % tarfile.BLOCKSIZE)
    if len(padding) != -info.size % tarfile.BLOCKSIZE or any(padding):
        raise BundleError(path, "the padding after this member is not zeros", info.name)


def _read_whole(path: str, stream: _Decompressed, info: tarfile.TarInfo) -> bytes:
    return b"".join(_member_data(path, stream, info))


def _read_members(path: str, tar: tarfile.TarFile, stream: _Decompressed,
                  sink: SinkFactory | None, on_head: Callable[[Head], None] | None,
                  scan: Scanner | None, head: Head | None = None) -> Manifest:
    """Every member, checked against the manifest: read first from the stream, or, in
    format 4, already read from the end (``head``) and met again there."""
    streamed = head is not None
    if head is None:
        head, info = _read_head(path, tar, stream)
    else:
        info = tar.next()
    if (head.manifest.format_version == STREAMED_VERSION) != streamed:
        raise BundleError(path, "format 4, and only it, keeps the manifest last, behind a "
                                "first frame that points to it; this bundle's layout and "
                                "version disagree", MANIFEST)
    if on_head:
        on_head(head)
    expected = head.manifest.members()
    # Format 4 holds weights in the manifest's order, then the manifest itself
    rank = None
    if streamed:
        tail = [MANIFEST] + ([SIGNATURE] if head.signature and not head.detached else [])
        rank = {n: i for i, n in enumerate(head.manifest.member_order() + tail)}
        expected = dict(expected, **{n: None for n in tail})
    links = _Links(path, head.manifest)
    seen: set = set()
    previous = ""
    while info is not None:
        tar.members.clear()  # a stream reader needs no index; keep memory flat
        name = info.name
        if name in seen:
            raise BundleError(path, "member appears twice", name)
        if seen and (name < previous if rank is None else
                     name in rank and rank[name] < rank[previous]):
            raise BundleError(path, f"member is out of order (after {previous})", name)
        previous = name
        if name not in expected:
            raise BundleError(path, "member is not listed in the manifest", name)
        problem = _not_plain(info)
        if problem:
            raise BundleError(path, problem, name)
        seen.add(name)
        if expected[name] is None:  # format 4's manifest, met again: the one read first
            _check_tail(path, stream, info, head)
            info = tar.next()
            continue
        if info.size != expected[name].size:
            raise BundleError(path, f"size {info.size} differs from the manifest's "
                                    f"{expected[name].size}", name)
        target = _read_member(path, stream, info, expected[name], sink, name in links.paths,
                              scan)
        if target is not None:
            links.read(name, target)
        info = tar.next()
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BundleError(path, f"missing from the bundle{more}", missing[0])
    return head.manifest


def _check_tail(path: str, stream: _Decompressed, info: tarfile.TarInfo, head: Head) -> None:
    """Format 4's manifest (or signature) at the end must be the bytes read first."""
    want = head.manifest_bytes if info.name == MANIFEST else head.signature
    limit = MAX_MANIFEST_BYTES if info.name == MANIFEST else MAX_SIGNATURE_BYTES
    if info.size != len(want) or info.size > limit or \
            _read_whole(path, stream, info) != want:
        raise BundleError(path, "differs from the one its first frame points to", info.name)


def _read_head(path: str, tar: tarfile.TarFile,
               stream: _Decompressed) -> Tuple[Head, tarfile.TarInfo | None]:
    """The manifest and the signature (inside the bundle, or beside it as BUNDLE.sig),
    and the member after them."""
    manifest_bytes = _read_whole(path, stream, _manifest_member(path, tar))
    manifest = manifest_from_bytes(path, manifest_bytes)
    info = tar.next()
    signature = None
    if info is not None and info.name == SIGNATURE:
        if not _plain_file(info) or info.size > MAX_SIGNATURE_BYTES:
            raise BundleError(path, "signature is not a small regular file", SIGNATURE)
        signature = _read_whole(path, stream, info)
        info = tar.next()
    elif path != STREAM and os.path.exists(path + ".sig"):  # detached, beside the bundle
        with open(path + ".sig", "rb") as fh:
            return Head(manifest, manifest_bytes, fh.read(MAX_SIGNATURE_BYTES), True), info
    return Head(manifest, manifest_bytes, signature), info


class _Links:
    """The symlinks of a bundle's snapshots: a snapshot's are resolved together
    (:func:`mirror.links.refused`) as soon as the last of them is read, so a link that
    leaves its snapshot, alone or through another, is refused before any weight is."""

    def __init__(self, path: str, manifest: Manifest):
        self.path = path
        self.paths = manifest.links()  # member -> its path in its snapshot
        self.targets: Dict[str, str] = {}  # member -> the target read
        # each snapshot with links, and those of its link members not read yet
        self.unread: List[Tuple[SnapshotEntry, Set[str]]] = []
        for repo in manifest.repos:
            for snap in repo.snapshots:
                names = {code_member(snap.commit, f.path) for f in snap.files if f.is_link}
                if names:
                    self.unread.append((snap, names))

    def read(self, member: str, target: str) -> None:
        self.targets[member] = target
        for snap, names in self.unread:
            if member in names:
                names.discard(member)
                if not names:
                    self._check(snap)

    def _check(self, snap: SnapshotEntry) -> None:
        bad = refused(snap.commit, snap.files, {
            f.path: self.targets[code_member(snap.commit, f.path)]
            for f in snap.files if f.is_link})
        if bad is not None:
            raise BundleError(self.path, bad.message, code_member(snap.commit, bad.path))


def _read_member(path: str, stream: _Decompressed, info: tarfile.TarInfo, want: Member,
                 sink: SinkFactory | None, link: bool, scan: Scanner | None) -> str | None:
    """Hash one member's bytes (copying them to the sink's file, if any, and showing
    them to ``scan``) against the manifest; return a symlink's target, its content
    (None for any other member)."""
    out = _sink(sink, want)
    digest = hashlib.sha256()
    content = []  # kept only for a symlink, whose target is its (small) content

    def passing() -> Iterator[memoryview]:
        for block in _member_data(path, stream, info):
            digest.update(block)
            if out is not None:
                _sink_call(out.write, block)
            if link:
                content.append(bytes(block))
            yield block

    blocks = passing()
    if scan is not None:
        scan(want, BlockReader(blocks))
    for _ in blocks:  # what the scan did not read
        pass
    if out is not None:
        _sink_call(out.close)
    if digest.hexdigest() != want.sha256:
        raise BundleError(path, f"sha256 {digest.hexdigest()} differs from the manifest's "
                                f"{want.sha256}", info.name)
    return decode(b"".join(content)) if link else None


def _manifest_member(path: str, tar: tarfile.TarFile) -> tarfile.TarInfo:
    first = tar.next()
    if first is None or first.name != MANIFEST or not _plain_file(first):
        raise BundleError(path, f"first member must be {MANIFEST}")
    if first.size > MAX_MANIFEST_BYTES:
        raise BundleError(path, f"manifest is {first.size} bytes, over the "
                                f"{MAX_MANIFEST_BYTES} byte limit", MANIFEST)
    return first


@dataclass(frozen=True)
class Verified:
    """A bundle whose every byte matched its manifest (and, if asked, whose signature a
    given key made)."""

    manifest: Manifest
    manifest_bytes: bytes  # as the bundle holds them: what a signature signs
    signed_by: str | None
    part: parts.Header | None = None  # one part, verified alone (see verify)

    @property
    def bundle_id(self) -> str:
        return bundle_id(self.manifest_bytes)


def verify(path: BundleInput, keys: Mapping[str, Any] | None = None,
           progress: bool = False, allow_unsafe_pickle: bool = False) -> Verified:
    """Verify every byte of the bundle at ``path`` without installing anything.

    ``path`` may be a bundle's parts, all of them (:class:`mirror.parts.Parts`), or a
    file holding them all. A file that is one part of several is verified alone
    (:func:`verify_part`).

    With ``keys`` (key id -> public key, see :func:`mirror.signing.load_keys`), the
    bundle must also carry a signature by one of them, checked before any member
    after the manifest is read. Weights that would import more than MegEngine
    state dicts do are refused (:class:`UnsafePickleError`) unless
    ``allow_unsafe_pickle``. In format 2, every git id is recomputed from the
    bytes (:mod:`mirror.proof`), as install does. Raises :class:`BundleError` or
    :class:`SignatureError`. What this accepts, ``install`` accepts: both read the
    bundle with :func:`read` and scan it with :class:`mirror.safety.PickleScans`.
    """
    from .proof import ProofError, prove_manifest

    if isinstance(path, str) and path != STREAM and parts.is_part(path) and \
            parts.group([path]) != [path]:
        return verify_part(path, keys)
    heads: list = []
    signer: list = []

    def on_head(head: Head) -> None:
        heads.append(head)
        if keys is not None:
            from .signing import check

            signer.append(check(head.signature, head.manifest_bytes, keys, path).key_id)

    with tempfile.TemporaryDirectory(prefix="mirror-verify-") as work:
        def keep(member: Member) -> IO[bytes] | None:
            # Code and git objects, to recompute git's ids; weights are only hashed.
            if member.name.startswith("weights/"):
                return None
            return open(os.path.join(work, member.sha256), "wb")

        scans = None if allow_unsafe_pickle else PickleScans(path)
        manifest = read(path, keep, on_head=on_head, progress=progress, scan=scans)
        if scans is not None:
            scans.check(manifest)
        try:
            # A delta's prerequisites are not here: only where they sit is checked.
            assumed = manifest.assumed
            prove_manifest(manifest, lambda sha256: None if sha256 in assumed else
                           os.path.join(work, sha256), work)
        except ProofError as e:
            raise BundleError(path, str(e)) from None
    return Verified(manifest, heads[0].manifest_bytes, signer[0] if signer else None)


def verify_part(path: str, keys: Mapping[str, Any] | None = None) -> Verified:
    """Verify one part of a bundle on its own, as it arrives: its header, and its
    payload's size and sha256 against the table of parts. With ``keys``, the manifest
    and the table must both be signed by one of them, so the part is the one its
    signer made. The members in it are checked when every part is read (install)."""
    header = parts.verify_alone(path)
    if header.index == 1:  # the bundle's own manifest follows: the header is its copy
        with open(path, "rb") as fh:
            fh.seek(header.size)
            if _first_manifest(path, fh) != header.manifest_bytes:
                raise BundleError(path, "its part header carries another manifest than "
                                        "the bundle it opens")
    signer = None
    if keys is not None:
        from .signing import check

        signer = check(header.signature, header.manifest_bytes, keys, path).key_id
        table = check(header.table_signature, header.table_bytes, keys, path,
                      what="table of parts", purpose=PARTS_TABLE).key_id
        if table != signer:
            raise SignatureError(path, f"its manifest is signed by key {signer}, its table "
                                       f"of parts by key {table}: not one signer")
    manifest = manifest_from_bytes(path, header.manifest_bytes)
    return Verified(manifest, header.manifest_bytes, signer, header)


def read_all(path: str, on_head: Callable[[Head], None] | None = None
             ) -> Tuple[Manifest, Dict[str, bytes]]:
    """The manifest and every member's bytes, in memory, of a bundle that verifies
    (for tools that rebuild a bundle with something changed; never for weights of
    real size)."""
    members: Dict[str, bytes] = {}

    class Keep(io.BytesIO):
        def __init__(self, member: Member):
            super().__init__()
            self.name = member.name

        def close(self) -> None:
            members[self.name] = self.getvalue()
            super().close()

    return read(path, Keep, on_head=on_head), members


def manifest_from_bytes(path: str, data: bytes) -> Manifest:
    """The manifest in ``data`` (read from bundle ``path``), parsed and validated by the
    one parser that ``verify`` and ``install`` share."""
    try:
        return Manifest.from_bytes(data)
    except InvalidRecordError as e:
        raise BundleError(path, f"invalid manifest: {e}", MANIFEST) from None


def read_manifest(path: BundleInput) -> Manifest:
    """Only the manifest, from the bundle's first zstd frame: the rest is never read,
    so this is as fast for a 100 GB bundle as for a small one. Not a verification:
    the manifest's digests are checked by :func:`read`."""
    return manifest_from_bytes(path, read_manifest_bytes(path))


def read_manifest_bytes(path: BundleInput) -> bytes:
    """The manifest's bytes as the bundle holds them (its id is their sha256); of a
    bundle in parts, as any of its parts' headers carries them."""
    if isinstance(path, Parts):
        return path.first.manifest_bytes
    if parts.is_part(path):
        return parts.header_of(path).manifest_bytes
    try:
        with open(path, "rb") as fh:
            if fh.peek(4)[:4] == POINTER_MAGIC:  # format 4: where the first frame points
                return _streamed_head(path, fh, os.fstat(fh.fileno()).st_size)[0] \
                    .manifest_bytes
            return _first_manifest(path, fh)
    except OSError as e:
        raise unreadable_bundle(path, e) from None


def _first_manifest(path: str, fh: IO[bytes]) -> bytes:
    """The manifest in the zstd frame at ``fh``'s position."""
    try:
        frame = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=False)
        head = frame.read(MAX_MANIFEST_BYTES + 64 * tarfile.BLOCKSIZE)
    except OSError as e:
        raise unreadable_bundle(path, e) from None
    except zstandard.ZstdError as e:
        raise BundleError(path, f"unreadable ({e}); not a bundle, or a corrupt one") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(head), mode="r:") as tar:
            return tar.extractfile(_manifest_member(path, tar)).read()
    except TAR_HEADER_ERRORS as e:
        raise BundleError(path, f"invalid manifest: {e}", MANIFEST) from None
