"""Schemathesis over the served OpenAPI document, against both stores: every phase it has
(examples, coverage, fuzzing, stateful) with `--checks all`, and 0 failures expected.

So the document describes every answer: each status code a route can return with its real
body (one error model), required headers required, ETag declared, and links from a read's
ETag to a write's If-Match that the stateful phase follows. Where this API differs from
schemathesis' defaults on purpose (412 for a stale If-Match, 428 for a missing one) is said
in schemathesis.toml next to this file.

Bounded: a time budget per store (fuzzing and stateful repeat until it is spent), a fixed
number of examples per operation and long-polls capped at 0.1 s by the server's settings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import OPERATOR, ApiUnderTest

pytestmark = pytest.mark.timeout(180)

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
CONFIG = Path(__file__).with_name("schemathesis.toml")
BUDGET_S = 40
EXAMPLES_PER_OPERATION = 10


def test_schemathesis_all_checks_all_phases_find_nothing(api_factory: Any, tmp_path: Path) -> None:
    api: ApiUnderTest = api_factory(long_poll_max_s=0.1)
    result = subprocess.run(
        [
            SCHEMATHESIS,
            "--config-file",
            str(CONFIG),
            "run",
            api.url + "/openapi.json",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--header",
            f"Authorization: Bearer {OPERATOR}",
            "--max-examples",
            str(EXAMPLES_PER_OPERATION),
            "--max-time",
            str(BUDGET_S),
            "--request-timeout",
            "10",
            # One worker: hypothesis' lambda introspection is not thread-safe (with two,
            # schemathesis itself crashed now and then while drawing a body).
            "--workers",
            "1",
            "--seed",
            "20261201",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=tmp_path,  # its report directory, if any, goes here
        check=False,
    )
    summary = result.stdout[result.stdout.find("= SUMMARY") :]
    print(summary)
    # The whole report stays beside the test's other files; the assertion shows the
    # failures section with each generated value cut short, so the reason is readable.
    (tmp_path / "schemathesis.out").write_text(result.stdout + result.stderr)
    failures = _failures_section(result.stdout)
    assert "Tested: " in summary, result.stdout[-3000:] + result.stderr[-2000:]
    # Every phase ran (a crash in one would show as an error, not a pass).
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in summary, failures
    assert result.returncode == 0, failures


def _failures_section(stdout: str) -> str:
    """The report's failures, from its FAILURES header to its WARNINGS or SUMMARY, each
    line cut to 300 characters (a generated body can be tens of kilobytes long)."""
    start = stdout.find("= FAILURES")
    end = min(
        (i for i in (stdout.find("= WARNINGS"), stdout.find("= SUMMARY")) if i > start),
        default=len(stdout),
    )
    section = stdout[start:end] if start >= 0 else stdout[-6000:]
    return "\n".join(line[:300] for line in section.splitlines())[:8000]
