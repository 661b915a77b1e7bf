"""mirror: take MegEngine Hub repos and their pretrained weights across an air gap.

The public API, for programs (the ``mirror`` command is a thin shell over it)::

    import mirror

    report = mirror.pack(["megengine/models@3f2a9c1"], "models.hub")      # connected host
    report = mirror.install("models.hub")                                 # isolated host
    mirror.verify_bundle("models.hub")          # every byte, installs nothing
    mirror.verify_store()                       # every blob, snapshot, ref and weight
    for repo in mirror.list_repos(): ...        # what the store holds
    mirror.remove("megengine/models:dev"); mirror.gc()
    mirror.seed()                               # MegEngine's own cache, from the store
    mirror.push(["models.hub"], "oci://registry:5000/models:v1")       # an OCI registry
    mirror.install(mirror.RegistrySource("oci://registry:5000/models:v1"))
    model = mirror.hub.load("megengine/models", "resnet18", pretrained=True)
    mirror.patch_megengine()                    # unmodified megengine.hub calls, offline

Everything is imported on first use, so ``import mirror`` stays light (``mirror
run`` imports it in every program it starts). Names not listed in ``__all__``, and
modules and names that start with ``_``, are internal.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute): where each public name lives.
_EXPORTS = {
    "pack": ("packer", "pack"),
    "PackOptions": ("pack_options", "PackOptions"),
    "PackReport": ("packer", "PackReport"),
    "install": ("installer", "install"),
    "InstallOptions": ("installer", "InstallOptions"),
    "InstallReport": ("installer", "InstallReport"),
    "verify_bundle": ("bundle", "verify"),
    "read_manifest": ("bundle", "read_manifest"),
    "Store": ("store", "Store"),
    "patch_megengine": ("patch", "patch_megengine"),
    "settings": ("config", "settings"),
    "push": ("oci", "push"),
    "pull": ("oci", "pull"),
    "RegistrySource": ("oci", "RegistrySource"),
    "Connection": ("reference", "Connection"),
    "errors": ("errors", None),
    "hub": ("hub", None),
}

__all__ = sorted(_EXPORTS) + ["export_bundle", "gc", "list_repos", "remove", "seed",
                              "take_inventory", "verify_store", "__version__"]


def list_repos(home: str | None = None) -> list:
    """Every repo installed in the store at ``home`` (default: the configured one),
    with its refs and snapshots, as :class:`mirror.store.RepoSummary` objects."""
    from .store import Store

    return Store(home).repos()


def verify_store(home: str | None = None, progress: bool = False) -> Any:
    """Re-hash every blob of the store at ``home`` and check every snapshot, ref and
    weight record. Returns a :class:`mirror.housekeeping.VerifyReport`, whose ``ok``
    is False and ``problems`` lists each problem when anything fails; it raises only
    for a store that cannot be read at all."""
    from .housekeeping import verify
    from .store import Store

    return verify(Store.existing(home), progress=progress)


def remove(spec: str, home: str | None = None, dry_run: bool = False) -> Any:
    """Remove a repo (``owner/name``), a ref (``owner/name:ref``) or a commit
    (``owner/name@commit``) from the store at ``home``, then every blob nothing else
    uses. Returns a :class:`mirror.housekeeping.Plan` of what went (or, with
    ``dry_run``, would go). Raises :class:`mirror.errors.NotInstalledError` or
    :class:`mirror.errors.StoreError`."""
    from .housekeeping import remove as remove_from
    from .refs import RepoSpec
    from .store import Store

    RepoSpec.parse(spec)  # a bad spec is said first, store or not
    return remove_from(Store.existing(home), spec, dry_run=dry_run)


def take_inventory(home: str | None = None) -> Any:
    """What the store at ``home`` holds (repos, refs, snapshots, weight pins, blobs), as
    a :class:`mirror.inventory.Inventory` whose ``to_bytes()`` is the file ``mirror
    inventory`` writes, for a connected host to pack only what is missing."""
    from .inventory import take
    from .store import Store

    return take(Store(home))


def export_bundle(specs: Any, output: str, home: str | None = None, sign: str | None = None,
                  since: str | None = None, split_size: str | None = None) -> Any:
    """Write to ``output`` a bundle of what ``specs`` name in the store at ``home``: repos
    (``owner/name``), refs (``owner/name:ref``) or commits (``owner/name@commit``), as
    ``remove`` takes them; from the store alone, no network. What one installed bundle
    held exactly is that bundle made again (same id, same signature); else a new one,
    signed with the private key at ``sign`` if given; with ``since`` (an inventory, a
    bundle or a lock file of the target), a delta; with ``split_size`` (``4G``), in
    parts of at most that size (:mod:`mirror.parts`). Returns a
    :class:`mirror.export.ExportReport`. Raises :class:`mirror.errors.NotInstalledError`
    or :class:`mirror.errors.StoreError`."""
    from .export import export
    from .store import Store

    return export(Store(home), specs, output, sign=sign, since=since, split_size=split_size)


def gc(home: str | None = None, dry_run: bool = False) -> Any:
    """Delete what no snapshot, ref or weight of the store at ``home`` references, and
    abandoned work. Returns a :class:`mirror.housekeeping.Plan`. Raises
    :class:`mirror.errors.StoreError` while an install is running."""
    from .housekeeping import gc as collect
    from .store import Store

    return collect(Store.existing(home), dry_run=dry_run)


def seed(home: str | None = None, megengine_home: str | None = None,
         versions: tuple = ()) -> Any:
    """Make MegEngine Hub's own cache at ``megengine_home`` (default: the configured
    ``MGE_HOME``) match the store at ``home``, from the store alone: seed what is
    missing, move what a ref moved, delete the store's seeds of what is gone, for
    ``versions`` (default: the installed MegEngine's) and every version seeded before.
    Returns a :class:`mirror.megengine_cache.SeedReport`."""
    from .config import settings
    from .installer import installed_versions
    from .megengine_cache import reconcile
    from .store import Store

    return reconcile(Store.existing(home), megengine_home or settings().megengine_home,
                     installed_versions(versions))


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mirror' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = importlib.import_module(f".{module_name}", __name__)
    return module if attribute is None else getattr(module, attribute)
