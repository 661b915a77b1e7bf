"""A demo hub repo: a real MegEngine model family with real weights and a history.

History (author dates fixed, so commit ids depend only on the weight server's port)::

    c1  initial: mlp and small_cnn, weights r1          master~2
    c2  retrain mlp (r2)                                master~1, tag v1.0 (annotated)
    c3  retrain small_cnn (r3)                          master
    c4  dev: retrain mlp (r4)                           dev

Each commit's code says which revision it is (``model.revision``), so a test can
tell which commit's code and weights were loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict

import numpy as np

from .weightserver import WeightServer

MLP_PY = '''\
import megengine.functional as F
import megengine.module as M

from . import REVISION, labels


class MLP(M.Module):
    """Two linear layers over 8 features."""

    def __init__(self, in_features=8, hidden=16, num_classes=4):
        super().__init__()
        self.revision = REVISION
        self.labels = labels()
        self.fc1 = M.Linear(in_features, hidden)
        self.fc2 = M.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))
'''

CNN_PY = '''\
import megengine.functional as F
import megengine.module as M

from .. import REVISION, labels


class SmallCNN(M.Module):
    """Two 3x3 convolutions and a linear head, for 3x8x8 images."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.revision = REVISION
        self.labels = labels()
        self.conv1 = M.Conv2d(3, 8, 3, padding=1)
        self.conv2 = M.Conv2d(8, 8, 3, padding=1)
        self.fc = M.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.avg_pool2d(x, 8)
        return self.fc(F.flatten(x, 1))
'''

INIT_PY = '''\
import os

REVISION = "{revision}"


def labels():
    # An asset read next to the code: a snapshot must keep every file.
    with open(os.path.join(os.path.dirname(__file__), "labels.txt")) as fh:
        return fh.read().split()
'''

HUBCONF_PY = '''\
"""Tiny demo models for mirror: an MLP and a small CNN."""
from megengine import hub

from tinynets.mlp import MLP
from tinynets.vision.cnn import SmallCNN

dependencies = ["megengine", "numpy"]

WEIGHTS = "{base}/weights/"


@hub.pretrained(WEIGHTS + "{mlp}")
def mlp(**kwargs):
    """A two-layer perceptron over 8 features (revision {revision})."""
    return MLP(**kwargs)


def mlp_from_url(pretrained=True, **kwargs):
    """The MLP, its weights fetched by the code itself (revision {revision})."""
    model = MLP(**kwargs)
    if pretrained:
        model.load_state_dict(hub.load_serialized_obj_from_url(WEIGHTS + "{mlp}"))
    return model


def mlp_via_hub(pretrained=True, **kwargs):
    """This repo's default-branch MLP, through megengine.hub.load (revision {revision})."""
    return hub.load("demo/tinynets", "mlp", pretrained=pretrained, **kwargs)


@hub.pretrained(
    "{base}/weights/"
    "{cnn}"
)
def small_cnn(**kwargs):
    """A two-convolution network for 3x8x8 images (revision {revision})."""
    return SmallCNN(**kwargs)
