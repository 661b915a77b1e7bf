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

import contextlib
import gc
import inspect
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Set, Tuple

from . import confine
from .config import trace_environment
from .errors import InvalidRecordError, MirrorError, NotFoundError
from .model import TraceRecord, need
from .names import one_line
from .refs import DEFAULT_HOST
from .sizes import iec
from .tree import write_bytes

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class TraceLimits:
    """What one traced entrypoint may use: resident ``memory`` (bytes) and ``timeout``
    (seconds), each in its own process; ``jobs`` entrypoints are traced at once."""

    memory: int = 4 << 30
    timeout: float = 300
    jobs: int = 1


@dataclass(frozen=True)
class Outcome:
    """How tracing one entrypoint went, as the progress line says it."""

    entry: str
    urls: int  # downloads it asked for
    seconds: float
    peak: int | None  # resident bytes at most, if known
    cause: str | None  # why it could not be traced, in one line; None: it was

    def line(self) -> str:
        peak = f", peak {iec(self.peak)}" if self.peak is not None else ""
        state = f"FAILED: {self.cause}" if self.cause else f"{self.urls} URLs"
        return f"traced {self.entry}: {state} ({self.seconds:.1f} s{peak})"


# What the manifest records for a failure that depends on the machine (no sizes, no
# times), so that the same failure gives the same manifest.
OUT_OF_MEMORY = "out of memory"
TIMED_OUT = "timed out"


def trace(files: Iterable[TreeFile], label: str, entries: Iterable[str] | None = None,
          limits: TraceLimits = TraceLimits(),
          report: Callable[[Outcome], None] = lambda o: None, progress: bool = False) -> Trace:
    """Trace the snapshot made of ``files``: import ``hubconf.py`` in a child process,
    then run each of its entrypoints (or only ``entries``) in a process of its own, with
    every download recorded instead of performed. This runs the repo's code.

    Each entrypoint's process is confined to ``limits`` (:mod:`mirror.confine`), so
    memory never accumulates across entrypoints, and ``limits.jobs`` run at once. An
    entrypoint that raises, runs out of memory, times out or dies is recorded in the
    trace's ``errors`` with its cause; ``report`` hears of each one as it finishes,
    above a bar over all of them when ``progress``.

    Args:
        files: every file of the snapshot (path, git mode, bytes).
        label: names the snapshot in errors, e.g. ``owner/name@commit``.
        entries: the entrypoints to run (default: all that ``hubconf.py`` has).

    Raises:
        MirrorError: ``hubconf.py`` cannot be imported.
        NotFoundError: ``entries`` names one that ``hubconf.py`` does not have (said
            before any entrypoint runs).
    """
    # Here, not at the top: each traced entrypoint's child imports this module too
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    _STOP.clear()
    with tempfile.TemporaryDirectory(prefix="mirror-trace-") as root:
        write_bytes(root, ((f.path, f.mode, f.data) for f in files))
        head, outcome = _traced(root, None, limits)
        if head is None:
            raise MirrorError(f"{label}: cannot import hubconf.py: {outcome.cause}")
        names = head.entries
        chosen = None if entries is None else set(entries)
        unknown = sorted((chosen or set()) - set(names))
        if unknown:  # before anything runs: a typo is said, not hidden by a failure
            raise NotFoundError(f"{label}: no entrypoint {', '.join(unknown)} in "
                                f"hubconf.py (it has: {', '.join(names)})")
        wanted = [n for n in names if chosen is None or n in chosen]
        weights, nested = dict(head.weights), dict(head.nested)
        errors: Dict[str, str] = {}
        with ThreadPoolExecutor(limits.jobs) as pool, \
                tqdm(total=len(wanted), unit="entry", desc="tracing", file=sys.stderr,
                     disable=not progress or None, leave=False) as bar:
            running = {pool.submit(_traced, root, name, limits): name for name in wanted}
            try:
                for done in as_completed(running):
                    answer, outcome = done.result()
                    with bar.external_write_mode(file=sys.stderr):
                        report(outcome)
                    bar.update(1)
                    name = running[done]  # an entrypoint's child always answers
                    weights.update({k: v for k, v in answer.weights.items() if k == name})
                    nested.update({k: v for k, v in answer.nested.items() if k == name})
                    errors.update({k: v for k, v in answer.errors.items() if k == name})
            except BaseException:  # Ctrl-C: the children run in sessions of their own
                pool.shutdown(wait=False, cancel_futures=True)
                _kill_all()
                raise
        order = {n: i for i, n in enumerate((IMPORT,) + tuple(names))}

        def ordered(found: Mapping[str, Any]) -> Dict[str, Any]:
            return {k: found[k] for k in sorted(found, key=lambda k: order.get(k, len(order)))}

        return Trace(names, ordered(weights), ordered(nested), ordered(errors))


def _partial(path: str) -> Tuple[Asked, ...]:
    """The downloads a child recorded before it died, one JSON object a line (a line
    cut short by the kill is passed over)."""
    found = set()
    with open(path) as fh:
        for line in fh:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                obj = json.loads(line)
                found.add(Asked(str(obj["url"]), str(obj["at"])))
    return tuple(sorted(found, key=lambda a: (a.at, a.url)))


