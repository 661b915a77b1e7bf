"""Repo specs: ``[host/]owner/name[:ref][@commit]`` and MegEngine's ``repo_info``.

A :class:`RepoSpec` is what the user asked for; a :class:`ResolvedRef` keeps
what was asked next to the commit it resolved to, so that messages can say both
and nothing is resolved twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Tuple

from .errors import SpecError
from .ids import short
from .names import is_host

DEFAULT_HOST = "github.com"
# MegEngine Hub's default when repo_info has no ":branch" (megengine/hub/const.py).
DEFAULT_BRANCH = "master"
PROTOCOLS = ("https", "http", "ssh")

_SPEC = re.compile(
    r"^(?:(?P<host>[^/@]+)/)?"  # optional host, may carry a port
    r"(?P<owner>[^/:@\s]+)/(?P<name>[^/:@\s]+)"
    r"(?::(?P<ref>[^@\s]+))?"
    r"(?:@(?P<commit>[0-9a-fA-F]{4,40}))?$"
)


def check_host(host: str, what: str = "git_host") -> str:
    """``host`` if it is a git host: a DNS name, an IPv4 address or a bracketed IPv6
    address, with an optional ``:port`` (1-65535); returned as given. Anything else,
    a path above all (the store keeps repos under their host's name), raises
    :class:`SpecError`. ``what`` names where the host came from in the message."""
    if not is_host(host):
        raise SpecError(str(host), f"{what} is not a git host: a DNS name or an IP "
                                   f"address, with an optional :port")
    return host


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # GitHub's owners and names


def _from_url(text: str, url: str) -> str:
    """``host/owner/name`` of a pasted ``https://host/owner/name[.git][/]``."""
    scheme, _, rest = url.partition("://")
    if scheme != "https":
        raise SpecError(text, f"a {scheme}:// URL: name the repo as host/owner/name and "
                              f"pass --protocol {scheme}")
    host, _, path = rest.partition("/")
    path = path.rstrip("/")
    if path.count("/") != 1 or any(c in path for c in ":@?#"):
        raise SpecError(text, "a URL of a repo is https://host/owner/name[.git]")
    return f"{host}/{path}" if host != DEFAULT_HOST else path


def _why_not(given: str) -> str:
    """Why ``given`` is not a spec, with the likely fix."""
    head, at, after = given.rpartition("@")
    if at and head and not re.fullmatch(r"[0-9a-fA-F]{4,40}", after):
        return (f"{after!r} after '@' is not a commit id (4 to 40 hex digits); a branch or "
                f"tag goes after ':' ({head}:{after})")
    return "expected [host/]owner/name[:ref][@commit]"


@dataclass(frozen=True)
class RepoSpec:
    """A repo as a user names it: host, owner and name, plus an optional ref and commit."""

    owner: str
    name: str
    host: str = DEFAULT_HOST
    ref: str | None = None
    commit: str | None = None

    @classmethod
    def parse(cls, text: str, default_host: str = DEFAULT_HOST) -> RepoSpec:
        """Parse ``[host/]owner/name[:ref][@commit]``, or a pasted
        ``https://host/owner/name[.git]``. Owner and name are GitHub's
        ``[A-Za-z0-9][A-Za-z0-9._-]*`` (nested groups are not supported). Raises
        :class:`SpecError`, with a hint where the mistake is a common one."""
        given = text.strip()
        if given.startswith(("https://", "http://")):
            given = _from_url(text, given)
        m = _SPEC.match(given)
        if not m:
            raise SpecError(text, _why_not(given))
        for part in ("owner", "name"):
            if not _NAME.fullmatch(m[part]):
                raise SpecError(text, f"{part} {m[part]!r} may hold only letters, digits, "
                                      f"'.', '_' and '-', starting with a letter or digit "
                                      f"(nested groups are not supported)")
        ref = m["ref"]
        if ref is not None and (ref.startswith("/") or ref.endswith("/") or ".." in ref):
            raise SpecError(text, f"{ref!r} is not a valid branch or tag name")
        if m["host"] is not None:
            check_host(m["host"], f"the host of {text.strip()!r}")
        return cls(
            owner=m["owner"],
            name=m["name"][:-4] if m["name"].endswith(".git") else m["name"],
            host=m["host"] or default_host,
            ref=ref,
            commit=m["commit"].lower() if m["commit"] else None,
        )

    @property
    def repo(self) -> str:
        """``owner/name``, as MegEngine's ``repo_info`` spells it."""
        return f"{self.owner}/{self.name}"

    @property
    def full(self) -> str:
        """``host/owner/name``, as :attr:`RepoId.full` (and JSON output) names a repo."""
        return f"{self.host}/{self.repo}"

    def url(self, protocol: str = "https") -> str:
        """The git remote URL of this repo over ``protocol``."""
        if protocol not in PROTOCOLS:
            raise SpecError(str(self), f"unknown protocol {protocol!r}, use one of {PROTOCOLS}")
        if protocol == "ssh":
            return f"git@{self.host}:{self.repo}.git"
        return f"{protocol}://{self.host}/{self.repo}"

    def __str__(self) -> str:
        host = "" if self.host == DEFAULT_HOST else f"{self.host}/"
        ref = f":{self.ref}" if self.ref else ""
        commit = f"@{self.commit}" if self.commit else ""
        return f"{host}{self.repo}{ref}{commit}"


@dataclass(frozen=True)
class ResolvedRef:
    """A ref as asked (``initial``), the branch or tag it names, and the commit it resolved to."""

    initial: str  # what the user wrote: a branch, a tag, a commit, or "" for the default
    name: str  # the ref recorded in the store, e.g. "master" or "v1.0"
    kind: str  # "branch" or "tag"
    commit: str  # full 40-hex commit id
    target: str | None = None  # the object the ref names: an annotated tag's own id

    def __str__(self) -> str:
        return f"{self.name} -> {short(self.commit)}"


def parse_repo_info(repo_info: str) -> Tuple[str, str, str]:
    """Split MegEngine's ``owner/name[:branch]`` exactly as ``megengine.hub`` does.

    Returns ``(owner, name, branch)``; the branch defaults to ``master``.
    """
    if "@" in repo_info:  # MegEngine would take it as part of the name, and fetch nothing
        prefix, _, commit = repo_info.partition("@")
        raise SpecError(repo_info, f"a commit is not part of repo_info: pass commit="
                                   f"{commit!r} (hub.load({prefix!r}, ..., commit="
                                   f"{commit!r}))")
    try:
        prefix, branch = repo_info.split(":") if ":" in repo_info else (repo_info, DEFAULT_BRANCH)
        owner, name = prefix.split("/")
    except ValueError:
        raise SpecError(repo_info, "expected owner/name[:branch_or_tag]") from None
    if not owner or not name or not branch:
        raise SpecError(repo_info, "expected owner/name[:branch_or_tag]")
    return owner, name, branch
