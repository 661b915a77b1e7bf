"""Sizes as people write and read them: ``4G`` on a command line, ``1.2 GiB`` in output."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_size(text: str) -> int:
    """A size as ``split -b`` takes it: ``4G`` and ``4GiB`` are 2^32 bytes, ``4700MB``
    is 4.7 * 10^9; a bare number is bytes."""
    found = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = found.group(2).lower() if found else ""
    if not found or unit not in _UNITS:
        raise UsageError(f"size {text!r}: a number with an optional unit (K, M, G, T "
                          f"for powers of 1024, KB, MB, GB, TB for powers of 1000), "
                          f"e.g. 4G or 4700MB")
    return int(found.group(1)) * _UNITS[unit]


def iec(size: int) -> str:
    """``size`` in IEC units, as `ls -h` and tqdm show it."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if round(value, 1) < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
