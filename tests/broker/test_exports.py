"""``__all__`` of the broker modules is complete, and every exported name is documented."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = ["broker_plugin.broker", "broker_plugin.topictrie", "broker_plugin.tlsconf"]


@pytest.mark.parametrize("name", MODULES)
def test_all_complete_and_documented(name: str) -> None:
    module = importlib.import_module(name)
    defined = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == name
    }
    assert defined <= set(module.__all__)
    for exported in module.__all__:
        obj = getattr(module, exported)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name}.{exported} has no docstring"
