"""Smart HTTP git over loopback: ``git http-backend`` run as a CGI per request."""

from __future__ import annotations

import base64
import os
import subprocess
from typing import Dict

from ._http import LoopbackServer, QuietHandler
from .tls import Certificates, server_context


class _GitHandler(QuietHandler):
    def do_GET(self) -> None:
        self._cgi()

    def do_POST(self) -> None:
        self._cgi()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _cgi(self) -> None:
        server: GitServer = self.server.owner
        if server.auth and self.headers.get("Authorization") != server.auth:
            if self.command == "POST":
                self._read_body()
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self._read_body() if self.command == "POST" else b""
        env: Dict[str, str] = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": server.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        for key, value in self.headers.items():
            env["HTTP_" + key.upper().replace("-", "_")] = value
        server.requests += 1
        proc = subprocess.run([server.backend], input=body, env=env, capture_output=True,
                              timeout=60)
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class GitServer(LoopbackServer):
    """Serves bare repositories under ``root`` as ``http://127.0.0.1:PORT/owner/name``."""

    def __init__(self, root: str, user: str | None = None, password: str | None = None,
                 certificates: Certificates | None = None):
        super().__init__(_GitHandler)
        if certificates is not None:  # https://127.0.0.1:PORT, trusted through its CA
            self.httpd.socket = server_context(certificates).wrap_socket(
                self.httpd.socket, server_side=True)
            self.base_url = f"https://127.0.0.1:{self.port}"
        self.root = os.path.abspath(root)
        self.requests = 0
        # With a user and password, every request must carry them (HTTP Basic).
        self.auth = ("Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
                     if user else None)
        exec_path = subprocess.run(["git", "--exec-path"], capture_output=True, text=True,
                                   check=True).stdout.strip()
        self.backend = os.path.join(exec_path, "git-http-backend")

    @property
    def host(self) -> str:
        """What ``--git-host`` takes: ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def url(self, repo: str) -> str:
        return f"{self.base_url}/{repo}"
