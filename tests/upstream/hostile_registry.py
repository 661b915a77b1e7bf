"""A registry that misbehaves on purpose, on 127.0.0.1: what CNCF Distribution will
not do (answer without end, challenge forever, lie about lengths), so that the
client's limits can be shown. Every other registry test runs the real one
(:mod:`tests.upstream.registry`)."""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import List, Tuple

from mirror.bundle import POINTER_SIZE, _pointer

from ._http import LoopbackServer, QuietHandler

LAYER = b"x" * 1000  # not a bundle: what a test reaches past the registry checks
LAYER_DIGEST = "sha256:" + hashlib.sha256(LAYER).hexdigest()
# opens as a bundle packed with --stream: a pointer to a manifest frame near its end
STREAMED = _pointer(POINTER_SIZE + 60, 100) + b"x" * 200
CONFIG = b"{}"
CONFIG_DIGEST = "sha256:" + hashlib.sha256(CONFIG).hexdigest()
MODES = ("scope-loop", "token-bomb", "error-bomb", "errors-not-a-list", "manifest-cut",
         "annotations-not-an-object", "nested", "bad-gzip", "token-per-request",
         "location-elsewhere", "ignores-range")


def manifest(annotations=None, layer: bytes = LAYER) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.megengine.mirror.bundle.v2",
        "config": {"mediaType": "application/vnd.megengine.mirror.manifest.v1+json",
                   "digest": CONFIG_DIGEST, "size": len(CONFIG)},
        "layers": [{"mediaType": "application/vnd.megengine.mirror.bundle.layer.v1.tar+zstd",
                    "digest": "sha256:" + hashlib.sha256(layer).hexdigest(),
                    "size": len(layer),
                    "annotations": annotations if annotations is not None else
                    {"org.opencontainers.image.title": "b.hub"}}]}).encode()


class _Handler(QuietHandler):
    def _send(self, code: int, body: bytes = b"", headers=()) -> None:
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _endless(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = b"a" * (1 << 20)
        try:
            for _ in range(4096):  # 4 GiB at most: the client must stop long before
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        except OSError:
            pass
        self.close_connection = True

    def _challenge(self, scope: str) -> None:
        server: HostileRegistry = self.server.owner
        self._send(401, b"{}", [("WWW-Authenticate", f'Bearer realm="{server.base_url}/token",'
                                                     f'service="s",scope="{scope}"')])

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        server: HostileRegistry = self.server.owner
        n = next(server.counter)
        server.seen.append((self.command, self.headers.get("Host", ""), self.path,
                            self.headers.get("Authorization")))
        mode, auth = server.mode, self.headers.get("Authorization")
        if self.path.startswith("/token"):
            if mode == "token-bomb":
                return self._endless(200)
            return self._send(200, json.dumps({"token": f"t{n}"}).encode())
        if mode == "scope-loop":  # a new scope each time: a client that follows loops
            return self._challenge(f"repository:x/y:pull{n}")
        if mode == "token-bomb" and not auth:
            return self._challenge("repository:x/y:pull")
        if mode == "token-per-request":  # each token good once, as if it expired
            if not auth or auth in server.used:
                return self._challenge("repository:x/y:pull")
            server.used.add(auth)
        if mode == "errors-not-a-list":
            return self._send(404, json.dumps({"errors": {"code": "X"}}).encode())
        if mode == "error-bomb":
            return self._endless(500)
        if "/manifests/" in self.path:
            if mode == "manifest-cut":  # says 5000 bytes, sends 16, hangs up
                self.send_response(200)
                self.send_header("Content-Length", "5000")
                self.end_headers()
                self.wfile.write(b'{"schemaVersion"')
                self.close_connection = True
                return None
            if mode == "annotations-not-an-object":
                return self._send(200, manifest(["x"]))
            if mode == "nested":
                return self._send(200, b"[" * 100000 + b"]" * 100000)
            if mode == "ignores-range":
                return self._send(200, manifest(layer=STREAMED))
            return self._send(200, manifest())
        if "/blobs/" in self.path:
            if mode == "bad-gzip":
                return self._send(200, b"not gzip at all", [("Content-Encoding", "gzip")])
            if mode == "ignores-range":  # the whole blob, whatever Range asks
                return self._send(200, STREAMED)
            return self._send(200, CONFIG if self.path.endswith(CONFIG_DIGEST) else LAYER)
        return self._send(404, b"{}")

    def _upload(self) -> None:
        server: HostileRegistry = self.server.owner
        server.seen.append((self.command, self.headers.get("Host", ""), self.path,
                            self.headers.get("Authorization")))
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            length -= len(self.rfile.read(min(length, 1 << 20)))
        if server.mode == "location-elsewhere":
            if self.headers.get("Host", "").startswith("127.0.0.1") and \
                    not self.headers.get("Authorization"):
                return self._send(401, b"{}", [("WWW-Authenticate", 'Basic realm="r"')])
            if self.command == "POST":  # the upload goes on at another host
                return self._send(202, b"", [("Location", f"http://localhost:{server.port}"
                                                          f"/elsewhere/upload")])
            return self._send(500, b"{}")
        return self._send(404, b"{}")

    do_POST = do_PUT = do_PATCH = _upload  # noqa: N815


class HostileRegistry(LoopbackServer):
    def __init__(self, mode: str):
        super().__init__(_Handler)
        self.mode = mode
        self.counter = itertools.count()
        self.used: set = set()
        self.seen: List[Tuple[str, str, str, str | None]] = []
