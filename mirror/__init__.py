"""mirror: take MegEngine Hub repos and their pretrained weights across an air gap."""

__version__ = "0.1.0"


def patch_megengine(store=None):
    """Redirect every ``megengine.hub`` call in this process to the store (see mirror.patch)."""
    from .patch import patch_megengine as patch

    return patch(store)
