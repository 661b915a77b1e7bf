"""Downloading weights: resumable, retried, hashed as the bytes arrive, and cached by
URL on the packing host so that packing again downloads nothing.

Which URLs to download is :mod:`mirror.discovery`'s job; this module only fetches
them (``http``, ``https``, ``file``, ``s3`` and absolute paths, as MegEngine does).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import logging
import os
import queue
import re
import shutil
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, Iterator, List, Mapping, Sequence, Tuple

from tqdm import tqdm

from .atomic import write_atomic
from .config import proxy_for, settings
from .errors import DownloadError, explained
from .hashing import CHUNK, sha256_bytes, sha256_file
from .locking import locked
from .model import WeightFile

log = logging.getLogger(__name__)

SCHEMES = ("http", "https", "file")
STOP_WAIT = 2.0  # seconds a stop waits for the downloads it stopped to end
PART = ".part"  # a download in progress, kept to be resumed (with its PART + ".json")


class Batch:
    """What the downloads of one pack share: one progress bar of bytes, whatever the
    number at once (each adds what it expects as its answer arrives), and a stop
    switch for Ctrl-C that each download checks between blocks and that shuts the
    sockets of reads waiting on a silent server."""

    def __init__(self, bar: Any = None) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._open: set = set()
        self.bar = bar

    def __bool__(self) -> bool:  # stopped
        return self._event.is_set()

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if stopped meanwhile."""
        self._event.wait(seconds)

    def stop(self) -> None:
        self._event.set()
        with self._lock:
            for response in list(self._open):
                _shut(response)

    def expect(self, size: int) -> None:
        """``size`` more bytes are on their way."""
        if self.bar is not None:
            with self._lock:
                self.bar.total = (self.bar.total or 0) + size
                self.bar.refresh()

    def advance(self, size: int) -> None:
        if self.bar is not None:
            with self._lock:
                self.bar.update(size)

    @contextlib.contextmanager
    def watching(self, response: Any) -> Iterator[None]:
        with self._lock:
            self._open.add(response)
        if self:
            _shut(response)
        try:
            yield
        finally:
            with self._lock:
                self._open.discard(response)


def _shut(response: Any) -> None:
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    with contextlib.suppress(OSError, AttributeError):
        sock.shutdown(socket.SHUT_RDWR)


class Interrupted(Exception):
    """A download stopped by :meth:`Batch.stop`; its part file is kept for a resume."""


def url_basename(url: str) -> str:
    """The file name MegEngine gives a URL's download (the last path segment)."""
    return os.path.basename(urllib.parse.urlparse(url).path) or "weights"


def download(url: str, dest: str, *, retries: int = 4, timeout: float = 30.0,
             progress: bool = True, batch: Batch | None = None,
             growth: Growth | None = None) -> WeightFile:
    """Download ``url`` to ``dest``, resuming after dropped connections, hashing as it goes.

    ``dest`` appears only when the whole file has arrived. A partial download is
    kept at ``dest + ".part"``, with the validator the server gave (ETag or
    Last-Modified) in ``dest + ".part.json"``: a retry, or the next run, asks only
    for the rest (``Range``), and only if the server's file is still that one
    (``If-Range``); otherwise it gets the whole file again.

    Args:
        url: an ``http``, ``https``, ``file`` or ``s3`` URL, or an absolute path.
        dest: the file to write.
        retries: attempts after the first, on a dropped connection or a 5xx or 429.
        timeout: seconds to wait for the server, per attempt.
        progress: show a progress bar.
        growth: told of every block written to the part file (an HTTP(S) download's).

    Returns:
        The :class:`WeightFile` file, with its size and sha256.

    Raises:
        DownloadError: the URL cannot be fetched (an unsupported scheme, a 4xx, a
            missing file), or every attempt failed.
    """
    scheme = urllib.parse.urlparse(url).scheme
    part = dest + ".part"
    if scheme == "" and os.path.isabs(url):
        _copy_local(url, part)  # a path on this host, as megfile (and MegEngine) allow
    elif scheme == "s3":
        _copy_s3(url, part)
    elif scheme not in SCHEMES:
        raise DownloadError(url, f"unsupported URL scheme {scheme or '(none)'!r}; mirror "
                                 f"downloads {', '.join(SCHEMES)} and s3 URLs and absolute "
                                 f"paths")
    hashed = _Hashed(part, url, growth if scheme in SCHEMES else None)
    if scheme in SCHEMES:
        if hashed.validator is None and os.path.exists(part):
            os.unlink(part)  # bytes of a file no validator names: never resumed into
        _fetch_with_retries(url, part, retries, timeout, progress, hashed, batch)
    hashed.catch_up(part)  # a no-op after an HTTP download, which hashed as it wrote
    os.replace(part, dest)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(part + ".json")
    return WeightFile(url, dest, hashed.size, hashed.digest.hexdigest())