def _recorded(cause: str) -> str:
    """A cause as the manifest keeps it: without the limit or the time."""
    for kept in (OUT_OF_MEMORY, TIMED_OUT):
        if cause.startswith(kept):
            return kept
    return cause


def _traced(root: str, entry: str | None, limits: TraceLimits) -> Tuple[Trace | None, Outcome]:
    """Run one child: ``hubconf.py``'s import alone (``entry`` None), or one entrypoint.
    Returns its answer and how it went: for an entrypoint, always an answer (what it
    asked for before it failed, and why); for the import, None if it gave none."""
    name = entry or IMPORT
    out = os.path.join(root, f".mirror-trace-{uuid.uuid4().hex}.json")
    started = time.monotonic()
    with confine.confined(limits.memory) as limit, \
            tempfile.TemporaryFile() as stderr:
        command = [sys.executable, "-m", "mirror.trace", root, out] + limit.child_args() + \
            (["--entry", entry] if entry is not None else [])
        with _LOCK:
            if _STOP.is_set():  # interrupted before this one started
                raise KeyboardInterrupt
            proc = subprocess.Popen(command, env=trace_environment(), cwd=root,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr, start_new_session=True)
            _RUNNING.add(proc)
        try:
            status, rusage = _wait(proc, limits.timeout)
        except BaseException:  # Ctrl-C: the child is in a session of its own
            _kill(proc)
            proc.wait()
            raise
        finally:
            with _LOCK:
                _RUNNING.discard(proc)
        seconds = time.monotonic() - started
        peak = limit.peak() or (rusage.ru_maxrss * 1024 if rusage else None)
        answer, cause = None, None
        if status is None:
            cause = f"{TIMED_OUT} after {limits.timeout:.0f} s"
        elif os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            cause = f"{OUT_OF_MEMORY} at {iec(limits.memory)}" if limit.out_of_memory() \
                else f"killed by signal {number} ({_signal_name(number)})"
        else:
            try:
                with open(out) as fh:
                    obj = json.load(fh)
                if "fatal" in obj:
                    cause = one_line(str(obj["fatal"]))
                else:
                    answer = Trace.from_json(obj)
            except (OSError, ValueError, RecursionError):
                stderr.seek(0)
                said = stderr.read()[-4000:].decode("utf-8", "replace")
                log.debug("tracing %s: stderr: %s", name, said)
                cause = f"exited with status {os.WEXITSTATUS(status)} and no answer"
        if answer is not None and entry is not None and entry in answer.errors:
            error = answer.errors[entry]
            cause = f"{OUT_OF_MEMORY} at {iec(limits.memory)}" if error == OUT_OF_MEMORY \
                else one_line(error)
        if answer is None and entry is not None:
            # Killed, or no answer: what it asked for before is still needed.
            asked = _partial(out + ".partial") if os.path.exists(out + ".partial") else ()
            answer = Trace((), {entry: asked} if asked else {}, {},
                           {entry: _recorded(cause or "")})
        for done in (out, out + ".partial"):
            with contextlib.suppress(OSError):
                os.unlink(done)
    urls = len(answer.weights.get(name, ())) if answer is not None else 0
    return answer, Outcome(name, urls, seconds, peak, cause)


_RUNNING: Set[subprocess.Popen] = set()  # the children tracing now, to kill on Ctrl-C
_STOP = threading.Event()  # set on Ctrl-C: no child starts after it
_LOCK = threading.Lock()


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)


def _kill_all() -> None:
    with _LOCK:
        _STOP.set()
        for proc in _RUNNING:
            _kill(proc)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal, say
        return f"SIG{number}"


