"""The ``mirror`` command: a thin shell over the library.

Exit codes (:class:`mirror.errors.ExitCode`): 0 success, 1 an operation failed
(git, a download, a registry, the disk), 2 bad usage, spec or reference, 3
verification failed (a bundle, the store, a stored file), 4 not found (a file, a
store, a repo, ref, commit, entrypoint or weight), 5 refused by the trust policy
(a signature, a weight that would run code), 6 a conflict with what is there (a
ref, a lock file's pins), 130 interrupted (Ctrl-C). ``mirror run`` exits as its
command does.

With ``--json``, what a command reports is one JSON object on stdout, and an error
is one JSON object on stderr; docs/json.md gives each schema.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Sequence

import click

from . import __version__, bundle, housekeeping, signing
from .atomic import write_atomic
from .errors import ExitCode, FileError, MirrorError
from .ids import short
from .sizes import iec
from .store import Store

JSON_VERSION = 1  # of every schema in docs/json.md; a field removed or changed bumps it


class _Failure(click.ClickException):
    """A MirrorError as click prints it: one line, the error's exit code."""

    def __init__(self, error: MirrorError):
        super().__init__(str(error))
        self.error = error
        self.exit_code = error.exit_code


class _Interrupted(click.ClickException):
    """Ctrl-C (SIGINT): exit 130, as a shell reports a command killed by it."""

    exit_code = ExitCode.INTERRUPTED

    def __init__(self) -> None:
        super().__init__("interrupted; nothing half-written was left at the output, and "
                         "downloads resume where they stopped when this runs again")


class _Refused(click.ClickException):
    """A refusal of the CLI's own (not the library's), with its exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def schema(name: str) -> str:
    """The ``schema`` value of a JSON object that ``mirror NAME --json`` prints."""
    return f"mirror.{name}/{JSON_VERSION}"


def _emit(name: str, obj: Dict[str, Any], err: bool = False) -> None:
    """Print ``obj`` as the JSON object of schema ``name`` (docs/json.md)."""
    click.echo(json.dumps(dict({"schema": schema(name)}, **obj), indent=1, default=str),
               err=err)


def error_json(error: click.ClickException) -> Dict[str, Any]:
    """An error as ``--json`` shows it (the ``error`` of schema ``error`` on stderr, or
    of a bundle that failed): its type, exit code and message, and the context the
    error carries (repo, ref, path, URL...)."""
    cause = getattr(error, "error", None)
    context = {k: v for k, v in vars(cause).items() if not k.startswith("_") and
               isinstance(v, (str, int, float, bool, list))} if cause is not None else {}
    return {"type": type(cause or error).__name__.lstrip("_"),
            "exit_code": int(error.exit_code), "message": error.format_message(),
            "context": context}


def _wants_json(args: Sequence[str]) -> bool:
    mine = list(args)[:list(args).index("--")] if "--" in args else args
    return "--json" in mine


# The order of the workflow, as the help lists the commands: the connected host's
# first, then the isolated host's, then the rest.
ORDER = ("pack", "inspect", "verify", "install", "list", "remove", "gc", "seed", "run",
         "export", "inventory", "push", "pull", "downloads", "keygen", "sign", "home",
         "completion")
ALIASES = {"ls": "list"}


class _Mirror(click.Group):
    """The ``mirror`` group: commands in workflow order, aliases folded into the
    command they name, and under ``--json`` errors as JSON objects on stderr."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        known = super().list_commands(ctx)
        return [n for n in ORDER if n in known] + [n for n in known if n not in ORDER]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, ALIASES.get(name, name))

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            done = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as e:
            if _wants_json(args):
                _emit("error", {"error": error_json(e)}, err=True)
            else:
                e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Error: interrupted", err=True)
            sys.exit(ExitCode.INTERRUPTED)
        sys.exit(done if isinstance(done, int) else 0)


def _library_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MirrorError as e:
            raise _Failure(e) from None
        except KeyboardInterrupt:
            raise _Interrupted() from None
        except OSError as e:  # a file the command was told to write: one line, no trace
            raise _Failure(FileError(e.filename, e.strerror or str(e))) from None
    return wrapper


def _home_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--home", type=click.Path(file_okay=False), default=None,
                        help="Store location (default: $MGE_MIRROR_HOME, $MGE_HOME/mirror, "
                             "$XDG_CACHE_HOME/megengine/mirror, ~/.cache/megengine/mirror).")(fn)


def _json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON object (docs/json.md); errors too, on stderr."
                        )(fn)


def _quiet_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-q", "--quiet", is_flag=True,
                        help="No progress bars or notes on stderr (the report still "
                             "prints).")(fn)


def _trusted_keys_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One name, in verify and install, for the public keys whose signature counts."""
    return click.option("--trusted-key", "trusted_keys", multiple=True,
                        type=click.Path(exists=True), metavar="KEY",
                        help="A trusted public key: a .pub file or a directory of them "
                             "(repeatable). Install's default: $MGE_MIRROR_TRUSTED_KEYS, "
                             "else <store>/trusted-keys.")(fn)


def _registry_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--plain-http and --ca-file, as ORAS spells them, for oci:// references."""
    fn = click.option("--ca-file", type=click.Path(exists=True, dir_okay=False),
                      help="Trust this CA bundle (PEM) for an oci:// registry's TLS, instead "
                           "of the system's.")(fn)
    return click.option("--plain-http", is_flag=True,
                        help="Reach an oci:// registry over HTTP, not HTTPS (a registry on a "
                             "trusted network).")(fn)


