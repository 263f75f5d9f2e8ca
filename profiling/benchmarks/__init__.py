"""One module per benchmark; each registers itself with `@benchlib.register(name)` on import.

Every module in this package is imported by `load_all()`, so adding a benchmark is adding a file.
Modules must stay cheap to import (torch and megatron-core are imported inside the functions that
run): the CLI imports all of them to list names, and spawned ranks import them to unpickle their
worker function.
"""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    """Import every benchmark module of this package (registering its benchmarks)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
