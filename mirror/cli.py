"""The ``mirror`` command: a thin shell over the library.

Exit codes: 0 success, 1 operation failed (git, download, store), 2 bad usage or
spec, 3 a bundle, the store or a stored file failed verification, 4 not
installed (repo, ref, commit, entrypoint or weight).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sys
from typing import Any, Callable

import click

from . import __version__, bundle, housekeeping, signing
from .atomic import write_atomic
from .errors import MirrorError
from .megengine_cache import installed_megengine_version
from .store import Store, default_home


class _Failure(click.ClickException):
    """A MirrorError as click prints it: one line, the error's exit code."""

    def __init__(self, error: MirrorError):
        super().__init__(str(error))
        self.exit_code = error.exit_code


def _library_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MirrorError as e:
            raise _Failure(e) from None
    return wrapper


def _home_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--home", type=click.Path(file_okay=False), default=None,
                        help="Store location (default: $MGE_MIRROR_HOME, $MGE_HOME/mirror, "
                             "$XDG_CACHE_HOME/megengine/mirror, ~/.cache/megengine/mirror).")(fn)


def _json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)


def _say(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mirror")
def cli() -> None:
    """Take MegEngine Hub repos and their weights across an air gap."""


@cli.command()
@click.argument("specs", nargs=-1)
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Bundle file to write (a recipe may name it).")
@click.option("--recipe", type=click.Path(dir_okay=False, exists=True),
              help="A TOML recipe naming repos, refs and options (see bundles/).")
@click.option("--git-host", default=None,
              help="Git host for specs without one (default github.com).")
@click.option("--protocol", type=click.Choice(["https", "http", "ssh", "file"],
                                              case_sensitive=False), default=None,
              help="How to reach the git host (default https).")
@click.option("--weights", "extra_weights", multiple=True, metavar="URL",
              help="Also pack this file (repeatable).")
@click.option("--entry", "entries", multiple=True, metavar="NAME",
              help="Pack only what these entrypoints need (repeatable; implies --trace).")
@click.option("--trace", is_flag=True, default=None,
              help="Also run each entrypoint with downloads recorded instead of performed, "
                   "to find what static discovery cannot (this runs the repo's code).")
@click.option("--follow-nested", is_flag=True, default=None,
              help="Also pack the repos the code loads with megengine.hub.load.")
@click.option("--rewrite", "rewrites", multiple=True, metavar="FROM=TO",
              help="Fetch git and weight URLs starting with FROM from TO instead, like git's "
                   "url.<base>.insteadOf; the bundle records the original URLs (repeatable).")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Leave out weights whose URL matches this glob (repeatable).")
@click.option("--allow-unresolved", is_flag=True, default=None,
              help="Pack even if some download calls' URLs cannot be worked out.")
@click.option("--allow-unreachable", is_flag=True, default=None,
              help="Pack :ref@commit even if the commit is not in the ref's history.")
@click.option("--allow-unsafe-pickle", is_flag=True, default=None,
              help="Pack weights that would import more than numpy, tensors and collections.")
@click.option("--lock", type=click.Path(dir_okay=False), default=None,
              help="Lock file of ref -> commit and URL -> sha256 pins: written if absent, "
                   "enforced if present.")
@click.option("--sign", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Sign the bundle with this private key (see mirror keygen).")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=None,
              help="Weights downloaded at once (default 4).")
@click.option("--refresh", is_flag=True, default=None,
              help="Download every weight again instead of using the download cache.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@_json_option
@_library_errors
def pack(specs, output, recipe, quiet, as_json, **options) -> None:
    """Pack SPECS ([host/]owner/name[:ref][@commit]) and their weights into one bundle."""
    # Imported here: git, HTTP and the weight discovery are pack's alone, and the
    # commands used on the isolated host start faster without them.
    from .pack import pack as pack_repos
    from .recipe import Recipe

    options = {k: v for k, v in options.items() if v not in (None, ())}
    if recipe:
        loaded = Recipe.load(recipe)
        specs, output = list(loaded.specs) + list(specs), output or loaded.output
        options = loaded.merged(options)
    if not specs:
        raise click.UsageError("name at least one repo spec, or a --recipe")
    if not output:
        raise click.UsageError("name the bundle to write with -o/--output")
    report = pack_repos(specs, output, progress=not quiet,
                        log=(lambda m: None) if quiet else _say, **options)
    if as_json:
        click.echo(json.dumps(report.__dict__, indent=1))
        return
    for ref in report.refs:
        click.echo(f"packed {ref}")
    for w in report.weights:
        click.echo(f"weight {w['url']} ({w['size']} bytes, sha256 {w['sha256'][:12]})")
    packed = {w["url"] for w in report.weights}
    for label, entries in report.coverage.items():  # what each entrypoint will load
        for entry, urls in entries.items():
            state = ", ".join(u if u in packed else f"{u} (NOT packed)" for u in urls)
            click.echo(f"coverage {label} {entry}: {state or 'no @pretrained weights'}")
    for line in report.unresolved:
        click.echo(f"unresolved {line}")
    for line in report.nested:
        click.echo(f"nested {line}")
    click.echo(f"wrote {report.output}: {report.size} bytes, {report.files} files, "
               f"{len(report.weights)} weights, bundle id {report.bundle_id[:16]}")


@cli.command()
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Reinstall snapshots and move refs back or tags.")
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
@click.option("--trusted-keys", "trusted_keys", multiple=True, type=click.Path(exists=True),
              help="Trusted public keys: a .pub file or a directory of them (repeatable; "
                   "default $MGE_MIRROR_TRUSTED_KEYS, else <store>/trusted-keys).")
@click.option("--receipt", type=click.Path(dir_okay=False),
              help="Write a JSON record of what was verified, for compliance.")
@_home_option
@_json_option
@_library_errors
def install(bundle_path, force, mge_versions, no_megengine_cache, allow_unsafe_pickle,
            require_signature, trusted_keys, receipt, home, as_json) -> None:
    """Verify every byte of BUNDLE and install it into the local store.

    Also seeds MegEngine Hub's own cache, so unmodified megengine.hub.load(...)
    calls work offline too.
    """
    versions = () if no_megengine_cache else (
        mge_versions or [v for v in [installed_megengine_version()] if v])
    store = Store(home)
    trusted = None
    if require_signature or trusted_keys or signing.policy_configured(store.home):
        trusted = signing.trusted_keys(list(trusted_keys), store.home)
    try:
        report = store.install(bundle_path, force=force, megengine_versions=versions,
                               progress=not as_json, allow_unsafe_pickle=allow_unsafe_pickle,
                               trusted=trusted, digest_file=bool(receipt))
    except MirrorError as e:
        if receipt:
            write_receipt(receipt, bundle_path, None, str(e))
        raise
    if receipt:
        write_receipt(receipt, bundle_path, report, None)
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.__dict__.items() if k != "members"},
                              indent=1))
        return
    click.echo(f"verified {report.verified_files} files, {report.verified_bytes} bytes "
               f"from {report.bundle}")
    for s in report.snapshots_installed:
        click.echo(f"installed {s}")
    for s in report.snapshots_present:
        click.echo(f"already installed {s}")
    for r in report.refs_set:
        click.echo(f"ref {r}")
    for r in report.refs_kept:
        click.echo(f"ref {r}")
    for line in report.megengine_cache:
        click.echo(f"megengine cache: {line}")
    if report.signed_by:
        click.echo(f"signed by trusted key {report.signed_by}")
    click.echo(f"{len(report.weights)} weights; {report.bytes_written} bytes written"
               + ("" if report.changed else " (nothing changed)"))


