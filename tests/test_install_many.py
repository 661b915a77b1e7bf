"""Several bundles in one `mirror install`: each verified and installed as it would
be alone, a folder standing for the bundles in it, a failure named at the end."""

import json
import os
import shutil

from tests.conftest import MIRROR, run, store_content


def _corrupt(good: str, out) -> str:
    data = bytearray(open(good, "rb").read())
    data[len(data) // 2] ^= 0xFF  # in a weight's frame: found only by reading it all
    out.write_bytes(bytes(data))
    return str(out)




def test_several_bundles_one_corrupt_leave_the_others_as_alone(master_bundle,
                                                                all_refs_bundle, tmp_path):
    bad = _corrupt(all_refs_bundle, tmp_path / "bad.hub")
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "many"))
    r = run(MIRROR + ["install", "--no-megengine-cache", master_bundle, bad, all_refs_bundle],
            env=env, netns=True)
    assert r.returncode == 3
    lines = r.stdout.splitlines()
    assert lines[0] == f"== {master_bundle}" and f"== {bad}" in lines
    assert lines[-1] == f"installed 2 of 3 bundles; failed: {bad}"
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"Error: {bad}: bad bundle {bad}")
    alone = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "alone"))
    for b in (master_bundle, all_refs_bundle):
        assert run(MIRROR + ["install", "--no-megengine-cache", b], env=alone).returncode == 0
    assert store_content(env["MGE_MIRROR_HOME"]) == store_content(alone["MGE_MIRROR_HOME"])


def test_a_folder_stands_for_its_bundles_and_json_reports_each(master_bundle, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(master_bundle, folder / "a.hub")
    (folder / "README.txt").write_text("not a bundle")
    env = dict(os.environ, MGE_MIRROR_HOME=str(tmp_path / "store"))
    r = run(MIRROR + ["install", "--no-megengine-cache", "--json", str(folder),
                      master_bundle], env=env)
    assert r.returncode == 0, r.stderr
    reports = json.loads(r.stdout)["bundles"]
    assert [x["bundle"] for x in reports] == [str(folder / "a.hub"), master_bundle]
    assert [s["installed"] for s in reports[0]["snapshots"]] == [True]
    assert [s["installed"] for s in reports[1]["snapshots"]] == [False]
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(MIRROR + ["install", str(empty)], env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: {empty}: a folder with no bundle in it (no *.hub file)"
