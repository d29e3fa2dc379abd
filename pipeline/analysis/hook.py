"""The ``ds.kernelmap`` accessor registered by ``import pipeline``, without importing xarray.

xarray registers an accessor when the class is defined (in
:mod:`pipeline.analysis.maps`), and that module needs xarray.  So
``import pipeline`` calls :func:`register_accessor`: if xarray is already
imported, the accessor is registered at once; otherwise a finder placed first
on :data:`sys.meta_path` waits for xarray's first import, hands xarray's own
loader a wrapper that registers the accessor once xarray has run, and then
takes itself off the path (Python has no post-import hook of its own).  A mere
look-up (``importlib.util.find_spec("xarray")``, as libraries do to see what
is installed) leaves it in place.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["register_accessor"]

_MAPS = "pipeline.analysis.maps"


def _register() -> None:
    importlib.import_module(_MAPS)  # defining KernelMapAccessor registers it


def register_accessor() -> None:
    """Register ``ds.kernelmap`` now if xarray is imported, else right after xarray's first import."""
    if "xarray" in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("xarray", _register))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: gives module ``name`` the spec the other finders give, its loader wrapped."""

    def __init__(self, name: str, then: Callable[[], None]):
        self.name = name
        self.then = then
        self._asking = threading.local()  # set while this finder asks the others

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None):
        if fullname != self.name or getattr(self._asking, "now", False):
            return None
        self._asking.now = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._asking.now = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _ThenLoader(spec.loader, self._imported)
        return spec

    def _imported(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.then()


class _ThenLoader(importlib.abc.Loader):
    """``loader``, then ``then()`` once the module has run; the module keeps ``loader`` as its own."""

    def __init__(self, loader: importlib.abc.Loader, then: Callable[[], None]):
        self.loader = loader
        self.then = then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            self.then()
        except Exception as exc:  # xarray itself is imported all the same
            warnings.warn(f"kernelmap could not register the ds.kernelmap accessor: {exc!r}; "
                          f"import {_MAPS} to see why", RuntimeWarning, stacklevel=2)
