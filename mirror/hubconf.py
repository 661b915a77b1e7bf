"""A repo's ``hubconf.py`` as MegEngine Hub imports it, and its entrypoint rule.

Shared by the loader (:mod:`mirror.hub`) and tracing (:mod:`mirror.trace`), so
both see exactly the entrypoints ``megengine.hub.list`` would.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import List

from .importer import SnapshotCode, bind, spec_for

HUBCONF = "hubconf.py"


def is_entrypoint(name: str) -> bool:
    """MegEngine's rule for the name of a callable of hubconf (``megengine.hub.list``)."""
    return not name.startswith("__")


def entrypoints(module: types.ModuleType) -> List[str]:
    """Every callable of ``module`` whose name :func:`is_entrypoint`, as
    ``megengine.hub.list`` answers."""
    return [n for n in dir(module) if is_entrypoint(n) and callable(getattr(module, n))]


def exec_hubconf(code: SnapshotCode, keep_path: bool = False) -> types.ModuleType:
    """Execute ``hubconf.py`` of a snapshot as MegEngine does: under the module name
    ``"hubconf.py"``, with the snapshot importable while it runs (and after, with
    ``keep_path``: a tracing child calls entrypoints that import late). Its modules
    run only from checked source (:mod:`mirror.importer`).

    Raises FileNotFoundError if there is none, and whatever the code raises.
    """
    root = code.root
    path = os.path.join(root, HUBCONF)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec_for(code, HUBCONF, path))
    bind(code)
    sys.path.insert(0, root)
    try:
        module.__spec__.loader.exec_module(module)
    finally:
        if not keep_path and root in sys.path:  # the code may have taken it out itself
            sys.path.remove(root)
    return module
