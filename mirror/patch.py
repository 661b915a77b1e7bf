"""Unmodified code, offline: redirect every ``megengine.hub`` call in a process to the store.

``patch_megengine()`` does it in this process (a plain call, or a ``with``
block that undoes it). ``mirror run -- CMD`` does it for another program: it
puts ``mirror/_run`` first on ``PYTHONPATH``, whose ``sitecustomize`` patches
``megengine.hub`` the moment the program imports it.
"""

from __future__ import annotations

import os
from typing import Sequence

from .config import run_environment
from .hub import Redirect
from .store import Store

RUN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_run")


def patch_megengine(store: Store | str | None = None) -> Redirect:
    """Make ``megengine.hub.load``/``list``/``help``/``import_module`` and its weight
    download answer from the store (a :class:`Store` or its home; default: the
    configured one), whatever ``use_cache`` the caller passes. Returns the patch:
    call ``.undo()``, or use it as a ``with`` block, to end it."""
    return Redirect(store if isinstance(store, Store) else Store(store)).apply()


def run(command: Sequence[str], home: str | None = None) -> None:
    """Replace this process with ``command``, its megengine.hub redirected to the store."""
    os.execvpe(command[0], list(command), run_environment(RUN_DIR, home))
