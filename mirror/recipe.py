"""Bundle recipes: a reviewed TOML file that says what a bundle holds.

```toml
# bundles/models.toml
output = "models.hub"            # relative to this file; -o overrides
lock = "models.lock"             # pins written once, then enforced

[[repo]]
spec = "megengine/models:master"

[options]                        # any pack option, with its CLI meaning
entries = ["resnet18"]
weights = ["https://example.org/extra/vocab.txt"]
exclude = ["*_fp16.pkl"]
rewrites = ["https://github.com=https://git.corp.example/github"]
```

Options given on the command line add to a list option and replace any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from .errors import MirrorError

# Recipe keys -> pack() keywords (the CLI's --weights is pack's extra_weights).
OPTIONS = {"git_host": "git_host", "protocol": "protocol", "weights": "extra_weights",
           "rewrites": "rewrites", "exclude": "exclude", "entries": "entries",
           "trace": "trace", "follow_nested": "follow_nested",
           "allow_unresolved": "allow_unresolved", "allow_unreachable": "allow_unreachable",
           "jobs": "jobs"}
LISTS = {"extra_weights", "rewrites", "exclude", "entries"}
TYPES = {**{k: list for k in LISTS}, "git_host": str, "protocol": str, "trace": bool,
         "follow_nested": bool, "allow_unresolved": bool, "allow_unreachable": bool,
         "jobs": int}


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: the specs, where the bundle and lock go, and pack options."""

    path: str
    specs: List[str]
    output: str | None = None
    lock: str | None = None
    options: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> Recipe:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise MirrorError(f"recipe {path}: {e}") from None
        where = os.path.dirname(os.path.abspath(path))
        repos = data.get("repo", [])
        if not isinstance(repos, list) or not repos or not all(
                isinstance(r, dict) and isinstance(r.get("spec"), str) for r in repos):
            raise MirrorError(f"recipe {path}: needs at least one [[repo]] with a spec")
        options = data.get("options", {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise MirrorError(f"recipe {path}: unknown option(s) {', '.join(unknown)} (known: "
                              f"{', '.join(sorted(OPTIONS))})")
        extra = sorted(set(data) - {"repo", "options", "output", "lock"})
        if extra:
            raise MirrorError(f"recipe {path}: unknown key(s) {', '.join(extra)}")

        for key, value in options.items():
            kind = TYPES[OPTIONS[key]]
            ok = (isinstance(value, list) and all(isinstance(v, str) for v in value)) \
                if kind is list else (isinstance(value, kind) and not (
                    kind is int and (isinstance(value, bool) or value < 1)))
            if not ok:
                what = {list: "a list of strings", bool: "true or false",
                        int: "a whole number of at least 1", str: "a string"}[kind]
                raise MirrorError(f"recipe {path}: option {key} must be {what}, "
                                  f"not {value!r}")

        def near(p: str | None) -> str | None:
            return os.path.join(where, p) if p else None

        return cls(path, [r["spec"] for r in repos], near(data.get("output")),
                   near(data.get("lock")), {OPTIONS[k]: v for k, v in options.items()})

    def merged(self, cli: Dict[str, Any]) -> Dict[str, Any]:
        """pack() keywords: this recipe's, with what the command line gave on top."""
        out = dict(self.options)
        for key, value in cli.items():
            if key in LISTS:
                out[key] = list(out.get(key, [])) + list(value)
            elif value is not None:
                out[key] = value
        if self.lock and "lock" not in out:
            out["lock"] = self.lock
        return out
