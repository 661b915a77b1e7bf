"""Every setting mirror takes from its environment, read in this one module.

In the spirit of huggingface_hub's ``constants.py``, with one difference: the
environment is read when :func:`settings` is called, not at import, so a test
(or a long-lived process) that sets a variable sees it on the next call.

=============================  ===============================================
``MGE_MIRROR_HOME``            the store (else ``$MGE_HOME/mirror``, else
                               ``$XDG_CACHE_HOME/megengine/mirror``, else
                               ``~/.cache/megengine/mirror``)
``MGE_HOME``                   MegEngine's own cache (else
                               ``$XDG_CACHE_HOME/megengine``, else
                               ``~/.cache/megengine``), as MegEngine reads it
``MGE_MIRROR_DOWNLOADS``       the packing host's download cache (else
                               ``$XDG_CACHE_HOME/megengine/mirror-downloads``)
``MGE_MIRROR_OFFLINE``         every ``mirror.hub`` call local (off when unset,
                               empty, ``0``, ``false``, ``no``, ``off``; else on)
``MGE_MIRROR_PARANOID``        re-hash a weight on every use, not once a process
``MGE_MIRROR_TRUSTED_KEYS``    trusted public keys, ``:``-separated paths
``MGE_MIRROR_GIT_USERNAME``,   HTTPS credentials for git
``MGE_MIRROR_GIT_PASSWORD``
``MGE_MIRROR_REGISTRY_USERNAME``,  credentials for OCI registries (else
``MGE_MIRROR_REGISTRY_PASSWORD``   ``$DOCKER_CONFIG/config.json``, else
                               ``~/.docker/config.json``: ``auths``,
                               ``credHelpers``, ``credsStore``)
``SOURCE_DATE_EPOCH``          the time recorded in a bundle (reproducible builds)
``MGE_MIRROR_PYTHON``          set by ``mirror run`` for the programs it starts:
                               the Python mirror runs in, which its hook suggests
                               to a Python that cannot import mirror
=============================  ===============================================

A store's own ``config.toml`` (``trusted_keys = [...]``, ``require_signature =
true``) and its ``trusted-keys/`` folder are read here too: together with the
command line they make the :class:`TrustPolicy` that every install and every
load of that store obeys.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Mapping, Sequence, Tuple
from urllib.parse import urlsplit

from .errors import ConfigError
from .layout import StoreLayout

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

_FALSE = ("", "0", "false", "no", "off")


def is_true(value: str | None) -> bool:
    """The one truthy parser: unset, empty, ``0``, ``false``, ``no`` and ``off`` (any
    case) are false; anything else is true. A switch that is set at all is on unless
    it says off, so a typo in ``MGE_MIRROR_OFFLINE`` keeps the host offline."""
    return (value or "").strip().lower() not in _FALSE


def _cache_root(env: Mapping[str, str]) -> str:
    return os.path.expanduser(env.get("XDG_CACHE_HOME") or "~/.cache")


@dataclass(frozen=True)
class Settings:
    """What the environment says, resolved once per call of :func:`settings`."""

    store_home: str
    megengine_home: str
    downloads_dir: str
    offline: bool
    paranoid: bool
    trusted_keys: Tuple[str, ...]
    git_username: str | None
    git_password: str | None = field(repr=False)
    source_date_epoch: str | None  # as set: only pack reads it, through now()
    registry_username: str | None = None
    registry_password: str | None = field(default=None, repr=False)
    docker_config: str = ""  # the file docker login writes
    digest_memo: str = ""  # push's memo of file digests (mirror.oci)

    def now(self) -> int:
        """The time to record in a bundle: ``SOURCE_DATE_EPOCH`` makes packs repeatable.
        Raises ConfigError when it is not a whole number of seconds."""
        if not self.source_date_epoch:
            return int(time.time())
        try:
            return int(self.source_date_epoch)
        except ValueError:
            raise ConfigError("SOURCE_DATE_EPOCH", f"{self.source_date_epoch!r} is not a "
                                                   f"whole number of seconds") from None


def settings(env: Mapping[str, str] | None = None) -> Settings:
    """The settings in ``env`` (default: this process's environment, read now)."""
    env = os.environ if env is None else env
    megengine_home = os.path.expanduser(env.get("MGE_HOME") or os.path.join(
        _cache_root(env), "megengine"))
    if env.get("MGE_MIRROR_HOME"):
        store_home = os.path.expanduser(env["MGE_MIRROR_HOME"])
    elif env.get("MGE_HOME"):
        store_home = os.path.join(megengine_home, "mirror")
    else:
        store_home = os.path.join(_cache_root(env), "megengine", "mirror")
    downloads = os.path.expanduser(env.get("MGE_MIRROR_DOWNLOADS") or os.path.join(
        _cache_root(env), "megengine", "mirror-downloads"))
    return Settings(
        store_home=os.path.abspath(store_home),
        megengine_home=os.path.abspath(megengine_home),
        downloads_dir=os.path.abspath(downloads),
        offline=is_true(env.get("MGE_MIRROR_OFFLINE")),
        paranoid=is_true(env.get("MGE_MIRROR_PARANOID")),
        trusted_keys=tuple(p for p in env.get("MGE_MIRROR_TRUSTED_KEYS", "").split(os.pathsep)
                           if p),
        git_username=env.get("MGE_MIRROR_GIT_USERNAME") or None,
        git_password=env.get("MGE_MIRROR_GIT_PASSWORD") or None,
        source_date_epoch=env.get("SOURCE_DATE_EPOCH") or None,
        registry_username=env.get("MGE_MIRROR_REGISTRY_USERNAME") or None,
        registry_password=env.get("MGE_MIRROR_REGISTRY_PASSWORD") or None,
        docker_config=os.path.join(os.path.expanduser(
            env.get("DOCKER_CONFIG") or "~/.docker"), "config.json"),
        digest_memo=os.path.join(_cache_root(env), "megengine", "mirror-digests"),
    )


# --- registry credentials --------------------------------------------------------


# A credential helper's username for an identity token (docker's convention)
TOKEN_USERNAME = "<token>"


@dataclass(frozen=True)
class Credentials:
    """A username and password (or token) for one registry, and where they came from:
    an error that says "unauthorized" names the source, so the user knows what to fix.
    ``identity_token``: an OAuth2 refresh token that ``docker login`` stored in place
    of a password (``identitytoken``), which only the registry's token service takes."""

    username: str
    password: str = field(repr=False)
    source: str
    identity_token: str | None = field(default=None, repr=False)


def registry_credentials(host: str, env: Mapping[str, str] | None = None
                         ) -> Credentials | None:
    """The credentials for the registry at ``host`` (``name[:port]``), as docker and
    oras find them: ``MGE_MIRROR_REGISTRY_USERNAME``/``_PASSWORD`` first, then the
    docker config's ``credHelpers`` for the host, its ``credsStore``, and its ``auths``.
    None when nothing is configured (anonymous). Raises :class:`ConfigError` for a
    config or credential helper that cannot be read."""
    env = os.environ if env is None else env
    s = settings(env)
    if s.registry_username or s.registry_password:
        if not (s.registry_username and s.registry_password):
            raise ConfigError("MGE_MIRROR_REGISTRY_USERNAME", "set both it and "
                                                              "MGE_MIRROR_REGISTRY_PASSWORD")
        return Credentials(s.registry_username, s.registry_password,
                           "MGE_MIRROR_REGISTRY_USERNAME/_PASSWORD")
    try:
        with open(s.docker_config, encoding="utf-8") as fh:
            docker = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(s.docker_config, f"cannot be read: {e}") from None
    if not isinstance(docker, dict):
        raise ConfigError(s.docker_config, "is not a JSON object")
    # docker login stores a host as typed: "host:port", or once as an https:// URL
    names = (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/")
    helpers = docker.get("credHelpers") or {}
    helper = next((helpers[n] for n in names if n in helpers), None) or \
        docker.get("credsStore")
    if helper:
        found = _credential_helper(str(helper), host, s.docker_config, env)
        if found is not None:
            return found
    auths = docker.get("auths") or {}
    entry = next((auths[n] for n in names if n in auths), None)
    if not isinstance(entry, dict):
        return None
    where = f"{s.docker_config} (auths.{host})"
    if entry.get("identitytoken"):
        return Credentials(str(entry.get("username") or TOKEN_USERNAME), "", where,
                           identity_token=str(entry["identitytoken"]))
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]), where)
    if entry.get("auth"):
        import base64  # here: the registry's alone, not every command's start-up

        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(where, "'auth' is not base64 of user:password") from None
        return Credentials(user, password, where)
    return None