class Growth:
    """One download's bytes as they arrive, for a reader that follows them (a streamed
    pack compresses a weight while it downloads): the part file, how many of its
    bytes are written and hashed, and a generation that moves whenever they start
    over (a server that cannot resume), which voids whatever was read before."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.part: str | None = None
        self.size = 0
        self.generation = 0
        self.done = False

    def grew(self, part: str, size: int, over: bool) -> None:
        with self._cond:
            self.part, self.size = part, size
            self.generation += over
            self._cond.notify_all()

    def end(self, *_: Any) -> None:
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def wait(self, beyond: int, generation: int | None,
             timeout: float = 0.5) -> Tuple[str | None, int, int, bool]:
        """(part, size, generation, done) once there are more than ``beyond`` bytes, the
        generation is not ``generation`` (None: any), or the download ended; at the
        latest after ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self.done or self.size > beyond or (
                generation is not None and self.generation != generation), timeout)
            return self.part, self.size, self.generation, self.done


class _Hashed:
    """The sha256 of a partial download, kept up to date as blocks arrive, and the
    validator of the file those bytes are the start of, kept beside the part file."""

    def __init__(self, part: str, source: str, growth: Growth | None = None) -> None:
        self.part, self.source, self.growth = part, source, growth
        self._reset(None)
        try:
            with open(part + ".json") as fh:
                state = json.load(fh)
            if state.get("source") == source and isinstance(state.get("validator"), str):
                self.validator = state["validator"]
        except (OSError, ValueError, AttributeError):
            pass

    def _reset(self, validator: str | None) -> None:
        self.digest, self.size = hashlib.sha256(), 0
        self.validator = validator  # ETag or Last-Modified of the bytes so far
        if self.growth is not None:
            self.growth.grew(self.part, 0, over=True)

    def restart(self, validator: str | None) -> None:
        """The bytes start again from 0, of the file ``validator`` names."""
        self._reset(validator)
        with open(self.part + ".json", "w") as fh:
            json.dump({"source": self.source, "validator": validator}, fh)

    def forget(self) -> None:
        """Drop the part and its validator: the next attempt downloads the whole file."""
        for path in (self.part, self.part + ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._reset(None)

    def update(self, block: bytes) -> None:
        """``block`` is in the part file now (written and flushed), after the others."""
        self.digest.update(block)
        self.size += len(block)
        if self.growth is not None:
            self.growth.grew(self.part, self.size, over=False)

    def catch_up(self, path: str) -> None:
        """Make the digest cover exactly the file at ``path`` (it already does unless a
        download started over, or was resumed from an earlier process's part file)."""
        have = os.path.getsize(path) if os.path.exists(path) else 0
        if have != self.size:
            self._reset(self.validator)
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(CHUNK), b""):
                    self.update(block)


