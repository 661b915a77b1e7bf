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
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Tuple

from .config import trace_environment
from .errors import InvalidRecordError, MirrorError
from .model import TraceRecord, need
from .refs import DEFAULT_HOST
from .tree import write_bytes

if TYPE_CHECKING:  # not at run time: the tracing child needs no pygit2
    from .git import TreeFile

IMPORT = "<import>"  # what hubconf.py asks for while it is imported, before any entry


@dataclass(frozen=True)
class Asked:
    """A download an entrypoint asked for: the URL, and the code line that asked."""

    url: str
    at: str

    def to_json(self) -> Dict[str, str]:
        """As the manifest's trace records it."""
        return {"url": self.url, "at": self.at}


@dataclass(frozen=True)
class NestedCall:
    """A ``megengine.hub.load`` of another repo that an entrypoint made."""

    repo_info: str
    entry: str
    at: str
    git_host: str | None = None
    commit: str | None = None

    def to_json(self) -> Dict[str, str]:
        """As the manifest's trace records it (``git_host`` and ``commit`` if given)."""
        out = {"repo_info": self.repo_info, "entry": self.entry, "at": self.at}
        out.update({k: v for k, v in (("git_host", self.git_host), ("commit", self.commit))
                    if v})
        return out

    @property
    def spec(self) -> str:
        """The repo spec this call loads, as ``mirror pack`` takes it."""
        spec = self.repo_info
        if self.git_host and self.git_host != DEFAULT_HOST:
            spec = f"{self.git_host}/{spec}"
        return spec + (f"@{self.commit}" if self.commit else "")


@dataclass(frozen=True)
class Trace:
    """What each entrypoint asked for: weight URLs (with the code line that asked),
    nested ``megengine.hub.load`` calls, and errors raised while tracing."""

    entries: Tuple[str, ...] = ()  # as megengine.hub.list names them
    weights: Mapping[str, Tuple[Asked, ...]] = field(default_factory=dict)  # entry -> downloads
    nested: Mapping[str, Tuple[NestedCall, ...]] = field(default_factory=dict)  # other repos
    errors: Mapping[str, str] = field(default_factory=dict)  # entry -> why calling it failed

    @classmethod
    def from_json(cls, obj: Any) -> Trace:
        """The tracing child's answer, checked. Raises :class:`InvalidRecordError`."""
        record = TraceRecord.from_json(obj)
        entries = need(obj, "entries", list)
        if not all(isinstance(e, str) for e in entries):
            raise InvalidRecordError("trace 'entries' is not a list of names")
        weights = {entry: tuple(Asked(need(a, "url", str), need(a, "at", str)) for a in asked)
                   for entry, asked in record.weights.items()}
        nested = {entry: tuple(_nested_call(c) for c in calls)
                  for entry, calls in record.nested.items()}
        return cls(tuple(entries), weights, nested, dict(record.errors))

    def record(self) -> TraceRecord:
        """What the manifest keeps of this trace (all but the entry names)."""
        return TraceRecord({e: [a.to_json() for a in asked] for e, asked in self.weights.items()},
                           {e: [c.to_json() for c in calls] for e, calls in self.nested.items()},
                           dict(self.errors))

    def urls(self, entries: Iterable[str] | None = None) -> Dict[str, List[str]]:
        """URL -> where it was asked for, for ``entries`` (default: all); what
        ``hubconf.py`` downloads as it is imported is needed by every entry."""
        out: Dict[str, List[str]] = {}
        for entry, asked in self.weights.items():
            if entries is None or entry in entries or entry == IMPORT:
                for a in asked:
                    out.setdefault(a.url, []).append(f"{a.at} (trace of {entry})")
        return out


def _nested_call(obj: Any) -> NestedCall:
    optional = [obj.get(k) for k in ("git_host", "commit")]
    if not all(v is None or isinstance(v, str) for v in optional):
        raise InvalidRecordError("a nested call's git_host or commit is not a string")
    return NestedCall(need(obj, "repo_info", str), need(obj, "entry", str),
                      need(obj, "at", str), *optional)