def _connection(plain_http: bool, ca_file: str | None) -> Any:
    from .reference import Connection

    return Connection(plain_http=plain_http, ca_file=ca_file)


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def _verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if value:
        import logging

        logging.basicConfig(format="mirror: %(message)s", stream=sys.stderr,
                            level=logging.DEBUG if value > 1 else logging.WARNING)
        logging.getLogger("mirror").setLevel(logging.DEBUG)


def _verbose_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """-v, before the command (as git and docker take it) or after (as pip does)."""
    return click.option("-v", "--verbose", count=True, expose_value=False,
                        callback=_verbose,
                        help="Say more on stderr: -v what each download and fetch does "
                             "(ranges resumed, proxies, retries), -vv also the libraries' "
                             "own logs.")(fn)


@click.group(cls=_Mirror, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mirror")
@_verbose_option
def cli() -> None:
    """Take MegEngine Hub repos and their weights across an air gap.

    \b
    On the connected host:
      mirror pack megengine/models@3f2a9c1 -o models.hub
    On the isolated host:
      mirror install models.hub
      python -c 'import mirror.hub as hub; hub.load("megengine/models", "resnet18")'

    Exit codes: 0 ok, 1 failed, 2 usage, 3 verification failed, 4 not found,
    5 refused by the trust policy, 6 conflict, 130 interrupted.
    """


def _pack_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A click option for each :class:`~mirror.pack_options.PackOptions` field that has a
    flag, in declaration order. Each defaults to None (or ``()``), so that a recipe can
    tell what the command line did not give."""
    from .pack_options import flags, kind

    for name, flag in reversed(list(flags().items())):
        settings_ = {"help": flag.help, "metavar": flag.metavar}
        if kind(name) is bool:
            settings_.update(is_flag=True, default=None)
        elif kind(name) is tuple:
            settings_.update(multiple=True)
        else:
            settings_["default"] = None
            if flag.choices:
                settings_["type"] = click.Choice(list(flag.choices), case_sensitive=False)
            elif flag.int_range:
                settings_["type"] = click.IntRange(*flag.int_range)
            elif flag.path:
                settings_["type"] = click.Path(exists=flag.exists, dir_okay=False)
        fn = click.option(*flag.names, name, **settings_)(fn)
    return fn


@cli.command()
@click.argument("specs", nargs=-1)
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Bundle file to write (a recipe may name it; '-': stdout).")
@click.option("--recipe", type=click.Path(dir_okay=False, exists=True),
              help="A TOML recipe naming repos, refs and options (see bundles/).")
@_pack_options
@_quiet_option
@_json_option
@_verbose_option
@_library_errors
def pack(specs, output, recipe, quiet, as_json, **options) -> None:
    """Pack SPECS ([host/]owner/name[:ref][@commit]) and their weights into one bundle.

    A spec is a repo (the default branch), a branch or tag after ':', a commit after
    '@' (abbreviated or whole), or a pasted https://HOST/OWNER/NAME URL.

    \b
    Examples:
      mirror pack megengine/models@3f2a9c1 -o models.hub
      mirror pack megengine/models:v1.2.0 --lock models.lock -o models.hub
    """
    # Imported here: git, HTTP and the weight discovery are pack's alone, and the
    # commands used on the isolated host start faster without them.
    from .packer import PackOptions
    from .packer import pack as pack_repos
    from .recipe import Recipe

    given = {k: v for k, v in options.items() if v not in (None, ())}
    if recipe:
        loaded = Recipe.load(recipe)
        specs, output = list(loaded.specs) + list(specs), output or loaded.output
        pack_options = loaded.merged(given)
    else:
        pack_options = PackOptions.from_mapping(given)
    if not specs:
        raise click.UsageError("name at least one repo spec, or a --recipe")
    if not output:
        raise click.UsageError("name the bundle to write with -o/--output")
    # To stdout (-o -): the bundle is the output, so the report goes to stderr.
    echo = functools.partial(click.echo, err=output == "-")
    report = pack_repos(specs, output, dataclasses.replace(pack_options,
                                                           progress=not (quiet or as_json)),
                        log=(lambda m: None) if quiet or (as_json and output == "-")
                        else _say)
    if as_json:
        _emit("pack", report.to_json(), err=output == "-")
        return
    if quiet:  # what --lock --update changed is said even so: it is the run's purpose
        for change in report.lock_changes:
            echo(change.line())
    for ref in report.refs:
        echo(f"packed {ref}")
    for w in report.weights:
        echo(f"weight {w.url} ({iec(w.size)}, sha256 {short(w.sha256)})")
    packed = {w.url for w in report.weights}
    for c in report.coverage:  # what each entrypoint will load
        state = ", ".join(u if u in packed else f"{u} (NOT packed)" for u in c.urls)
        echo(f"coverage {c.label} {c.entrypoint}: {state or 'no weights'}")
    for u in report.untraced:
        echo(f"untraced {u.label} {u.entrypoint}: {u.cause}")
    for line in report.unresolved:
        echo(f"unresolved {line}")
    for line in report.nested:
        echo(f"nested {line}")
    where = "stdout" if report.size < 0 else _written(report.output, report.parts,
                                                      report.size)
    echo(f"wrote {where}, {report.files} files, {len(report.weights)} weights, bundle id "
         f"{report.bundle_id[:16]}")
    if report.prerequisites is not None:
        echo(_assumes(report.prerequisites))


def _written(output: str, parts: Sequence[str], size: int) -> str:
    """Where a bundle went: its file, or its parts."""
    if not parts:
        return f"{output}: {iec(size)}"
    return f"{len(parts)} parts {parts[0]} .. {parts[-1]}: {iec(size)}"


def _assumes(prerequisites: Any) -> str:
    """One line on what a delta leaves out: what the store it installs into must hold."""
    commits = ", ".join(p.label for p in prerequisites.commits) or "no snapshot"
    return (f"delta: assumes {len(prerequisites.blobs)} contents the target store holds, "
            f"and {commits}")


@cli.command()
@click.argument("bundle_paths", metavar="BUNDLE...", nargs=-1, required=True,
                type=click.Path())
@click.option("--force", is_flag=True,
              help="Reinstall snapshots and move refs back or tags (a proven snapshot is "
                   "never replaced by an unproven one).")
@click.option("--megengine-version", "mge_versions", multiple=True, metavar="VERSION",
              help="Seed MegEngine Hub's cache for this MegEngine version (repeatable; "
                   "default: the installed one).")
@click.option("--no-megengine-cache", is_flag=True,
              help="Do not seed MegEngine Hub's own cache ($MGE_HOME/hub, serialized).")
@click.option("--allow-unsafe-pickle", is_flag=True,
              help="Install weights that would import more than numpy, tensors and "
                   "collections when loaded.")
@click.option("--require-signature", is_flag=True,
              help="Refuse a bundle not signed by a trusted key (checked before anything "
                   "is written). Implied when trusted keys are configured.")
@_trusted_keys_option
@click.option("--receipt", type=click.Path(dir_okay=False),
              help="Write a JSON record of what was verified, for compliance.")
@_registry_options
@_home_option
@_quiet_option
@_json_option
@_verbose_option
@_library_errors
def install(bundle_paths, force, mge_versions, no_megengine_cache, allow_unsafe_pickle,
            require_signature, trusted_keys, receipt, plain_http, ca_file, home, quiet,
            as_json) -> None:
    """Verify every byte of each BUNDLE and install it into the local store. A folder
    stands for the *.hub bundles in it; whole bundles go before deltas; '-' is stdin;
    oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST] is read from a registry as it
    streams in (no copy on disk).

    Also seeds MegEngine Hub's own cache, so unmodified megengine.hub.load(...)
    calls work offline too. With several bundles, each is installed as it would be
    alone: one that fails is named at the end, and the others stay installed.

    \b
    Examples:
      mirror install models.hub
      mirror install models.hub.0*          (every part of a split bundle)
      mirror install --trusted-key team.pub models.hub
    """
    from .installer import InstallOptions, install_all, installed_versions

    options = InstallOptions(
        force=force, megengine_versions=() if no_megengine_cache else
        installed_versions(mge_versions), allow_unsafe_pickle=allow_unsafe_pickle,
        trusted_keys=tuple(trusted_keys), require_signature=require_signature,
        digest_file=bool(receipt), progress=not (as_json or quiet),
        registry=_connection(plain_http, ca_file))
    from .installer import bundle_paths as inputs_of

    if receipt and len(inputs_of(bundle_paths, options.registry)) > 1:
        raise click.UsageError("--receipt takes one bundle")
    outcomes = install_all(bundle_paths, home, options)
    if receipt:
        done = outcomes[0]
        write_receipt(receipt, done.bundle, done.report,
                      str(done.error) if done.error else None)
    if len(outcomes) == 1 and outcomes[0].error is not None:
        raise outcomes[0].error  # one bundle: its error, as ever
    failed = [o for o in outcomes if o.error is not None]
    if as_json:
        _emit("install", {"bundles": [
            o.report.to_json() if o.report else
            {"bundle": o.bundle, "ok": False,
             "error": error_json(_Failure(o.error))} for o in outcomes],
            "installed": len(outcomes) - len(failed), "failed": len(failed)})
    else:
        for o in outcomes:
            if len(outcomes) > 1:
                click.echo(f"== {o.bundle}")
            if o.report is not None:
                _print_install(o.report)
            else:
                click.echo(f"failed: {o.error}")
        if len(outcomes) > 1:
            click.echo(f"installed {len(outcomes) - len(failed)} of {len(outcomes)} bundles"
                       + (f"; failed: {', '.join(o.bundle for o in failed)}" if failed
                          else ""))
    if failed:
        if not as_json:
            for o in failed:
                click.echo(f"Error: {o.bundle}: {o.error}", err=True)
        raise SystemExit(failed[0].error.exit_code)


def _print_install(report: Any) -> None:
    click.echo(f"verified {report.verified_files} files, {iec(report.verified_bytes)} "
               f"from {report.bundle}")
    for s in report.snapshots_installed:
        click.echo(f"installed {s}")
    for s in report.snapshots_present:
        click.echo(f"already installed {s}")
    for r in report.refs_set + report.refs_kept:
        click.echo(f"ref {r}")
    for line in report.megengine_cache:
        click.echo(f"megengine cache: {line}")
    if report.signed_by:
        click.echo(f"signed by trusted key {report.signed_by}")
    click.echo(f"{len(report.weights)} weights; {iec(report.bytes_written)} written"
               + ("" if report.changed else " (nothing changed)"))


@cli.command()
@click.argument("bundle_paths", metavar="[BUNDLE...]", nargs=-1,
                type=click.Path(dir_okay=False))
@_trusted_keys_option
@click.option("--allow-unsafe-pickle", is_flag=True,
              help="Accept weights that would import more than MegEngine state dicts do, "
                   "as 'install --allow-unsafe-pickle' does.")
@_registry_options
@_home_option
@_quiet_option
@_json_option
@_library_errors
def verify(bundle_paths, trusted_keys, allow_unsafe_pickle, plain_http, ca_file, home,
           quiet, as_json) -> None:
    """Verify every byte of each BUNDLE ('-': stdin; oci://HOST/REPOSITORY[:TAG|@DIGEST]:
    from a registry) without installing it, or, without
    BUNDLE, the whole store: every blob re-hashed, every snapshot, ref and weight checked.

    Every part of a split bundle (OUT.*), in any order, is verified as the bundle; one
    part file given alone is verified alone, against its table (signed, with
    --trusted-key). Exits 3 when anything fails verification, 5 when a signature by a
    trusted key is missing.

    \b
    Examples:
      mirror verify models.hub
      mirror verify --trusted-key team.pub models.hub
      mirror verify                          (the store)
    """
    if bundle_paths:
        from .installer import bundle_paths as inputs_of

        trusted = signing.load_keys(trusted_keys) if trusted_keys else None
        reports = []
        # One part file given alone is checked alone (bundle.verify_part); several
        # files must make whole bundles, as install takes them
        for given in inputs_of(bundle_paths, _connection(plain_http, ca_file)):
            verified = bundle.verify(given, trusted, progress=not (as_json or quiet),
                                     allow_unsafe_pickle=allow_unsafe_pickle)
            reports.append(_verified(str(given), verified, as_json, bool(trusted_keys)))
        if as_json:
            _emit("verify", {"bundles": reports})
        return
    report = housekeeping.verify(Store.existing(home), progress=not (as_json or quiet))
    if as_json:
        _emit("verify-store", report.to_json())
    else:
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        click.echo(f"{report.home}: {'OK' if report.ok else 'FAILED'}, {report.blobs} blobs "
                   f"({iec(report.bytes)}) re-hashed, {report.snapshots} snapshots "
                   f"({report.files} files; {report.proven} proven from their git ids, "
                   f"{report.unproven} unproven), {report.refs} refs, {report.weights} "
                   f"weights, {report.seeds} seeds checked; {len(report.problems)} problems")
    if not report.ok:
        raise SystemExit(ExitCode.VERIFICATION)


def _verified(path: str, verified: bundle.Verified, as_json: bool, keyed: bool) -> Any:
    """What verify says of one bundle, or one part: its JSON (docs/json.md), or
    printed lines."""
    n = len(verified.manifest.members())
    pre, part = verified.manifest.prerequisites, verified.part
    if as_json:
        return {"bundle": path, "ok": True, "members": None if part else n,
                "bundle_id": verified.bundle_id,
                "part": {"index": part.index, "count": part.count, "payload_bytes":
                         part.payload[0], "payload_sha256": part.payload[1]} if part else None,
                "signed_by": verified.signed_by,
                "prerequisites": pre.to_json() if pre else None}
    signed = f", signed by {verified.signed_by}" if verified.signed_by else ""
    if part is not None:
        click.echo(f"{path}: OK, part {part.index} of {part.count} of bundle "
                   f"{verified.bundle_id[:16]}, {iec(part.payload[0])} as its table says"
                   f"{signed}; its members are verified with every part (install)")
        if not keyed:
            click.echo("  (no --trusted-key: this shows the part was not damaged in "
                       "transit, not who made it)")
        return None
    click.echo(f"{path}: OK, {n} members verified{signed}")
    if pre is not None:  # a delta: what it could not check alone
        click.echo(f"{_assumes(pre)}; install checks those against the store's "
                   f"copies (git ids, pickle scan)")
    return None


def _print_plan(name: str, plan: housekeeping.Plan, as_json: bool, long: bool) -> None:
    if as_json:
        _emit(name, dataclasses.asdict(plan))
        return
    verb = "would remove" if plan.dry_run else "removed"
    for kind, items in (("ref", plan.refs), ("snapshot", plan.snapshots),
                        ("seed", plan.seeds)) + \
            ((("blob", plan.blobs), ("file", plan.other)) if long else ()):
        for item in items:
            click.echo(f"{verb} {kind} {item}")
    click.echo(f"{verb} {len(plan.refs)} refs, {len(plan.snapshots)} snapshots, "
               f"{len(plan.blobs)} blobs and {len(plan.other)} other files; "
               f"{'would free at most' if plan.dry_run else 'freed'} {iec(plan.bytes_freed)}"
               + ("" if long or not (plan.blobs or plan.other) else
                  " (--long names every file)"))


def _long_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-l", "--long", "long", is_flag=True,
                        help="Name every blob and file too.")(fn)


@cli.command()
@click.argument("spec")
@click.option("-n", "--dry-run", is_flag=True, help="Show what would go, change nothing.")
@_long_option
@_home_option
@_json_option
@_library_errors
def remove(spec, dry_run, long, home, as_json) -> None:
    """Remove a repo (owner/name), a ref (owner/name:ref) or a commit (owner/name@commit),
    and every blob nothing else uses.

    \b
    Examples:
      mirror remove megengine/models:v1.0 --dry-run
      mirror remove megengine/models
    """
    from .refs import RepoSpec

    RepoSpec.parse(spec)  # a bad spec is said first, store or not
    _print_plan("remove", housekeeping.remove(Store.existing(home), spec, dry_run=dry_run),
                as_json, long)


@cli.command()
@click.option("-n", "--dry-run", is_flag=True, help="Show what would go, change nothing.")
@_long_option
@_home_option
@_json_option
@_library_errors
def gc(dry_run, long, home, as_json) -> None:
    """Delete what no snapshot, ref or weight references any more, and abandoned work.

    \b
    Example:
      mirror gc --dry-run
    """
    _print_plan("gc", housekeeping.gc(Store.existing(home), dry_run=dry_run), as_json, long)


@cli.command()
@click.option("--megengine-version", "mge_versions", multiple=True, metavar="VERSION",
              help="Seed for this MegEngine version (repeatable; default: the installed "
                   "one, and every version seeded before).")
@click.option("--megengine-home", type=click.Path(file_okay=False),
              help="MegEngine's home (default: $MGE_HOME, else ~/.cache/megengine).")
@_home_option
@_json_option
@_library_errors
def seed(mge_versions, megengine_home, home, as_json) -> None:
    """Make MegEngine Hub's own cache match the store, from the store alone (no bundle):
    seed what is missing (also what a stock use_cache=False deleted), move what a ref
    moved, and delete the store's seeds of what is gone.

    \b
    Example:
      mirror seed --megengine-version 1.13.0
    """
    from . import seed as seed_cache

    report = seed_cache(home, megengine_home, tuple(mge_versions))
    if as_json:
        _emit("seed", report.to_json())
        return
    for line in report.lines():
        click.echo(line)
    click.echo(f"{report.megengine_home}: {len(report.seeded)} seeded, {report.kept} "
               f"already right, {len(report.removed)} removed, {len(report.unseeded)} left "
               f"out, {len(report.foreign)} not mirror's")


@cli.command()
@click.argument("files", metavar="BUNDLE...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.argument("target", metavar="oci://HOST[:PORT]/REPOSITORY[:TAG]")
@click.option("--mount-from", metavar="REPOSITORY",
              help="Ask the registry to mount blobs it holds in this repository instead of "
                   "receiving them again.")
@_registry_options
@_quiet_option
@_json_option
@_verbose_option
@_library_errors
def push(files, target, mount_from, plain_http, ca_file, quiet, as_json) -> None:
    """Push a bundle (a file, a delta, or all the parts of one) to an OCI registry, as
    an artifact that ORAS and any registry understand. Blobs the registry has are not
    sent again. Prints the manifest's digest.

    \b
    Example:
      mirror push models.hub oci://registry.site:5000/mirror/models:2026-12
    """
    from .oci import push as push_bundle

    report = push_bundle(files, target, _connection(plain_http, ca_file), mount_from,
                         progress=not (quiet or as_json))
    if as_json:
        _emit("push", report.to_json())
        return
    click.echo(f"pushed {report.reference}")
    click.echo(f"{report.layers} layers: {report.uploaded} uploaded "
               f"({iec(report.uploaded_bytes)}), {report.present} already there, "
               f"{report.mounted} mounted")
    click.echo(report.digest)


@cli.command()
@click.argument("source", metavar="oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The bundle file to write.")
@click.option("--parts", "keep_parts", is_flag=True,
              help="Write the parts as pushed (OUTPUT.001, ...), not one bundle.")
@_registry_options
@_quiet_option
@_json_option
@_verbose_option
@_library_errors
def pull(source, output, keep_parts, plain_http, ca_file, quiet, as_json) -> None:
    """Download a bundle from an OCI registry, every layer checked against its digest;
    a pull that broke off resumes where it stopped. No pull is needed to install:
    'mirror install oci://HOST/REPOSITORY:TAG' reads the registry directly.

    \b
    Example:
      mirror pull oci://registry.site:5000/mirror/models:2026-12 -o models.hub
    """
    from .oci import pull as pull_bundle

    report = pull_bundle(source, output, keep_parts, _connection(plain_http, ca_file),
                         progress=not (quiet or as_json))
    if as_json:
        _emit("pull", report.to_json())
        return
    resumed = f" (resumed after {iec(report.resumed_from)})" if report.resumed_from else ""
    click.echo(f"pulled {report.reference}: {iec(report.bytes)}{resumed}")
    for path in report.files:
        click.echo(f"wrote {path}")


@cli.group()
def downloads() -> None:
    """The packing host's download cache: weights pack downloaded, kept by URL so that
    packing again downloads nothing, and parts of downloads that a later pack resumes
    ($MGE_MIRROR_DOWNLOADS). Not MegEngine's cache, which install seeds."""


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)  # a clock set back
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _print_downloads(entries: Sequence[Any], verb: str) -> None:
    for e in entries:
        click.echo(f"{iec(e.size):>10}  {_age(time.time() - e.modified):>5}  "
                   f"{'whole' if e.complete else 'part':5}  {e.url}")
    parts = sum(1 for e in entries if not e.complete)
    click.echo(f"{verb} {len(entries)} downloads ({parts} parts), "
               f"{iec(sum(e.size for e in entries))}")


