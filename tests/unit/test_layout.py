"""The packages import on their own: the dependency rule is enforced by import-linter."""

import importlib

import pytest


@pytest.mark.parametrize("name", ["edge", "bgp", "api", "edgectl"])
def test_package_imports(name: str) -> None:
    assert importlib.import_module(name).__doc__
