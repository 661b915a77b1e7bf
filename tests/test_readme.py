"""The README cannot drift from the code.

- The isolated host's quick start (the ``console`` block under "On the isolated
  host": lines starting with ``$`` are commands, the others what they print) runs
  command by command on the demo repo's bundle, with no network (``unshare -n``),
  and each prints what the README shows: the same lines in the same order, with
  ids, sizes, counts, paths and URLs wildcarded, ``...`` standing for lines left
  out, and the public names (``megengine/models``, ``resnet18``) standing for the
  demo's. The connected host's ``inspect`` and ``verify`` run the same way, and its
  ``pack`` against the loopback upstream.
- Every ``mirror COMMAND ... --option`` in a code block or inline code of the
  README (and of the docs it links that say how to use mirror) names a command and
  options that the CLI has.
- Every exit code the README's table lists is one mirror exits with, and the
  reverse; every relative link (and its #anchor) resolves.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from typing import Iterator, List, Tuple

import click
import pytest

from mirror.cli import cli
from mirror.errors import ExitCode
from tests.conftest import MIRROR, ROOT, run

README = os.path.join(ROOT, "README.md")
# Docs written for users, checked like the README (json.md and benchmarks.md have
# their own owners and tests).
USER_DOCS = [README] + [os.path.join(ROOT, "docs", f) for f in
                        ("usage.md", "trust.md", "store.md", "development.md")]
STEP_TIMEOUT = 120  # seconds per command: MegEngine's import is most of it


def read(path: str = README) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def blocks(text: str) -> List[Tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return FENCE.findall(text)


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line), up to the next heading of the
    same or a higher level, outside code blocks."""
    level = len(heading) - len(heading.lstrip("#"))
    lines, out, inside, fenced = text.splitlines(), [], False, False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(f"#{{1,{level}}} ", line):
            if inside:
                break
            inside = line.strip() == heading
            continue
        if inside:
            out.append(line)
    assert out, f"README.md has no section {heading!r}"
    return "\n".join(out) + "\n"


