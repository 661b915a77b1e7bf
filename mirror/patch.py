"""Unmodified code, offline: redirect every ``megengine.hub`` call in a process to the store.

``patch_megengine()`` does it in this process (a plain call, or a ``with``
block that undoes it). ``mirror run -- CMD`` does it for another program:
:func:`run` replaces the ``mirror`` process with ``CMD`` (so its exit status is
the program's), with ``mirror/_run`` first on ``PYTHONPATH`` and nothing else
added there. In every Python the program starts, that folder's
``sitecustomize``:

- fails closed: an interpreter that cannot import ``mirror`` (``/usr/bin/python3``,
  another virtual environment) prints one line on stderr, naming the interpreter,
  the import error and the remedy (install mirror into that interpreter, or run
  the command with the Python mirror is installed in), and exits with status
  :data:`CANNOT_IMPORT_MIRROR` (125) before the program's first line runs;
- patches ``megengine.hub`` the moment the program imports it;
- then runs the ``sitecustomize`` it shadows (the next one on ``sys.path``: a
  distribution's, a virtual environment's, one on the caller's ``PYTHONPATH``).

Exit statuses of ``mirror run``, as ``env`` has them: the program's own; 127
when the command is not found; 126 when it is found but cannot be executed
(:func:`exec_failure`); 125 when a Python it starts cannot import mirror.
A Python started with ``-E``, ``-I`` or ``-S`` reads no ``sitecustomize`` from
``PYTHONPATH`` and is not patched.
"""

from __future__ import annotations

import errno
import os
from typing import Sequence, Tuple

from .config import run_environment
from .hub import Redirect
from .store import Store

RUN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_run")
COMMAND_NOT_FOUND = 127
CANNOT_EXECUTE = 126
CANNOT_IMPORT_MIRROR = 125  # the hook's (_run/sitecustomize.py), which cannot import this


def patch_megengine(store: Store | str | None = None) -> Redirect:
    """Make ``megengine.hub.load``/``list``/``help``/``import_module`` and its weight
    download answer from the store (a :class:`Store` or its home; default: the
    configured one), whatever ``use_cache`` the caller passes. Returns the patch:
    call ``.undo()``, or use it as a ``with`` block, to end it."""
    return Redirect(store if isinstance(store, Store) else Store(store)).apply()


def run(command: Sequence[str], home: str | None = None) -> None:
    """Replace this process with ``command``, its megengine.hub redirected to the store.
    Never returns: the process becomes the command, or this raises the ``OSError`` that
    kept it from starting (see :func:`exec_failure`)."""
    os.execvpe(command[0], list(command), run_environment(RUN_DIR, home))


def exec_failure(name: str, error: OSError) -> Tuple[int, str]:
    """The exit status and message for a ``command`` that :func:`run` could not start:
    127 for one not found, 126 for one found that cannot be executed."""
    if error.errno == errno.ENOENT:
        found = "command not found" if os.sep not in name else error.strerror
        return COMMAND_NOT_FOUND, f"{name}: {found}"
    return CANNOT_EXECUTE, f"{name}: {error.strerror or error}"
