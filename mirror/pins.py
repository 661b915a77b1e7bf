"""The pin file (``mirror pack --lock FILE``): the ref -> commit and URL -> sha256 pins
of a pack, for review and repeats.

``mirror pack --lock bundles/NAME.lock`` writes the file when it does not exist,
and enforces it when it does: a ref that now resolves elsewhere, or a weight
whose bytes changed upstream, fails the pack, naming what changed. (The store's
own file lock, which serialises writers, is :mod:`mirror.locking`.)

``--lock FILE --update`` moves pins on purpose instead: refs are resolved afresh
and weights fetched as any pack fetches them (through the download cache: add
``--refresh`` to ask upstream for their bytes again), then, once the bundle is
written, the pins that changed are moved, the new ones added, and each change is
said in one line (``lock: moved SPEC OLD -> NEW``, ``lock: added SPEC -> COMMIT``,
``lock: weight URL sha256 OLD -> NEW``, ``lock: added weight URL sha256 NEW``, or
``lock: unchanged``). Pins this pack does not use are kept, not dropped: a lock
often serves several recipes or runs, and a pack of some of its specs says nothing
about the others; delete the file to start afresh. The file is then what a first
pack of the same pins would write, byte for byte, so that its diff is the review.
A pack that fails leaves the file as it was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence

from .atomic import write_atomic
from .errors import LockMismatchError, MirrorError
from .model import JsonObject

PINS_VERSION = 1


@dataclass(frozen=True)
class LockChange:
    """One pin that ``--update`` moved or added."""

    kind: str  # "ref" (name: the spec as written) or "weight" (name: the URL)
    name: str
    old: str | None  # the commit or sha256 pinned before; None: newly pinned
    new: str

    def line(self) -> str:
        """The change as the pack's log says it."""
        if self.kind == "ref":
            return (f"lock: added {self.name} -> {self.new}" if self.old is None
                    else f"lock: moved {self.name} {self.old} -> {self.new}")
        return (f"lock: added weight {self.name} sha256 {self.new}" if self.old is None
                else f"lock: weight {self.name} sha256 {self.old} -> {self.new}")

    def to_json(self) -> JsonObject:
        return {"kind": self.kind, "name": self.name, "old": self.old, "new": self.new}


def _changes(kind: str, pinned: Mapping[str, str], now: Mapping[str, str]) -> List[LockChange]:
    return [LockChange(kind, name, pinned.get(name), value)
            for name, value in sorted(now.items()) if pinned.get(name) != value]


@dataclass
class Pins:
    """Pins: each spec as written -> commit, each weight URL -> sha256."""

    path: str
    refs: Dict[str, str] = field(default_factory=dict)
    weights: Dict[str, str] = field(default_factory=dict)
    exists: bool = False

    @classmethod
    def load(cls, path: str) -> Pins:
        """The pins in ``path``, or none (``exists`` false) if there is no such file.
        Raises :class:`MirrorError` when the file is there but unreadable."""
        if not os.path.exists(path):
            return cls(path)
        try:
            with open(path) as fh:
                data = json.load(fh)
            if data.get("version") != PINS_VERSION:
                raise ValueError(f"version {data.get('version')!r} is not {PINS_VERSION}")
            return cls(path, dict(data["refs"]), dict(data["weights"]), exists=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MirrorError(f"lock file {path} is unreadable: {e}") from None

    def check_ref(self, spec: str, commit: str) -> None:
        """Raises :class:`LockMismatchError` if ``spec`` is pinned to another commit."""
        pinned = self.refs.get(spec)
        if self.exists and pinned is not None and pinned != commit:
            raise LockMismatchError(self.path, f"{spec} now resolves to {commit}, the lock "
                                               f"pins {pinned}")

    def check_weight(self, url: str, sha256: str) -> None:
        """Raises :class:`LockMismatchError` if ``url`` is pinned to other bytes."""
        pinned = self.weights.get(url)
        if self.exists and pinned is not None and pinned != sha256:
            raise LockMismatchError(self.path, f"{url} now has sha256 {sha256}, the lock "
                                               f"pins {pinned}: its content changed upstream")

    def missing(self, specs: Sequence[str], urls: Sequence[str]) -> List[str]:
        """What this pack has that the existing file does not pin (nothing when there
        is no file yet)."""
        if not self.exists:
            return []
        return [s for s in specs if s not in self.refs] + [u for u in urls
                                                           if u not in self.weights]

    def changes(self, refs: Mapping[str, str], weights: Mapping[str, str]) -> List[LockChange]:
        """What pinning ``refs`` (spec -> commit) and ``weights`` (URL -> sha256) moves
        or adds: refs first, then weights, each kind by name."""
        return _changes("ref", self.refs, refs) + _changes("weight", self.weights, weights)

    def unused(self, refs: Mapping[str, str], weights: Mapping[str, str]) -> List[str]:
        """The specs, then the URLs, this file pins that ``refs`` and ``weights`` do not
        name: what ``--update`` keeps."""
        return sorted(set(self.refs) - set(refs)) + sorted(set(self.weights) - set(weights))

    def write(self, refs: Mapping[str, str], weights: Mapping[str, str]) -> bool:
        """Write ``refs`` (spec -> commit) and ``weights`` (URL -> sha256), atomically;
        False (and nothing written) if the file already holds exactly these bytes."""
        data = {"version": PINS_VERSION, "refs": dict(sorted(refs.items())),
                "weights": dict(sorted(weights.items()))}
        text = (json.dumps(data, indent=1) + "\n").encode()
        try:
            with open(self.path, "rb") as fh:
                if fh.read() == text:
                    return False
        except OSError:
            pass  # absent or unreadable: written anew
        write_atomic(self.path, text)
        self.refs, self.weights, self.exists = dict(refs), dict(weights), True
        return True
