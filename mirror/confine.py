"""A memory limit for one child process (a traced entrypoint), and what it used.

Three ways, the first that works here:

- a **cgroup v2** child group with ``memory.max`` (and no swap), where the
  process's own group lets children use the memory controller;
- a **cgroup v1** memory group with ``memory.limit_in_bytes``, where the memory
  hierarchy is mounted and writable (as root on most hosts with a hybrid layout);
- **RLIMIT_AS**, the address space, set by the child itself once it has imported
  MegEngine, at what that import reserved plus the limit: importing MegEngine
  alone reserves gigabytes of address space it never touches, so an address
  space limit at the resident limit would fail healthy models.

A cgroup limits what is resident, which is what the limit means; the address space
limit is the fallback, and :attr:`Confinement.how` says which is in force. The
child joins its group (or sets its limit) itself, as its first act, so nothing it
allocates escapes the limit (:func:`enter`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import resource
import signal
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

CGROUP_V2 = "cgroup v2 memory.max"
CGROUP_V1 = "cgroup v1 memory.limit_in_bytes"
ADDRESS_SPACE = "RLIMIT_AS over what importing MegEngine reserves"

_serial = itertools.count()


@dataclass(frozen=True)
class Confinement:
    """One child's limit: ``how`` it is enforced, and the group folder (None under
    RLIMIT_AS) that the child joins with :func:`enter`."""

    limit: int  # bytes
    how: str
    group: str | None = None

    def child_args(self) -> List[str]:
        """The arguments that tell the child how to confine itself."""
        return ["--memory", str(self.limit), "--group", self.group or ""]

    def peak(self) -> int | None:
        """The group's peak resident memory, if the kernel keeps it."""
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            value = _read(self.group, name) if self.group else None
            if value is not None and value.strip().isdigit():
                return int(value)
        return None

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process of the group for reaching the limit."""
        if not self.group:
            return False
        for name in ("memory.events", "memory.oom_control"):
            for line in (_read(self.group, name) or "").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit() and int(value):
                    return True
        return False

    def remove(self) -> None:
        """Delete the group, killing what is left in it first (a process that left the
        child's session, say); a few tries, as the kernel reaps them."""
        if not self.group:
            return
        for _ in range(50):
            for pid in (_read(self.group, "cgroup.procs") or "").split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                os.rmdir(self.group)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)


@contextlib.contextmanager
def confined(limit: int) -> Iterator[Confinement]:
    """A fresh limit of ``limit`` bytes for one child, removed when the block ends."""
    made = _cgroup(limit)
    try:
        yield made
    finally:
        made.remove()


def enter(limit: int, group: str) -> None:
    """In the child, before anything is allocated: join ``group``, or (no group) cap
    the address space at what is reserved now plus ``limit``. Call it after importing
    MegEngine in the address-space case, whose reservation must not count."""
    if group:
        with open(os.path.join(group, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
        return
    reserved = _vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (reserved + limit, reserved + limit))


def _cgroup(limit: int) -> Confinement:
    name = f"mirror-trace-{os.getpid()}-{next(_serial)}"
    for how, parent, files in _parents():
        group = os.path.join(parent, name)
        try:
            os.mkdir(group)
        except OSError:
            continue
        try:
            for i, (file, value) in enumerate(files(limit)):
                try:
                    with open(os.path.join(group, file), "w") as fh:
                        fh.write(value)
                except OSError:
                    if i == 0:  # the limit itself: this group is no use
                        raise
                    # the rest (no swap) as the kernel allows
            return Confinement(limit, how, group)
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(group)
    return Confinement(limit, ADDRESS_SPACE)


def _v2_files(limit: int) -> List[Tuple[str, str]]:
    return [("memory.max", str(limit)), ("memory.swap.max", "0")]


def _v1_files(limit: int) -> List[Tuple[str, str]]:
    # memsw (memory + swap) only after the plain limit: it may not be below it.
    return [("memory.limit_in_bytes", str(limit)), ("memory.memsw.limit_in_bytes", str(limit))]


def _parents() -> Iterator[Tuple[str, str, object]]:
    """Where a child group could go: this process's own group in each hierarchy that
    has a memory controller, v2 first."""
    mounts = _mounts()
    for hierarchy, controllers, path in _own_groups():
        if hierarchy == "0":
            for parent in _under(mounts.get("cgroup2", []), path):
                enabled = (_read(parent, "cgroup.subtree_control") or "").split()
                if "memory" in enabled:
                    yield CGROUP_V2, parent, _v2_files
        elif "memory" in controllers.split(","):
            for parent in _under(mounts.get("memory", []), path):
                yield CGROUP_V1, parent, _v1_files


def _under(mounts: List[Tuple[str, str]], path: str) -> Iterator[str]:
    """The folder of the group ``path`` (as /proc/self/cgroup names it) through each
    mount (root, mount point) that shows it: a container's runtime mounts the
    hierarchy from its own group, so that group is the mount's root, not ``/``."""
    for root, point in mounts:
        if root == "/" or path == root or path.startswith(root.rstrip("/") + "/"):
            yield os.path.join(point, path[len(root.rstrip("/")):].lstrip("/"))


def _own_groups() -> List[Tuple[str, str, str]]:
    try:
        with open("/proc/self/cgroup") as fh:
            return [tuple(line.rstrip("\n").split(":", 2)) for line in fh  # type: ignore
                    if line.count(":") >= 2]
    except OSError:
        return []


def _mounts() -> Dict[str, List[Tuple[str, str]]]:
    """cgroup2 mounts, and v1 hierarchies by controller ("memory"): each as (the
    group it shows as its root, its mount point), from /proc/self/mountinfo."""
    out: Dict[str, List[Tuple[str, str]]] = {}
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                # ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
                fields = line.split()
                if "-" not in fields[6:]:
                    continue
                dash = fields.index("-", 6)
                if len(fields) < dash + 4:
                    continue
                root, point = (_unescape(f) for f in fields[3:5])
                kind, options = fields[dash + 1], fields[dash + 3]
                if kind == "cgroup2":
                    out.setdefault("cgroup2", []).append((root, point))
                elif kind == "cgroup":
                    for option in options.split(","):
                        out.setdefault(option, []).append((root, point))
    except OSError:
        pass
    return out


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _read(folder: str, name: str) -> str | None:
    try:
        with open(os.path.join(folder, name)) as fh:
            return fh.read()
    except OSError:
        return None


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")
