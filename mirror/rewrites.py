"""URL rewrites (``--rewrite FROM=TO``): where pack fetches git and weight bytes from,
never what the bundle records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

from .errors import SpecError


@dataclass(frozen=True)
class Rewrites:
    """URL prefix rewrites (``FROM=TO``), applied as git's ``url.<base>.insteadOf``:
    the longest matching prefix wins. What is recorded stays the original URL; only
    the bytes come from the rewritten one (an internal mirror, or a test server)."""

    rules: Tuple[Tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, texts: Sequence[str]) -> Rewrites:
        """Rules from ``FROM=TO`` texts. Raises :class:`SpecError` for one without both."""
        rules = []
        for text in texts:
            source, sep, target = text.partition("=")
            if not sep or not source or not target:
                raise SpecError(text, "a rewrite is FROM=TO, e.g. "
                                      "https://github.com=https://git.corp.example/github")
            rules.append((source, target))
        return cls(tuple(sorted(rules, key=lambda r: -len(r[0]))))

    def __call__(self, url: str) -> str:
        """Where to fetch ``url`` from: ``url`` with its longest matching prefix
        replaced, or ``url`` itself when no rule matches."""
        for source, target in self.rules:
            if url.startswith(source):
                return target + url[len(source):]
        return url
