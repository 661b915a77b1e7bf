"""mirror: take MegEngine Hub repos and their pretrained weights across an air gap."""

__version__ = "0.1.0"
