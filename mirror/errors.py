"""Every error mirror raises on purpose, grouped by topic.

Each carries its context (repo, ref, commit, URL, path) as attributes and a
message that names it. The CLI prints ``str(error)`` on one line and exits with
``error.exit_code``; a traceback means a bug.
"""

from __future__ import annotations

import enum
import errno
from typing import Iterable, Mapping, Sequence, Tuple

from .ids import short


class ExitCode(enum.IntEnum):
    """What the ``mirror`` command exits with: each kind of failure its own code, so
    that a script can tell a missing bundle from a damaged one. The README's table
    says the same."""

    OK = 0
    FAILED = 1  # an operation failed: git, a download, a registry, the disk
    USAGE = 2  # a bad command line, spec or reference
    VERIFICATION = 3  # a bundle, the store or a stored file failed verification
    NOT_FOUND = 4  # no such file or store; a repo, ref, commit, entrypoint or weight
    TRUST = 5  # refused by the trust policy: a signature, or a pickle that runs code
    CONFLICT = 6  # at odds with what is there: a ref, or a lock file's pins
    INTERRUPTED = 130  # Ctrl-C, as a shell reports a command SIGINT ended


def explained(said: str, meanings: Sequence[Tuple[Tuple[str, ...], str]]) -> str:
    """A library's error text as one line a user can act on: the meaning of the first
    entry of ``meanings`` one of whose words it holds (what happened, what to try),
    then the library's own words for the curious; as it was if none fits."""
    for needles, meaning in meanings:
        if any(n in said.lower() for n in needles):
            return f"{meaning} ({said})"
    return said


class MirrorError(Exception):
    """Base class of every error mirror raises on purpose."""

    exit_code: int = ExitCode.FAILED


# --- configuration and records ----------------------------------------------


class ConfigError(MirrorError):
    """Raised when a setting (an environment variable, a store's ``config.toml``) has a
    value mirror cannot use."""

    def __init__(self, where: str, reason: str):
        self.where = where
        super().__init__(f"config {where}: {reason}")


class InvalidRecordError(MirrorError, ValueError):
    """Raised by :mod:`mirror.model` when a manifest or a store record lacks a field, has
    one of the wrong type or range, or names something unsafe. Callers that know where
    it came from re-raise it as a :class:`BundleError` or :class:`StoreError`."""

    exit_code = ExitCode.VERIFICATION

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


# --- specs and revisions ---------------------------------------------------


class SpecError(MirrorError, ValueError):
    """Raised when a repo spec such as ``owner/name:ref@commit`` cannot be parsed."""

    exit_code = ExitCode.USAGE

    def __init__(self, spec: str, reason: str):
        self.spec = spec
        super().__init__(f"invalid repo spec {spec!r}: {reason}")


# --- git -------------------------------------------------------------------


class GitError(MirrorError):
    """Raised when the upstream git repository cannot be reached or read."""

    def __init__(self, url: str, reason: str):
        self.url = url
        super().__init__(f"git: {url}: {reason}")


