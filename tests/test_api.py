"""Every package and module states its public API in ``__all__``, and states it completely."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types

import pytest

import protocol

PROTOCOL_MODULES = ["protocol"] + [f"protocol.{m.name}" for m in pkgutil.iter_modules(protocol.__path__)]


def public_definitions(module: types.ModuleType) -> set[str]:
    """Functions and classes defined in the module itself, not starting with ``_``."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == module.__name__
    }


@pytest.mark.parametrize("name", PROTOCOL_MODULES)
def test_all_is_complete_and_correct(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what does not exist: {missing}"
    unlisted = public_definitions(module) - set(exported)
    assert not unlisted, f"{name} defines public names missing from __all__: {sorted(unlisted)}"


@pytest.mark.parametrize("name", PROTOCOL_MODULES)
def test_public_names_have_docstrings(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no module docstring"
    undocumented = [
        n for n in module.__all__ if (inspect.isclass(getattr(module, n)) or inspect.isfunction(getattr(module, n)))
        and not inspect.getdoc(getattr(module, n))
    ]
    assert not undocumented, f"{name}: public names without a docstring: {undocumented}"
