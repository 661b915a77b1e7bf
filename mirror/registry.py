"""The OCI distribution API, as mirror uses it, over ``requests``.

A registry keeps blobs (addressed by their sha256) and manifests (by tag or by
digest) per repository. This module speaks that API and nothing more: the
authentication of the ecosystem (anonymous, HTTP Basic, and the distribution
spec's Bearer token flow), blobs (HEAD, cross-repository mount, streamed upload,
download resumed with Range) and manifests. It knows nothing of bundles:
:mod:`mirror.oci` maps a bundle onto an artifact.

Every failure is a :class:`~mirror.errors.RegistryError` whose ``kind`` (and
one-line message) says what failed: unauthorized, denied, not found, TLS,
connection refused, timed out, damaged or protocol.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import ssl
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, Iterator, Mapping, Tuple
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from . import __version__
from .config import Credentials, registry_credentials
from .errors import RegistryError
from .hashing import sha256_bytes
from .names import one_line
from .reference import HTTPS, Connection, Reference

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TIMEOUT = (10, 120)  # seconds to connect, and to wait for each read
PIECE = 1 << 20  # bytes per read and per send: large, so a GiB is a thousand calls
MAX_MANIFEST = 4 << 20  # the distribution spec's suggested limit for a manifest
RETRIES = 3  # times a blob download that broke off is resumed with Range
ANSWER_MAX = 64 << 10  # bytes of an answer read whole (an error, a token)

@dataclass(frozen=True)
class Answer:
    """A registry's answer read whole (at most ANSWER_MAX bytes of it)."""

    status: int
    headers: Mapping[str, str]
    url: str
    body: bytes