def _fetch_with_retries(url: str, part: str, retries: int, timeout: float,
                        progress: bool, hashed: _Hashed, batch: Batch | None) -> None:
    last_error = "no attempt made"
    batch = batch if batch is not None else Batch()
    # The proxy of this URL, as git's is chosen (config.proxy_for), or none at all:
    # once, not at every attempt (git config is asked in a process of its own).
    proxy = proxy_for(url)
    for attempt in range(retries + 1):
        if attempt:
            batch.wait(min(0.25 * 2 ** attempt, 4.0))
        if batch:
            raise Interrupted(url)
        try:
            return _fetch_into(url, part, timeout, progress, hashed, batch, proxy)
        except _Retryable as e:
            last_error = str(e)
            log.debug("%s: %s (attempt %d of %d)", url, e, attempt + 1, retries + 1)
    raise DownloadError(url, f"{last_error} (gave up after {retries + 1} attempt"
                             f"{'s' if retries else ''})")


def local_file(source: str) -> str | None:
    """The file on this host that ``source`` (a path or a ``file:`` URL) names, or
    None: it is read where it is, never copied into the download cache."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        # the file urllib would open: "?" is part of its name, "#" ends it
        return urllib.request.url2pathname(urllib.request.Request(source).selector)
    if parsed.scheme == "" and os.path.isabs(source):
        return source
    return None


def _stamp(st: os.stat_result) -> Tuple[int, ...]:
    """What changes when a file's bytes may have: its identity, size and times."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@contextlib.contextmanager