@cli.command()
@click.argument("bundle_path", metavar="[BUNDLE]", required=False,
                type=click.Path(dir_okay=False))
@click.option("--key", "keys", multiple=True, type=click.Path(exists=True),
              help="Require a signature by this public key (a .pub file or a directory of "
                   "them; repeatable).")
@_home_option
@_json_option
@_library_errors
def verify(bundle_path, keys, home, as_json) -> None:
    """Verify every byte of BUNDLE without installing it, or, without BUNDLE, the
    whole store: every blob re-hashed, every snapshot, ref and weight checked.

    Exits 3 when anything fails verification.
    """
    if bundle_path:
        signer = []

        def on_head(head: bundle.Head) -> None:
            if keys:
                signer.append(signing.check(head.signature, head.manifest_bytes,
                                            signing.trusted_keys(list(keys)), bundle_path))

        manifest = bundle.read(bundle_path, on_head=on_head, progress=not as_json)
        n = len(bundle.expected_members(manifest))
        signed = f", signed by {signer[0].key_id}" if signer else ""
        if as_json:
            click.echo(json.dumps({"bundle": bundle_path, "ok": True, "members": n,
                                   "signed_by": signer[0].key_id if signer else None}))
        else:
            click.echo(f"{bundle_path}: OK, {n} members verified{signed}")
        return
    report = housekeeping.verify(Store(home), progress=not as_json)
    if as_json:
        click.echo(json.dumps(dict(report.__dict__, ok=report.ok), indent=1))
    else:
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        click.echo(f"{report.home}: {'OK' if report.ok else 'FAILED'}, {report.blobs} blobs "
                   f"({report.bytes} bytes) re-hashed, {report.snapshots} snapshots "
                   f"({report.files} files), {report.refs} refs, {report.weights} weights "
                   f"checked; {len(report.problems)} problems")
    if not report.ok:
        raise SystemExit(3)