class Registry:
    """One repository of one registry, with a session that logs in when asked to."""

    def __init__(self, ref: Reference, connection: Connection = HTTPS):
        self.ref = ref
        self.connection = connection
        self._credentials: Credentials | None = None
        self._looked_up = False
        self._authorization: str | None = None
        self.session = requests.Session()
        # Given with each request: requests lets REQUESTS_CA_BUNDLE override a session's
        self.verify = connection.ca_file or True
        self.session.headers["User-Agent"] = f"mirror/{__version__}"
        scheme = "http" if connection.plain_http else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.repository}/"

    def close(self) -> None:
        self.session.close()

    def error(self, kind: str, reason: str) -> RegistryError:
        return RegistryError(str(self.ref), kind, reason)

    def credentials(self) -> Credentials | None:
        if not self._looked_up:
            self._credentials = registry_credentials(self.ref.host)
            self._looked_up = True
        return self._credentials

    # --- requests, and logging in when the registry asks --------------------------

    def call(self, method: str, url: str, expect: Tuple[int, ...] = (200,), what: str = "",
             limit: int = ANSWER_MAX, **kw: Any) -> Answer:
        """``method`` on ``url`` (relative to this repository), its answer read whole: a
        body over ``limit`` bytes is refused, so no answer can fill the memory."""
        with self.stream(method, url, expect, what, **kw) as r:
            return Answer(r.status_code, r.headers, r.url, self._read(r, limit, what))

    def stream(self, method: str, url: str, expect: Tuple[int, ...] = (200,),
               what: str = "", **kw: Any) -> requests.Response:
        """``method`` on ``url``, its answer's body left to read (close it). When the
        registry answers 401, log in as it asks and send the request again, once: a
        token that expired is renewed, and no challenge can make a loop. A streamed
        body (an upload) cannot be sent twice; the upload that starts it has logged in.
        Any status outside ``expect`` raises RegistryError."""
        url = urljoin(self.base, url)
        what = what or f"{method} {url}"
        replayable = not isinstance(kw.get("data"), _Body)
        logged_in = False
        while True:
            headers = dict(kw.get("headers") or {})
            # never to another host (an upload's Location may name one)
            if self._authorization and _origin(url) == _origin(self.base):
                headers["Authorization"] = self._authorization
            r = self._send(method, url, dict(kw, headers=headers), what)
            if r.status_code == 401 and not logged_in and replayable:
                try:
                    logged_in = self._login(r.headers.get("WWW-Authenticate", ""))
                except BaseException:
                    r.close()
                    raise
                if logged_in:
                    r.close()
                    continue
                # not logged in: this 401 is the answer (no second request to get it)
            if r.status_code not in expect:
                with r:
                    raise self._refused(r, what)
            return r

    def _send(self, method: str, url: str, kw: Dict[str, Any], what: str
              ) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=TIMEOUT, verify=self.verify,
                                        stream=True, **kw)
        except requests.exceptions.SSLError as e:
            raise self.error("TLS", f"{_root(e)} (trust the registry's CA with "
                                    f"--ca-file, or use --plain-http for an HTTP "
                                    f"registry on a trusted network)") from None
        except requests.exceptions.Timeout:
            raise self.error("timed out", f"no answer from {urlsplit(url).netloc} in "
                                          f"{TIMEOUT[1]} s") from None
        except requests.exceptions.ConnectionError as e:
            raise self.error(*_connection_failure(urlsplit(url).netloc, e)) from None
        except requests.exceptions.RequestException as e:
            raise self.error("protocol", f"{what}: {_root(e)}") from None

    def _read(self, r: requests.Response, limit: int, what: str) -> bytes:
        """At most ``limit`` bytes of ``r``'s body; more is refused."""
        try:
            data = r.raw.read(limit + 1, decode_content=True)
        except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException,
                OSError) as e:
            raise self.error("protocol", f"{what}: the answer broke off: {_root(e)}") \
                from None
        if len(data) > limit:
            raise self.error("protocol", f"{what}: the answer is over {limit} bytes")
        return data

    def _login(self, challenge: str) -> bool:
        """Log in as the 401's ``challenge`` asks (Basic, or a Bearer token from its
        realm); False for a scheme mirror does not speak."""
        scheme, _, rest = challenge.partition(" ")
        params = requests.utils.parse_dict_header(rest)
        credentials = self.credentials()
        if scheme.lower() == "basic":
            if credentials is None:
                raise self.error("unauthorized", f"{self.ref.host} asks for a username and "
                                                 f"password, and none is configured "
                                                 f"({_WHERE_CREDENTIALS})")
            if credentials.identity_token is not None:
                raise self.error("unauthorized", f"{self.ref.host} asks for a username and "
                                                 f"password, and {credentials.source} holds "
                                                 f"an identity token, which only a token "
                                                 f"service takes")
            self._authorization = requests.auth._basic_auth_str(credentials.username,
                                                                credentials.password)
            return True
        realm = params.get("realm") or ""
        if scheme.lower() != "bearer" or not realm.startswith(("https://", "http://")):
            return False
        if realm.startswith("http://") and credentials and not self.connection.plain_http:
            raise self.error("unauthorized", f"the registry sends its login to {realm}, "
                                             f"over plain HTTP: the credentials are not sent "
                                             f"there without --plain-http")
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        what = f"the token service {realm}"
        if credentials is not None and credentials.identity_token is not None:
            # OAuth2, as docker does with one: the refresh token for an access token
            form = dict(query, grant_type="refresh_token", client_id="mirror",
                        refresh_token=credentials.identity_token)
            request: Dict[str, Any] = {"data": form}
            method, refused = "POST", f"the identity token from {credentials.source}"
            refusals: Tuple[int, ...] = (400, 401, 403)  # OAuth2's "invalid_grant" is a 400
        else:
            auth = (credentials.username, credentials.password) if credentials else None
            request = {"params": query, "auth": auth}
            method, refused = "GET", f"the credentials from {credentials.source}" \
                if credentials else f"an anonymous login ({_WHERE_CREDENTIALS})"
            refusals = (401, 403)
        with self._send(method, realm, request, what) as r:
            if r.status_code in refusals:
                raise self.error("unauthorized", f"{what} refused {refused}")
            body = self._read(r, ANSWER_MAX, what)
        token = None
        with contextlib.suppress(ValueError, RecursionError, AttributeError):
            answer = json.loads(body) if r.status_code == 200 else {}
            token = answer.get("token") or answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise self.error("unauthorized", f"{what} answered HTTP {r.status_code} with no "
                                             f"token")
        self._authorization = f"Bearer {token}"
        return True

    def _refused(self, r: requests.Response, what: str) -> RegistryError:
        said = ""
        with contextlib.suppress(RegistryError, ValueError, RecursionError, AttributeError,
                                 TypeError):
            body = r.raw.read(ANSWER_MAX, decode_content=True)
            errors = json.loads(body).get("errors")
            said = "; ".join(f"{e.get('code')}: {e.get('message')}"
                             for e in errors[:3] if isinstance(e, dict)) \
                if isinstance(errors, list) else ""
        with contextlib.suppress(Exception):
            said = one_line(said)[:300]
        said = f" ({said})" if said else ""
        if r.status_code == 401:
            credentials = self.credentials()
            return self.error("unauthorized", (
                f"{self.ref.host} refused the credentials from {credentials.source}"
                if credentials else f"{self.ref.host} refused an anonymous request "
                                    f"({_WHERE_CREDENTIALS})") + said)
        if r.status_code == 403:
            return self.error("denied", f"{what} is not allowed for this login{said}")
        if r.status_code == 404:
            return self.error("not found", f"{what}{said}")
        return self.error("protocol", f"{what}: HTTP {r.status_code}{said}")

    # --- blobs ----------------------------------------------------------------

    def blob_size(self, digest: str) -> int | None:
        """The size of the blob ``digest`` in this repository, or None if it lacks it."""
        r = self.call("HEAD", f"blobs/{digest}", expect=(200, 404), what=f"blob {digest}")
        return int(r.headers.get("Content-Length", -1)) if r.status == 200 else None

    def start_upload(self, digest: str | None = None, mount_from: str | None = None
                     ) -> str | None:
        """Start an upload, first asking the registry to mount ``digest`` from the
        repository ``mount_from`` (or, with none, from wherever it knows it: the
        distribution spec lets a registry do that). None when it mounted the blob;
        else the upload's URL."""
        params = {"mount": digest, "from": mount_from} if digest else {}
        r = self.call("POST", "blobs/uploads/", expect=(201, 202),
                      params={k: v for k, v in params.items() if v},
                      what=f"an upload to {self.ref.repository}")
        if r.status == 201:
            return None
        return self._location(r)

    def upload(self, location: str, body: IO[bytes], size: int, digest: Callable[[], str]
               ) -> str:
        """Send ``size`` bytes from ``body`` to the upload at ``location`` in one streamed
        PATCH (memory stays flat), then close it with the digest ``digest()`` gives once
        they have all been read; returns that digest."""
        r = self.call("PATCH", location, expect=(202,), data=_Body(body, size),
                      headers={"Content-Type": "application/octet-stream",
                               "Content-Length": str(size)},
                      what="the upload")
        done = digest()
        self.call("PUT", self._location(r), expect=(201,), params={"digest": done},
                  what=f"the upload of blob {done}")
        return done

    def put_blob(self, data: bytes) -> str:
        """Upload a small blob whole (a config) unless the registry has it; its digest."""
        digest = "sha256:" + sha256_bytes(data)
        if self.blob_size(digest) is None:
            location = self.start_upload()
            self.call("PUT", location, expect=(201,), params={"digest": digest},
                      data=data, headers={"Content-Type": "application/octet-stream"},
                      what=f"the upload of blob {digest}")
        return digest

    def blob_chunks(self, digest: str, start: int = 0, what: str = "") -> Iterator[bytes]:
        """The bytes of blob ``digest`` from byte ``start``, as they arrive; a download
        that breaks off is resumed with Range where it stopped, up to RETRIES times.
        The caller checks the digest: a registry can serve what it stored damaged."""
        what = what or f"blob {digest}"
        retries = RETRIES
        while True:
            headers = {"Range": f"bytes={start}-"} if start else {}
            r = self.stream("GET", f"blobs/{digest}", expect=(200, 206), headers=headers,
                            what=what)
            try:
                chunks = r.iter_content(PIECE)
                if start and r.status_code == 200:  # it ignored Range: skip what we have
                    skip = start
                    for chunk in chunks:
                        if skip >= len(chunk):
                            skip -= len(chunk)
                            continue
                        start += len(chunk) - skip
                        yield chunk[skip:]
                        break
                for chunk in chunks:
                    start += len(chunk)
                    yield chunk
                return
            except (requests.exceptions.ConnectionError,
                    requests.exceptions.ChunkedEncodingError) as e:
                retries -= 1
                if retries < 0:
                    raise self.error(*_connection_failure(self.ref.host, e)) from None
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as e:
                raise self.error("protocol", f"{what}: {_root(e)}") from None
            finally:
                r.close()

    def blob_range(self, digest: str, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes of blob ``digest`` from ``offset``, by a range request, not
        checked against the digest (the caller binds them otherwise). A registry that
        ignores the range is refused, not read past: it would send the whole blob."""
        with self.stream("GET", f"blobs/{digest}", expect=(200, 206), what=what,
                         headers={"Range": f"bytes={offset}-{offset + length - 1}"}) as r:
            if r.status_code != 206:
                raise self.error("protocol", f"{what}: the registry ignores range requests, "
                                             f"which a bundle packed with --stream needs "
                                             f"(its manifest is at its end): mirror pull it, "
                                             f"then install the file")
            data = self._read(r, length, what)
        if len(data) != length:
            raise self.error("protocol", f"{what}: the answer is {len(data)} bytes, not the "
                                         f"{length} asked for")
        return data

    def verified_blob(self, digest: str, size: int, what: str, start: int = 0,
                      hashed: Any = None) -> Iterator[bytes]:
        """The bytes of blob ``digest`` from byte ``start`` (``hashed``, a sha256, has
        seen the bytes before it), refused as "damaged" the moment they run past
        ``size``, and at their end unless they are ``size`` bytes that hash to
        ``digest``: a registry can serve what it stored damaged."""
        hashed = hashed or hashlib.sha256()
        done = start
        chunks = self.blob_chunks(digest, start, what) if start < size else \
            (c for c in ())
        with contextlib.closing(chunks):  # its answer closed at once, however this ends
            for chunk in chunks:
                if done + len(chunk) > size:
                    raise self.error("damaged", f"{what} is longer than the {size} bytes "
                                                f"its descriptor says: the registry's copy "
                                                f"is damaged (push the bundle again)")
                hashed.update(chunk)
                done += len(chunk)
                yield chunk
        _check_digest(self, digest, hashed, done, size, what)

    def small_blob(self, digest: str, size: int, limit: int, what: str) -> bytes:
        """A blob of ``size`` bytes, at most ``limit``, whole and checked."""
        if size > limit:
            raise self.error("protocol", f"{what} is {size} bytes, over the {limit} byte "
                                         f"limit")
        return b"".join(self.verified_blob(digest, size, what))

    # --- manifests --------------------------------------------------------------

    def put_manifest(self, reference: str, data: bytes, media_type: str = OCI_MANIFEST
                     ) -> str:
        """Store the manifest ``data`` under ``reference`` (a tag); its digest."""
        digest = "sha256:" + sha256_bytes(data)
        r = self.call("PUT", f"manifests/{reference}", expect=(201,), data=data,
                      headers={"Content-Type": media_type},
                      what=f"storing the manifest as {reference}")
        said = r.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise self.error("protocol", f"the registry says the manifest is {said}; its "
                                         f"bytes are {digest}")
        return digest

    def get_manifest(self, reference: str) -> Tuple[bytes, str]:
        """The manifest at ``reference`` (a tag or a digest) and its digest. A digest
        is a proof: bytes that do not hash to it are refused."""
        is_tag = not reference.startswith("sha256:")
        data = self.call("GET", f"manifests/{reference}", expect=(200,),
                         headers={"Accept": OCI_MANIFEST}, limit=MAX_MANIFEST,
                         what=f"{'tag' if is_tag else 'manifest'} {reference} in "
                              f"{self.ref.host}/{self.ref.repository}").body
        digest = "sha256:" + sha256_bytes(data)
        if not is_tag and digest != reference:
            raise self.error("damaged", f"the manifest asked for as {reference} hashes to "
                                        f"{digest}")
        return data, digest

    def _location(self, r: Answer) -> str:
        location = r.headers.get("Location")
        if not location:
            raise self.error("protocol", f"{r.url} gave no Location for the upload")
        return urljoin(r.url, location)


def _check_digest(registry: Registry, digest: str, hashed: Any, size: int,
                 expected_size: int, what: str) -> None:
    """Raise the "damaged" RegistryError when ``hashed`` (``size`` bytes) is not the
    blob ``digest`` of ``expected_size`` bytes."""
    got = "sha256:" + hashed.hexdigest()
    if got != digest or size != expected_size:
        raise registry.error("damaged", (
            f"{what} is {size} bytes that hash to {got}, not {expected_size} bytes of "
            f"{digest}: the registry's copy is damaged (push the bundle again)"))


class _Body:
    """A file to send as a request body in pieces of PIECE bytes: http.client asks for
    16 KiB at a time, which for a GiB is tens of thousands of calls into Python."""

    def __init__(self, fh: IO[bytes], size: int):
        self.fh, self.size = fh, size

    def __len__(self) -> int:
        return self.size

    def read(self, _: int = -1) -> bytes:
        return self.fh.read(PIECE)


_WHERE_CREDENTIALS = ("docker login, ~/.docker/config.json, or "
                      "MGE_MIRROR_REGISTRY_USERNAME/_PASSWORD")


def _origin(url: str) -> Tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _root(e: BaseException) -> str:
    """The innermost reason of a requests error, which wraps urllib3's, which wraps the
    socket's or ssl's: the one a user can act on."""
    while True:
        inner = e.__context__ or e.__cause__ or (e.args[0] if e.args and isinstance(
            e.args[0], BaseException) else None)
        if inner is None or inner is e:
            break
        e = inner
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    reason = getattr(e, "reason", None)
    return str(reason if isinstance(reason, (str, BaseException)) and reason else e)


def _connection_failure(host: str, e: BaseException) -> Tuple[str, str]:
    text = _root(e)
    if "refused" in text.lower():
        return "connection refused", (f"nothing answers at {host} (is the registry up, "
                                      f"and is this its port?)")
    return "connection failed", f"{host}: {text}"

