"""A snapshot's symlinks, resolved as the kernel resolves them: none may leave it.

Each link is followed component by component from the folder holding it, and
every link met on the way (in the middle of a path, before a ``..``) is replaced
by where it leads, as the kernel does: a link that is harmless alone can lead
another one out (``d1/d2/L -> ..`` is ``d1``, so ``M -> d1/d2/L/../../x`` is
``../x``). A link is refused if it leaves the snapshot at any step, ends at the
snapshot's own root, loops, goes through more links than Linux follows, or has
an absolute, empty or NUL target.

What the snapshot does not hold is taken for a folder and followed lexically
(``missing/../../x`` leaves): a link dangling inside the snapshot is allowed, as
git allows it. A file used as a folder stops the kernel there (ENOTDIR), so a
path through one cannot leave: allowed.

Names are compared byte for byte, as Linux does on most filesystems; others
(macOS's APFS and HFS+, ext4 with casefold, NTFS) take ``A`` for ``a``, or an NFD
name for its NFC form, and there a link can lead elsewhere than it does here
(``d/A -> ..`` is ``d``, so ``M -> d/a/../../x``, lexically ``x``, leaves). So
what could differ between filesystems is refused, as no real repo needs it: a
link's target naming a path the snapshot does not hold but holds after folding
(:func:`fold`), or a file used as a folder whose folded twin is a folder; and a
snapshot with two paths one after folding where one is a link (a file ``m/f``
beside a link ``M`` would be written through it). Twins without a link
(``README`` and ``readme``) are allowed.

Pack (:mod:`mirror.packer`, :func:`mirror.bundle.write`), every read of a bundle
(:func:`mirror.bundle.read`, so ``verify`` and ``install``) and ``mirror verify``
of the store (:mod:`mirror.housekeeping`) all decide with :func:`refused`.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Protocol, Set, Tuple

from .ids import short
from .model import MODE_LINK

MAXSYMLINKS = 40  # links one lookup follows before Linux fails it (ELOOP)
TOO_DEEP = f"goes through more than {MAXSYMLINKS} symlinks"
SHOWN = 5  # links a message lists, at most

# What a path leads to: a folder, a file, nothing the snapshot holds (taken for a
# folder), or nowhere: the kernel stops at a file used as a folder (ENOTDIR).
DIR, FILE, MISSING, STUCK = "folder", "file", "missing", "stuck"
LINK = "symlink"


class Entry(Protocol):
    """A file of a snapshot as this module needs it: a model ``FileEntry`` or a git
    ``TreeFile`` (whose path's folders are folders: git and the model's tree check
    put nothing below a file or a link)."""

    path: str
    mode: int


@dataclass(frozen=True)
class Refusal:
    """The first link of a snapshot that is refused, and the message saying why."""

    path: str
    target: str
    message: str

    def __str__(self) -> str:
        return self.message


def decode(data: bytes) -> str:
    """A link's target from its content, as :mod:`mirror.tree` makes the link."""
    return data.decode("utf-8", "surrogateescape")


def refused(commit: str, files: Iterable[Entry], targets: Mapping[str, str]) -> Refusal | None:
    """The first link (in path order) of snapshot ``commit`` that is refused, or None.

    ``files`` is every file of the snapshot (paths and git modes), ``targets`` every
    link's target by path. Linear in the snapshot's size: each link is resolved once,
    and a link met again is replaced by where it was found to lead.
    """
    return _Resolver(commit, files, targets).first_refused()


