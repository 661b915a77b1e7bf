"""The public Python API: what `import mirror` offers a program, end to end."""

from __future__ import annotations

import inspect

import mirror
from mirror import bundle


def test_every_public_name_resolves_and_says_what_it_does():
    for name in mirror.__all__:
        value = getattr(mirror, name)
        if callable(value):
            assert inspect.getdoc(value), name


def test_mirror_pack_stays_the_function_once_its_module_is_imported():
    import mirror.packer  # noqa: F401  (what the CLI and tests do)

    assert mirror.pack is mirror.packer.pack
    assert mirror.install.__module__ == "mirror.installer"


def test_install_verify_and_list_through_the_public_api(master_bundle, home, upstream):
    verified = mirror.verify_bundle(master_bundle)
    assert verified.bundle_id == bundle.bundle_id(bundle.read_manifest_bytes(master_bundle))
    report = mirror.install(master_bundle)
    assert report.bundle_id == verified.bundle_id and report.changed
    (repo,) = mirror.list_repos()
    master = upstream.demo.branches["master"]
    assert (repo.id.label, repo.commits) == ("demo/tinynets", [master])
    assert [(r.kind, r.name, r.commit) for r in repo.refs] == [("branch", "master", master)]
    assert mirror.verify_store().ok
    plan = mirror.remove("demo/tinynets", dry_run=True)
    assert plan.snapshots == [f"demo/tinynets@{master}"]


def test_a_patch_applied_twice_is_undone_once(home):
    import megengine.hub
    import megengine.hub.hub

    original = megengine.hub.hub.load
    patch = mirror.patch_megengine()
    assert megengine.hub.load is not original
    patch.apply()
    patch.undo()
    # MegEngine's own function again (under the dispatcher that answers snapshot code)
    assert inspect.unwrap(megengine.hub.hub.load) is inspect.unwrap(original)
    assert not patch.active
