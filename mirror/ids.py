"""Ids as people see them: a commit id shortened for messages, and the hex check that
every full id (commit, tree, sha256) must pass."""

from __future__ import annotations

import re
from typing import Any, Tuple

SHORT = 12  # hex digits of a commit id shown to people
_HEX = re.compile("[0-9a-f]*")


def short(commit: str) -> str:
    """A commit id as messages show it."""
    return commit[:SHORT]


def is_hex(s: Any, lengths: Tuple[int, ...]) -> bool:
    """Whether ``s`` is lowercase hex of one of ``lengths``."""
    return isinstance(s, str) and len(s) in lengths and _HEX.fullmatch(s) is not None
