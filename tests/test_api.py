"""The public API: every exported name resolves to the documented object, even after every
submodule has been imported (a submodule must never shadow a function of the same name)."""

from __future__ import annotations

import importlib
import pkgutil

import rebasin


def test_exports_are_the_functions_not_modules() -> None:
    for mod in pkgutil.walk_packages(rebasin.__path__, "rebasin."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    for name in rebasin.__all__:
        obj = getattr(rebasin, name)
        assert not isinstance(obj, type(rebasin)), name
    assert callable(rebasin.permute) and callable(rebasin.match) and callable(rebasin.interpolate)
