"""Test-wide: the `needs(...)` marker gates a test on real parts (tests/support/requires.py):
a skip on a machine without them, a failure with the reason under CI=true."""

from __future__ import annotations

import pytest

from tests.support.requires import require


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("needs"):
        require(*marker.args)
