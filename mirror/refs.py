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
        """Parse ``[host/]owner/name[:ref][@commit]``. Raises :class:`SpecError`."""
        m = _SPEC.match(text.strip())
        if not m:
            raise SpecError(text, "expected [host/]owner/name[:ref][@commit]")
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
    try:
        prefix, branch = repo_info.split(":") if ":" in repo_info else (repo_info, DEFAULT_BRANCH)
        owner, name = prefix.split("/")
    except ValueError:
        raise SpecError(repo_info, "expected owner/name[:branch_or_tag]") from None
    if not owner or not name or not branch:
        raise SpecError(repo_info, "expected owner/name[:branch_or_tag]")
    return owner, name, branch