class RefNotFoundError(GitError):
    """Raised when a branch, tag or commit asked for does not exist upstream."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, url: str, ref: str, available: Sequence[str] = ()):
        self.ref = ref
        self.available = list(available)
        hint = f" (it has: {', '.join(self.available[:20])})" if self.available else ""
        super().__init__(url, f"no branch, tag or commit {ref!r}{hint}")


# --- weights ---------------------------------------------------------------


class DownloadError(MirrorError):
    """Raised when a weight file cannot be downloaded after all retries."""

    def __init__(self, url: str, reason: str):
        self.url = url
        super().__init__(f"download failed: {url}: {reason}")


class OCIReferenceError(MirrorError, ValueError):
    """Raised when an ``oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]`` reference
    cannot be parsed."""

    exit_code = ExitCode.USAGE

    def __init__(self, reference: str, reason: str):
        self.reference = reference
        super().__init__(f"invalid registry reference {reference!r}: {reason}")


class RegistryError(MirrorError):
    """Raised when an OCI registry cannot be reached or refuses a request. ``kind`` says
    which failed, as the one-line message does: ``unauthorized``, ``denied``, ``not
    found``, ``TLS``, ``connection refused``, ``timed out``, ``damaged`` (a blob that
    does not hash to its digest) or ``protocol`` (an answer mirror cannot use)."""

    def __init__(self, reference: str, kind: str, reason: str):
        self.reference = reference
        self.kind = kind
        if kind == "not found":  # a tag or digest the registry lacks, as a git ref
            self.exit_code = ExitCode.NOT_FOUND
        super().__init__(f"registry {reference}: {kind}: {reason}")


class UnresolvedError(MirrorError):
    """Raised when code downloads from a URL that static discovery cannot work out."""

    def __init__(self, unresolved: Sequence[str]):
        self.unresolved = list(unresolved)
        super().__init__(
            f"cannot tell which URL {len(unresolved)} download call(s) fetch: "
            f"{'; '.join(unresolved[:3])}{' ...' if len(unresolved) > 3 else ''}. Add the "
            f"files with --weights URL, or pass --allow-unresolved to pack without them")


class LockMismatchError(MirrorError):
    """Raised when a pack under ``--lock`` finds a ref or a weight that no longer
    matches its pin."""

    exit_code = ExitCode.CONFLICT

    def __init__(self, path: str, what: str):
        self.path = path
        super().__init__(f"lock {path}: {what}. Review the change; pack again with "
                         f"--update to move the pins")


class UnsafePickleError(MirrorError):
    """Raised when a weight file, unpickled, would import something MegEngine weights
    never use (pickles run code): at pack and at install."""

    exit_code = ExitCode.TRUST

    def __init__(self, what: str, names: Sequence[str]):
        self.what, self.names = what, list(names)
        super().__init__(
            f"{what} would import {', '.join(self.names)} when loaded (unpickling runs "
            f"code); MegEngine weights import only numpy arrays, tensors and collections. "
            f"Pass --allow-unsafe-pickle only if you trust where it comes from")


class RefusedWeightError(UnsafePickleError):
    """Raised when loading a weight file meets what MegEngine weights never hold: the
    restricted unpickler (:mod:`mirror.unpickler`) refuses it, before building it."""

    def __init__(self, url: str, path: str, reason: str):
        self.url, self.path, self.reason = url, path, reason
        self.what, self.names = f"weight {url}", [reason]
        MirrorError.__init__(
            self, f"weight {url} ({path}) refused when loaded: {reason}. mirror loads only "
                  f"what MegEngine saves: numpy arrays and scalars, tensors and collections")


# --- bundles ---------------------------------------------------------------


class BundleError(MirrorError):
    """Raised when a bundle file is unreadable, malformed or fails verification."""

    exit_code = ExitCode.VERIFICATION

    def __init__(self, path: str, reason: str, member: str | None = None):
        self.path = path
        self.member = member
        where = f" [{member}]" if member else ""
        super().__init__(f"bad bundle {path}{where}: {reason}")


class UsageError(MirrorError):
    """Raised when options do not fit together, or a value is malformed (a size, an
    option that needs another): the command line's mistake, exit 2."""

    exit_code = ExitCode.USAGE


class NotFoundError(MirrorError):
    """Raised when something named on the command line is not there (an entrypoint a
    pack names, say); exit 4."""

    exit_code = ExitCode.NOT_FOUND


class FileError(MirrorError):
    """Raised when a file mirror was asked to read or write cannot be (permissions, a
    full disk, a folder where a file should be)."""

    def __init__(self, path: str | None, reason: str):
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