@downloads.command("list")
@_json_option
@_library_errors
def downloads_list(as_json) -> None:
    """List what the download cache holds: size, age, whole or part, URL.

    \b
    Example:
      mirror downloads list --json
    """
    from .download import list_downloads

    entries = list_downloads()
    if as_json:
        _emit("downloads", {"dry_run": False, "downloads": [e.to_json() for e in entries]})
    else:
        _print_downloads(entries, "holds")


@downloads.command("clean")
@click.option("--partial", is_flag=True, help="Only parts of downloads (not resumed yet).")
@click.option("--older-than", type=click.FloatRange(min=0), metavar="DAYS",
              help="Only what was not touched for DAYS days.")
@click.option("-n", "--dry-run", is_flag=True, help="Show what would go, change nothing.")
@_json_option
@_library_errors
def downloads_clean(partial, older_than, dry_run, as_json) -> None:
    """Remove downloads from the cache (a pack downloading now keeps its own).

    \b
    Examples:
      mirror downloads clean --partial --older-than 7
      mirror downloads clean --dry-run
    """
    from .download import clean_downloads

    removed = clean_downloads(partial_only=partial, dry_run=dry_run,
                              older_than=None if older_than is None else older_than * 86400)
    if as_json:
        _emit("downloads", {"dry_run": dry_run, "downloads": [e.to_json() for e in removed]})
    else:
        _print_downloads(removed, "would remove" if dry_run else "removed")


