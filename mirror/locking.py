"""Advisory locks (``flock``), which the kernel drops when a process dies, so never stale.

They only order decisions (see :mod:`mirror.installer`); the store's integrity
rests on atomic renames, never on a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator


@contextlib.contextmanager
def locked(path: str, shared: bool = False, wait: bool = True) -> Iterator[None]:
    """Hold a ``flock`` on ``path`` (created if needed) for the block.

    Raises BlockingIOError when ``wait`` is False and another process holds it.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as fh:
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        fcntl.flock(fh.fileno(), flags)
        yield  # closing the file releases the lock
