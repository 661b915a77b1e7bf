"""Unmodified code, offline: redirect every ``megengine.hub`` call in a process to the store.

``patch_megengine()`` does it in this process (a plain call, or a ``with``
block that undoes it). ``mirror run -- CMD`` does it for another program: it
puts ``mirror/_run`` first on ``PYTHONPATH``, whose ``sitecustomize`` patches
``megengine.hub`` the moment the program imports it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Sequence

from .hub import Redirect
from .store import Store

RUN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_run")


class Patch:
    """``megengine.hub`` pointed at a store until :meth:`undo` (or the end of ``with``)."""

    def __init__(self, store: Store):
        self.store = store
        self._redirect = Redirect(store)
        self._redirect.apply()
        self.active = True

    def undo(self) -> None:
        if self.active:
            self.active = False
            self._redirect.restore()

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def patch_megengine(store: Store | str | None = None) -> Patch:
    """Make ``megengine.hub.load``/``list``/``help``/``import_module`` and its weight
    download answer from the store, whatever ``use_cache`` the caller passes."""
    return Patch(store if isinstance(store, Store) else Store(store))


def run_environment(home: str | None = None) -> Dict[str, str]:
    """The environment in which ``mirror run`` starts a program."""
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(RUN_DIR))
    paths = [RUN_DIR, package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                         if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["MGE_MIRROR_OFFLINE"] = "1"  # every mirror.hub call local, whatever source= says
    if home:
        env["MGE_MIRROR_HOME"] = os.path.abspath(home)
    return env


def run(command: Sequence[str], home: str | None = None) -> None:
    """Replace this process with ``command``, its megengine.hub redirected to the store."""
    os.execvpe(command[0], list(command), run_environment(home))
