"""Test-wide: the `needs(...)` marker gates a test on real parts (tests/support/requires.py):
a skip on a machine without them, a failure with the reason under CI=true."""

from __future__ import annotations

import pytest
from hypothesis import settings

from tests.support.requires import require

# No wall-clock deadline per generated example: a test never asserts a time (the machine is
# shared and loaded during CI; speeds live in `make bench-*`). Hypothesis' default of 200 ms
# failed a framing property once under load, with nothing wrong in the code.
settings.register_profile("anycast-edge", deadline=None)
settings.load_profile("anycast-edge")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("needs"):
        require(*marker.args)
