"""sha256, the one digest mirror trusts: of bytes, of a file, and the block size it reads in."""

from __future__ import annotations

import hashlib
from typing import Tuple

CHUNK = 1 << 20  # bytes read, hashed or copied at a time: large enough, memory flat


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> Tuple[str, int]:
    """The sha256 (hex) and size of the file at ``path``, read once in CHUNK blocks.
    Raises OSError if it cannot be read."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
