"""No rollback: installing an older bundle again changes neither which commit a branch
names nor which bytes a weight URL stands for.

The repo here serves one weight URL whose bytes change between two commits, as a
retrained model published under the same name would.
"""

from __future__ import annotations

import mirror
import mirror.hub
from mirror.installer import InstallOptions, install
from mirror.packer import PackOptions, pack
from tests.conftest import MIRROR, run, same_weights


def test_an_older_bundle_installed_again_rolls_back_neither_ref_nor_weight(
        retrained, upstream, home):
    url, served, commits, bundles = retrained
    install(bundles[1])
    install(bundles[2])
    again = install(bundles[1])
    assert list(map(str, again.refs_set)) == []
    assert list(map(str, again.refs_kept)) == [
        f"roll/models:master stays at newer {commits[2][:12]} (use --force to move it back)"]
    import megengine.hub

    with mirror.patch_megengine(store=mirror.Store()):
        # a bare URL: the bytes the default branch pins, not the last bundle's
        assert same_weights(megengine.hub.load_serialized_obj_from_url(url), served[2])
        assert same_weights(mirror.hub.load_serialized_obj_from_url(url), served[2])
    net = mirror.hub.load("roll/models", "net", git_host=upstream.git.host, pretrained=True)
    assert net.revision == "2" and same_weights(net.state_dict(), served[2])
    # and each commit keeps its own pins
    old = mirror.hub.load("roll/models", "net", git_host=upstream.git.host, pretrained=True,
                          commit=commits[1])
    assert old.revision == "1" and same_weights(old.state_dict(), served[1])


def test_an_older_bundle_never_moves_a_ref_a_newer_one_set(retrained, upstream, home,
                                                            tmp_path, monkeypatch):
    """Upstream moved master back to v1 (a bad release withdrawn), in a bundle made
    after v2's; v2's bundle installed again must not undo that, though v2 descends
    from v1."""
    url, served, commits, bundles = retrained
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "3000")
    withdrawn = str(tmp_path / "withdrawn.hub")
    pack([f"roll/models:master@{commits[1]}"], withdrawn,
         PackOptions(git_host=upstream.git.host, protocol="http", progress=False))
    install(bundles[2])
    install(withdrawn, options=InstallOptions(force=True))  # the operator takes it back
    again = install(bundles[2])
    assert list(map(str, again.refs_set)) == []
    assert list(map(str, again.refs_kept)) == [
        f"roll/models:master stays at {commits[1][:12]}: bundle withdrawn.hub, which moved it "
        f"there, was made 1970-01-01 00:50:00 UTC, after this one (1970-01-01 00:33:20 UTC); "
        f"an older bundle never moves a ref (--force moves it)"]
    r = run(MIRROR + ["install", bundles[2]])
    assert r.returncode == 0 and "an older bundle never moves a ref" in r.stdout + r.stderr
    net = mirror.hub.load("roll/models", "net", git_host=upstream.git.host, pretrained=True)
    # v1's code, with the bytes its URL served when the withdrawing bundle was packed
    assert net.revision == "1" and same_weights(net.state_dict(), served[2])
    assert list(map(str, install(bundles[2], options=InstallOptions(force=True)).refs_set)) == [
        f"roll/models:master -> {commits[2][:12]} (was {commits[1][:12]})"]
