"""Which names, paths and URLs mirror accepts.

A bundle names things that end up as files (refs, snapshot paths, repo folders),
in JSON records, in messages and on terminals (URLs, specs, entrypoints). Each
rule here holds on every common filesystem and for every later step, so a
manifest that passes :mod:`mirror.model` (which calls these) installs without
an ``OSError`` or a ``UnicodeEncodeError`` half-way through.

Every check raises :class:`~mirror.errors.InvalidRecordError` with a message that
names the field and shows the offending value (escaped, shortened if long).
:func:`ref_conflict` is the one rule that also needs the store: which installed
ref a new one cannot sit beside.
"""

from __future__ import annotations

import ipaddress
import keyword
import re
import urllib.parse
from typing import Iterable, Sequence, Tuple

from .errors import InvalidRecordError

# ext4, XFS, btrfs, ZFS and tmpfs store names of at most 255 bytes; NTFS, APFS and FAT
# count 255 UTF-16 units or characters, which 255 UTF-8 bytes never exceed.
NAME_MAX = 255
# Linux refuses a path of 4,096 bytes or more (PATH_MAX). The store joins a snapshot's
# file below <home>/repos/<host>/<owner>/<name>/snapshots/<commit>/, 853 bytes after
# <home> with the longest host (259), owner and name (255) allowed; a ref goes below
# .../refs/heads/, shorter. 3,072 bytes leave about 170 bytes for <home> in that worst
# case, and over 900 with names of ordinary length. No real repo comes near it.
RELATIVE_PATH_MAX = 3072
# Room for signed download URLs with long tokens, short enough to show in a message.
URL_MAX = 8192
# Free text pack records (specs, what could not be resolved or fetched, the tool's
# version, where a URL came from): shown, never acted on, but bounded all the same.
TEXT_MAX = 65536
SHOW_MAX = 80  # characters of a value a message shows

# The schemes mirror.download fetches (and absolute paths, as MegEngine's megfile does).
URL_SCHEMES = ("http", "https", "file", "s3")
REF_KINDS = ("branch", "tag")


def shown(value: str) -> str:
    """``value`` as a message shows it: ``repr`` (control characters, lone surrogates and
    invisible characters escaped, so a message stays one line), cut after
    :data:`SHOW_MAX` characters."""
    if len(value) <= SHOW_MAX:
        return repr(value)
    return f"{value[:SHOW_MAX]!r}... ({len(value)} characters)"


def check_utf8(value: str, what: str) -> str:
    """``value`` if it has a UTF-8 form: a lone surrogate (JSON's ``"\\udcff"``) has
    none, so no record, file name or message could hold it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecordError(f"{what} {shown(value)} is not valid UTF-8 (it holds a lone "
                                 f"surrogate)") from None
    return value


# C0 (NUL, newline, escape...), DEL and C1: a terminal acts on them, a log splits on them,
# a file system call stops at NUL. A regular expression: manifests hold 100,000 paths.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_WHITESPACE = re.compile(r"\s")  # str.isspace's characters: Unicode's spaces too


def control_character(value: str) -> str | None:
    """The first control character in ``value`` (C0, DEL or C1), if any."""
    found = _CONTROL.search(value)
    return found.group() if found else None


def one_line(text: str) -> str:
    """``text`` (an error message, say) made fit for a manifest's text fields: control
    characters and runs of whitespace become one space, lone surrogates a "?"."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return " ".join(_CONTROL.sub(" ", text).split())


def check_text(value: str, what: str, limit: int = TEXT_MAX) -> str:
    """``value`` if it is valid UTF-8 of at most ``limit`` bytes, with no control
    character."""
    size = len(check_utf8(value, what).encode("utf-8"))
    bad = control_character(value)
    if bad is not None:
        raise InvalidRecordError(f"{what} {shown(value)} holds the control character "
                                 f"{bad!r}")
    if size > limit:
        raise InvalidRecordError(f"{what} {shown(value)} is {size} bytes, over the {limit} "
                                 f"byte limit")
    return value


def check_component(value: str, what: str) -> str:
    """``value`` if it can be one file name: text of 1 to :data:`NAME_MAX` bytes, neither
    ``.`` nor ``..``, with no ``/`` or ``\\``."""
    check_text(value, what, NAME_MAX)
    if value in ("", ".", "..") or "/" in value or "\\" in value:
        raise InvalidRecordError(f"{what} {shown(value)} is not a plain name")
    return value


def check_path(value: str, what: str) -> str:
    """``value`` if it is a relative POSIX path that stays in the folder it is joined to:
    no empty, ``.`` or ``..`` component, no ``\\``, each component at most
    :data:`NAME_MAX` bytes, the whole at most :data:`RELATIVE_PATH_MAX`."""
    check_text(value, what, RELATIVE_PATH_MAX)
    if "\\" in value or any(part in ("", ".", "..") for part in value.split("/")):
        raise InvalidRecordError(f"unsafe {what} {shown(value)}: not a relative path inside "
                                 f"its folder")
    _check_components(value, what)
    return value


def _check_components(value: str, what: str) -> None:
    for part in value.split("/"):
        size = len(part.encode("utf-8"))
        if size > NAME_MAX:
            raise InvalidRecordError(f"{what} {shown(value)} has a {size} byte component "
                                     f"{shown(part)}, over the {NAME_MAX} bytes a file "
                                     f"name may have")


def check_identifier(value: str, what: str) -> str:
    """``value`` if it is a Python identifier, as the name of a function ``hubconf.py``
    defines must be."""
    if not value.isidentifier() or keyword.iskeyword(value):
        raise InvalidRecordError(f"{what} {shown(value)} is not a Python identifier")
    return value