def _credential_helper(helper: str, host: str, config: str, env: Mapping[str, str]
                       ) -> Credentials | None:
    """Ask ``docker-credential-HELPER get`` for ``host``'s credentials, as docker does."""
    import subprocess

    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run([program, "get"], input=host.encode(), capture_output=True,
                              timeout=30, env=dict(env))
    except FileNotFoundError:
        raise ConfigError(config, f"names the credential helper {helper!r}, but "
                                  f"{program} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(config, f"{program} did not answer in 30 s") from None
    if done.returncode != 0:
        return None  # the helper knows no credentials for this host
    try:
        answer = json.loads(done.stdout)
        if answer["Username"] == TOKEN_USERNAME:  # its secret is an identity token
            return Credentials(TOKEN_USERNAME, "", program, identity_token=str(answer["Secret"]))
        return Credentials(str(answer["Username"]), str(answer["Secret"]), program)
    except (ValueError, KeyError, TypeError):
        raise ConfigError(config, f"{program} answered what is not its JSON") from None


# --- a store's trust policy ----------------------------------------------------


@dataclass(frozen=True)
class StoreConfig:
    """``<store>/config.toml``: a host's policy without flags on each command."""

    trusted_keys: Tuple[str, ...] = ()
    require_signature: bool = False

    @classmethod
    def load(cls, store_home: str) -> StoreConfig:
        path = StoreLayout(store_home).config
        if not os.path.exists(path):
            return cls()
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(path, str(e)) from None
        keys = data.get("trusted_keys", [])
        require = data.get("require_signature", False)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or \
                not isinstance(require, bool):
            raise ConfigError(path, "trusted_keys is a list of paths and require_signature "
                                    "true or false")
        return cls(tuple(keys), require)


@dataclass(frozen=True)
class TrustPolicy:
    """Which signers a store accepts. ``required`` means a trust policy is in force:
    installs refuse bundles no trusted key signed, and the loader runs only code
    such a bundle brought. Without it, signatures are checked only when asked."""

    locations: Tuple[str, ...] = ()  # *.pub files or folders of them
    required: bool = False

    def keys(self) -> Dict[str, Ed25519PublicKey]:
        """The trusted public keys, by key id."""
        from .signing import load_keys

        return load_keys(self.locations)


def trust_policy(store_home: str, locations: Sequence[str] = (), require: bool = False,
                 env: Mapping[str, str] | None = None) -> TrustPolicy:
    """The policy for the store at ``store_home``: keys from ``locations`` (the command
    line), else ``$MGE_MIRROR_TRUSTED_KEYS``, else ``config.toml``, else the store's
    ``trusted-keys/`` folder. A policy is in force when any of these names keys, or
    when ``require`` or ``require_signature = true`` asks for one."""
    stored = StoreConfig.load(store_home)
    found = tuple(locations) or settings(env).trusted_keys or stored.trusted_keys
    default = StoreLayout(store_home).trusted_keys
    if not found and os.path.isdir(default):
        found = (default,)
    return TrustPolicy(found, bool(found) or require or stored.require_signature)


# --- environments handed to child processes -------------------------------------


def run_environment(run_dir: str, store_home: str | None = None) -> Dict[str, str]:
    """The environment of a program started by ``mirror run``: ``run_dir`` (whose
    ``sitecustomize`` patches megengine.hub on import) first on ``PYTHONPATH`` and
    nothing else added there (not the folder mirror is installed in: for a wheel that
    is all of site-packages), every mirror.hub call local, and ``MGE_MIRROR_PYTHON``
    naming this interpreter, which the hook suggests to a Python that lacks mirror."""
    env = dict(os.environ)
    # The caller's entries kept as they are, empty ones too (the current directory).
    theirs = env["PYTHONPATH"].split(os.pathsep) if env.get("PYTHONPATH") else []
    paths = [run_dir] + [p for p in theirs
                         if not p or os.path.abspath(p) != os.path.abspath(run_dir)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["MGE_MIRROR_OFFLINE"] = "1"
    if sys.executable:
        env["MGE_MIRROR_PYTHON"] = sys.executable
    if store_home:
        env["MGE_MIRROR_HOME"] = os.path.abspath(store_home)
    return env


def trace_environment() -> Dict[str, str]:
    """The environment of a tracing child: no bytecode written into its temporary tree."""
    return dict(os.environ, PYTHONDONTWRITEBYTECODE="1")


def proxy_for(url: str, env: Mapping[str, str] | None = None) -> str | None:
    """The proxy to reach ``url`` through, or None: git's ``http.proxy`` where it is
    set (git lets it override the environment), else ``https_proxy``/``http_proxy``
    (or ``all_proxy``) as requests and curl read them, in either case; a host that
    ``no_proxy`` names goes direct either way."""
    import urllib.request  # here: http.client and ssl are the network's, not start-up's

    env = os.environ if env is None else env
    parts = urlsplit(url)
    proxies: Dict[str, str] = {}  # as curl and urllib read them: lowercase first
    for key in sorted((k for k in env if k.lower().endswith("_proxy") and env[k]),
                      key=lambda k: k.islower()):
        proxies[key.lower()] = env[key]
    no_proxy = proxies.get("no_proxy", "")
    try:
        port = parts.port
    except ValueError:  # not a port: the download itself says the URL is invalid
        port = None
    host = (parts.hostname or "") + (f":{port}" if port else "")
    if no_proxy and urllib.request.proxy_bypass_environment(host, {"no": no_proxy}):
        return None
    configured = _git_config("http.proxy", url, env)
    if configured:
        return configured
    return proxies.get(f"{parts.scheme}_proxy") or proxies.get("all_proxy") or None


def _git_config(key: str, url: str, env: Mapping[str, str]) -> str | None:
    """git's own setting ``key`` for ``url`` (global, system or XDG configuration,
    ``[http "https://host"]`` sections included), as git reads it."""
    import subprocess

    try:
        done = subprocess.run(["git", "config", "--get-urlmatch", key, url],
                              capture_output=True, text=True, timeout=10, env=dict(env),
                              cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def git_credential_environment() -> Dict[str, str]:
    """The environment of ``git credential fill``: it may answer, never prompt."""
    return dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="", SSH_ASKPASS="")
