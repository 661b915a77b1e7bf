"""Git with pygit2: list an upstream's refs, resolve what was asked, export the tree.

Every pack works in a fresh bare repository in a temporary directory, so no
state leaks between packs and nothing on the host's git config matters.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple

import pygit2

from .config import git_credential_environment, proxy_for, settings
from .errors import AmbiguousCommitError, GitError, RefNotFoundError, explained
from .ids import short
from .model import MODE_GITLINK
from .proof import MODE_TREE, encode, tree_entries
from .refs import DEFAULT_BRANCH, RepoSpec, ResolvedRef

log = logging.getLogger(__name__)

# Commits of first-parent history fetched and carried with a branch's tip, so that an
# install can prove the branch moves forward from what the isolated host has.
HISTORY = 100
_TYPES = {1: "commit", 2: "tree", 3: "blob", 4: "tag"}  # libgit2's object type numbers


@dataclass(frozen=True)
class TreeFile:
    """One file of a snapshot: its path in the repo, git mode and content."""

    path: str
    mode: int
    data: bytes


@dataclass(frozen=True)
class Snapshot:
    """The tree of one commit, every file included (repos read assets next to their code)."""

    commit: str
    tree: str
    commit_time: int
    files: Tuple[TreeFile, ...]
    objects: bytes  # the commit, its trees, its tags and history, as git hashes them


class Upstream:
    """One upstream repository, fetched into a private bare repo."""

    def __init__(self, url: str, workdir: str | None = None, history: int = HISTORY,
                 progress: bool = False):
        self.url, self.history, self.progress = url, history, progress
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="mirror-git-")
        path = workdir or self._tmp.name
        self.repo = pygit2.init_repository(path, bare=True)
        self.remote = self.repo.remotes.create_anonymous(url)
        self._heads: Dict[str, str] | None = None
        self._default: str | None = None
        # Given to libgit2 explicitly: pygit2 turns proxies off unless told. (libgit2
        # sends only https:// remotes through one, with CONNECT: libgit2#5650.)
        self.proxy = proxy_for(url)
        log.debug("git %s%s", url, f" through {self.proxy}" if self.proxy else "")
        if self.proxy and url.startswith("http://"):
            log.warning("git: %s: libgit2 does not send plain-HTTP git through a proxy "
                        "(libgit2#5650); fetching it directly, past %s", url, self.proxy)
            self.proxy = None

    def close(self) -> None:
        """Remove the private repository (unless it was the caller's ``workdir``)."""
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> Upstream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- refs ---------------------------------------------------------------

    def refs(self) -> Dict[str, str]:
        """Upstream refs (``refs/heads/*``, ``refs/tags/*``) to the object ids they name."""
        if self._heads is None:
            try:
                listing = _list_heads(self.remote, Credentials(), self.proxy)
            except pygit2.GitError as e:
                raise GitError(self.url, explain(self.url, e, self.proxy)) from None
            self._heads = {}
            for name, oid, symref in listing:
                if name == "HEAD" and symref:
                    self._default = symref[len("refs/heads/"):]
                elif name.startswith(("refs/heads/", "refs/tags/")) and not name.endswith("^{}"):
                    self._heads[name] = oid
        return self._heads

    def default_branch(self) -> str:
        """The branch MegEngine Hub uses without ``:ref`` (master), else the remote's HEAD."""
        refs = self.refs()
        if f"refs/heads/{DEFAULT_BRANCH}" in refs or not self._default:
            return DEFAULT_BRANCH
        return self._default

    def resolve(self, spec: RepoSpec, allow_unreachable: bool = False) -> ResolvedRef:
        """Resolve ``spec`` to a commit, fetching only the ref it names.

        ``:ref@commit`` must name a commit in the ref's history, unless
        ``allow_unreachable``.
        """
        refs = self.refs()
        if spec.ref:
            if f"refs/heads/{spec.ref}" in refs:
                name, kind, refname = spec.ref, "branch", f"refs/heads/{spec.ref}"
            elif f"refs/tags/{spec.ref}" in refs:
                name, kind, refname = spec.ref, "tag", f"refs/tags/{spec.ref}"
            else:
                raise RefNotFoundError(self.url, spec.ref, _short_names(refs))
        else:
            name, kind = self.default_branch(), "branch"
            refname = f"refs/heads/{name}"
            if refname not in refs and not spec.commit:
                raise RefNotFoundError(self.url, name, _short_names(refs))

        if spec.commit is None:
            # Only the tip is needed: a shallow fetch keeps large histories fast.
            self._fetch([f"+{refname}:{refname}"], depth=self.history)
            target = str(self.repo.references[refname].target)
            return ResolvedRef(spec.ref or "", name, kind, self._peel(target), target)

        # A pinned commit may be anywhere in history: fetch the refs that can reach it.
        wanted = [f"+{refname}:{refname}"] if spec.ref else ["+refs/heads/*:refs/heads/*",
                                                             "+refs/tags/*:refs/tags/*"]
        self._fetch(wanted, depth=0)
        try:
            commit = self._lookup_commit(spec.commit)
        except RefNotFoundError:
            if not spec.ref:
                raise
            # Not in the ref's history: look everywhere, to say "unreachable" if it exists.
            self._fetch(["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"], depth=0)
            commit = self._lookup_commit(spec.commit)
        if spec.ref:
            tip = self._peel(self.repo.references[refname].target)
            if tip != commit and not self.repo.descendant_of(tip, commit) and \
                    not allow_unreachable:
                raise GitError(self.url, f"commit {short(commit)} is not reachable from {kind} "
                                         f"{name!r} (its tip is {short(tip)}); pass "
                                         f"--allow-unreachable to pack it as {name} anyway")
        target = commit
        if spec.ref and kind == "tag" and self._peel(self.repo.references[refname].target) \
                == commit:
            target = str(self.repo.references[refname].target)
        return ResolvedRef(spec.ref or spec.commit, name, kind, commit, target)

    def _fetch(self, refspecs: List[str], depth: int) -> None:
        from tqdm import tqdm

        try:
            with tqdm(unit="obj", desc="git fetch", leave=False,
                      disable=not self.progress or None) as bar:
                self.remote.fetch(refspecs, depth=depth, callbacks=Credentials(bar),
                                  proxy=self.proxy)
        except pygit2.GitError as e:
            if depth and "shallow" in str(e):  # libgit2's file:// transport: fetch it all
                return self._fetch(refspecs, depth=0)
            raise GitError(self.url, f"fetch failed: {explain(self.url, e, self.proxy)}") \
                from None

    def _peel(self, oid) -> str:
        return str(self.repo[oid].peel(pygit2.Commit).id)

    def _lookup_commit(self, prefix: str) -> str:
        try:
            obj = self.repo.revparse_single(prefix)
        except KeyError:
            raise RefNotFoundError(self.url, prefix) from None
        except ValueError as e:
            if "ambiguous" not in str(e):
                raise RefNotFoundError(self.url, prefix) from None
            ids = (str(c.id) for c in self._all_commits())
            matches = sorted({i for i in ids if i.startswith(prefix)})
            if len(matches) == 1:  # the others sharing the prefix are trees or blobs
                return matches[0]
            raise AmbiguousCommitError(self.url, prefix, matches) from None
        if not str(obj.id).startswith(prefix.lower()):
            # revparse took it as a branch or tag name: @ takes only commit ids.
            ids = sorted({str(c.id) for c in self._all_commits()
                          if str(c.id).startswith(prefix.lower())})
            if len(ids) != 1:
                raise RefNotFoundError(self.url, prefix) if not ids else \
                    AmbiguousCommitError(self.url, prefix, ids)
            return ids[0]
        try:
            return str(obj.peel(pygit2.Commit).id)
        except (pygit2.InvalidSpecError, ValueError):
            raise RefNotFoundError(self.url, prefix) from None

    def _all_commits(self) -> Iterator[pygit2.Commit]:
        for oid in self.repo.odb:
            obj = self.repo[oid]
            if isinstance(obj, pygit2.Commit):
                yield obj

    # --- trees --------------------------------------------------------------

    def snapshot(self, commit: str) -> Snapshot:
        """Every file of ``commit``'s tree, sorted by path, and the git objects that
        prove it (see mirror.proof): the commit, its trees and its first-parent history
        as far as it was fetched (annotated tags: :meth:`tag_objects`)."""
        c = self.repo[commit].peel(pygit2.Commit)
        files: List[TreeFile] = []
        trees: List[str] = []
        self._walk(c.tree, "", files, trees)
        files.sort(key=lambda f: f.path)
        objects = self._encode(self._history(str(c.id)) + trees)
        return Snapshot(str(c.id), str(c.tree_id), c.commit_time, tuple(files), objects)

    def tag_objects(self, targets: Tuple[str, ...]) -> bytes:
        """The annotated tag objects among ``targets`` (and the tags they name), as
        git hashes them."""
        return self._encode(self._tags(targets))

    def _encode(self, ids: List[str]) -> bytes:
        return encode((_TYPES[kind], data) for kind, data in
                      (self.repo.odb.read(oid) for oid in ids))

    def _walk(self, tree: pygit2.Tree, prefix: str, out: List[TreeFile],
              trees: List[str]) -> None:
        trees.append(str(tree.id))
        # Modes as the raw tree writes them: libgit2 reports an old git's 100664 as
        # 100644, but the tree's id (recomputed at install) is of what is written.
        for mode, name, oid in tree_entries(self.repo.odb.read(tree.id)[1]):
            path = prefix + name
            if mode == MODE_TREE:
                self._walk(self.repo[oid], path + "/", out, trees)
            elif mode != MODE_GITLINK:  # a mode the format cannot carry fails the pack
                out.append(TreeFile(path, mode, self.repo[oid].data))
            # A submodule (160000) has no content in this repository: only its entry in
            # the tree, which travels with the tree.

    def _history(self, commit: str) -> List[str]:
        """``commit`` and its first parents, as far as fetched (a shallow fetch stops
        the chain), at most ``history`` commits."""
        out, at = [], commit
        while at and len(out) < max(1, self.history) and self.repo.odb.exists(at):
            out.append(at)
            parents = self.repo[at].parent_ids
            at = str(parents[0]) if parents else ""
        return out

    def _tags(self, targets: Tuple[str, ...]) -> List[str]:
        """The annotated tag objects among ``targets``, and the tags they name."""
        out = []
        for oid in targets:
            obj = self.repo[oid]
            while isinstance(obj, pygit2.Tag):
                out.append(str(obj.id))
                obj = self.repo[obj.target]
        return out


class Credentials(pygit2.RemoteCallbacks):
    """Credentials from the usual places, each offered once (libgit2 asks again after a
    refusal, and would loop): ssh-agent for SSH; for HTTPS, ``MGE_MIRROR_GIT_USERNAME``
    and ``MGE_MIRROR_GIT_PASSWORD`` (a token, say), else git's own credential helpers
    (``git credential fill``)."""

    def __init__(self, bar: Any = None) -> None:
        super().__init__()
        self.tried: set = set()
        self.bar = bar  # a progress bar of objects received, for a fetch

    def transfer_progress(self, stats: Any) -> None:
        """libgit2's progress of a fetch, on the bar (which throttles its redraws)."""
        if self.bar is not None:
            self.bar.total = stats.total_objects
            self.bar.update(stats.received_objects - self.bar.n)

    def credentials(self, url: str, username_from_url: str | None, allowed_types: int):
        """What libgit2 asks for: the next credential not yet offered. Raises
        :class:`GitError` when every one was refused."""
        if allowed_types & pygit2.enums.CredentialType.SSH_KEY and "agent" not in self.tried:
            self.tried.add("agent")
            return pygit2.KeypairFromAgent(username_from_url or "git")
        if allowed_types & pygit2.enums.CredentialType.USERPASS_PLAINTEXT:
            config = settings()
            if "env" not in self.tried and config.git_password:
                self.tried.add("env")
                user = config.git_username or username_from_url or "git"
                return pygit2.UserPass(user, config.git_password)
            if "helper" not in self.tried:
                self.tried.add("helper")
                found = _credential_helper(url, username_from_url)
                if found:
                    return pygit2.UserPass(*found)
        offered = ", ".join(sorted(self.tried)) or "nothing"
        raise GitError(url, f"authentication failed (offered: {offered}); for HTTPS set "
                            f"MGE_MIRROR_GIT_USERNAME and MGE_MIRROR_GIT_PASSWORD or configure "
                            f"a git credential helper, for SSH load the key into ssh-agent")


def _credential_helper(url: str, username: str | None) -> Tuple[str, str] | None:
    """What ``git credential fill`` knows for ``url`` (never prompting)."""
    query = f"url={url}\n" + (f"username={username}\n" if username else "") + "\n"
    try:
        proc = subprocess.run(["git", "credential", "fill"], input=query,
                              env=git_credential_environment(),
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    answer = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if proc.returncode == 0 and answer.get("password"):
        return answer.get("username", username or ""), answer["password"]
    return None


# libgit2's words, and what they mean for the user: what happened, what to try
_MEANINGS = (
    (("proxy authentication",),
     "the proxy asks for credentials, which mirror cannot hand libgit2 for a proxy: use "
     "one that lets this host through without them"),
    (("proxy",),
     "the proxy refused or failed the connection: check https_proxy/http_proxy and "
     "git's http.proxy"),
    (("packet length too long", "wrong version number", "unknown protocol"),
     "the server answered an HTTPS request in plain HTTP; if it speaks HTTP, pack with "
     "--protocol http"),
    (("certificate",),
     "its TLS certificate is not trusted here; add its CA to the system's trust store "
     "(or point SSL_CERT_FILE at a bundle that has it)"),
    (("status code: 404", "repository not found"),
     "no such repository there, or it is private: check owner/name and --git-host; a "
     "private one needs MGE_MIRROR_GIT_USERNAME/_PASSWORD or a git credential helper"),
    (("status code: 401", "authentication required", "too many redirects or authentication"),
     "it asks for credentials: set MGE_MIRROR_GIT_USERNAME/_PASSWORD or a git credential "
     "helper"),
    (("status code: 403",),
     "access denied for these credentials"),
    (("failed to resolve address", "name or service not known",
      "temporary failure in name resolution"),
     "the host name does not resolve: this host has no DNS or no way out; pack on a host "
     "that reaches it, or point --git-host or --rewrite at a mirror this one reaches"),
    (("connection refused",),
     "nothing answers at that address and port (is the server up, and is this its port?)"),
    (("timed out", "timeout"),
     "the server did not answer in time (a slow network, or a firewall dropping packets)"),
)


def explain(url: str, error: BaseException, proxy: str | None = None) -> str:
    """libgit2's error as one line a user can act on: what happened and what to try,
    then libgit2's own words for the curious. Through ``proxy``, what refuses a
    connection is the proxy."""
    meanings = _MEANINGS
    if proxy:
        meanings = ((("failed to connect", "connection refused"),
                     f"the proxy {proxy} does not answer: check https_proxy and git's "
                     f"http.proxy"),) + meanings
    said = explained(f"libgit2: {error}", meanings)
    return said if said != f"libgit2: {error}" else str(error)


def _list_heads(remote: pygit2.Remote, callbacks: pygit2.RemoteCallbacks,
                proxy: str | None) -> List[Tuple[str, str, str | None]]:
    """``(name, oid, symref_target)`` of every ref the remote advertises."""
    if hasattr(remote, "list_heads"):  # pygit2 >= 1.18; ls_remotes is deprecated there
        return [(h.name or "", str(h.oid), h.symref_target)
                for h in remote.list_heads(callbacks=callbacks, proxy=proxy)]
    return [(h["name"], str(h["oid"]), h.get("symref_target"))
            for h in remote.ls_remotes(callbacks=callbacks, proxy=proxy)]


def _short_names(refs: Dict[str, str]) -> List[str]:
    return sorted(r.split("/", 2)[2] for r in refs)
