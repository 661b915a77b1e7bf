"""Where a bundle lives in a registry: ``oci://`` references, parsed and checked, and
how to reach the registry (TLS or plain HTTP, which CA). Kept apart from
:mod:`mirror.registry` so that what only names a registry imports no HTTP client."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import OCIReferenceError

SCHEME = "oci://"

# The distribution spec's grammar (v1.1, "Pulling manifests")
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
                         r"(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])"
                   r"(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Reference:
    """``oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]``, parsed and checked."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Raises :class:`OCIReferenceError` for anything outside the grammar."""
        if not text.startswith(SCHEME):
            raise OCIReferenceError(text, f"it does not start with {SCHEME}")
        host, slash, path = text[len(SCHEME):].partition("/")
        if not slash or not path:
            raise OCIReferenceError(text, "expected oci://HOST[:PORT]/REPOSITORY[:TAG|"
                                          "@sha256:DIGEST]")
        if not _HOST.fullmatch(host):
            raise OCIReferenceError(text, f"{host!r} is not a host name with an optional "
                                          f"port")
        path, at, digest = path.partition("@")
        if at and not _DIGEST.fullmatch(digest):
            raise OCIReferenceError(text, f"{digest!r} is not sha256: and 64 lowercase hex "
                                          f"digits")
        name, colon, tag = path.rpartition(":")
        if not colon or "/" in tag:
            name, tag = path, ""
        if not _REPOSITORY.fullmatch(name) or len(name) > 255:
            raise OCIReferenceError(text, f"{name!r} is not a repository name (lowercase "
                                          f"letters, digits, and . _ - / between them)")
        if colon and not _TAG.fullmatch(tag):
            raise OCIReferenceError(text, f"{tag!r} is not a tag (at most 128 letters, "
                                          f"digits, . _ -, not starting with . or -)")
        return cls(host, name, tag or None, digest or None)

    @property
    def reference(self) -> str:
        """What the manifest is asked for by: the digest, else the tag, else latest."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.host, self.repository, self.tag, digest)

    def __str__(self) -> str:
        return (f"{SCHEME}{self.host}/{self.repository}"
                f"{':' + self.tag if self.tag else ''}{'@' + self.digest if self.digest else ''}")


def is_reference(text: str) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)


@dataclass(frozen=True)
class Connection:
    """How to reach a registry: HTTPS with the system's trust store unless told."""

    plain_http: bool = False  # ORAS's flag: HTTP, for a registry on a trusted network
    ca_file: str | None = None  # a CA bundle to trust instead of the system's


HTTPS = Connection()  # the default: TLS, verified against the system's trust store
