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
from typing import Dict, List, Mapping

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from .errors import MirrorError
from .pack_options import OptionValueError, PackOptions, convert, recipe_keys


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: the specs, where the bundle and lock go, and pack options."""

    path: str
    specs: List[str]
    output: str | None = None
    lock: str | None = None
    options: PackOptions = field(default_factory=PackOptions)

    @classmethod
    def load(cls, path: str) -> Recipe:
        """Read and check the recipe at ``path``; ``output`` and ``lock`` are resolved
        next to it. Raises :class:`MirrorError` naming the recipe and what is wrong (an
        unknown key or option, a value of the wrong type, no ``[[repo]]``)."""
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
        table = data.get("options", {})
        keys = _option_keys(path, table)
        extra = sorted(set(data) - {"repo", "options", "output", "lock"})
        if extra:
            raise MirrorError(f"recipe {path}: unknown key(s) {', '.join(extra)}")
        options = _options(path, table, keys)

        def near(p: str | None) -> str | None:
            return os.path.join(where, p) if p else None

        return cls(path, [r["spec"] for r in repos], near(data.get("output")),
                   near(data.get("lock")), options)

    def merged(self, cli: Mapping[str, object]) -> PackOptions:
        """The options to pack with: this recipe's, with what the command line gave
        (``cli``: field name -> value, only the options given) on top. A list given
        adds to the recipe's; any other value replaces it. Raises :class:`MirrorError`
        as :meth:`PackOptions.from_mapping`."""
        out = self.options.updated(cli)
        if self.lock and cli.get("lock") is None:
            out = out.updated({"lock": self.lock})
        return out


def _option_keys(path: str, table: object) -> Dict[str, str]:
    """Each key of a recipe's ``[options]`` -> the :class:`PackOptions` field it sets."""
    if not isinstance(table, dict):
        raise MirrorError(f"recipe {path}: [options] is not a table")
    keys = recipe_keys()
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise MirrorError(f"recipe {path}: unknown option(s) {', '.join(unknown)} (known: "
                          f"{', '.join(sorted(keys))})")
    return {key: keys[key] for key in table}


def _options(path: str, table: Mapping[str, object], keys: Mapping[str, str]) -> PackOptions:
    """A recipe's ``[options]``, each value checked against its field's type."""
    values = {}
    for key, value in table.items():
        try:
            values[keys[key]] = convert(keys[key], value)
        except OptionValueError as e:
            raise MirrorError(f"recipe {path}: option {key} {e}") from None
    return PackOptions.from_mapping(values)
