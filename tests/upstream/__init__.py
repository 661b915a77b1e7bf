"""A real upstream on the loopback interface, for the tests and the demo.

- :class:`GitServer`: smart HTTP through ``git http-backend``, repos as ``owner/name``.
- :class:`WeightServer`: plain HTTP file server with ``Range`` and fault switches.
- :func:`build_demo_repo`: a MegEngine model family with real weights and history.
"""

from .demorepo import DemoRepo, build_demo_repo
from .gitserver import GitServer
from .weightserver import WeightServer

__all__ = ["DemoRepo", "GitServer", "WeightServer", "build_demo_repo"]
