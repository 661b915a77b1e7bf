"""Imported by Python at start-up under ``mirror run``: as soon as the program
imports ``megengine.hub``, point it at the mirror store (mirror.patch)."""

import importlib.machinery
import sys


class _PatchOnImport:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "megengine.hub":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            from mirror.patch import patch_megengine

            patch_megengine()

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
