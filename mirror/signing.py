"""Signed bundles: an Ed25519 signature over the manifest's sha256, which covers every
byte of the bundle (the manifest lists each member's digest).

The signature travels inside the bundle (``manifest.sig``, right after the
manifest) or beside it (``BUNDLE.sig``); both hold the same small JSON. Which
keys a store trusts is its :class:`mirror.config.TrustPolicy`.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Sequence

from .atomic import atomic_file
from .errors import MirrorError, SignatureError
from .hashing import sha256_bytes

# cryptography is imported where a key is used: the commands that use none (inspect,
# list, an install without a trust policy) start sooner.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

ALGORITHM = "ed25519"


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the start of the sha256 of its raw bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_bytes(raw)[:16]


def keygen(path: str) -> str:
    """Write a new private key to ``path`` (0600) and its public key to ``path.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with atomic_file(path, mode=0o600) as fh:
        fh.write(pem)
    with atomic_file(path + ".pub") as fh:
        fh.write(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(private.public_key())


def load_private(path: str) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        with open(path, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise MirrorError(f"key {path}: cannot read an Ed25519 private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise MirrorError(f"key {path}: not an Ed25519 private key")
    return key


def load_public(path: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        with open(path, "rb") as fh:
            key = serialization.load_pem_public_key(fh.read())
    except (OSError, ValueError, TypeError) as e:
        raise MirrorError(f"key {path}: cannot read an Ed25519 public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise MirrorError(f"key {path}: not an Ed25519 public key")
    return key


PARTS_TABLE = "parts-table"  # the purpose of a split bundle's table's signature


def sign(private: Ed25519PrivateKey, manifest_bytes: bytes, purpose: str | None = None) -> bytes:
    """The signature document for a manifest (what ``manifest.sig`` holds), or, with a
    ``purpose``, for another document (a split bundle's table of parts), which says so:
    a signature of one is never taken for the other."""
    digest = sha256_bytes(manifest_bytes)
    doc = {"algorithm": ALGORITHM, "key_id": key_id(private.public_key()),
           "manifest_sha256": digest,
           "signature": base64.b64encode(private.sign(
               (digest if purpose is None else f"{purpose}:{digest}").encode())).decode()}
    if purpose is not None:
        doc["purpose"] = purpose
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Signer:
    """Who signed a bundle, as checked."""

    key_id: str
    manifest_sha256: str


def check(document: bytes | None, manifest_bytes: bytes, trusted: Dict[str, Ed25519PublicKey],
          bundle: str, what: str = "manifest", purpose: str | None = None) -> Signer:
    """The signer of ``manifest_bytes``, if ``document`` is a valid signature of it by a
    ``trusted`` key; else :class:`SignatureError` saying what is wrong. ``what`` names
    the signed document in messages (a split bundle's table of parts is signed too)."""
    from cryptography.exceptions import InvalidSignature

    if document is None:
        raise SignatureError(bundle, "it is not signed" if what == "manifest" else
                             f"its {what} is not signed")
    try:
        doc = json.loads(document)
        signature = base64.b64decode(doc["signature"], validate=True)
        kid, algorithm = doc["key_id"], doc["algorithm"]
        if doc.get("purpose") != purpose:
            raise ValueError("another purpose")
    except (ValueError, KeyError, TypeError, RecursionError):
        raise SignatureError(bundle, "its signature document is malformed") from None
    if algorithm != ALGORITHM:
        raise SignatureError(bundle, f"it is signed with {algorithm!r}, not {ALGORITHM}")
    digest = sha256_bytes(manifest_bytes)
    if doc.get("manifest_sha256") != digest:
        raise SignatureError(bundle, f"its {what} was changed after signing")
    if kid not in trusted:
        known = ", ".join(sorted(trusted)) or "none"
        raise SignatureError(bundle, f"it is signed by key {kid}, which is not trusted "
                                     f"(trusted: {known})")
    try:
        trusted[kid].verify(signature, (digest if purpose is None else
                                        f"{purpose}:{digest}").encode())
    except InvalidSignature:
        raise SignatureError(bundle, f"the signature by key {kid} does not verify: the "
                                     f"bundle was altered after signing") from None
    return Signer(kid, digest)


def load_keys(locations: Sequence[str]) -> Dict[str, Ed25519PublicKey]:
    """Public keys by key id, from ``locations``: each a ``*.pub`` file or a folder of
    them (see :func:`mirror.config.trust_policy` for where the locations come from)."""
    keys: Dict[str, Ed25519PublicKey] = {}
    for location in locations:
        files = [os.path.join(location, n) for n in sorted(os.listdir(location))
                 if n.endswith(".pub")] if os.path.isdir(location) else [location]
        for path in files:
            public = load_public(path)
            keys[key_id(public)] = public
    return keys