'''

LABELS = "cat dog bird fish\n"


@dataclass
class DemoRepo:
    """What was built: where it is served, its commits, refs and weights."""

    owner: str
    name: str
    bare: str
    commits: Dict[str, str] = field(default_factory=dict)  # "c1".. -> commit id
    branches: Dict[str, str] = field(default_factory=dict)
    tags: Dict[str, str] = field(default_factory=dict)
    urls: Dict[str, Dict[str, str]] = field(default_factory=dict)  # commit -> entry -> URL
    revisions: Dict[str, str] = field(default_factory=dict)  # commit -> REVISION in its code
    weights: Dict[str, bytes] = field(default_factory=dict)  # URL -> bytes served

    @property
    def repo(self) -> str:
        return f"{self.owner}/{self.name}"


# Parameter shapes of the models above; load_state_dict is strict, so a wrong
# shape here fails every load test rather than passing silently.
SHAPES = {
    "mlp": {"fc1.weight": (16, 8), "fc1.bias": (16,), "fc2.weight": (4, 16), "fc2.bias": (4,)},
    "small_cnn": {"conv1.weight": (8, 3, 3, 3), "conv1.bias": (1, 8, 1, 1),
                  "conv2.weight": (8, 8, 3, 3), "conv2.bias": (1, 8, 1, 1),
                  "fc.weight": (4, 8), "fc.bias": (4,)},
}


def make_weights(entry: str, seed: int) -> bytes:
    """A state dict for ``entry`` from seeded random numbers, saved with ``megengine.save``."""
    import megengine

    rng = np.random.RandomState(seed)
    state = {k: (rng.standard_normal(shape) * 0.5).astype(np.float32)
             for k, shape in sorted(SHAPES[entry].items())}
    buf = io.BytesIO()
    megengine.save(state, buf)
    return buf.getvalue()


def git(cwd: str, *args: str, date: str = "2024-01-01T00:00:00Z") -> str:
    """Run git in ``cwd`` as a fixed author at a fixed date (so commit ids repeat)."""
    env = dict(os.environ, GIT_AUTHOR_NAME="Demo", GIT_AUTHOR_EMAIL="demo@example.invalid",
               GIT_COMMITTER_NAME="Demo", GIT_COMMITTER_EMAIL="demo@example.invalid",
               GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date, GIT_CONFIG_GLOBAL="/dev/null",
               GIT_CONFIG_NOSYSTEM="1")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def build_demo_repo(git_root: str, weights: WeightServer, owner: str = "demo",
                    name: str = "tinynets", url_base: str | None = None) -> DemoRepo:
    """Create the demo repo as a bare repo at ``git_root/owner/name`` and serve its weights.

    ``url_base`` is what hubconf.py names as the weight host (default: the weight
    server itself); another one, such as a public host, is served through
    ``mirror pack --rewrite``.
    """
    url_base = url_base or weights.base_url
    bare = os.path.join(git_root, owner, name)
    demo = DemoRepo(owner, name, bare)
    files: Dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="demo-repo-") as work:
        git(work, "init", "-q", "-b", "master")

        def commit(label: str, revision: str, mlp_seed: int, cnn_seed: int, day: int) -> str:
            urls = {}
            for entry, seed in (("mlp", mlp_seed), ("small_cnn", cnn_seed)):
                data = make_weights(entry, seed)
                # A hex token in the name, as real hub files have; never a checksum to trust.
                fname = f"{entry}_r{seed}_{hashlib.sha256(data).hexdigest()[:8]}.pkl"
                weights.add(f"weights/{fname}", data)
                urls[entry] = f"{url_base}/weights/{fname}"
                demo.weights[urls[entry]] = data
            files.update({
                "hubconf.py": HUBCONF_PY.format(
                    base=url_base, revision=revision,
                    mlp=urls["mlp"].rsplit("/", 1)[1], cnn=urls["small_cnn"].rsplit("/", 1)[1]),
                "tinynets/__init__.py": INIT_PY.format(revision=revision),
                "tinynets/labels.txt": LABELS,
                "tinynets/mlp.py": MLP_PY,
                "tinynets/vision/__init__.py": "",
                "tinynets/vision/cnn.py": CNN_PY,
                "README.md": f"# tinynets\n\nDemo models, revision {revision}.\n",
            })
            for path, text in files.items():
                os.makedirs(os.path.dirname(os.path.join(work, path)), exist_ok=True)
                with open(os.path.join(work, path), "w") as fh:
                    fh.write(text)
            git(work, "add", "-A")
            date = f"2024-01-{day:02d}T00:00:00Z"
            git(work, "commit", "-q", "-m", f"{label}: revision {revision}", date=date)
            sha = git(work, "rev-parse", "HEAD")
            demo.commits[label], demo.urls[sha], demo.revisions[sha] = sha, urls, revision
            return sha

        commit("c1", "1", mlp_seed=1, cnn_seed=1, day=1)
        c2 = commit("c2", "2", mlp_seed=2, cnn_seed=1, day=2)
        git(work, "tag", "-a", "v1.0", "-m", "release 1.0", date="2024-01-02T12:00:00Z")
        c3 = commit("c3", "3", mlp_seed=2, cnn_seed=3, day=3)
        git(work, "checkout", "-q", "-b", "dev")
        c4 = commit("c4", "4-dev", mlp_seed=4, cnn_seed=3, day=4)
        git(work, "checkout", "-q", "master")
        demo.branches.update(master=c3, dev=c4)
        demo.tags["v1.0"] = c2

        os.makedirs(os.path.dirname(bare), exist_ok=True)
        git(git_root, "clone", "-q", "--bare", work, bare)
    return demo