def transcript(body: str) -> List[Tuple[str, List[str]]]:
    """(command, the lines shown as its output) for each ``$`` line of a console block."""
    steps: List[Tuple[str, List[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:].strip(), []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def console_block(heading: str) -> List[Tuple[str, List[str]]]:
    found = [b for lang, b in blocks(section(read(), heading)) if lang == "console"]
    assert len(found) == 1, f"expected one console block under {heading!r}"
    steps = transcript(found[0])
    for command, _ in steps:
        assert command.split()[0] in ("mirror", "python", "python3.10"), command
    return steps


# --- what a line the README shows may stand for ------------------------------------

SHOWN = re.compile(
    r"(?P<url>https?://[^\s)'\"]+)"
    r"|(?P<repo>(?:github\.com/)?megengine/models)"
    r"|(?P<path>(?<![^\s(])/[^\s)]+)"
    r"|(?P<size>\d+(?:\.\d+)? (?:B|KiB|MiB|GiB|TiB)\b)"
    r"|(?P<hex>(?<![0-9A-Za-z])[0-9a-f]{7,64}(?![0-9A-Za-z]))"
    r"|(?P<num>\d+)"
    r"|(?P<space>\s+)"
    r"|(?P<entry>\bresnet18\b)"
    r"|(?P<cls>\bResNet\b)")


def shape(shown: str, repo: str) -> re.Pattern:
    """A pattern for the lines ``shown`` stands for: ids, sizes, numbers, paths and URLs
    wildcarded, the public repo and entrypoint names replaced by the demo's (whose
    identity may carry its git host: the demo is packed from a loopback server)."""
    wild = {"url": r"\S+", "path": r"/[^\s)]+", "size": r"\d+(?:\.\d+)? (?:B|KiB|MiB|GiB|TiB)",
            "hex": r"[0-9a-f]{4,64}", "num": r"\d+", "space": r"\s+",
            "repo": r"(?:[^\s/()']+/)?" + re.escape(repo), "entry": "mlp", "cls": "MLP"}
    out, at = [], 0
    for m in SHOWN.finditer(shown):
        out.append(re.escape(shown[at:m.start()]))
        out.append(wild[m.lastgroup])
        at = m.end()
    out.append(re.escape(shown[at:]))
    return re.compile("".join(out).rstrip() + r"\s*")


def assert_prints(shown: List[str], printed: List[str], repo: str, command: str) -> None:
    """``printed`` is what ``shown`` says: the first line first, then every line shown in
    order, adjacent unless ``...`` stands between them, and nothing after the last one
    unless ``...`` ends the block."""
    shown = [s for s in shown if s.strip()]
    printed = [p for p in printed if p.strip()]
    assert shown and shown[0] != "...", f"README shows no output for {command!r}"
    context = f"\n$ {command}\nREADME shows:\n" + "\n".join(shown) + "\nprinted:\n" + \
              "\n".join(printed)
    i, gap = 0, False
    for line in shown:
        if line.strip() == "...":
            gap = True
            continue
        pattern = shape(line, repo)
        if gap:
            while i < len(printed) and not pattern.fullmatch(printed[i]):
                i += 1
        assert i < len(printed) and pattern.fullmatch(printed[i]), \
            f"README's line {line!r} is not what is printed{context}"
        i, gap = i + 1, False
    assert gap or i == len(printed), f"printed more than the README shows{context}"


NOISE = re.compile(r"^\s*(info:|debug:|warning:.*pkg_resources)|pkg_resources|"
                   r"^\s*import pkg_resources|^\S*\x1b\[")


def quiet(lines: str) -> List[str]:
    """Output without MegEngine's start-up notices (CUDA, pkg_resources)."""
    return [line for line in lines.splitlines() if not NOISE.search(line)]


def argv(command: str, names: dict) -> List[str]:
    for public, demo in names.items():
        command = command.replace(public, demo)
    args = shlex.split(command)
    assert args[0] in ("mirror", "python"), command
    if args[0] == "mirror":
        args = MIRROR + args[1:]
    return [sys.executable if a == "python" else a for a in args]


@pytest.fixture()
def isolated(tmp_path, master_bundle):
    """A folder holding the demo's bundle as ``models.hub``, and an environment whose
    store and MegEngine home are empty and inside it."""
    shutil.copy(master_bundle, tmp_path / "models.hub")
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"))
    return tmp_path, env


def names_for(upstream) -> dict:
    return {"megengine/models": upstream.demo.repo, "resnet18": "mlp"}


# --- the quick start, run ------------------------------------------------------------

def test_the_isolated_hosts_quick_start_runs_offline_and_prints_what_it_shows(
        upstream, isolated):
    cwd, env = isolated
    names = names_for(upstream)
    train = [b for lang, b in blocks(section(read(), "### On the isolated host"))
             if lang == "python" and b.startswith("# train.py")]
    assert len(train) == 1, "the isolated host's quick start shows train.py"
    text = train[0]
    for public, demo in names.items():
        text = text.replace(public, demo)
    (cwd / "train.py").write_text(text)

    steps = console_block("### On the isolated host")
    assert [c.split()[:2] for c, _ in steps][:2] == [["mirror", "install"], ["mirror", "list"]]
    for command, shown in steps:
        r = run(argv(command, names), env=env, netns=True, timeout=STEP_TIMEOUT,
                cwd_=str(cwd))
        assert r.returncode == 0, f"$ {command}\n{r.stdout}\n{r.stderr}"
        assert_prints(shown, quiet(r.stdout), upstream.demo.repo, command)


def test_the_connected_hosts_inspect_and_verify_run_offline(upstream, isolated):
    cwd, env = isolated
    steps = [(c, s) for c, s in console_block("### On the connected host")
             if c.split()[:2] in (["mirror", "inspect"], ["mirror", "verify"])]
    assert len(steps) == 2
    for command, shown in steps:
        r = run(argv(command, names_for(upstream)), env=env, netns=True,
                timeout=STEP_TIMEOUT, cwd_=str(cwd))
        assert r.returncode == 0, f"$ {command}\n{r.stdout}\n{r.stderr}"
        assert_prints(shown, quiet(r.stdout), upstream.demo.repo, command)


def test_the_connected_hosts_pack_prints_what_it_shows(upstream, tmp_path):
    """The quick start's pack, against the loopback upstream instead of GitHub: its notes
    (stderr) and its report (stdout) as the README shows them."""
    [(command, shown)] = [(c, s) for c, s in console_block("### On the connected host")
                          if c.startswith("mirror pack ")]
    spec = re.search(r"megengine/models@([0-9a-f]+)", command)
    assert spec, command
    names = dict(names_for(upstream))
    names[spec.group(1)] = upstream.demo.branches["master"][:len(spec.group(1))]
    args = argv(command, names) + ["--git-host", upstream.git.host, "--protocol", "http"]
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
               MGE_HOME=str(tmp_path / "mge"))
    r = run(args, env=env, timeout=STEP_TIMEOUT, cwd_=str(tmp_path))
    assert r.returncode == 0, f"$ {command}\n{r.stdout}\n{r.stderr}"
    assert (tmp_path / "models.hub").is_file()
    assert_prints(shown, quiet(r.stderr) + quiet(r.stdout), upstream.demo.repo, command)


def test_the_output_check_can_fail():
    """The comparison above is not vacuous: a changed word, a missing line or a line
    too many each fail it."""
    shown = ["verified 10 files, 8.2 KiB from models.hub", "...", "2 weights; 8.2 KiB written"]
    printed = ["verified 7 files, 912 B from models.hub", "installed demo/tinynets@0123456789ab",
               "2 weights; 1.0 MiB written"]
    assert_prints(shown, printed, "demo/tinynets", "install")
    for bad in (["checked 7 files, 912 B from models.hub"] + printed[1:],
                printed[:1] + printed[2:] + ["extra"],
                printed[:2]):
        with pytest.raises(AssertionError):
            assert_prints(shown, bad, "demo/tinynets", "install")
    with pytest.raises(AssertionError):  # adjacent lines must be adjacent
        assert_prints(["a 1", "b 2"], ["a 1", "x", "b 2"], "demo/tinynets", "x")


# --- commands and options ------------------------------------------------------------

def _logical_lines(body: str) -> Iterator[str]:
    joined = ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        yield joined + line
        joined = ""


def invocations(text: str) -> Iterator[str]:
    """Every ``mirror ...`` command line in a document: in ``sh`` blocks, every line; in
    ``console`` blocks, the ``$`` lines; and inline code that starts with ``mirror ``."""
    for lang, body in blocks(text):
        if lang not in ("sh", "console"):
            continue
        for line in _logical_lines(body):
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            yield from _in_line(line)
    prose = FENCE.sub("", text)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.startswith("mirror "):
            yield from _in_line(span)


def _in_line(line: str) -> Iterator[str]:
    line = re.sub(r"(^|\s)#.*$", "", line)  # a comment
    for segment in re.split(r"\|\||&&|[|;]|\$\(", line):
        m = re.search(r"(?:^|[\s\"'(])mirror\s+(\S.*)$", segment)
        if m:
            yield "mirror " + m.group(1).rstrip(" )\"'")


def problems(invocation: str) -> List[str]:
    """What is wrong with one ``mirror ...`` command line: an unknown command or option."""
    try:
        tokens = shlex.split(invocation)[1:]
    except ValueError:
        tokens = invocation.split()[1:]
    ctx = click.Context(cli)
    helps = set(cli.context_settings.get("help_option_names", ["--help"]))
    top = {o for p in cli.params for o in p.opts + p.secondary_opts} | helps
    while tokens and tokens[0].startswith("-"):
        flag = tokens.pop(0)
        if flag not in top and not re.fullmatch(r"-v+", flag):
            return [f"{invocation}: mirror has no option {flag}"]
    if not tokens:
        return [f"{invocation}: no command"]
    command = cli.get_command(ctx, tokens[0])
    if command is None:
        return [f"{invocation}: no command {tokens[0]!r}"]
    tokens = tokens[1:]
    if isinstance(command, click.Group):
        sub = command.get_command(ctx, tokens[0]) if tokens else None
        if sub is None:
            return [f"{invocation}: {command.name} has no command {tokens[:1]}"]
        command, tokens = sub, tokens[1:]
    options = {o for p in command.params if isinstance(p, click.Option)
               for o in p.opts + p.secondary_opts} | helps
    out = []
    for token in tokens:
        if token == "--":  # what follows is mirror run's command
            break
        token = token.strip("[]")
        if token.startswith("--") or re.fullmatch(r"-[A-Za-z]", token):
            flag = token.split("=", 1)[0]
            if flag not in options:
                out.append(f"{invocation}: mirror {command.name} has no option {flag}")
    return out


@pytest.mark.parametrize("doc", USER_DOCS, ids=os.path.basename)
def test_every_command_and_option_shown_exists(doc):
    found = list(invocations(read(doc)))
    assert len(found) >= (25 if doc == README else 1), found
    wrong = [p for inv in found for p in problems(inv)]
    assert not wrong, "\n".join(wrong)


def test_every_command_the_readme_shows_is_parsed():
    """The extraction finds what the README uses, so the check above checks them."""
    found = " ".join(invocations(read()))
    for expected in ("mirror install --trusted-key release.pub models.hub",
                     "mirror pack megengine/models --lock models.lock --update -o models.hub",
                     "mirror completion bash", "mirror install -", "mirror run -- python"):
        assert expected in found, expected


def test_the_option_check_can_fail():
    for wrong in ("mirror verify --key release.pub models.hub",
                  "mirror install --trusted-keys /etc/keys models.hub",
                  "mirror frobnicate models.hub", "mirror downloads purge",
                  "mirror list --format json", "mirror export megengine/models -q -o x.hub"):
        assert problems(wrong), wrong
    for right in ("mirror -v pack megengine/models -o - --rewrite A=B",
                  "mirror ls --long", "mirror downloads clean --older-than 7 -n",
                  "mirror run -- python train.py --epochs 3", "mirror gc -h"):
        assert not problems(right), problems(right)


# --- exit codes and links -------------------------------------------------------------

def test_the_exit_code_table_is_the_codes_mirror_exits_with():
    rows = [line for line in section(read(), "## Exit codes").splitlines()
            if line.startswith("| ") and not line.startswith("| code")]
    listed = {int(c) for row in rows for c in re.findall(r"\d+", row.split("|")[1])}
    assert listed == {int(c) for c in ExitCode} | {125, 126, 127}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    prose = FENCE.sub("", read(path))
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", prose, re.M)}


@pytest.mark.parametrize("doc", USER_DOCS, ids=os.path.basename)
def test_every_relative_link_resolves(doc):
    prose = FENCE.sub("", read(doc))
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert links
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(doc), target)) if target else doc
        if not os.path.exists(path):
            broken.append(f"{link}: no such file")
        elif anchor and path.endswith(".md") and anchor not in anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {os.path.relpath(path, ROOT)}")
    assert not broken, "\n".join(broken)


def test_the_readme_stays_short_and_links_the_docs():
    text = read()
    assert len(text.splitlines()) <= 350
    for doc in ("bundle-format.md", "architecture.md", "benchmarks.md", "json.md",
                "transcript-network.md", "trust.md", "development.md"):
        assert f"(docs/{doc}" in text, doc
    assert "docs/development.md#not-done-yet" in text
