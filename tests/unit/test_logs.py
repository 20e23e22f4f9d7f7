"""contract.logs: one JSON object per record, with the fixed keys, the process's static
fields and the call's `extra=` fields, and nothing of LogRecord's own bookkeeping."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from contract.logs import JsonLines


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("edge.agent", logging.WARNING, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_fixed_keys_static_and_extra_fields() -> None:
    formatter = JsonLines({"component": "agent", "node": "edge-a1"})
    line = formatter.format(
        record(
            "backend %s down",
            "b1",
            event="backend",
            reason="3 checks failed",
            color_message="\x1b[31m",
        )
    )
    parsed = json.loads(line)
    assert parsed.pop("ts").endswith("+00:00")
    assert parsed == {
        "level": "warning",
        "logger": "edge.agent",
        "msg": "backend b1 down",
        "component": "agent",
        "node": "edge-a1",
        "event": "backend",
        "reason": "3 checks failed",
    }
    assert "\n" not in line


def test_an_exception_is_one_field_and_odd_values_are_strings() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = record("failed", path=Path("/x"))
        made.exc_info = sys.exc_info()
    parsed = json.loads(JsonLines().format(made))
    assert "ValueError: boom" in parsed["exc"]
    assert parsed["path"] == "/x"


@given(st.text(), st.dictionaries(st.sampled_from(["node", "reason", "state"]), st.text()))
def test_any_message_is_one_parseable_line(msg: str, fields: dict[str, str]) -> None:
    line = JsonLines().format(record("%s", msg, **fields))
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["msg"] == msg
    assert {k: parsed[k] for k in fields} == fields