@cli.command()
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(dir_okay=False))
@_json_option
@_library_errors
def inspect(bundle_path, as_json) -> None:
    """Summarize BUNDLE from its manifest (its first member) without reading the rest:
    nothing is verified (verify and install do that).

    \b
    Example:
      mirror inspect models.hub
    """
    manifest_bytes = bundle.read_manifest_bytes(bundle_path)  # the first frame, once
    manifest = bundle.manifest_from_bytes(bundle_path, manifest_bytes)
    if as_json:
        _emit("inspect", {"bundle": bundle_path, "bundle_id": bundle.bundle_id(manifest_bytes),
                          "manifest": json.loads(manifest_bytes)})
        return
    size = {w.url: w.size for w in manifest.weights}
    click.echo(f"{bundle_path}: {manifest.tool or '?'}, format {manifest.format_version}, "
               f"{len(manifest.weights)} weights, {iec(sum(size.values()))} of weights")
    click.echo(f"bundle id {bundle.bundle_id(manifest_bytes)}")
    pre = manifest.prerequisites
    if pre is not None:
        click.echo(_assumes(pre))
        for p in pre.commits:
            click.echo(f"  needs {p.host}/{p.owner}/{p.name}@{p.commit}"
                       f"{f'  (bundle {p.bundle_file or p.bundle})' if p.bundle else ''}")
        carried = {m.sha256 for m in manifest.members().values()}
        uses = {w.sha256: f"weight {w.url}" for w in manifest.weights}
        for sha in pre.blobs:
            if sha not in carried:
                click.echo(f"  needs {sha[:16]}  {uses.get(sha, 'a code file')}")
    for repo in manifest.repos:
        ident = repo.id
        click.echo(f"{ident.host}/{ident.owner}/{ident.name} ({ident.url})")
        for ref in repo.refs:
            click.echo(f"  {ref.kind:6} {ref.name} -> {short(ref.commit)}  (asked {ref.asked!r})")
        for snap in repo.snapshots:
            click.echo(f"  commit {snap.commit}  {len(snap.files)} files, {iec(snap.size)}")
            for entry, urls in snap.coverage.items():
                named = ", ".join(f"{u} ({iec(size[u]) if u in size else 'not packed'})"
                                  for u in urls)
                click.echo(f"    {entry}: {named or 'no weights'}")
            for u in snap.unresolved:
                click.echo(f"    unresolved: {u}")
            for u in snap.excluded:
                click.echo(f"    excluded: {u}")