def show(text: str) -> str:
    """A path or target as a message shows it: unprintable characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# Code points HFS+ ignores in names (as git's is_hfs_dotgit lists them): ZWNJ, ZWJ,
# the direction marks and embeddings, the deprecated format characters, the BOM.
_IGNORED = dict.fromkeys([*range(0x200C, 0x2010), *range(0x202A, 0x202F),
                          *range(0x206A, 0x2070), 0xFEFF])


def fold(path: str) -> str:
    """``path`` as a case- or normalization-insensitive filesystem may take it: NFC,
    case-folded (which can undo NFC, so NFC again), without what HFS+ ignores. Two
    paths folding alike may be one file there."""
    text = unicodedata.normalize("NFC", path.translate(_IGNORED)).casefold()
    return unicodedata.normalize("NFC", text)


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _insensitive(a: str, b: str) -> str:
    """The filesystems on which ``a`` and ``b`` (folding alike) are one name."""
    if _nfc(a) == _nfc(b):
        return "a normalization-insensitive filesystem"
    if a.casefold() == b.casefold():
        return "a case-insensitive filesystem"
    if _nfc(a).casefold() == _nfc(b).casefold():
        return "a case- and normalization-insensitive filesystem"
    return "HFS+ (which ignores some invisible characters)"  # folding alike: they differ


def _twins(a: str, b: str) -> Tuple[str, str]:
    """``a`` and ``b`` quoted as a message shows them: escaped past ASCII unless both are
    ASCII (an NFD name looks like its NFC form)."""
    if a.isascii() and b.isascii():
        return f"'{show(a)}'", f"'{show(b)}'"
    return ascii(a), ascii(b)


class _Leaves(Exception):
    """A ``..`` at the snapshot's root."""


class _TooDeep(Exception):
    """More links followed than the kernel follows."""


class _Twin(Exception):
    """A path named that the snapshot holds only under another name, ``twin``, one with
    it on some filesystems."""

    def __init__(self, named: str, twin: str):
        super().__init__(named)
        self.named, self.twin = named, twin


class _Refused(Exception):
    def __init__(self, link: str, why: str, trail: Iterable[str] = ()):
        super().__init__(link)
        self.link, self.why, self.trail = link, why, tuple(trail)


def _bad_target(target: str) -> str | None:
    if not target:
        return "has an empty target"
    if "\0" in target:
        return "has a NUL byte in its target"
    if target.startswith("/"):
        return "has an absolute target"
    return None


def _parent(at: str) -> str:
    cut = at.rfind("/")
    return at[:cut] if cut >= 0 else ""


