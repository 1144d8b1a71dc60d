"""Importing a command's heavy modules at the moment it needs them, without the collector."""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def without_collector() -> Iterator[None]:
    """No collection while the block imports (the collector would scan the growing heap of modules
    several times over: a seventh of ``run``'s imports); what it made is then left out of later
    collections."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def imported(module: str) -> ModuleType:
    with without_collector():
        return importlib.import_module(module)