def write_receipt(path: str, bundle_path: str, report: Any, error: str | None) -> None:
    """A machine-readable record of an install's verification, for compliance."""
    # The digest of the bytes that were verified, taken during that one read; a
    # refused bundle may not have been read whole, so it has none.
    record = {"bundle": os.path.abspath(bundle_path),
              "bundle_sha256": report.file_sha256 if report else None,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "tool": f"mirror {__version__}", "result": "installed" if error is None else
              "refused", "error": error,
              "manifest_sha256": report.bundle_id if report else None,
              "signed_by": report.signed_by if report else None,
              "members": [{"name": m.name, "sha256": m.sha256, "size": m.size}
                          for m in report.members] if report else []}
    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


@cli.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Inventory file to write (default: print the inventory).")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False),
              help="Private key: also write OUTPUT.sig, a signature of its bytes.")
@_home_option
@_json_option
@_library_errors
def inventory(output, sign_key, home, as_json) -> None:
    """What the store holds (repos, refs, commits, weights, blobs), as a small JSON file
    to carry to a connected host, so that a bundle packed there can leave it out.

    Without -o the inventory itself (JSON, docs/inventory) is printed, whatever --json
    says.

    \b
    Example:
      mirror inventory -o site-a.json --sign site-a.key
    """
    from .inventory import take, write

    store = Store(home)  # none yet: an empty inventory, what a new site sends out
    taken = take(store)
    if not output:
        if sign_key:
            raise click.UsageError("--sign needs -o/--output: the signature goes to OUTPUT.sig")
        click.echo(taken.to_bytes().decode(), nl=False)
        return
    signer = write(taken, output, sign_key)
    counts = taken.summary()
    if as_json:
        _emit("inventory", dict(counts, home=store.home, output=output, signed_by=signer,
                                signature=output + ".sig" if signer else None))
        return
    click.echo(f"inventory of {store.home}: {counts['repos']} repos, {counts['snapshots']} "
               f"snapshots, {counts['weights']} weights, {counts['blobs']} blobs -> {output}")


