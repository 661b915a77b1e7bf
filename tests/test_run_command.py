"""``mirror run -- CMD`` as a command line: exit statuses as ``env`` has them, only its
hook folder added to ``PYTHONPATH``, a shadowed ``sitecustomize`` still run, and a
Python that cannot import mirror refused before the program runs.

Real processes throughout: ``python -m mirror run`` with the interpreter mirror is
installed in (tests/conftest's ``run`` is not used: it puts the project on
``PYTHONPATH``, which would hide what ``mirror run`` itself adds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from mirror import patch
from tests.conftest import ROOT

HOOK = patch.RUN_DIR


def mirror_run(command, tmp_path, pythonpath=None, **env):
    """``python -m mirror run -- command`` from ``tmp_path``, with ``PYTHONPATH`` exactly
    ``pythonpath`` (unset when None) and an empty store."""
    full = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"),
                MGE_HOME=str(tmp_path / "mge"), **env)
    full.pop("PYTHONPATH", None)
    if pythonpath is not None:
        full["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "mirror", "run", "--", *command], env=full,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)


def test_a_missing_command_exits_127(tmp_path):
    r = mirror_run(["mirror-no-such-command", "arg"], tmp_path)
    assert r.returncode == 127, r.stderr
    assert r.stderr.strip() == "mirror run: mirror-no-such-command: command not found"
    r = mirror_run([str(tmp_path / "absent.sh")], tmp_path)
    assert r.returncode == 127, r.stderr
    assert r.stderr.strip() == f"mirror run: {tmp_path / 'absent.sh'}: No such file or directory"


def test_a_command_that_cannot_be_executed_exits_126(tmp_path):
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o644)
    r = mirror_run([str(script)], tmp_path)
    assert r.returncode == 126, r.stderr
    assert r.stderr.strip() == f"mirror run: {script}: Permission denied"
    assert r.stdout == ""
    r = mirror_run([str(tmp_path)], tmp_path)  # a directory
    assert r.returncode == 126, r.stderr


def test_the_programs_exit_status_is_mirror_runs(tmp_path):
    r = mirror_run([sys.executable, "-c", "import sys; print('ran'); sys.exit(7)"], tmp_path)
    assert (r.returncode, r.stdout) == (7, "ran\n"), r.stderr


def test_only_the_hook_folder_is_added_to_pythonpath(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    show = "import json, os; print(json.dumps(os.environ['PYTHONPATH'].split(os.pathsep)))"
    r = mirror_run([sys.executable, "-c", show], tmp_path, pythonpath=str(theirs))
    assert r.returncode == 0, r.stderr
    paths = json.loads(r.stdout)
    assert paths == [HOOK, str(theirs)]
    assert ROOT not in paths and sysconfig.get_paths()["purelib"] not in paths
    # Under a mirror run already (PYTHONPATH holds the hook): the hook once, still first.
    r = mirror_run([sys.executable, "-c", show], tmp_path,
                   pythonpath=os.pathsep.join([str(theirs), HOOK]))
    assert json.loads(r.stdout) == [HOOK, str(theirs)], r.stderr


def test_a_shadowed_sitecustomize_still_runs(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    marker = tmp_path / "marker"
    (theirs / "sitecustomize.py").write_text(
        "import os, sys\n"
        "os.environ['THEIR_SITECUSTOMIZE'] = __name__\n"
        "hooked = any(type(f).__name__ == '_PatchOnImport' for f in sys.meta_path)\n"
        f"open({str(marker)!r}, 'w').write('hook installed' if hooked else 'no hook')\n")
    program = ("import json, os, sitecustomize, megengine.hub\n"
               "load = megengine.hub.load\n"  # patched: mirror.hub.load, partially applied
               "print(json.dumps([os.environ.get('THEIR_SITECUSTOMIZE'), sitecustomize.__file__,"
               " getattr(load, 'func', load).__module__]))\n")
    r = mirror_run([sys.executable, "-c", program], tmp_path, pythonpath=str(theirs))
    assert r.returncode == 0, r.stderr
    ran_as, module_file, load_from = json.loads(r.stdout.strip().splitlines()[-1])
    assert ran_as == "sitecustomize" and module_file == str(theirs / "sitecustomize.py")
    assert marker.read_text() == "hook installed"  # it ran after the hook was in place
    assert load_from == "mirror.hub"  # and megengine.hub is patched


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python that cannot import mirror: a venv of the same base, without pip, which
    sees neither this venv's site-packages nor its editable install of mirror."""
    root = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   capture_output=True, timeout=120)
    python = str(root / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([python, "-c", "import mirror"], env=env, capture_output=True,
                           cwd=str(root), timeout=60)
    assert probe.returncode != 0, "the bare venv can import mirror: nothing to refuse"
    return python


def test_a_python_that_cannot_import_mirror_is_refused_before_the_program_runs(
        tmp_path, bare_python):
    created = tmp_path / "created"
    script = tmp_path / "program.py"
    script.write_text("import sys\nopen(sys.argv[1], 'w').write('ran unpatched')\n")
    r = mirror_run([bare_python, str(script), str(created)], tmp_path)
    assert r.returncode == patch.CANNOT_IMPORT_MIRROR == 125, r.stderr
    assert not created.exists()
    assert r.stdout == ""
    [line] = r.stderr.splitlines()
    assert line.startswith(f"mirror run: {bare_python} cannot import mirror "
                           "(ModuleNotFoundError: No module named 'mirror')")
    assert "install mirror into that interpreter" in line
    assert f"run the command with the Python mirror is installed in ({sys.executable})" in line


def test_the_hook_and_the_library_agree_on_the_refusal_status():
    source = open(os.path.join(HOOK, "sitecustomize.py")).read()
    assert f"CANNOT_IMPORT_MIRROR = {patch.CANNOT_IMPORT_MIRROR} " in source


def test_a_program_with_its_own_module_named_mirror_keeps_it(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "mirror.py").write_text("X = 'its own'\n")
    (app / "main.py").write_text("import mirror\nprint(mirror.X)\n")
    r = mirror_run([sys.executable, str(app / "main.py")], tmp_path)
    assert (r.returncode, r.stdout) == (0, "its own\n"), r.stderr


def test_a_second_hook_folder_on_pythonpath_is_not_chained_in_a_loop(tmp_path):
    other = tmp_path / "other-install-hook"
    other.mkdir()
    shutil.copy(os.path.join(patch.RUN_DIR, "sitecustomize.py"), other)
    r = mirror_run([sys.executable, "-c", "print('ran')"], tmp_path, pythonpath=str(other))
    assert (r.returncode, r.stdout) == (0, "ran\n"), r.stderr


def test_empty_pythonpath_entries_keep_meaning_the_current_folder(tmp_path):
    (tmp_path / "helper_mod.py").write_text("NAME = 'found in the current folder'\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.py").write_text("import helper_mod\nprint(helper_mod.NAME)\n")
    r = mirror_run([sys.executable, "sub/s.py"], tmp_path, pythonpath=":")
    assert (r.returncode, r.stdout) == (0, "found in the current folder\n"), r.stderr
