"""Pack's options, declared once.

Each field of :class:`PackOptions` carries, in its metadata, how it appears on
``mirror pack``'s command line (:class:`Flag`) and under which name a recipe's
``[options]`` table sets it. The command's click options (``mirror.cli``), the
recipe's keys and type checks (:mod:`mirror.recipe`) and
:meth:`PackOptions.from_mapping` are all derived from this one declaration:
adding an option is adding a field here.

This module imports nothing heavy: the command line reads it at start-up.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

from .errors import MirrorError
from .model import JsonObject

PROTOCOLS = ("https", "http", "ssh", "file")

# What a value of each kind must be, as errors say it. The kind of a field is the
# type of its default (None: an optional string); jobs and history are whole numbers.
_WHAT = {tuple: "a list of strings", bool: "true or false",
         int: "a whole number of at least 1", str: "a string"}


@dataclass(frozen=True)
class Flag:
    """How an option appears on ``mirror pack``'s command line."""

    names: Tuple[str, ...]  # e.g. ("-j", "--jobs")
    help: str
    metavar: str | None = None
    choices: Tuple[str, ...] = ()  # one of these, in any case
    int_range: Tuple[int, int] | None = None
    path: bool = False  # a file (not a directory) ...
    exists: bool = False  # ... that must exist


def _option(default: Any, flag: Flag | None = None, recipe: str | None = None) -> Any:
    return field(default=default, metadata={"flag": flag, "recipe": recipe})


@dataclass(frozen=True)
class PackOptions:
    """How to pack (see :func:`mirror.packer.pack`). Lists are kept as tuples; a value
    of the wrong type is a :class:`~mirror.errors.MirrorError` naming the option."""

    git_host: str | None = _option(None, Flag(
        ("--git-host",), "Git host for specs without one (default github.com)."),
        recipe="git_host")
    protocol: str = _option("https", Flag(
        ("--protocol",), "How to reach the git host (default https).", choices=PROTOCOLS),
        recipe="protocol")
    extra_weights: Tuple[str, ...] = _option((), Flag(
        ("--weights",), "Also pack this file (repeatable).", metavar="URL"),
        recipe="weights")
    entries: Tuple[str, ...] = _option((), Flag(
        ("--entry",), "Pack only what these entrypoints need (repeatable; implies --trace).",
        metavar="NAME"), recipe="entries")
    trace: bool = _option(False, Flag(
        ("--trace",), "Also run each entrypoint with downloads recorded instead of performed, "
                      "to find what static discovery cannot (this runs the repo's code)."),
        recipe="trace")
    trace_memory: str = _option("4G", Flag(
        ("--trace-memory",), "Resident memory each traced entrypoint may use, in its own "
                             "process (default 4G; a cgroup where one can be made, else an "
                             "address-space limit).", metavar="SIZE"), recipe="trace_memory")
    trace_timeout: int = _option(300, Flag(
        ("--trace-timeout",), "Seconds each traced entrypoint may take (default 300).",
        metavar="SECONDS", int_range=(1, 86400)), recipe="trace_timeout")
    trace_jobs: int = _option(1, Flag(
        ("--trace-jobs",), "Entrypoints traced at once, each in its own process (default 1).",
        metavar="N", int_range=(1, 64)), recipe="trace_jobs")
    strict: bool = _option(False, Flag(
        ("--strict",), "With --trace: fail the pack when any entrypoint cannot be traced "
                       "(else each failure is reported and recorded)."), recipe="strict")
    follow_nested: bool = _option(False, Flag(
        ("--follow-nested",), "Also pack the repos the code loads with megengine.hub.load."),
        recipe="follow_nested")
    rewrites: Tuple[str, ...] = _option((), Flag(
        ("--rewrite",), "Fetch git and weight URLs starting with FROM from TO instead, like "
                        "git's url.<base>.insteadOf; the bundle records the original URLs "
                        "(repeatable).", metavar="FROM=TO"), recipe="rewrites")
    exclude: Tuple[str, ...] = _option((), Flag(
        ("--exclude",), "Leave out weights whose URL matches this glob (repeatable).",
        metavar="PATTERN"), recipe="exclude")
    allow_unresolved: bool = _option(False, Flag(
        ("--allow-unresolved",), "Pack even if some download calls' URLs cannot be worked "
                                 "out."), recipe="allow_unresolved")
    allow_unreachable: bool = _option(False, Flag(
        ("--allow-unreachable",), "Pack :ref@commit even if the commit is not in the ref's "
                                  "history."), recipe="allow_unreachable")
    allow_unsafe_pickle: bool = _option(False, Flag(
        ("--allow-unsafe-pickle",), "Pack weights that would import more than numpy, tensors "
                                    "and collections."))
    # The pin file: written if absent, enforced if present (see mirror.pins). A recipe
    # names it at its top level, next to the output, not among its options.
    lock: str | None = _option(None, Flag(
        ("--lock",), "Lock file of ref -> commit and URL -> sha256 pins: written if absent, "
                     "enforced if present.", path=True))
    # Not a recipe key either: moving pins is one run's deliberate act, reviewed in the
    # lock's diff, never a standing setting that would make the lock enforce nothing.
    update_lock: bool = _option(False, Flag(
        ("--update",), "With --lock: re-resolve refs and weights, move the pins that changed "
                       "and add new ones, and say what changed (instead of failing)."))
    since: str | None = _option(None, Flag(
        ("--since",), "Pack a delta against what a target store holds: its inventory "
                      "(mirror inventory), an earlier bundle or a lock file. What it holds "
                      "is left out, and named as prerequisites.", path=True, exists=True))
    since_key: str | None = _option(None, Flag(
        ("--since-key",), "Public key (or a directory of them) that must have signed the "
                          "--since inventory or bundle; then the weights it holds for their "
                          "URLs are not downloaded again.", path=True, exists=True))
    sign: str | None = _option(None, Flag(
        ("--sign",), "Sign the bundle with this private key (see mirror keygen).", path=True,
        exists=True))
    stream: bool = _option(False, Flag(
        ("--stream",), "Compress each weight into the bundle as its bytes arrive, while "
                       "the next ones download (a local file: as it is read, once), and "
                       "write the manifest last (format "
                       "4): faster over a slow network; such a bundle cannot be installed "
                       "from a pipe, nor by mirror 0.1. Only to a whole file, not a delta."),
        recipe="stream")
    split_size: str | None = _option(None, Flag(
        ("--split-size",), "Write the bundle in parts OUT.001, OUT.002, ... of at most SIZE "
                           "bytes each (4G = 4 GiB, 4700MB = 4.7e9 bytes), each verifiable "
                           "alone.", metavar="SIZE"), recipe="split_size")
    history: int = _option(100, Flag(
        ("--history",), "Commits of first-parent history to carry with each branch tip, so "
                        "an install can prove the branch moves forward (default 100).",
        metavar="N", int_range=(1, 100000)), recipe="history")
    jobs: int = _option(4, Flag(
        ("-j", "--jobs"), "Weights downloaded at once (default 4).", int_range=(1, 64)),
        recipe="jobs")
    refresh: bool = _option(False, Flag(
        ("--refresh",), "Download every weight again instead of using the download cache."))
    cache_dir: str | None = _option(None)  # default: config.settings().downloads_dir
    progress: bool = _option(True)  # the command line's -q turns it off

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, convert(f.name, value))
            except OptionValueError as e:
                raise MirrorError(f"pack option {f.name} {e}") from None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> PackOptions:
        """Options from ``mapping`` (field name -> value), the others at their defaults.

        Raises:
            MirrorError: a key is not an option (the message lists the known ones),
                or a value is not of the option's type.
        """
        return cls().updated(mapping)

    def updated(self, mapping: Mapping[str, object]) -> PackOptions:
        """These options with ``mapping``'s on top: a list adds to the list, any other
        value (unless None) replaces. Raises :class:`MirrorError` as :meth:`from_mapping`."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(mapping) - names)
        if unknown:
            raise MirrorError(f"unknown pack option(s) {', '.join(unknown)} (known: "
                              f"{', '.join(sorted(names))})")
        changes: Dict[str, object] = {}
        for name, value in mapping.items():
            try:
                value = convert(name, value)
            except OptionValueError as e:
                raise MirrorError(f"pack option {name} {e}") from None
            if isinstance(value, tuple):
                changes[name] = getattr(self, name) + value
            elif value is not None:
                changes[name] = value
        return dataclasses.replace(self, **changes)

    def to_json(self) -> JsonObject:
        """The options that differ from their defaults, lists as lists: what a recipe and
        the command line asked for. ``from_mapping(o.to_json()) == o``."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