@cli.command("export")
@click.argument("specs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Bundle file to write ('-': stdout).")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False),
              help="Private key: sign the bundle (else an installed bundle made again keeps "
                   "its own signature, and a new one is unsigned).")
@click.option("--since", type=click.Path(exists=True, dir_okay=False),
              help="A delta against what the target holds: its inventory (mirror "
                   "inventory), a bundle it installed, or a lock file.")
@click.option("--split-size", metavar="SIZE",
              help="Write parts OUTPUT.001, ... of at most SIZE bytes each (4G = 4 GiB, "
                   "4700MB = 4.7e9 bytes), each verifiable alone.")
@_home_option
@_json_option
@_library_errors
def export_(specs, output, sign_key, since, split_size, home, as_json) -> None:
    """Write a bundle of SPECS ([host/]owner/name[:ref][@commit]: a repo, a ref or a
    commit, as remove takes them) from the store alone, with no network, that installs
    on another host as the bundle(s) that brought them did.

    \b
    Examples:
      mirror export megengine/models:master -o models.hub
      mirror export megengine/models --since site-b.json -o update.hub
    """
    from .export import export as export_bundle

    report = export_bundle(Store.existing(home), specs, output, sign=sign_key, since=since,
                           split_size=split_size)
    echo = functools.partial(click.echo, err=output == "-")  # -o -: the bundle is stdout
    if as_json:
        _emit("export", report.to_json(), err=output == "-")
        return
    for s in report.snapshots:
        echo(f"exported {s}")
    how = "the installed bundle made again" if report.reemitted else "a new bundle"
    where = "stdout" if report.bytes < 0 else _written(report.output, report.parts,
                                                       report.bytes)
    echo(f"wrote {where}, {len(report.snapshots)} snapshots, {len(report.weights)} "
         f"weights, {how}{', signed' if report.signed else ''}, bundle id "
         f"{report.bundle_id[:16]}")
    if report.prerequisites is not None:
        echo(_assumes(report.prerequisites))