class MissingFileError(MirrorError):
    """Raised when a file or folder given to mirror (a bundle, one of its parts) does
    not exist: not found, not a failed verification."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, path: str, what: str = "bundle"):
        self.path = path
        super().__init__(f"no such {what}: {path}")


def unreadable_bundle(path: str, error: OSError) -> MirrorError:
    """The error for a bundle file that could not be opened or read: missing (exit 4),
    or unreadable, which verification counts as failed (exit 3)."""
    if error.errno == errno.ENOENT:
        return MissingFileError(path)
    return BundleError(path, error.strerror or str(error))


class SignatureError(MirrorError):
    """Raised when a signature is required and the bundle is unsigned, signed by a key
    that is not trusted, or altered after signing."""

    exit_code = ExitCode.TRUST

    def __init__(self, bundle: str, reason: str):
        self.bundle = bundle
        super().__init__(f"refusing {bundle}: {reason}")


# --- store and loading -----------------------------------------------------


class StoreError(MirrorError):
    """Raised when the local store cannot be written or is inconsistent."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(f"store {path}: {reason}")


class NoStoreError(MirrorError):
    """Raised by every command but install (which creates one) when the store it is
    pointed at does not exist: a mistyped ``--home`` is said, never made a store."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, home: str):
        self.home = home
        super().__init__(f"no store at {home}; 'mirror install' creates one (is --home or "
                         f"MGE_MIRROR_HOME what you meant?)")


class NotInstalledError(MirrorError):
    """Raised when a load asks for a repo, ref or commit the store does not hold."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(
        self,
        repo: str,
        ref: str | None = None,
        commit: str | None = None,
        available: Iterable[str] = (),
        store: str = "",
    ):
        self.repo, self.ref, self.commit = repo, ref, commit
        self.available = list(available)
        what = repo + (f":{ref}" if ref else "") + (f" commit={commit}" if commit else "")
        if self.available:
            has = f"the store has {', '.join(self.available)} for {repo}"
        else:
            has = f"the store has nothing for {repo}"
        where = f" in {store}" if store else ""
        super().__init__(
            f"{what} is not installed{where}: {has}. "
            f"Pack it on a connected host (mirror pack {repo}"
            f"{':' + ref if ref else ''}{'@' + commit if commit else ''} -o X.hub) "
            f"and run 'mirror install X.hub' here."
        )


class AmbiguousCommitError(MirrorError):
    """Raised when an abbreviated commit id matches more than one commit."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, repo: str, commit: str, candidates: Sequence[str]):
        self.repo, self.commit, self.candidates = repo, commit, list(candidates)
        super().__init__(
            f"{repo}: commit {commit!r} is ambiguous, it matches {', '.join(self.candidates)}"
        )


class EntrypointNotFoundError(MirrorError):
    """Raised when hubconf.py of a snapshot has no callable of the name asked for."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, repo: str, commit: str, entry: str, available: Sequence[str],
                 suggestion: str | None = None):
        self.repo, self.commit, self.entry = repo, commit, entry
        self.available, self.suggestion = list(available), suggestion
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        super().__init__(
            f"{repo}@{short(commit)}: no entrypoint {entry!r} in hubconf.py "
            f"(it has: {', '.join(self.available) or 'none'}){hint}"
        )


class DependencyError(MirrorError):
    """Raised when a module that a repo's hubconf imports, or declares in
    ``dependencies``, cannot be imported on this host."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, repo: str, commit: str, module: str, entry: str | None = None,
                 declared: bool = False):
        self.repo, self.commit, self.module, self.entry = repo, commit, module, entry
        why = "declares it in dependencies" if declared else "imports it"
        who = f"entrypoint {entry!r} of " if entry else ""
        super().__init__(
            f"{who}{repo}@{short(commit)} needs module {module!r}, which cannot be imported "
            f"here (hubconf.py {why}); install it into this Python environment"
        )


class WeightNotInstalledError(MirrorError):
    """Raised when code asks for a weight URL that no installed bundle brought."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, url: str, store: str = "", location: str | None = None,
                 repo: str | None = None):
        self.url, self.location, self.repo = url, location, repo
        where = f" in {store}" if store else ""
        asked = f" (asked for at {location})" if location else " (asked for by code that " \
            "builds the URL at run time)"
        spec = repo or "OWNER/NAME"  # the repo whose code loads it, if known
        super().__init__(
            f"weight {url}{asked} is not installed{where}: no installed bundle packed it. "
            f"Pack it with 'mirror pack {spec} --weights {url} -o X.hub' and install that "
            f"bundle"
        )