# --- URLs ---------------------------------------------------------------------------


def check_url_text(value: str, what: str) -> str:
    """``value`` if it can be a URL at all: text of at most :data:`URL_MAX` bytes, no
    whitespace (a URL has none; ``http.client`` refuses it)."""
    check_text(value, what, URL_MAX)
    if _WHITESPACE.search(value):
        raise InvalidRecordError(f"{what} {shown(value)} holds whitespace, which no URL "
                                 f"does")
    return value


def check_url(value: str, what: str) -> str:
    """``value`` if it is a URL mirror downloads: ``http``, ``https`` (with a host),
    ``file`` or ``s3``, or an absolute path."""
    check_url_text(value, what)
    try:
        parts = urllib.parse.urlsplit(value)
        host = parts.hostname  # parses a bracketed IPv6 host, and may refuse it
    except ValueError:
        raise InvalidRecordError(f"{what} {shown(value)} is not a URL") from None
    if parts.scheme == "" and value.startswith("/"):
        return value
    if parts.scheme not in URL_SCHEMES:
        raise InvalidRecordError(
            f"{what} {shown(value)} has the scheme {parts.scheme or '(none)'!r}; mirror "
            f"downloads {', '.join(URL_SCHEMES)} URLs and absolute paths")
    if parts.scheme in ("http", "https") and not host:
        raise InvalidRecordError(f"{what} {shown(value)} has no host")
    return value


# --- hosts ----------------------------------------------------------------------------

# Matched with fullmatch: "$" would let a trailing newline through.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_IPV6 = re.compile(r"\[([0-9A-Fa-f:.]+)\]")  # no zone id: "%" may be followed by anything


def is_host(host: str) -> bool:
    """Whether ``host`` is a git host: a DNS name, an IPv4 address or a bracketed IPv6
    address, with an optional ``:port`` (1-65535). The store keeps a repo in a folder
    named after its host, so nothing else (a path above all) may pass."""
    if not isinstance(host, str) or not host.isascii():
        return False
    name, port = host, None
    if host.startswith("["):
        name, sep, port = host.partition("]:")
        name += "]" if sep else ""
        port = port if sep else None
    elif host.count(":") == 1:
        name, port = host.split(":")
    if port is not None and not (_PORT.fullmatch(port) and int(port) <= 65535):
        return False
    v6 = _IPV6.fullmatch(name)
    if v6:
        try:
            ipaddress.IPv6Address(v6[1])
        except ValueError:
            return False
        return True
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return False
    if labels[-1].isdigit():  # numeric last label: an IPv4 address, as URLs read it
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
    return True


def check_host(value: str, what: str) -> str:
    """``value`` if :func:`is_host`."""
    if not is_host(value):
        raise InvalidRecordError(f"{what} {shown(value)} is not a git host: a DNS name or an "
                                 f"IP address, with an optional :port")
    return value


# --- refs -----------------------------------------------------------------------------


def check_ref_name(name: str, kind: str) -> str:
    """``name`` if git accepts it as a ``kind`` ("branch" or "tag") name and the store
    can keep it as a file: git's own check (``git check-ref-format``, by libgit2), no
    control character (libgit2 lets DEL, C1 and even a NUL through), no leading ``-``
    (``git branch`` and ``git tag`` refuse one: it reads as an option), not ``HEAD``
    for a branch, each component at most :data:`NAME_MAX` bytes."""
    what = kind  # messages say "branch 'a..b' ...", "tag 'x.lock' ..."
    check_text(name, what, RELATIVE_PATH_MAX)
    import pygit2  # here: listing and loading never check a ref name, and it is slow

    full = ("refs/heads/" if kind == "branch" else "refs/tags/") + name
    if not pygit2.reference_is_valid_name(full) or name.startswith("-") or (
            kind == "branch" and name == "HEAD"):
        raise InvalidRecordError(f"{what} {shown(name)} is not a valid git {kind} name")
    _check_components(name, what)
    return name


def ref_conflict(installed: Iterable[str], new: str) -> str | None:
    """The name among ``installed`` (refs of one kind) that ``new`` cannot sit beside,
    if any: ``x`` and ``x/y`` either way round, as git keeps refs as files and one name
    cannot be both a file and a folder. ``new`` itself is no conflict (it moves)."""
    for name in installed:
        if new.startswith(name + "/") or name.startswith(new + "/"):
            return name
    return None


def check_refs(refs: Sequence[Tuple[str, str]]) -> None:
    """Refuse (kind, name) pairs, of one repo, that cannot all be installed: the same
    one twice, or two of one kind where one is a folder of the other (``x`` and
    ``x/y``)."""
    seen: set = set()
    for kind, name in refs:
        if (kind, name) in seen:
            raise InvalidRecordError(f"{kind} {shown(name)} is listed twice")
        seen.add((kind, name))
    # Sorted by their components, a ref's descendants come right after it ("x", "x/y",
    # "x-a"; by characters "x-a" would come between), so comparing neighbours finds
    # every clash in n log n, however many refs and components a bundle has.
    ordered = sorted((kind, name.split("/"), name) for kind, name in refs)
    for (kind, parts, name), (next_kind, next_parts, next_name) in zip(ordered, ordered[1:]):
        if kind == next_kind and next_parts[:len(parts)] == parts:
            raise InvalidRecordError(
                f"{kind} {shown(next_name)} cannot coexist with {kind} {shown(name)} (git "
                f"keeps refs as files: one cannot be both a file and a folder)")