class OptionValueError(ValueError):
    """A value that is not of its option's type; ``str()`` says what it must be."""

    def __init__(self, what: str, value: object):
        super().__init__(f"must be {what}, not {value!r}")
        self.what, self.value = what, value


def _kind(f: dataclasses.Field) -> type:
    return str if f.default is None else type(f.default)


def kind(name: str) -> type:
    """The kind of value option ``name`` takes: ``tuple`` (of strings), ``bool``,
    ``int`` or ``str``. Raises KeyError for a name that is not an option."""
    return _kind(_FIELDS[name])


def convert(name: str, value: object) -> object:
    """``value`` as option ``name`` holds it: a list of strings as a tuple, a path-like
    as its string. Raises :class:`OptionValueError` when it is not of the option's kind
    (None is accepted where the default is None)."""
    f = _FIELDS[name]
    expected = _kind(f)
    if value is None and f.default is None:
        return None
    if expected is str and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if expected is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif expected is int:  # a bool is an int to Python, never to a user
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise OptionValueError(_WHAT[expected], value)
    return value


def recipe_keys() -> Dict[str, str]:
    """Each key a recipe's ``[options]`` table may set -> the field it sets (``weights``
    sets ``extra_weights``, as ``--weights`` does)."""
    return {f.metadata["recipe"]: f.name for f in _FIELDS.values() if f.metadata["recipe"]}


def flags() -> Dict[str, Flag]:
    """Field name -> its command-line :class:`Flag`, in declaration order (the order
    ``mirror pack --help`` lists them), for the fields that have one."""
    return {name: f.metadata["flag"] for name, f in _FIELDS.items() if f.metadata["flag"]}


_FIELDS: Dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(PackOptions)}
