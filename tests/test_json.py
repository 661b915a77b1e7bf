"""The command line's contract with scripts: every command's `--json` validated against
the schema docs/json.md gives for it, errors as JSON on stderr, one exit code per kind
of failure, and every command that an error message suggests parses."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil

import click
import jsonschema
import pytest

from mirror import cli as mirror_cli
from mirror.errors import (
    ExitCode,
    NoStoreError,
    NotInstalledError,
    RefConflictError,
    WeightNotInstalledError,
)
from mirror.refs import RepoSpec
from tests.conftest import MIRROR, ROOT, run
from tests.upstream.registry import RegistryServer

DOC = os.path.join(ROOT, "docs", "json.md")


def documented_schemas() -> dict:
    """Every JSON Schema in docs/json.md, by its title (``mirror.NAME/1``)."""
    text = open(DOC).read()
    schemas = {}
    for block in re.findall(r"```json\n(.*?)```", text, re.S):
        schema = json.loads(block)
        jsonschema.Draft202012Validator.check_schema(schema)
        schemas[schema["title"]] = schema
    return schemas


SCHEMAS = documented_schemas()


def check(out: str, name: str) -> dict:
    """``out`` parsed: one JSON object valid under the schema ``mirror.NAME/1``."""
    obj = json.loads(out)
    assert obj["schema"] == f"mirror.{name}/1"
    jsonschema.validate(obj, SCHEMAS[obj["schema"]])
    return obj


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    server = RegistryServer(str(tmp_path_factory.mktemp("registry"))).start()
    yield server
    server.stop()


def test_every_command_prints_json_its_documented_schema_accepts(
        upstream, master_bundle, registry, tmp_path):
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"), MGE_MIRROR_DOWNLOADS=str(tmp_path / "dl"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    seen = set()

    def mirror(*args, name, ok=True):
        r = run(MIRROR + [*args, "--json"], env=env)
        assert (r.returncode == 0) == ok, r.stderr
        if ok:
            assert "\n{" not in r.stderr  # no second object on stderr
        obj = check(r.stdout if ok else r.stderr, name)
        seen.add(obj["schema"])
        return obj

    out = str(tmp_path / "demo.hub")
    packed = mirror("pack", upstream.spec(":dev"), "-o", out, "--git-host",
                    upstream.git.host, "--protocol", "http", name="pack")
    dev = upstream.demo.branches["dev"]
    assert packed["refs"] == [{"repo": f"{upstream.git.host}/demo/tinynets",
                               "kind": "branch", "name": "dev", "commit": dev,
                               "asked": upstream.spec(":dev")}]
    # the entrypoint that downloads in its body names its weight (it said "no
    # @pretrained weights" before)
    covered = {c["entrypoint"]: c["weights"] for c in packed["coverage"]}
    assert covered["mlp_from_url"] == [upstream.demo.urls[dev]["mlp"]]

    assert mirror("inspect", out, name="inspect")["bundle_id"] == packed["bundle_id"]
    (verified,) = mirror("verify", out, name="verify")["bundles"]
    assert verified["bundle_id"] == packed["bundle_id"]
    installed = mirror("install", "--no-megengine-cache", out, master_bundle, name="install")
    assert [b["ok"] for b in installed["bundles"]] == [True, True]
    (ref,) = installed["bundles"][0]["refs"]
    assert (ref["name"], ref["commit"], ref["previous"], ref["set"]) == ("dev", dev, None, True)
    listed = mirror("list", name="list")
    assert listed["totals"]["snapshots"] == 2 and listed["totals"]["repos"] == 1
    assert mirror("verify", name="verify-store")["ok"] is True
    mirror("seed", name="seed")
    mirror("inventory", "-o", str(tmp_path / "inv.json"), name="inventory")
    mirror("export", "demo/tinynets:dev", "-o", str(tmp_path / "again.hub"), name="export")
    key = mirror("keygen", "-o", str(tmp_path / "k"), name="keygen")
    signed = mirror("sign", out, "--key", str(tmp_path / "k"), name="sign")
    assert signed["key_id"] == key["key_id"]
    pushed = mirror("push", out, registry.ref("json/demo:v1"), "--plain-http", name="push")
    pulled = mirror("pull", registry.ref("json/demo:v1"), "-o", str(tmp_path / "p.hub"),
                    "--plain-http", name="pull")
    assert pulled["digest"] == pushed["digest"]
    mirror("downloads", "list", name="downloads")
    mirror("downloads", "clean", "--dry-run", name="downloads")
    assert mirror("remove", "demo/tinynets:dev", "-n", name="remove")["dry_run"] is True
    mirror("gc", name="gc")
    assert mirror("home", name="home")["exists"] is True

    error = mirror("verify", str(tmp_path / "missing.hub"), name="error", ok=False)["error"]
    assert error == {"type": "MissingFileError", "exit_code": 4,
                     "message": f"no such bundle: {tmp_path / 'missing.hub'}",
                     "context": {"path": str(tmp_path / "missing.hub")}}
    usage = mirror("pack", "-o", out, name="error", ok=False)["error"]
    assert (usage["type"], usage["exit_code"]) == ("UsageError", 2)

    assert seen == set(SCHEMAS), f"documented but not exercised: {set(SCHEMAS) - seen}"


def test_a_json_error_keeps_the_exit_code_and_says_nothing_on_stdout(tmp_path):
    r = run(MIRROR + ["gc", "--home", str(tmp_path / "typo"), "--json"])
    assert r.returncode == ExitCode.NOT_FOUND and r.stdout == ""
    error = check(r.stderr, "error")["error"]
    assert error["type"] == "NoStoreError" and error["context"]["home"] == \
        str(tmp_path / "typo")
    assert not os.path.exists(tmp_path / "typo")


# --- exit codes ---------------------------------------------------------------------


def test_each_kind_of_failure_has_its_own_exit_code(upstream, master_bundle, tmp_path):
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"))

    def code(*args):
        return run(MIRROR + list(args), env=env).returncode

    corrupt = tmp_path / "corrupt.hub"
    data = bytearray(open(master_bundle, "rb").read())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    keys = tmp_path / "keys"
    keys.mkdir()
    assert code("keygen", "-o", str(keys / "k")) == ExitCode.OK
    assert code("install", "--no-megengine-cache", master_bundle) == ExitCode.OK

    assert code("pack", "demo/tinynets@v1.0", "-o", str(tmp_path / "x.hub")) == ExitCode.USAGE
    assert code("install", "--no-such-option") == ExitCode.USAGE
    assert code("verify", str(corrupt)) == ExitCode.VERIFICATION
    assert code("verify", str(tmp_path / "nope.hub")) == ExitCode.NOT_FOUND
    assert code("install", str(tmp_path / "nope.hub")) == ExitCode.NOT_FOUND
    assert code("remove", "demo/tinynets:no-such-branch") == ExitCode.NOT_FOUND
    assert code("verify", "--trusted-key", str(keys / "k.pub"), master_bundle) == \
        ExitCode.TRUST
    assert code("keygen", "-o", str(keys / "k")) == ExitCode.CONFLICT  # not overwritten


def test_ref_conflicts_say_conflict():
    assert RefConflictError("a/b", "branch", "x/y", "x", "b.hub").exit_code == \
        ExitCode.CONFLICT == 6


# --- suggested commands ---------------------------------------------------------------


def suggested(message: str) -> list:
    """The mirror commands a message tells the user to run."""
    return [m.strip() for m in re.findall(r"['`(](mirror [^'`()]*?)['`)]", message)]


def parses(command: str, tmp_path) -> None:
    """Parse ``command`` as the shell and mirror would: its options by click, its specs
    by the spec grammar. A file it names (X.hub) is made, as the user would have it."""
    args = shlex.split(command)[1:]
    assert args, command
    name, rest = args[0], args[1:]
    cmd = mirror_cli.cli.get_command(click.Context(mirror_cli.cli), name)
    assert cmd is not None, f"{command}: no command {name}"
    if not rest:  # a command named in passing ("'mirror install' creates one")
        return
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for arg in rest:
            if arg.endswith(".hub") and not os.path.exists(arg):
                open(arg, "wb").close()
        ctx = cmd.make_context(name, list(rest), resilient_parsing=False)
    finally:
        os.chdir(cwd)
    for spec in ctx.params.get("specs", ()) + ((ctx.params["spec"],) if "spec" in ctx.params
                                              else ()):
        RepoSpec.parse(spec)


def test_every_command_an_error_suggests_parses(tmp_path):
    messages = [
        str(NotInstalledError("demo/tinynets", "dev", available=["master"])),
        str(NotInstalledError("demo/tinynets", None, "ffc13eb")),
        str(NotInstalledError("demo/tinynets", "v1.0", "ffc13eb4a1")),
        str(NotInstalledError("git.corp.example/demo/tinynets", "main")),
        str(WeightNotInstalledError("https://example.com/w.pkl", "/store", "hubconf.py:3")),
        str(NoStoreError(str(tmp_path / "store"))),
    ]
    # and every one written in the source as a literal
    package = os.path.join(ROOT, "mirror")
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            messages += [m for m in re.findall(r"'mirror [^'{}\"\n]*'", open(
                os.path.join(package, name)).read())]
    commands = sorted({c for m in messages for c in suggested(m)})
    assert len(commands) >= 8, commands
    for command in commands:
        if "..." in command:  # an abbreviation in a message is not a command
            pytest.fail(f"{command!r}: a suggested command must be one a user can run")
        parses(command, tmp_path)


def test_a_tag_after_at_sign_gets_a_hint_and_its_suggestion_parses(tmp_path):
    r = run(MIRROR + ["pack", "demo/tinynets@v1.0", "-o", str(tmp_path / "x.hub")])
    assert r.returncode == ExitCode.USAGE
    assert "demo/tinynets:v1.0" in r.stderr
    parses("mirror pack demo/tinynets:v1.0 -o x.hub", tmp_path)


# --- help ---------------------------------------------------------------------------


def test_help_lists_commands_in_workflow_order_with_whole_summaries():
    r = run(MIRROR + ["--help"])
    listed = re.findall(r"^  ([a-z]+)  +(.*)$", r.stdout.split("Commands:")[1], re.M)
    names = [n for n, _ in listed]
    assert names[:8] == ["pack", "inspect", "verify", "install", "list", "remove", "gc", "seed"]
    assert "ls" not in names and "(alias: ls)" in dict(listed)["list"]
    assert all(not s.endswith("...") for _, s in listed), listed
    assert run(MIRROR + ["ls", "--help"]).returncode == 0


@pytest.mark.parametrize("name", [n for n in mirror_cli.ORDER if n != "downloads"])
def test_each_command_help_shows_an_example(name):
    r = run(MIRROR + [name, "--help"])
    assert r.returncode == 0 and re.search(r"Examples?:\n  +mirror ", r.stdout) or \
        re.search(r"Examples?:\n  +\S", r.stdout), r.stdout


def test_verify_and_install_name_trusted_keys_alike():
    for name in ("verify", "install"):
        out = run(MIRROR + [name, "--help"]).stdout
        assert "--trusted-key KEY" in out and "--key " not in out


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_a_script_the_shell_reads(shell, tmp_path):
    r = run(MIRROR + ["completion", shell])
    assert r.returncode == 0 and "_MIRROR_COMPLETE" in r.stdout
    if shell == "bash" and shutil.which("bash"):
        script = tmp_path / "c.bash"
        script.write_text(r.stdout)
        check_ = run(["bash", "-n", str(script)])
        assert check_.returncode == 0, check_.stderr