@cli.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Private key file to write; the public key goes to OUTPUT.pub.")
@_json_option
@_library_errors
def keygen(output, as_json) -> None:
    """Make an Ed25519 key pair for signing bundles.

    \b
    Example:
      mirror keygen -o team.key              (writes team.key and team.pub)
    """
    if os.path.exists(output):
        raise _Refused(f"{output} exists; not overwriting a key", ExitCode.CONFLICT)
    key_id = signing.keygen(output)
    if as_json:
        _emit("keygen", {"key_id": key_id, "private": output, "public": output + ".pub"})
        return
    click.echo(f"key {key_id}: private {output}, public {output}.pub")


@cli.command()
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(dir_okay=False))
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Private key file.")
@_json_option
@_library_errors
def sign(bundle_path, key, as_json) -> None:
    """Sign BUNDLE's manifest (which covers every byte) into BUNDLE.sig, beside it.

    \b
    Example:
      mirror sign models.hub --key team.key
    """
    verified = bundle.verify(bundle_path, progress=False)  # sign only what verifies
    if verified.part is not None:
        raise click.UsageError(f"{bundle_path} is one part of a split bundle: sign it "
                               f"as it is packed (pack or export --sign), which signs "
                               f"its table of parts too")
    private = signing.load_private(key)
    document = signing.sign(private, verified.manifest_bytes)
    write_atomic(bundle_path + ".sig", document)
    if as_json:
        _emit("sign", {"bundle": bundle_path, "bundle_id": verified.bundle_id,
                       "signature": bundle_path + ".sig",
                       "key_id": signing.key_id(private.public_key())})
        return
    click.echo(f"signed {bundle_path} -> {bundle_path}.sig")


@cli.command("list")
@click.option("-l", "--long", "long", is_flag=True,
              help="Also each snapshot's entrypoints, weights and the bundle it came in.")