def _wait(proc: subprocess.Popen, timeout: float) -> Tuple[int | None, Any]:
    """Wait for ``proc`` at most ``timeout`` seconds: (its wait status, its resource
    usage), or (None, None) when it timed out and was killed, with its process group."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        # Exited, but not reaped yet: while it is a zombie its process group id cannot
        # be reused, so what it left running in its session can be killed safely.
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            _kill(proc)
            _, status, rusage = os.wait4(proc.pid, 0)
            proc.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) \
                else os.WEXITSTATUS(status)
            return status, rusage
        if time.monotonic() >= deadline:
            _kill(proc)
            proc.wait()
            return None, None
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


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

    def __init__(self, root: str, partial: str | None = None, address_space: bool = False):
        self.root = root
        self.partial = partial  # each download also appended here: kept if killed
        self.address_space = address_space  # confined by RLIMIT_AS, not a cgroup
        self.weights: Dict[str, List[Dict[str, str]]] = {}
        self.nested: Dict[str, List[Dict[str, str]]] = {}
        self.errors: Dict[str, str] = {}
        self.entry: str = IMPORT
        self.function: Any = None

    def download(self, url: str, model_dir: Any = None) -> Dict[str, Any]:
        asked = {"url": url, "at": _where(self.root, self.function)}
        self.weights.setdefault(self.entry, []).append(asked)
        if self.partial and self.entry != IMPORT:
            with open(self.partial, "a") as fh:
                fh.write(json.dumps(asked, sort_keys=True) + "\n")
        return {}  # nothing is downloaded; load_state_dict, patched out, accepts it

    def load(self, repo_info: str, entry: str, **kwargs: Any) -> Dict[str, str]:
        call = {"repo_info": repo_info, "entry": entry, "at": _where(self.root, self.function)}
        call.update({k: kwargs[k] for k in ("git_host", "commit") if kwargs.get(k)})
        self.nested.setdefault(self.entry, []).append(call)
        return call

    def call(self, name: str, function: Any) -> None:
        """Call an entrypoint with and without ``pretrained=True`` (that first: it asks
        for the most): one form working is enough (classes take no ``pretrained=``),
        but running out of memory in either is a failure, as it may have stopped the
        build before a download."""
        self.entry, self.function = name, function
        failures = []
        for kwargs in ({"pretrained": True}, {}):
            try:
                function(**kwargs)
            except Exception as e:  # noqa: BLE001  (the repo's code: any failure is data)
                if _out_of_memory(e, self.address_space):
                    self.errors[name] = OUT_OF_MEMORY
                    return
                failures.append(one_line(f"{type(e).__name__}: {_scrubbed(e, self.root)}"))
            gc.collect()  # the first model is gone before the second is built
        if len(failures) == 2:
            self.errors[name] = failures[0]

    def answer(self, entries: List[str]) -> Dict[str, Any]:
        for found in (self.weights, self.nested):  # each entry ran twice: once is enough
            for entry in found:
                unique = {json.dumps(a, sort_keys=True) for a in found[entry]}
                found[entry] = [json.loads(a) for a in sorted(unique)]
        return {"entries": entries, "weights": self.weights, "nested": self.nested,
                "errors": self.errors}


def _out_of_memory(error: BaseException, address_space: bool) -> bool:
    """Python's MemoryError, or MegEngine's allocator failing: a RuntimeError that says
    so, or, under an address-space limit, the AsyncError MegEngine raises for an
    operation whose memory it could not get (a model's constructor runs no other
    operation that fails at run time)."""
    if isinstance(error, MemoryError) or "failed to malloc" in str(error):
        return True
    return address_space and type(error).__name__ == "AsyncError"


def _child(root: str, out: str, entry: str | None, address_space: bool) -> None:
    import megengine
    import megengine.hub
    import megengine.hub.hub
    import megengine.module
    import megengine.module.init

    from .hubconf import entrypoints, exec_hubconf
    from .importer import SnapshotCode

    recorder = _Recorder(root, out + ".partial" if entry is not None else None, address_space)
    # Synchronous: an operation that fails (memory it cannot get) fails where it runs,
    # in the entrypoint, not later or never.
    megengine.config.async_level = 0

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
    # Parameters keep their shapes but are not filled: what a build asks for does not
    # depend on random initial values, and filling them is much of a large build's time.
    for fill in _FILLS:
        if hasattr(megengine.module.init, fill):
            setattr(megengine.module.init, fill, lambda *a, **k: None)

    # Nothing is recorded yet for code being packed: compiled as it is, never cached.
    code = SnapshotCode(root, "the repo being traced", "")
    hubconf = exec_hubconf(code, keep_path=True)  # entrypoints may import late
    names = entrypoints(hubconf)
    if entry is not None:
        recorder.weights.pop(IMPORT, None)  # the import's own child reports those
        recorder.nested.pop(IMPORT, None)
        recorder.call(entry, getattr(hubconf, entry))
    with open(out, "w") as fh:
        json.dump(recorder.answer(names), fh)


def _scrubbed(error: BaseException, root: str) -> str:
    """``error``'s text without the temporary path and object addresses, so that
    tracing the same code gives the same manifest."""
    # The path first: a temporary folder's random name can hold "0x" and hex digits.
    return re.sub(r"0x[0-9a-fA-F]+", "0x?", str(error).replace(root, "<snapshot>"))


_FILLS = ("fill_", "normal_", "uniform_", "xavier_normal_", "xavier_uniform_",
          "msra_normal_", "msra_uniform_", "zeros_", "ones_")


def _main(argv: List[str]) -> None:
    """``python -m mirror.trace ROOT OUT --memory BYTES --group DIR [--entry NAME]``:
    confined first (a cgroup before anything is allocated; an address-space limit
    after MegEngine's import has reserved its own), then traced."""
    root, out, rest = argv[0], argv[1], argv[2:]
    options = dict(zip(rest[::2], rest[1::2]))
    limit, group = int(options["--memory"]), options["--group"]
    try:
        if group:
            confine.enter(limit, group)
        import megengine  # noqa: F401  (its reservation is not the model's)

        if not group:
            confine.enter(limit, "")
        _child(root, out, options.get("--entry"), not group)
    except BaseException as e:  # noqa: BLE001  (the parent reports it by name)
        with open(out, "w") as fh:
            json.dump({"fatal": f"{type(e).__name__}: {_scrubbed(e, root)}"}, fh)


if __name__ == "__main__":
    _main(sys.argv[1:])