def reading_in_place(path: str) -> Iterator[Tuple[IO[bytes], int]]:
    """A local weight's file, open to be read once, where it is, and its size: a
    regular file (a FIFO put there meanwhile is refused, not waited on), which must
    not change while it is read. The caller reads it to its end.

    Raises :class:`DownloadError` naming ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise DownloadError(path, e.strerror or str(e)) from None
    try:
        fh = open(fd, "rb")  # a folder is refused here
    except OSError as e:
        os.close(fd)
        raise DownloadError(path, e.strerror or str(e)) from None
    with fh:
        before = _fstat(path, fd)
        if not stat.S_ISREG(before.st_mode):
            raise DownloadError(path, "not a regular file")
        yield fh, before.st_size
        if _stamp(_fstat(path, fd)) != _stamp(before) or fh.tell() != before.st_size:
            raise DownloadError(path, "it changed while it was read; pack again once it "
                                      "is written")


def _fstat(path: str, fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as e:
        raise DownloadError(path, e.strerror or str(e)) from None


def _in_place(url: str, path: str, batch: Batch) -> WeightFile:
    """A local file, hashed where it is. A copy would cost a second write of every
    byte (and its flush, which the bundle's fsync waits for), and the space; the
    bundle writer hashes the bytes again as it packs them (:class:`bundle.LocalFile`)."""
    with reading_in_place(path) as (fh, expected):
        batch.expect(expected)
        digest, size = hashlib.sha256(), 0
        try:
            for block in iter(lambda: fh.read(CHUNK), b""):
                if batch:
                    raise Interrupted(url)
                digest.update(block)
                size += len(block)
                batch.advance(len(block))
        except OSError as e:
            raise DownloadError(path, e.strerror or str(e)) from None
    return WeightFile(url, path, size, digest.hexdigest(), in_place=True)


def _copy_local(path: str, part: str) -> None:
    try:
        shutil.copyfile(path, part)
    except OSError as e:
        raise DownloadError(path, e.strerror or str(e)) from None


def _copy_s3(url: str, part: str) -> None:
    try:
        import megfile  # MegEngine's own file layer, which its hub uses for s3://
    except ImportError:
        raise DownloadError(url, "s3:// needs megfile (pip install megfile), which "
                                 "MegEngine installs") from None
    try:
        with megfile.smart_open(url, "rb") as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    except Exception as e:  # noqa: BLE001  (megfile raises its own and botocore's errors)
        raise DownloadError(url, f"{type(e).__name__}: {e}") from None


class _Retryable(Exception):
    pass


# urllib's and HTTP's words, and what they mean for the user: what happened, what to try
_MEANINGS = (
    (("http 404", "http 410"),
     "not there, or not public: check the URL (or where --rewrite points it)"),
    (("http 401", "http 403"),
     "the server refuses to serve it without credentials, which mirror does not send for "
     "weights: download it yourself and pack it with --weights PATH"),
    (("http 407",),
     "the proxy asks for credentials: give them in the proxy URL "
     "(https_proxy=http://USER:PASSWORD@HOST:PORT)"),
    (("tunnel connection failed",),
     "the proxy refused the connection: check https_proxy, http_proxy and no_proxy"),
    (("wrong_version_number", "wrong version number", "packet length too long"),
     "the server answered an HTTPS request in plain HTTP: rewrite the URL to http:// "
     "with --rewrite"),
    (("certificate verify failed",),
     "its TLS certificate is not trusted here: add its CA to the system's trust store, "
     "or point SSL_CERT_FILE at a bundle that has it"),
    (("name or service not known", "temporary failure in name resolution",
      "nodename nor servname"),
     "the host name does not resolve: this host has no DNS or no way out; pack on a host "
     "that reaches it, or --rewrite the URL to a mirror this one reaches"),
    (("connection refused",),
     "nothing answers at that address and port (is the server up, and is this its port?)"),
)


def _fetch_into(url: str, part: str, timeout: float, progress: bool, hashed: _Hashed,
                batch: Batch, proxy: str | None) -> None:
    """One attempt: the rest of ``part`` (all of it if the server cannot resume).
    Raises :class:`_Retryable` for what another attempt may fix."""
    hashed.catch_up(part)
    have = hashed.size
    request = urllib.request.Request(url, headers={"User-Agent": "mge-mirror"})
    if have:
        request.add_header("Range", f"bytes={have}-")
        if hashed.validator:  # the rest only if it is still the same file, else all of it
            request.add_header("If-Range", hashed.validator)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(
        {urllib.parse.urlsplit(url).scheme: proxy} if proxy else {}))
    log.debug("GET %s%s%s", url, f" (bytes {have}-, If-Range {hashed.validator})"
              if have else "", f" through {proxy}" if proxy else "")
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Asked past the end: whole, if the server's file is as long as the part;
            # else (a server deaf to If-Range, a file that changed) start over.
            if e.headers.get("Content-Range", "") == f"bytes */{have}":
                return
            hashed.forget()
            raise _Retryable(f"the part is not a part of the server's file (HTTP 416, "
                             f"{e.headers.get('Content-Range')}); downloading it "
                             f"again") from None
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(url, explained(f"HTTP {e.code} {e.reason}", _MEANINGS)) \
            from None
    except (urllib.error.URLError, OSError) as e:
        meanings = _MEANINGS if not proxy else ((
            ("connection refused",), f"the proxy {proxy} does not answer: check "
                                     f"https_proxy, http_proxy and no_proxy"),) + _MEANINGS
        raise _Retryable(explained(str(getattr(e, "reason", e)), meanings)) from None
    except (ValueError, http.client.HTTPException) as e:  # e.g. InvalidURL: a bad port
        raise DownloadError(url, f"invalid URL: {e}") from None

    with response, batch.watching(response):
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if have and response.status == 206 and (
                not response.headers.get("Content-Range", "").startswith(f"bytes {have}-")
                or validator != hashed.validator):
            # The rest of another file (a server deaf to If-Range): never spliced on
            hashed.forget()
            raise _Retryable("the server's file is not the one the part began; "
                             "downloading it again")
        if have and response.status != 206:
            have = 0  # the whole file: the server ignored Range, or the file changed
        if not have:
            hashed.restart(validator)
        _receive(url, response, part, have, progress, hashed, batch)


def _receive(url: str, response: http.client.HTTPResponse, part: str, have: int,
             progress: bool, hashed: _Hashed, batch: Batch) -> None:
    """Append the response's body to ``part`` (which holds ``have`` bytes), hashing it."""
    length = response.headers.get("Content-Length")
    expected = int(length) if length is not None else None
    received = 0
    batch.expect(expected or 0)
    with open(part, "ab" if have else "wb") as out, tqdm(
        total=(expected + have) if expected is not None else None, initial=have,
        unit="B", unit_scale=True, unit_divisor=1024, desc=url_basename(url),
        disable=not progress, leave=False,
    ) as bar:
        buffer = bytearray(CHUNK)  # reused: read() would allocate and copy each block
        try:
            while True:
                n = response.readinto(buffer)
                if batch:
                    raise Interrupted(url)
                if not n:
                    break
                block = memoryview(buffer)[:n]
                out.write(block)
                if hashed.growth is not None:
                    out.flush()  # in the file before the reader following it is told
                hashed.update(block)  # sha256 on the fly: the file is read once
                received += n
                bar.update(n)
                batch.advance(n)
        except (OSError, http.client.HTTPException) as e:  # e.g. IncompleteRead
            if batch:
                raise Interrupted(url) from None
            batch.expect(-(expected - received) if expected is not None else 0)
            raise _Retryable(f"connection lost after {have + received} bytes: {e}") from None
    if expected is not None and received != expected:
        batch.expect(received - expected)  # what never came is not waited for
        raise _Retryable(f"connection closed after {have + received} of "
                         f"{have + expected} bytes")


# --- the packing host's download cache ----------------------------------------


def default_cache_dir() -> str:
    """The packing host's download cache: ``config.settings().downloads_dir``."""
    return settings().downloads_dir


class DownloadCache:
    """Weights downloaded before, by URL, so packing again downloads nothing.

    A cached file is never trusted because it exists: it is re-hashed against the
    sha256 recorded when it was downloaded (and against ``expect``, a lock's pin).
    """

    def __init__(self, root: str | None = None, refresh: bool = False,
                 keep: contextlib.ExitStack | None = None):
        self.root = root or default_cache_dir()
        self.refresh = refresh  # download again, whatever is cached
        self.keep = keep  # where the locks of the files fetched are held, if anywhere

    def _paths(self, url: str) -> Tuple[str, str]:
        key = sha256_bytes(url.encode())
        return os.path.join(self.root, key + ".data"), os.path.join(self.root, key + ".json")

    def fetch(self, url: str, source: str, progress: bool = True,
              expect: str | None = None, batch: Batch | None = None,
              growth: Growth | None = None) -> WeightFile:
        """The file for ``url``: from the cache when its bytes still match what was
        recorded (and ``expect``, a sha256, if given), else downloaded from ``source``
        (``url`` itself, or where a rewrite points it), resuming what an earlier run
        left (:func:`download`), ``growth`` told of its bytes as they arrive. A
        local file (a path, a ``file:`` URL) is hashed where it is, not cached.

        Raises :class:`DownloadError`, also when the cache cannot be written."""
        stop = batch if batch is not None else Batch()
        local = local_file(source)
        if local is not None:
            return _in_place(url, local, stop)
        while True:
            got = self._fetch(url, source, progress, expect, stop, growth)
            if self.keep is None:
                return got
            # Kept (a shared lock) until the pack is done: clean leaves it alone. A
            # clean between the download and this lock is seen, and it is fetched again,
            # the lock let go first (the download's own exclusive lock would wait on it).
            with contextlib.ExitStack() as held:
                held.enter_context(_lock(got.path + ".lock", stop, shared=True))
                if os.path.exists(got.path):
                    self.keep.enter_context(held.pop_all())
                    return got

    def _fetch(self, url: str, source: str, progress: bool, expect: str | None,
               batch: Batch, growth: Growth | None) -> WeightFile:
        data, record = self._paths(url)
        cached = None if self.refresh else self._check(url, data, record, expect)
        if cached:
            return cached
        try:
            os.makedirs(self.root, exist_ok=True)
            # One download of a URL at a time, whoever asks: two packs never write one
            # part file; the second finds the first's download done.
            with _lock(data + ".lock", batch):
                cached = None if self.refresh else self._check(url, data, record, expect)
                if cached:
                    return cached
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(record)  # data is about to be replaced
                got = download(source, data, progress=progress, batch=batch, growth=growth)
                write_atomic(record, json.dumps({"url": url, "sha256": got.sha256,
                                                 "size": got.size}).encode())
        except OSError as e:
            raise DownloadError(url, f"download cache {self.root}: {e.strerror or e}") \
                from None
        return WeightFile(url, data, got.size, got.sha256)

    @staticmethod
    def _check(url: str, data: str, record: str, expect: str | None) -> WeightFile | None:
        try:
            with open(record) as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or rec.get("url") != url or (
                expect and rec.get("sha256") != expect):
            return None
        try:
            digest, size = sha256_file(data)
        except OSError:
            return None
        if digest != rec.get("sha256"):
            return None  # changed on disk since: download again
        with contextlib.suppress(OSError):
            os.utime(data)  # used now: clean --older-than counts from here
        return WeightFile(url, data, size, digest)


@dataclass(frozen=True)
class CachedDownload:
    """One entry of the download cache: a whole download, or a part of one kept to be
    resumed."""

    url: str  # the URL (for a part: where its bytes come from), or "?" if unrecorded
    path: str
    size: int
    modified: int  # seconds since the epoch
    complete: bool

    def to_json(self) -> Dict[str, Any]:
        return {"url": self.url, "path": self.path, "size": self.size,
                "modified": self.modified, "complete": self.complete}


def list_downloads(root: str | None = None) -> List[CachedDownload]:
    """What the download cache at ``root`` (default: the configured one) holds."""
    root = root or default_cache_dir()
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        path = os.path.join(root, name)
        if name.endswith(".data"):
            record, key = path[:-len(".data")] + ".json", "url"
        elif name.endswith(".data" + PART):
            record, key = path + ".json", "source"
        else:
            continue  # records, locks
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue  # removed meanwhile
        url = "?"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            with open(record) as fh:
                url = str(json.load(fh).get(key) or "?")
        found.append(CachedDownload(url, path, st.st_size, int(st.st_mtime),
                                    name.endswith(".data")))
    return found


def clean_downloads(root: str | None = None, partial_only: bool = False,
                    older_than: float | None = None, dry_run: bool = False
                    ) -> List[CachedDownload]:
    """Remove entries of the download cache at ``root``: every one, or only parts
    (``partial_only``), or only those not touched for ``older_than`` seconds. An
    entry a pack is downloading now is left alone. Returns what was (or, with
    ``dry_run``, would be) removed."""
    removed = []
    now = time.time()
    for entry in list_downloads(root):
        if (partial_only and entry.complete) or \
                (older_than is not None and now - entry.modified < older_than):
            continue
        data = entry.path[:-len(PART)] if not entry.complete else entry.path
        if not _remove_locked(data, (data, data[:-len(".data")] + ".json") if entry.complete
                              else (entry.path, entry.path + ".json"), dry_run):
            continue  # being downloaded now
        removed.append(entry)
    if not dry_run:  # the locks of what is gone (and of downloads that never began)
        root = root or default_cache_dir()
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            names = []
        for name in names:
            data = os.path.join(root, name[:-len(".lock")])
            if _LOCK_NAME.fullmatch(name) and os.path.isfile(data + ".lock") and \
                    not os.path.exists(data) and not os.path.exists(data + PART):
                with contextlib.suppress(OSError):  # a lock file is no content: kept
                    _remove_locked(data, (), dry_run)
    return removed


_LOCK_NAME = re.compile(r"[0-9a-f]{64}\.data\.lock")  # an entry's: the sha256 of its URL


def _remove_locked(data: str, paths: Sequence[str], dry_run: bool) -> bool:
    """Remove ``paths`` of the entry ``data``, and its lock file once nothing of it is
    left, holding that lock (which :func:`locked` allows); False if a pack holds it."""
    lock = data + ".lock"
    try:
        with locked(lock, wait=False):
            if dry_run:
                return True
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            if not os.path.exists(data) and not os.path.exists(data + PART):
                with contextlib.suppress(OSError):  # (a lock file is no content)
                    os.unlink(lock)
    except BlockingIOError:
        return False
    return True


@dataclass(frozen=True)
class Arriving:
    """A download under way: its bytes as they arrive (``growth``), and its
    :class:`WeightFile` once whole (``result()``, which waits for it and raises its
    :class:`DownloadError`)."""

    url: str
    growth: Growth
    future: Future

    def result(self) -> WeightFile:
        return self.future.result()


def fetch_arriving(urls: Sequence[str], cache: DownloadCache, source: Callable[[str], str],
                   jobs: int = 4, progress: bool = True,
                   expect: Mapping[str, str] | None = None) -> Iterator[Arriving]:
    """Download ``urls`` (each from ``source(url)``), ``jobs`` at a time, through
    ``cache``, each given in the order of ``urls`` as soon as the caller asks for it,
    whole or not (:class:`Arriving`): pack checks each as the later ones download,
    and a streamed pack compresses its bytes as they arrive.

    ``expect`` maps a URL to the sha256 a lock pins: a cached file with other bytes
    is downloaded again. Closing the iterator (after the first error, or Ctrl-C)
    stops every download."""
    expect = expect or {}
    done: List[str] = []
    # One bar of bytes (rate, ETA) at any -j; a bar per file too with -j 1
    with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"weights 0/{len(urls)}", disable=not progress or None) as bar:
        batch = Batch(bar)

        def finished(future: Any) -> None:
            done.append("")
            bar.set_description(f"weights {len(done)}/{len(urls)}")

        growths = [Growth() for _ in urls]
        futures = _on_daemons([functools.partial(
            cache.fetch, u, source(u), progress and jobs == 1, expect.get(u), batch, g)
            for u, g in zip(urls, growths)], jobs)
        for future, growth in zip(futures, growths):
            future.add_done_callback(finished)
            future.add_done_callback(growth.end)
        try:
            for url, growth, future in zip(urls, growths, futures):
                yield Arriving(url, growth, future)
        except BaseException:  # Ctrl-C, GeneratorExit: a caller that stops stops them all
            for future in futures:  # the first failure is the answer
                future.cancel()
            batch.stop()  # the running ones stop mid-read; their parts stay, to resume
            # They end at once, but for one stuck in a connect: not waited for past this
            wait(futures, timeout=STOP_WAIT)
            raise


