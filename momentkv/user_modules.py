"""Import the user's own modules, those that register custom scorers or prefill compressors, by name or path.

A policy may name a scorer that a user's module registers with ``@momentkv.register_scorer``. Without a
package declaring it as an entry point, nothing would import that module; the CLI's ``--import MODULE`` and
lm-eval's ``import=`` model argument both import it with :func:`import_modules` before any policy is loaded.
``MODULE`` is a dotted module name, importable from the current folder, or the path of a ``.py`` file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path


def _import_file(path: Path) -> None:
    name = f"_imported_{path.stem}_{abs(hash(str(path.resolve())))}"  # unique; never a real module name
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def import_modules(names: list[str]) -> str | None:
    """Import each of ``names``; ``None`` when all imported, else a message naming the one that failed."""
    for name in names:
        path = Path(name)
        try:
            if name.endswith(".py") or path.is_file():
                if not path.is_file():
                    return f"--import {name}: no such file"
                _import_file(path)
            else:
                if os.getcwd() not in sys.path:  # a module next to the user, as `python -m` would find it
                    sys.path.insert(0, os.getcwd())
                importlib.import_module(name)
        except Exception as err:  # the user's module: any failure is reported, never a traceback
            return f"--import {name}: cannot import it: {type(err).__name__}: {err}"
    return None
