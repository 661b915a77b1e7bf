"""Files over HTTP on loopback, with ``Range`` and switches that inject faults."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Dict

from ._http import LoopbackServer, QuietHandler

FAULTS = ("404", "500", "drop", "slow", "stall", "change")


class _WeightHandler(QuietHandler):
    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        server: WeightServer = self.server.owner
        path = self.path.split("?", 1)[0]
        server.hits[path] = server.hits.get(path, 0) + 1
        fault = server.faults.get(path)
        if fault and server.fault_budget.get(path, 0) != 0:
            server.fault_budget[path] -= 1
        else:
            fault = None
        data = server.files.get(path)
        if fault == "404" or data is None:
            return self._error(404)
        if fault == "500":
            return self._error(500)
        start, end, status = 0, len(data), 200
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if if_range is not None:
            server.if_range.append(if_range)
            if if_range != etag and server.honor_if_range:
                rng = None  # another file than the one the client has part of: all of it
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            server.range_requests += 1
        body = memoryview(data)[start:end]  # no copy: the bench serves GiBs
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        if fault == "drop":
            # Send half, then cut the connection: the client sees a short body.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "change":
            # Send half, pause, then republish other bytes at the path and cut the
            # connection: the client's retry finds another file than its part began.
            half = body[: len(body) // 2]
            server.throttled(self.wfile, half) if server.rate else self.wfile.write(half)
            self.wfile.flush()
            time.sleep(server.change_pause)
            server.files[path] = server.changes.pop(path)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "stall":
            # Send half, then hold the connection open without a byte more (a client
            # must be able to give up, or be interrupted, meanwhile).
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            deadline = time.monotonic() + server.stall_seconds
            while time.monotonic() < deadline and not server.stopping:
                time.sleep(0.05)
            self.close_connection = True
            return
        if fault == "slow":
            for i in range(0, len(body), 4096):
                self.wfile.write(body[i:i + 4096])
                time.sleep(server.slow_delay)
            return
        if server.rate:
            return server.throttled(self.wfile, body)
        self.wfile.write(body)

    def _error(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


class WeightServer(LoopbackServer):
    """Serves ``files`` (URL path -> bytes) at ``http://127.0.0.1:PORT/<path>``.

    ``fault(path, kind, times)`` makes the next ``times`` requests for ``path``
    fail as ``kind``: ``404``, ``500``, ``drop`` (half the body, then the
    connection closes), ``slow`` (the body in small delayed pieces) or ``change``
    (:meth:`change_midway`). ``rate``
    limits the bytes per second of all answers together.
    """

    def __init__(self):
        super().__init__(_WeightHandler)
        self.files: Dict[str, bytes] = {}
        self.faults: Dict[str, str] = {}
        self.fault_budget: Dict[str, int] = {}
        self.hits: Dict[str, int] = {}
        self.range_requests = 0
        self.if_range: list = []  # every If-Range header received
        self.slow_delay = 0.01
        self.stall_seconds = 60.0
        self.honor_if_range = True  # False: a server that serves Range whatever changed
        self.stopping = False
        # Bytes per second that every answer together may send (0: as fast as it can):
        # a link of that speed, shared as a real one is, for the benchmarks.
        self.rate = 0
        self.changes: Dict[str, bytes] = {}  # what a "change" fault republishes
        self.change_pause = 0.3
        self._sent_until = 0.0  # when the link is free again
        self._link = threading.Lock()

    def throttled(self, out, body: memoryview) -> None:
        """Send ``body`` no faster than ``rate`` allows, with every other answer."""
        piece = 1 << 18
        for i in range(0, len(body), piece):
            chunk = body[i:i + piece]
            with self._link:
                start = max(self._sent_until, time.monotonic())
                self._sent_until = start + len(chunk) / self.rate
            delay = start - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            out.write(chunk)

    def stop(self) -> None:
        self.stopping = True  # a stalled answer ends now
        super().stop()

    def add(self, path: str, data: bytes) -> str:
        """Serve ``data`` at ``path`` and return its URL."""
        path = "/" + path.lstrip("/")
        self.files[path] = data
        return self.base_url + path

    def add_file(self, path: str, local: str) -> str:
        with open(local, "rb") as fh:
            return self.add(path, fh.read())

    def fault(self, path: str, kind: str | None, times: int = -1) -> None:
        """Inject ``kind`` for the next ``times`` requests (-1: until cleared with None)."""
        path = "/" + path.lstrip("/")
        if kind is None:
            self.faults.pop(path, None)
            self.fault_budget.pop(path, None)
            return
        if kind not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        self.faults[path], self.fault_budget[path] = kind, times

    def change_midway(self, path: str, data: bytes) -> None:
        """The next answer for ``path`` sends half its bytes, then ``data`` replaces
        them (another ETag) and the connection is cut."""
        path = "/" + path.lstrip("/")
        self.changes[path] = data
        self.fault(path, "change", times=1)

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")
