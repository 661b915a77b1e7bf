"""Dynamic discovery (``mirror pack --trace``): run a snapshot's entrypoints and record
every download instead of performing it.

Static discovery misses downloads that happen without ``pretrained=True`` on the
entrypoint called: a backbone built with pretrained weights inside a model's
constructor, an undecorated factory whose own default is ``pretrained=True``, a
``megengine.hub.load`` of another repo. Tracing imports ``hubconf.py`` in a child
process (this runs the repo's code: only trace repos you would run) with
MegEngine's downloader, ``Module.load_state_dict`` and ``megengine.hub.load``
replaced by recorders, calls each entrypoint with and without ``pretrained=True``,
and reports what each one asked for.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List

from .errors import MirrorError
from .git import MODE_LINK, TreeFile

IMPORT = "<import>"  # what hubconf.py asks for while it is imported, before any entry


@dataclass
class Trace:
    """What each entrypoint asked for: weight URLs (with the code line that asked),
    nested ``megengine.hub.load`` calls, and errors raised while tracing."""

    entries: List[str] = field(default_factory=list)  # as megengine.hub.list names them
    weights: Dict[str, List[Dict[str, str]]] = field(default_factory=dict)  # entry -> [{url, at}]
    nested: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)  # entry -> [call]
    errors: Dict[str, str] = field(default_factory=dict)

    def urls(self, entries: Iterable[str] | None = None) -> Dict[str, List[str]]:
        """URL -> where it was asked for, for ``entries`` (default: all); what
        ``hubconf.py`` downloads as it is imported is needed by every entry."""
        out: Dict[str, List[str]] = {}
        for entry, asked in self.weights.items():
            if entries is None or entry in entries or entry == IMPORT:
                for a in asked:
                    out.setdefault(a["url"], []).append(f"{a['at']} (trace of {entry})")
        return out


def trace(files: Iterable[TreeFile], label: str, timeout: float = 300) -> Trace:
    """Trace the snapshot made of ``files`` (``label`` names it in errors)."""
    with tempfile.TemporaryDirectory(prefix="mirror-trace-") as root:
        for f in files:
            dest = os.path.join(root, f.path)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if f.mode == MODE_LINK:
                os.symlink(f.data.decode("utf-8", "surrogateescape"), dest)
            else:
                with open(dest, "wb") as fh:
                    fh.write(f.data)
        out = os.path.join(root, ".mirror-trace.json")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        try:
            proc = subprocess.run([sys.executable, "-m", "mirror.trace", root, out], env=env,
                                  capture_output=True, text=True, timeout=timeout, cwd=root)
        except subprocess.TimeoutExpired:
            raise MirrorError(f"{label}: tracing its entrypoints took over {timeout:.0f} s") \
                from None
        if proc.returncode != 0 or not os.path.exists(out):
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise MirrorError(f"{label}: cannot trace hubconf.py: {last}")
        with open(out) as fh:
            data = json.load(fh)
    return Trace(data["entries"], data["weights"], data["nested"], data["errors"])


# --- the child process -------------------------------------------------------


def _where(root: str, entry: Any) -> str:
    """The innermost frame in the repo's own code: the line that asked. When MegEngine's
    ``@pretrained`` wrapper asked, the decorated function's own definition."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(root + os.sep):
            return f"{os.path.relpath(frame.filename, root)}:{frame.lineno}"
    code = getattr(inspect.unwrap(entry), "__code__", None)
    if code is not None and code.co_filename.startswith(root + os.sep):
        return f"{os.path.relpath(code.co_filename, root)}:{code.co_firstlineno}"
    return "?"


def _child(root: str, out: str) -> None:
    import importlib.util

    import megengine.hub
    import megengine.hub.hub
    import megengine.module

    weights: Dict[str, List[Dict[str, str]]] = {}
    nested: Dict[str, List[Dict[str, Any]]] = {}
    errors: Dict[str, str] = {}
    current: List[Any] = [IMPORT, None]  # entry name, entry function

    class Stub(megengine.module.Module):
        def forward(self, *args: Any) -> None:
            return None

    def record_download(url: str, model_dir: Any = None) -> Dict[str, Any]:
        weights.setdefault(current[0], []).append({"url": url,
                                                   "at": _where(root, current[1])})
        return {}  # nothing is downloaded; load_state_dict below accepts it

    def record_nested(repo_info: str, entry: str, *args: Any, **kwargs: Any) -> Any:
        call = {"repo_info": repo_info, "entry": entry, "at": _where(root, current[1])}
        call.update({k: kwargs[k] for k in ("git_host", "commit") if kwargs.get(k)})
        nested.setdefault(current[0], []).append(call)
        return Stub()

    for module in (megengine.hub.hub, megengine.hub):
        module.load_serialized_obj_from_url = record_download
        module.load = record_nested
    megengine.module.Module.load_state_dict = lambda self, *a, **k: None

    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("hubconf.py", os.path.join(root, "hubconf.py"))
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    names = [n for n in dir(hubconf) if not n.startswith("__") and callable(getattr(hubconf, n))]
    for name in names:
        current[:] = [name, getattr(hubconf, name)]
        failures = []
        for kwargs in ({}, {"pretrained": True}):
            try:
                getattr(hubconf, name)(**kwargs)
            except Exception as e:  # noqa: BLE001  (the repo's code: any failure is data)
                # Without the temporary path and object addresses, so that tracing the
                # same code gives the same manifest.
                text = re.sub(r"0x[0-9a-fA-F]+", "0x?", str(e)).replace(root, "<snapshot>")
                failures.append(f"{type(e).__name__}: {text}")
        if len(failures) == 2:  # one form working is enough: classes take no pretrained=
            errors[name] = failures[0]
    for found in (weights, nested):  # each entry is called twice: once is enough to say
        for entry in found:
            unique = {json.dumps(a, sort_keys=True) for a in found[entry]}
            found[entry] = [json.loads(a) for a in sorted(unique)]
    with open(out, "w") as fh:
        json.dump({"entries": names, "weights": weights, "nested": nested, "errors": errors},
                  fh)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