def trace(files: Iterable[TreeFile], label: str, timeout: float = 300) -> Trace:
    """Trace the snapshot made of ``files``: run its entrypoints in a child process with
    every download recorded instead of performed. This runs the repo's code.

    Args:
        files: every file of the snapshot (path, git mode, bytes).
        label: names the snapshot in errors, e.g. ``owner/name@commit``.
        timeout: seconds the child may take.

    Returns:
        The :class:`Trace` of each entrypoint.

    Raises:
        MirrorError: ``hubconf.py`` cannot be imported, or the child timed out or gave
            no answer.
    """
    with tempfile.TemporaryDirectory(prefix="mirror-trace-") as root:
        write_bytes(root, ((f.path, f.mode, f.data) for f in files))
        out = os.path.join(root, ".mirror-trace.json")
        try:
            proc = subprocess.run([sys.executable, "-m", "mirror.trace", root, out],
                                  env=trace_environment(), capture_output=True, text=True,
                                  timeout=timeout, cwd=root)
        except subprocess.TimeoutExpired:
            raise MirrorError(f"{label}: tracing its entrypoints took over {timeout:.0f} s") \
                from None
        if proc.returncode != 0 or not os.path.exists(out):
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise MirrorError(f"{label}: cannot trace hubconf.py: {last}")
        try:
            with open(out) as fh:
                return Trace.from_json(json.load(fh))
        except (ValueError, RecursionError) as e:  # InvalidRecordError is a ValueError
            raise MirrorError(f"{label}: cannot trace hubconf.py: {e}") from None


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


class _Recorder:
    """What the child saw, by entry: downloads, nested loads, errors."""

    def __init__(self, root: str):
        self.root = root
        self.weights: Dict[str, List[Dict[str, str]]] = {}
        self.nested: Dict[str, List[Dict[str, str]]] = {}
        self.errors: Dict[str, str] = {}
        self.entry: str = IMPORT
        self.function: Any = None

    def download(self, url: str, model_dir: Any = None) -> Dict[str, Any]:
        self.weights.setdefault(self.entry, []).append(
            {"url": url, "at": _where(self.root, self.function)})
        return {}  # nothing is downloaded; load_state_dict, patched out, accepts it

    def load(self, repo_info: str, entry: str, **kwargs: Any) -> Dict[str, str]:
        call = {"repo_info": repo_info, "entry": entry, "at": _where(self.root, self.function)}
        call.update({k: kwargs[k] for k in ("git_host", "commit") if kwargs.get(k)})
        self.nested.setdefault(self.entry, []).append(call)
        return call

    def call(self, name: str, function: Any) -> None:
        """Call an entrypoint with and without ``pretrained=True``: one form working is
        enough (classes take no ``pretrained=``)."""
        self.entry, self.function = name, function
        failures = []
        for kwargs in ({}, {"pretrained": True}):
            try:
                function(**kwargs)
            except Exception as e:  # noqa: BLE001  (the repo's code: any failure is data)
                # Without the temporary path and object addresses, so that tracing the
                # same code gives the same manifest.
                text = re.sub(r"0x[0-9a-fA-F]+", "0x?", str(e)).replace(self.root, "<snapshot>")
                failures.append(f"{type(e).__name__}: {text}")
        if len(failures) == 2:
            self.errors[name] = failures[0]

    def answer(self, entries: List[str]) -> Dict[str, Any]:
        for found in (self.weights, self.nested):  # each entry ran twice: once is enough
            for entry in found:
                unique = {json.dumps(a, sort_keys=True) for a in found[entry]}
                found[entry] = [json.loads(a) for a in sorted(unique)]
        return {"entries": entries, "weights": self.weights, "nested": self.nested,
                "errors": self.errors}


def _child(root: str, out: str) -> None:
    import megengine.hub
    import megengine.hub.hub
    import megengine.module

    from .hubconf import entrypoints, exec_hubconf
    from .importer import SnapshotCode

    recorder = _Recorder(root)

    class Stub(megengine.module.Module):
        def forward(self, *args: Any) -> None:
            return None

    def record_nested(repo_info: str, entry: str, *args: Any, **kwargs: Any) -> Any:
        recorder.load(repo_info, entry, **kwargs)
        return Stub()

    for module in (megengine.hub.hub, megengine.hub):
        module.load_serialized_obj_from_url = recorder.download
        module.load = record_nested
    megengine.module.Module.load_state_dict = lambda self, *a, **k: None

    # Nothing is recorded yet for code being packed: compiled as it is, never cached.
    code = SnapshotCode(root, "the repo being traced", "")
    hubconf = exec_hubconf(code, keep_path=True)  # entrypoints may import late
    names = entrypoints(hubconf)
    for name in names:
        recorder.call(name, getattr(hubconf, name))
    with open(out, "w") as fh:
        json.dump(recorder.answer(names), fh)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