@_home_option
@_json_option
@_library_errors
def list_(long, home, as_json) -> None:
    """List installed snapshots: repo, refs, commit, when installed, size (alias: ls).

    \b
    Examples:
      mirror list
      mirror list --long
    """
    store = Store(home)
    repos = store.repos()
    snapshots = [s for r in repos for s in r.snapshots]
    weights = {p.sha256: p.size for s in snapshots for _, p in s.weights if p}
    totals = {"repos": len(repos), "snapshots": len(snapshots), "weights": len(weights),
              "bytes": sum(s.size for s in snapshots) + sum(weights.values())}
    if as_json:
        _emit("list", {"home": store.home, "repos": [r.to_json() for r in repos],
                       "totals": totals})
        return
    if not repos:
        click.echo(f"nothing installed in {store.home}")
        return
    rows = [("REPO", "REF", "COMMIT", "INSTALLED", "SIZE")]
    notes: Dict[int, List[str]] = {}
    for r in repos:
        repo = r.id.spec
        for s in r.snapshots:
            names = [h.name + (" (tag)" if h.kind == "tag" else "") for h in r.refs
                     if h.commit == s.commit]
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(s.installed_at)) \
                if s.installed_at else "?"
            size = s.size + sum(p.size for _, p in s.weights if p)
            commit = short(s.commit) + ("" if s.proven else " (unproven)" if s.readable
                                        else " (record unreadable)")
            rows.append((repo, ", ".join(names) or "-", commit, when, iec(size)))
            if long:
                notes[len(rows) - 1] = _snapshot_lines(s)
        installed = {s.commit for s in r.snapshots}
        for h in r.refs:  # a ref whose snapshot was removed: said, not hidden
            if h.commit not in installed:
                rows.append((repo, h.name + (" (tag)" if h.kind == "tag" else ""),
                             f"{short(h.commit)} (not installed)", "-", "-"))
        for problem in r.problems:
            click.echo(f"warning: {problem}", err=True)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
        for line in notes.get(i, ()):
            click.echo(f"    {line}")
    click.echo(f"{totals['repos']} repos, {totals['snapshots']} snapshots, "
               f"{totals['weights']} weights, {iec(totals['bytes'])} (a weight shared by "
               f"snapshots counted once) in {store.home}")


def _snapshot_lines(s: Any) -> List[str]:
    """What ``list --long`` says under a snapshot's row."""
    if not s.readable:
        return [f"commit {s.commit}: its record is unreadable; run 'mirror verify'"]
    lines = [f"commit {s.commit}, {s.files} files, from {s.bundle_file}"
             + ("" if s.proven else " (unproven: its bundle, format 1, carried no git "
                                    "objects to recompute its id)")]
    if s.entrypoints:
        lines.append(f"entrypoints: {', '.join(s.entrypoints)}")
    for url, pin in s.weights:
        lines.append(f"weight {url} ({iec(pin.size) if pin else 'not installed'})")
    return lines


@cli.command(context_settings={"ignore_unknown_options": True,
                              "allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_home_option
def run(command, home) -> None:
    """Run COMMAND with megengine.hub answering from the store.

    Unmodified scripts that call megengine.hub.load(...), even with use_cache=False,
    load the installed snapshots and weights and never reach the network. Put -- before
    COMMAND so that its options are its own.

    mirror becomes COMMAND and exits as it does: its status; 127 when it is not found,
    126 when it cannot be executed. Every Python it starts must be able to import
    mirror: one that cannot (another interpreter or virtual environment) says so and
    exits with 125 before running anything. A sitecustomize that Python would import
    still runs.

    \b
    Example:
      mirror run -- python train.py
    """
    from .patch import exec_failure
    from .patch import run as run_redirected

    try:
        run_redirected(command, home)
    except OSError as e:
        status, message = exec_failure(command[0], e)
        click.echo(f"mirror run: {message}", err=True)
        sys.exit(status)


@cli.command()
@_home_option
@_json_option
@_library_errors
def home(home, as_json) -> None:
    """Print the store location (--home, else the configured default), and whether a
    store is there.

    \b
    Example:
      export MGE_MIRROR_HOME=$(mirror home)
    """
    store = Store(home)
    if as_json:
        _emit("home", {"home": store.home, "exists": store.exists()})
        return
    click.echo(store.home)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell) -> None:
    """Print the shell completion script for SHELL (click's).

    \b
    Examples:
      eval "$(mirror completion bash)"        (in ~/.bashrc)
      mirror completion fish > ~/.config/fish/completions/mirror.fish
    """
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell)(cli, {}, "mirror", "_MIRROR_COMPLETE")
    click.echo(completer.source())


# One line each in `mirror --help`, where click would cut the docstring's first sentence.
SUMMARIES = {
    "pack": "Pack repos and the weights their code loads into one bundle.",
    "inspect": "Show a bundle's manifest: repos, refs, commits, weights.",
    "verify": "Verify a bundle (or the store) byte for byte; install nothing.",
    "install": "Verify bundles and install them into the store, atomically.",
    "list": "List installed snapshots (alias: ls).",
    "remove": "Remove a repo, a ref or a commit from the store.",
    "gc": "Delete what nothing in the store references any more.",
    "seed": "Make MegEngine Hub's own cache match the store.",
    "run": "Run a command with megengine.hub answering from the store.",
    "export": "Write a bundle of installed repos, for another isolated host.",
    "inventory": "Write what the store holds, for a delta packed elsewhere.",
    "push": "Push a bundle to an OCI registry.",
    "pull": "Download a bundle from an OCI registry.",
    "downloads": "List or clean the packing host's download cache.",
    "keygen": "Make an Ed25519 key pair for signing bundles.",
    "sign": "Sign a bundle into BUNDLE.sig.",
    "home": "Print the store's location.",
    "completion": "Print a shell completion script (bash, zsh, fish).",
}
for _name, _summary in SUMMARIES.items():
    cli.commands[_name].short_help = _summary


def main() -> None:
    cli(prog_name="mirror")


if __name__ == "__main__":
    sys.exit(main())
