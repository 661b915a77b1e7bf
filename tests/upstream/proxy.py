"""A logging HTTP proxy on loopback, as a connected host's egress proxy: ``CONNECT``
tunnels (what HTTPS goes through) and plain ``GET`` of absolute URLs, each logged."""

from __future__ import annotations

import http.client
import select
import socket
import urllib.parse
from typing import List, Tuple

from ._http import LoopbackServer, QuietHandler


class _ProxyHandler(QuietHandler):
    def do_CONNECT(self) -> None:  # noqa: N802
        server: LoggingProxy = self.server.owner
        server.seen.append(("CONNECT", self.path))
        host, _, port = self.path.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            self.send_error(502)
            return
        # As squid answers: the status line alone (a client may read a CONNECT answer
        # with headers as one whose body runs to the end of the connection)
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.close_connection = True
        with upstream:
            sockets = [self.connection, upstream]
            for _ in range(100_000):  # bounded: a test's fetch is a few hundred rounds
                ready, _, broken = select.select(sockets, [], sockets, 30)
                if broken or not ready:
                    return
                for s in ready:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    (upstream if s is self.connection else self.connection).sendall(data)

    def do_GET(self) -> None:  # noqa: N802
        server: LoggingProxy = self.server.owner
        server.seen.append(("GET", self.path))
        target = urllib.parse.urlsplit(self.path)
        conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=30)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("proxy-connection", "connection", "host")}
        conn.request("GET", target.path + (f"?{target.query}" if target.query else ""),
                     headers=headers)
        answer = conn.getresponse()
        self.send_response(answer.status, answer.reason)
        for k, v in answer.getheaders():
            if k.lower() not in ("connection", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        while True:
            block = answer.read(1 << 16)
            if not block:
                break
            self.wfile.write(block)
        conn.close()
        self.close_connection = True


class LoggingProxy(LoopbackServer):
    """``http://127.0.0.1:PORT``; ``seen`` lists ``(method, target)`` of each request."""

    def __init__(self):
        super().__init__(_ProxyHandler)
        self.seen: List[Tuple[str, str]] = []
