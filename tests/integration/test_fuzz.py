"""Schemathesis over the served OpenAPI schema: no generated request, valid or not, gets a 5xx
(against both stores).

Bounded: a fixed number of examples per operation, long-polls capped at 0.1 s by the
server's settings, no shrinking of failures beyond the default.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import OPERATOR, ApiUnderTest

pytestmark = pytest.mark.timeout(200)

EXAMPLES_PER_OPERATION = 20


def test_no_generated_request_gets_a_server_error(api_factory: Any) -> None:
    api: ApiUnderTest = api_factory(long_poll_max_s=0.1)
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    failures: list[str] = []
    statuses: list[int] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(), token_choice=st.integers(0, 4))
        def exercise(case: Any, token_choice: int) -> None:
            headers = {"Authorization": f"Bearer {OPERATOR if token_choice else 'nope'}"}
            response = case.call(base_url=api.url, headers=headers, timeout=10)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:200]}"
                )

        exercise()
    assert operations >= 20
    assert len(statuses) >= operations * 3  # it really sent requests
    print("status counts", sorted(Counter(statuses).items()))
    assert failures == []
