"""Imported by Python at start-up under ``mirror run`` (this folder is on
``PYTHONPATH``), in three steps:

1. Fail closed: import ``mirror`` (light: its modules load on first use). An
   interpreter that cannot gets one line on stderr and exits with
   :data:`CANNOT_IMPORT_MIRROR` (125) before the program's first line runs: run
   unpatched, it would reach for the network or MegEngine's own cache.
2. As soon as the program imports ``megengine.hub``, point it at the mirror
   store (mirror.patch).
3. Chain: run the ``sitecustomize`` this one shadows, the first on ``sys.path``
   outside this folder (a distribution's, a virtual environment's, one on the
   user's ``PYTHONPATH``), as Python would have, under the name ``sitecustomize``.

Kept to what Python 3.6 runs, so that an older interpreter can print the message.
"""

import importlib.machinery
import importlib.util
import os
import sys

CANNOT_IMPORT_MIRROR = 125  # as env(1) and timeout(1) say that they, not the program, failed

_HERE = os.path.dirname(os.path.abspath(__file__))


def _refuse(error):
    where = os.environ.get("MGE_MIRROR_PYTHON")
    suggest = f" ({where})" if where and where != sys.executable else ""
    sys.stderr.write(
        f"mirror run: {sys.executable or 'this Python'} cannot import mirror "
        f"({type(error).__name__}: {error}), so megengine.hub would not be redirected to "
        "the store; install mirror into that interpreter, or run the command with the "
        f"Python mirror is installed in{suggest}\n")
    sys.stderr.flush()
    # Not sys.exit: site would turn SystemExit into a fatal error and a traceback.
    os._exit(CANNOT_IMPORT_MIRROR)


def _check_mirror():
    # Found, not imported: the program may have a module of its own named mirror,
    # which its folder (not on sys.path yet) must go on providing.
    try:
        spec = importlib.util.find_spec("mirror")
        folders = list(spec.submodule_search_locations or []) if spec else []
        if not any(os.path.exists(os.path.join(f, "patch.py")) for f in folders):
            if spec is None:
                raise ModuleNotFoundError("No module named 'mirror'")
            raise ImportError(f"{spec.origin} is not mirror's (no mirror/patch.py)")
    except Exception as e:
        _refuse(e)


class _PatchOnImport:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "megengine.hub":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            try:
                from mirror.patch import patch_megengine
            except ImportError as e:  # closed: never megengine.hub unredirected
                raise ImportError(
                    f"mirror run: megengine.hub cannot be redirected to the store: {e} "
                    f"(a module of the program's own named 'mirror' hides mirror's)"
                ) from None
            patch_megengine()

        spec.loader.exec_module = exec_module
        return spec


# Every hook folder this interpreter has run (two installs' mirror run, nested): none
# is chained to twice, and only the first installs the patch.
_HOOKS = sys.__dict__.setdefault("_mirror_run_hooks", [])


def _is_hook(entry):
    for hook in _HOOKS:
        try:
            if os.path.samefile(entry or os.curdir, hook):
                return True
        except OSError:
            continue
    return False


def _chain():
    """Run the next ``sitecustomize`` on ``sys.path``, if any, in place of this one
    in ``sys.modules``; its errors are reported by ``site`` as its own would be."""
    spec = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if not _is_hook(p)])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    ours = sys.modules.get("sitecustomize")
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if ours is not None:
            sys.modules["sitecustomize"] = ours
        raise


if not _HOOKS:
    _check_mirror()
    sys.meta_path.insert(0, _PatchOnImport())
_HOOKS.append(_HERE)
_chain()
