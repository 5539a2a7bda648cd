"""Where the built-in data folders (judges, recipes) live, installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

import alignkit


def builtin_dir(name: str) -> Path:
    """The folder of built-in `name` files ("judges", "recipes").

    An installed wheel carries them inside the package (pyproject's force-include); a source
    checkout keeps them at the repository's top level.
    """
    package = Path(alignkit.__file__).resolve().parent
    for candidate in (package / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"built-in folder {name!r} not found in {package} or {package.parent}")
