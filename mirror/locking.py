"""Advisory locks (``flock``), which the kernel drops when a process dies, so never stale.

They only order decisions (see :mod:`mirror.installer`); the store's integrity
rests on atomic renames, never on a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

RETRIES = 100  # a lock file removed under its waiter this often in a row: not a race


@contextlib.contextmanager
def locked(path: str, shared: bool = False, wait: bool = True) -> Iterator[None]:
    """Hold a ``flock`` on ``path`` (created if needed) for the block.

    A lock file may be removed by whoever holds it exclusively (the download cache's
    clean does): a lock won on a file no longer at ``path`` is let go and taken
    again on the one there now, so two holders never hold two files.

    Raises BlockingIOError when ``wait`` is False and another process holds it.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    for attempt in range(RETRIES + 1):
        with open(path, "a") as fh:
            fcntl.flock(fh.fileno(), flags)
            # (a filesystem whose stat and fstat never agree is given the lock at last)
            if _same_file(fh.fileno(), path) or attempt == RETRIES:
                yield  # closing the file releases the lock
                return


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