def _print_plan(plan: housekeeping.Plan, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(plan.__dict__, indent=1))
        return
    verb = "would remove" if plan.dry_run else "removed"
    for kind, items in (("ref", plan.refs), ("snapshot", plan.snapshots),
                        ("blob", plan.blobs), ("file", plan.other)):
        for item in items:
            click.echo(f"{verb} {kind} {item}")
    click.echo(f"{'would free' if plan.dry_run else 'freed'} {plan.bytes_freed} bytes "
               f"in {len(plan.blobs)} blobs")


@cli.command()
@click.argument("spec")
@click.option("-n", "--dry-run", is_flag=True, help="Show what would go, change nothing.")
@_home_option
@_json_option
@_library_errors
def remove(spec, dry_run, home, as_json) -> None:
    """Remove a repo (owner/name), a ref (owner/name:ref) or a commit (owner/name@commit),
    and every blob nothing else uses."""
    _print_plan(housekeeping.remove(Store(home), spec, dry_run=dry_run), as_json)


@cli.command()
@click.option("-n", "--dry-run", is_flag=True, help="Show what would go, change nothing.")
@_home_option
@_json_option
@_library_errors
def gc(dry_run, home, as_json) -> None:
    """Delete what no snapshot, ref or weight references any more, and abandoned work."""
    _print_plan(housekeeping.gc(Store(home), dry_run=dry_run), as_json)


@cli.command()
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(dir_okay=False))
@_json_option
@_library_errors
def inspect(bundle_path, as_json) -> None:
    """Summarize BUNDLE from its manifest (its first member) without reading the rest."""
    manifest_bytes = bundle.read_manifest_bytes(bundle_path)  # the first frame, once
    manifest = bundle.manifest_from_bytes(bundle_path, manifest_bytes)
    if as_json:
        click.echo(json.dumps(manifest, indent=1))
        return
    size = {w["url"]: w["size"] for w in manifest["weights"]}
    click.echo(f"{bundle_path}: {manifest.get('tool', '?')}, format "
               f"{manifest['format_version']}, "
               f"{len(manifest['weights'])} weights, "
               f"{sum(size.values())} bytes of weights")
    click.echo(f"bundle id {bundle.bundle_id(manifest_bytes)}")
    for repo in manifest["repos"]:
        click.echo(f"{repo['host']}/{repo['owner']}/{repo['name']} ({repo['url']})")
        for ref in repo["refs"]:
            click.echo(f"  {ref['kind']:6} {ref['name']} -> {ref['commit'][:12]}  "
                       f"(asked {ref['asked']!r})")
        for snap in repo["snapshots"]:
            code = sum(f["size"] for f in snap["files"])
            click.echo(f"  commit {snap['commit']}  {len(snap['files'])} files, {code} bytes")
            for entry, urls in (snap.get("coverage") or {}).items():
                named = ", ".join(f"{u} ({size.get(u, '?')} bytes)" for u in urls)
                click.echo(f"    {entry}: {named or 'no @pretrained weights'}")
            for u in snap.get("unresolved", []):
                click.echo(f"    unresolved: {u}")
            for u in snap.get("excluded", []):
                click.echo(f"    excluded: {u}")