class IntegrityError(MirrorError):
    """Raised when a stored file no longer matches the digest it was installed with."""

    exit_code = ExitCode.VERIFICATION

    def __init__(self, path: str, expected: str, actual: str, url: str | None = None):
        self.path, self.expected, self.actual, self.url = path, expected, actual, url
        what = f"{url} ({path})" if url else path
        super().__init__(
            f"integrity check failed for {what}: expected sha256 {expected}, got {actual}"
        )


class CodeIntegrityError(IntegrityError):
    """Raised when a snapshot's code, about to run, is not what its install recorded
    (changed, added or not Python source): nothing of it runs."""

    def __init__(self, repo: str, commit: str, path: str, reason: str):
        self.repo, self.commit, self.path, self.url = repo, commit, path, None
        self.expected = self.actual = None
        MirrorError.__init__(
            self, f"{repo}@{short(commit)}: {path} {reason}; it was not run. Run 'mirror "
                  f"verify' and reinstall the bundle that brought it with --force")


class SnapshotRemovedError(MirrorError):
    """Raised when a snapshot is removed from the store ('mirror remove', 'mirror gc')
    while its code or weights are being loaded."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, repo: str, commit: str, path: str):
        self.repo, self.commit, self.path = repo, commit, path
        super().__init__(
            f"{repo}@{short(commit)} was removed from the store while it was being loaded "
            f"({path} is gone); install its bundle again, or load another revision")


class PrerequisiteError(MirrorError):
    """Raised when a delta bundle is installed into a store that lacks what it was made
    against (``mirror pack --since``): a snapshot, or content it leaves out."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, bundle: str, store: str, missing: Sequence[str],
                 made_against: Sequence[str], gone: bool = False):
        self.bundle, self.store, self.missing = bundle, store, list(missing)
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        if gone:  # the snapshots are there: what they shared was removed since
            then = ("; the store no longer holds them (removed or collected since the "
                    "baseline was taken): install a whole bundle, or take a new inventory "
                    "and pack again")
        elif made_against:
            then = (f"; it was made against {', '.join(made_against)}: install that "
                    f"first, then this delta")
        else:
            then = "; install the bundle it was made against first, then this delta"
        super().__init__(
            f"{bundle} is a delta, and {store} lacks what it assumes: "
            f"{'; '.join(missing[:3])}{more}{then}. Nothing was installed")


class RefConflictError(MirrorError):
    """Raised when a bundle's ref cannot sit beside a ref the store has: git keeps refs
    as files, so ``x`` and ``x/y`` (of one kind) cannot both exist."""

    exit_code = ExitCode.CONFLICT

    def __init__(self, repo: str, kind: str, ref: str, installed: str, bundle: str):
        self.repo, self.kind, self.ref, self.installed = repo, kind, ref, installed
        super().__init__(
            f"{bundle}: {kind} {ref!r} of {repo} cannot be installed beside the installed "
            f"{kind} {installed!r} (git keeps refs as files: one name cannot be both a "
            f"file and a folder); nothing was installed. Remove it first with 'mirror "
            f"remove {repo}:{installed}'"
        )


class AmbiguousWeightError(MirrorError):
    """Raised when a weight URL asked for outside any snapshot's code is pinned to
    different bytes by the snapshots installed, so no one answer is right."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, url: str, pins: Mapping[str, Sequence[str]]):
        self.url, self.pins = url, dict(pins)
        which = "; ".join(f"sha256 {sha[:12]} by {', '.join(who)}" for sha, who in
                          sorted(self.pins.items()))
        super().__init__(
            f"weight {url} is pinned to different bytes by the installed snapshots ({which}); "
            f"load it through the repo whose bytes you want (mirror.hub.load or "
            f"megengine.hub.load under patch_megengine), which uses that snapshot's own pins"
        )