class _Resolver:
    def __init__(self, commit: str, files: Iterable[Entry], targets: Mapping[str, str]):
        self.commit, self.targets = commit, targets
        self.links: Set[str] = set()
        self.files: Set[str] = set()
        self.dirs: Set[str] = set()
        for f in files:
            (self.links if f.mode == MODE_LINK else self.files).add(f.path)
            at = _parent(f.path)
            while at and at not in self.dirs:
                self.dirs.add(at)
                at = _parent(at)
        # folded path -> the first path (in path order) folding to it; and of folders
        self.folded: Dict[str, str] = {}
        self.folded_dirs: Dict[str, str] = {}
        # link -> (where it leads, what is there, the links followed to get there)
        self.done: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {}
        self.active: List[str] = []  # links being resolved, outermost first

    def first_refused(self) -> Refusal | None:
        twins = self._fold_paths()
        if twins is not None:
            return twins
        for link in sorted(self.links):
            try:
                self._resolve(link)
            except _Refused as r:
                return Refusal(r.link, self.targets[r.link], self._message(r))
        return None

    def _fold_paths(self) -> Refusal | None:
        """Fill :attr:`folded`; the first link (in path order) that is one path with
        another of the snapshot after folding, or None. One fold per path: linear."""
        kinds = dict.fromkeys(self.dirs, DIR)
        kinds.update(dict.fromkeys(self.files, FILE))
        kinds.update(dict.fromkeys(self.links, LINK))
        for path in sorted(kinds):
            key = fold(path)
            if kinds[path] == DIR:
                self.folded_dirs.setdefault(key, path)
            other = self.folded.setdefault(key, path)
            if other != path and LINK in (kinds[path], kinds[other]):
                link, twin = (other, path) if kinds[other] == LINK else (path, other)
                return Refusal(link, self.targets[link], self._twin_message(link, twin,
                                                                            kinds[twin]))
        return None

    def _twin_message(self, link: str, twin: str, kind: str) -> str:
        shown = _twins(link, twin)[1]
        what = f"the symlink {shown} -> {show(self.targets[twin])}" if kind == LINK \
            else f"the {kind} {shown}"
        return (f"symlink {show(link)} -> {show(self.targets[link]) or repr('')} in snapshot "
                f"{short(self.commit)} and {what} are one path on {_insensitive(link, twin)}")

    def _message(self, r: _Refused) -> str:
        text = (f"symlink {show(r.link)} -> {show(self.targets[r.link]) or repr('')} in "
                f"snapshot {short(self.commit)} {r.why}")
        through = list(dict.fromkeys(r.trail))  # in the order met, each once
        if through:
            more = f", and {len(through) - SHOWN} more" if len(through) > SHOWN else ""
            text += f" (through {self._pairs(through[:SHOWN])}{more})"
        return text

    def _pairs(self, links: Iterable[str]) -> str:
        return ", ".join(f"{show(p)} -> {show(self.targets[p])}" for p in links)

    def _resolve(self, link: str) -> Tuple[str, str, Tuple[str, ...]]:
        """Where ``link`` leads from its own folder; raises :class:`_Refused`."""
        done = self.done.get(link)
        if done is not None:
            return done
        if link in self.active:
            cycle = self.active[self.active.index(link):]
            raise _Refused(cycle[0], f"loops ({self._pairs(cycle)})")
        if len(self.active) >= MAXSYMLINKS:  # each goes through the next: stop recursing
            raise _Refused(self.active[0], TOO_DEEP, self.active[1:] + [link])
        target = self.targets[link]
        bad = _bad_target(target)
        if bad:
            raise _Refused(link, bad)
        self.active.append(link)
        trail: List[str] = []
        try:
            where, kind = self._walk(_parent(link), target.split("/"), trail)
        except _Leaves:
            raise _Refused(link, "leaves the snapshot", trail) from None
        except _TooDeep:
            raise _Refused(link, TOO_DEEP, trail) from None
        except _Twin as t:
            named, twin = _twins(t.named, t.twin)
            raise _Refused(link, f"names {named}, which is {twin} on "
                                 f"{_insensitive(t.named, t.twin)}", trail) from None
        finally:
            self.active.pop()
        if where == "" and kind == DIR:
            raise _Refused(link, "leads to the snapshot's root", trail)
        self.done[link] = (where, kind, tuple(trail))
        return self.done[link]

    def _walk(self, at: str, parts: List[str], trail: List[str]) -> Tuple[str, str]:
        """Follow ``parts`` from folder ``at`` (``""``: the root), replacing each link met
        by where it leads and adding it (and the links it went through) to ``trail``."""
        kind = DIR
        for part in parts:
            if kind == FILE:  # a file used as a folder ("file/..", "file/"): ENOTDIR
                twin = self.folded_dirs.get(fold(at))
                if twin is not None:  # unless the filesystem takes it for a folder
                    raise _Twin(at, twin)
                return at, STUCK
            if part in ("", "."):
                continue
            if part == "..":
                if not at:
                    raise _Leaves()
                at, kind = _parent(at), DIR
                continue
            at = f"{at}/{part}" if at else part
            if at in self.links:
                trail.append(at)
                at, kind, inner = self._resolve(at)
                trail.extend(inner)
                if len(trail) >= MAXSYMLINKS:  # and the link being resolved: one more
                    raise _TooDeep()
                if kind == STUCK:
                    return at, STUCK
            elif at in self.files:
                kind = FILE
            elif at in self.dirs:
                kind = DIR
            else:
                twin = self.folded.get(fold(at))
                if twin is not None:  # not here, but there under another name
                    raise _Twin(at, twin)
                kind = MISSING
        return at, kind