def write_receipt(path: str, bundle_path: str, report: Any, error: str | None) -> None:
    """A machine-readable record of an install's verification, for compliance."""
    # The digest of the bytes that were verified, taken during that one read; a
    # refused bundle may not have been read whole, so it has none.
    bundle_sha256 = report.bundle_file_sha256 if report else None
    record = {"bundle": os.path.abspath(bundle_path), "bundle_sha256": bundle_sha256,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "tool": f"mirror {__version__}", "result": "installed" if error is None else
              "refused", "error": error,
              "manifest_sha256": report.bundle_sha256 if report else None,
              "signed_by": report.signed_by if report else None,
              "members": report.members if report else []}
    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


@cli.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Private key file to write; the public key goes to OUTPUT.pub.")
@_library_errors
def keygen(output) -> None:
    """Make an Ed25519 key pair for signing bundles."""
    if os.path.exists(output):
        raise click.ClickException(f"{output} exists; not overwriting a key")
    click.echo(f"key {signing.keygen(output)}: private {output}, public {output}.pub")


@cli.command()
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(dir_okay=False))
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Private key file.")
@_library_errors
def sign(bundle_path, key) -> None:
    """Sign BUNDLE's manifest (which covers every byte) into BUNDLE.sig, beside it."""
    heads = []
    bundle.read(bundle_path, on_head=heads.append)  # sign only what verifies
    document = signing.sign(signing.load_private(key), heads[0].manifest_bytes)
    write_atomic(bundle_path + ".sig", document)
    click.echo(f"signed {bundle_path} -> {bundle_path}.sig")


@cli.command("list")
@_home_option
@_json_option
@_library_errors
def list_(home, as_json) -> None:
    """List installed repos: refs, commits, entrypoints, weights, sizes, bundles."""
    store = Store(home)
    repos = store.repos()
    if as_json:
        click.echo(json.dumps(repos, indent=1))
        return
    if not repos:
        click.echo(f"nothing installed in {store.home}")
    for r in repos:
        click.echo(f"{r['host']}/{r['owner']}/{r['name']}")
        for name, ref in r["refs"].items():
            click.echo(f"  {ref['kind']:6} {name} -> {ref['commit'][:12]}")
        for s in r["snapshots"]:
            click.echo(f"  commit {s['commit']}  {s['files']} files, {s['size']} bytes, "
                       f"from {s['bundle_file']}")
            if s["entrypoints"]:
                click.echo(f"    entrypoints: {', '.join(s['entrypoints'])}")
            for w in s["weights"]:
                click.echo(f"    weight {w['url']} ({w['size']} bytes)")


cli.add_command(list_, "ls")


@cli.command(context_settings={"ignore_unknown_options": True,
                              "allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_home_option
def run(command, home) -> None:
    """Run COMMAND (e.g. -- python script.py) with megengine.hub answering from the store.

    Unmodified scripts that call megengine.hub.load(...), even with use_cache=False,
    load the installed snapshots and weights and never reach the network.
    """
    from .patch import run as run_redirected

    try:
        run_redirected(command, home)
    except OSError as e:
        raise click.ClickException(f"cannot run {command[0]}: {e.strerror}") from None


@cli.command()
def home() -> None:
    """Print the default store location."""
    click.echo(default_home())


def main() -> None:
    cli(prog_name="mirror")


if __name__ == "__main__":
    sys.exit(main())
