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

HUBCONF = "hubconf.py"


def entrypoints(module: types.ModuleType) -> List[str]:
    """MegEngine's rule (``megengine.hub.list``): every callable not named ``__*``."""
    return [n for n in dir(module) if not n.startswith("__") and callable(getattr(module, n))]


def exec_hubconf(root: str, keep_path: bool = False) -> types.ModuleType:
    """Execute ``root/hubconf.py`` as MegEngine does: under the module name
    ``"hubconf.py"``, with ``root`` importable while it runs (and after, with
    ``keep_path``: a tracing child calls entrypoints that import late).

    Raises FileNotFoundError if there is none, and whatever the code raises.
    """
    path = os.path.join(root, HUBCONF)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    spec = importlib.util.spec_from_file_location(HUBCONF, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, root)
    try:
        spec.loader.exec_module(module)
    finally:
        if not keep_path:
            sys.path.remove(root)
    return module
