"""A real OCI registry on the loopback interface: Debian's ``docker-registry`` (CNCF
Distribution 2.8), with a config of the test's own (its port, its storage), and
optionally TLS from a CA made here, htpasswd Basic auth, or the Bearer token flow
against :class:`TokenServer`."""

from __future__ import annotations

import base64
import crypt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from typing import Dict, List

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ._http import LoopbackServer, QuietHandler
from .tls import Certificates, certificate, write_pem

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RegistryServer:
    """``docker-registry serve`` on 127.0.0.1:<free port>, storing under ``root``."""

    def __init__(self, root: str, certificates: Certificates | None = None,
                 users: Dict[str, str] | None = None, token: TokenServer | None = None):
        self.root = root
        self.storage = os.path.join(root, "storage")
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = certificates is not None
        os.makedirs(self.storage, exist_ok=True)
        lines = ["version: 0.1", "log:", "  level: error", "  accesslog:",
                 "    disabled: true", "storage:", "  filesystem:",
                 f"    rootdirectory: {self.storage}", "  delete:", "    enabled: true",
                 "http:", f"  addr: 127.0.0.1:{self.port}"]
        if certificates:
            lines += ["  tls:", f"    certificate: {certificates.cert}",
                      f"    key: {certificates.key}"]
        if users:
            htpasswd = os.path.join(root, "htpasswd")
            with open(htpasswd, "w") as fh:
                for user, password in users.items():  # bcrypt, as Distribution wants
                    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
                    fh.write(f"{user}:{hashed}\n")
            lines += ["auth:", "  htpasswd:", "    realm: mirror-test", f"    path: {htpasswd}"]
        elif token:
            lines += ["auth:", "  token:", f"    realm: {token.base_url}/token",
                      f"    service: {token.service}", f"    issuer: {token.issuer}",
                      f"    rootcertbundle: {token.cert_path}"]
        self.config = os.path.join(root, "config.yml")
        with open(self.config, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> RegistryServer:
        self.log = open(os.path.join(self.root, "registry.log"), "wb")
        self.proc = subprocess.Popen([REGISTRY, "serve", self.config], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self._log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not listen in 20 s: {self._log_tail()}")

    def _log_tail(self) -> str:
        with open(os.path.join(self.root, "registry.log"), "rb") as fh:
            return fh.read()[-2000:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()

    def ref(self, name: str) -> str:
        return f"oci://{self.host}/{name}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def blob_file(self, digest: str) -> str:
        """Where the registry keeps a blob's bytes (to damage them behind its back)."""
        hexa = digest.split(":", 1)[1]
        return os.path.join(self.storage, "docker", "registry", "v2", "blobs", "sha256",
                            hexa[:2], hexa, "data")

    def blob_count(self) -> int:
        blobs = os.path.join(self.storage, "docker", "registry", "v2", "blobs", "sha256")
        return sum(len(os.listdir(os.path.join(blobs, d))) for d in os.listdir(blobs)) \
            if os.path.isdir(blobs) else 0


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _TokenHandler(QuietHandler):
    """GET /token?service=&scope=...: a JWT for the scopes asked, to a user whose Basic
    credentials match (anonymous users get a token granting nothing). POST /token, the
    OAuth2 form docker sends with an identity token (``grant_type=refresh_token``): the
    same, to the user a known refresh token stands for."""

    def _refuse(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        from urllib.parse import parse_qs, urlparse

        server: TokenServer = self.server.owner
        query = parse_qs(urlparse(self.path).query)
        user = None
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if server.users.get(name) != password:
                return self._refuse(401, b'{"errors":[{"code":"UNAUTHORIZED",'
                                         b'"message":"bad credentials"}]}')
            user = name
        self._grant(user, query)

    def do_POST(self) -> None:  # noqa: N802
        from urllib.parse import parse_qs

        server: TokenServer = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(min(length, 1 << 16)).decode())
        token = (form.get("refresh_token") or [""])[0]
        if form.get("grant_type") != ["refresh_token"] or token not in server.refresh_tokens:
            return self._refuse(400, b'{"error":"invalid_grant"}')
        self._grant(server.refresh_tokens[token], form, oauth=True)

    def _grant(self, user, query, oauth: bool = False) -> None:
        server: TokenServer = self.server.owner
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if user:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        server.issued.append((user, query.get("scope", [])))
        token = server.token(user or "", access)
        body = json.dumps({"access_token": token, "expires_in": 300} if oauth else
                          {"token": token, "expires_in": 300}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TokenServer(LoopbackServer):
    """The distribution spec's token endpoint, as Docker Hub and Harbor run one: signs
    JWTs (RS256, with the certificate in ``x5c``) that the registry trusts through its
    ``rootcertbundle``."""

    service = "mirror-test-registry"
    issuer = "mirror-test-token-issuer"

    def __init__(self, folder: str, users: Dict[str, str],
                 refresh_tokens: Dict[str, str] | None = None):
        super().__init__(_TokenHandler)
        self.users = users
        self.refresh_tokens = refresh_tokens or {}  # an identity token -> its user
        self.issued: List = []
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert = certificate("mirror test token issuer", self.key, None, None, ca=True)
        self.cert_path = write_pem(os.path.join(folder, "token-issuer.pem"), self.cert)

    def token(self, subject: str, access: list) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(
            self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service,
                  "exp": now + 300, "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex,
                  "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode()))
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
