"""The pin file (``mirror pack --lock FILE``): the ref -> commit and URL -> sha256 pins
of a pack, for review and repeats.

``mirror pack --lock bundles/NAME.lock`` writes the file when it does not exist,
and enforces it when it does: a ref that now resolves elsewhere, or a weight
whose bytes changed upstream, fails the pack, naming what changed. (The store's
own file lock, which serialises writers, is :mod:`mirror.locking`.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence

from .atomic import write_atomic
from .errors import LockMismatchError, MirrorError

PINS_VERSION = 1


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

    def write(self, refs: Mapping[str, str], weights: Mapping[str, str]) -> None:
        """Write ``refs`` (spec -> commit) and ``weights`` (URL -> sha256), atomically."""
        data = {"version": PINS_VERSION, "refs": dict(sorted(refs.items())),
                "weights": dict(sorted(weights.items()))}
        write_atomic(self.path, (json.dumps(data, indent=1) + "\n").encode())