def _on_daemons(tasks: Sequence[Callable[[], Any]], jobs: int) -> List[Future]:
    """Run ``tasks`` in order on ``jobs`` daemon threads, each result in its Future. Not
    a ThreadPoolExecutor, whose threads the interpreter waits for when it exits: after
    Ctrl-C, a thread still in a connect or a TLS handshake (which nothing can wake)
    must not hold the process. The part file it leaves is resumed next time."""
    futures: List[Future] = [Future() for _ in tasks]
    work: queue.SimpleQueue = queue.SimpleQueue()
    for pair in zip(tasks, futures):
        work.put(pair)

    def worker() -> None:
        while True:
            try:
                task, future = work.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue  # cancelled before it began
            try:
                future.set_result(task())
            except BaseException as e:  # noqa: BLE001  (handed to whoever waits on it)
                future.set_exception(e)

    for _ in range(max(1, min(jobs, len(tasks)))):
        threading.Thread(target=worker, daemon=True, name="mirror-download").start()
    return futures


@contextlib.contextmanager
def _lock(path: str, batch: Batch, shared: bool = False) -> Iterator[None]:
    """Hold the ``flock`` on ``path``, waiting for another pack's download of the same
    URL to end, unless ``batch`` is stopped meanwhile (Ctrl-C)."""
    while True:
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(locked(path, shared=shared, wait=False))
            except BlockingIOError:
                if batch:
                    raise Interrupted(path) from None
                batch.wait(0.2)
                continue
            yield
            return
