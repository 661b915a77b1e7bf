"""A synthetic model zoo, to trace: many entrypoints whose models hold hundreds of MiB
each (and keep them, as a zoo's registries and caches do), and the ways a real zoo's
entrypoints fail: one that needs more memory than a trace may use, one that hangs,
one that crashes the interpreter, one that builds a pretrained backbone inside its
constructor whatever ``pretrained`` says, one that loads another repo.

Every entrypoint that runs appends its name to the file ``$ZOO_LOG`` names, so a test
can tell which ones a trace ran."""

from __future__ import annotations

import io
from typing import Dict

import numpy as np

BACKBONE = "backbone"
FAILING = {"huge": "out of memory", "huge_tensor": "out of memory",
           "greedy": "out of memory", "hang": "timed out",
           "crash": "killed by signal 11 (SIGSEGV)"}


def weights(seed: int) -> bytes:
    """A small state dict saved with ``megengine.save``."""
    import megengine

    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    megengine.save({"w": rng.standard_normal((4, 4)).astype(np.float32)}, buf)
    return buf.getvalue()


def names(big: int, extras: bool = True, transformer: bool = False) -> list:
    """The weights the zoo's code names: one per big entry, the detector's and its
    backbone's (and the transformer's)."""
    out = [f"big_{i}" for i in range(big)]
    if extras:
        out += ["detector", BACKBONE, "greedy"]
    if transformer:
        out.append("transformer")
    return out


def hubconf(urls: Dict[str, str], big: int, big_mib: int, extras: bool = True,
            transformer: bool = False) -> str:
    """``hubconf.py`` of the zoo: ``big`` entrypoints of ``big_mib`` MiB of parameters
    each, with the weight URLs in ``urls`` (by :func:`names`)."""
    out = [_HEAD.format(floats=big_mib * (1 << 20) // 4)]
    for i in range(big):
        out.append(f"@hub.pretrained({urls[f'big_{i}']!r})\n"
                   f"def big_{i}(**kwargs):\n"
                   f"    _called('big_{i}')\n"
                   f"    model = _Big()\n"
                   f"    _KEEP.append(model)  # a zoo's registry: nothing is freed\n"
                   f"    return model\n\n")
    if extras:
        out.append(_EXTRAS.format(detector=urls["detector"], backbone=urls[BACKBONE],
                                  greedy=urls["greedy"]))
    if transformer:
        out.append(_TRANSFORMER.format(url=urls["transformer"]))
    return "".join(out)


_HEAD = '''import os
import time

import megengine.module as M
import numpy as np
from megengine import Parameter, hub

_KEEP = []


def _called(name):
    log = os.environ.get("ZOO_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(name + "\\n")


class _Big(M.Module):
    def __init__(self):
        super().__init__()
        self.w = Parameter(np.ones({floats}, dtype=np.float32))

    def forward(self, x):
        return x


'''

_EXTRAS = '''def huge(**kwargs):
    """Needs more memory than a trace may use: 3 GiB, touched."""
    _called("huge")
    block = np.ones(3 << 28, dtype=np.float32)
    _KEEP.append(block)
    return block


def huge_tensor(**kwargs):
    """The same through MegEngine's own allocator (which fails with a RuntimeError, not
    a MemoryError, under an address-space limit)."""
    _called("huge_tensor")
    import megengine.functional as F

    block = F.zeros((3 << 28,))
    _KEEP.append(block)
    return block


def greedy(**kwargs):
    """Asks for its weights, then runs out of memory: what it asked for is needed."""
    _called("greedy")
    state = hub.load_serialized_obj_from_url({greedy!r})
    _KEEP.append(np.ones(3 << 28, dtype=np.float32))
    return state


def daemon(**kwargs):
    """Leaves a process running behind it (its pid in $ZOO_PIDS)."""
    import subprocess

    child = subprocess.Popen(["sleep", "300"])
    pids = os.environ.get("ZOO_PIDS")
    if pids:
        with open(pids, "a") as fh:
            fh.write(f"{{child.pid}}\\n")
    return M.Linear(1, 1)


def hang(**kwargs):
    _called("hang")
    time.sleep(3600)


def crash(**kwargs):
    _called("crash")
    import ctypes

    ctypes.string_at(0)


@hub.pretrained({backbone!r})
def _backbone(**kwargs):
    return M.Linear(4, 4)


class _Detector(M.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _backbone(pretrained=True)  # whatever the caller asked for
        self.head = M.Linear(4, 4)

    def forward(self, x):
        return self.head(self.backbone(x))


@hub.pretrained({detector!r})
def detector(**kwargs):
    _called("detector")
    return _Detector()


def nested(pretrained=True, **kwargs):
    _called("nested")
    return hub.load("zoo/other", "tiny", pretrained=pretrained)


'''

_TRANSFORMER = '''class _Layer(M.Module):
    def __init__(self, d=1024, ff=4096):
        super().__init__()
        self.q, self.k, self.v, self.o = (M.Linear(d, d) for _ in range(4))
        self.f1, self.f2 = M.Linear(d, ff), M.Linear(ff, d)
        self.n1, self.n2 = M.LayerNorm(d), M.LayerNorm(d)

    def forward(self, x):
        return x


class _Encoder(M.Module):
    """A 24-layer, 1,024-wide transformer encoder: about 335M parameters."""

    def __init__(self):
        super().__init__()
        self.embedding = M.Embedding(30522, 1024)
        self.layers = [_Layer() for _ in range(24)]

    def forward(self, x):
        return x


@hub.pretrained({url!r})
def transformer(**kwargs):
    _called("transformer")
    return _Encoder()


'''
