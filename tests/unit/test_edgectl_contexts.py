"""edgectl contexts: the file's rules (one line naming the file and the field), and the
order in which a connection is chosen (flags, then EDGECTL_*, then the current context)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgectl import contexts

EDGECTL = str(Path(sys.executable).parent / "edgectl")


def test_put_use_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "edgectl" / "config.yaml"
    lab = contexts.Context(api=["http://198.18.10.30:8080"], token="t-lab")
    prod = contexts.Context(api=["https://gslb.example:8443"], token="t-prod")
    contexts.put("lab", lab, make_current=True, path=path)
    contexts.put("prod", prod, make_current=False, path=path)
    assert contexts.current(path) == ("lab", lab)
    contexts.use("prod", path)
    assert contexts.current(path) == ("prod", prod)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds tokens
    with pytest.raises(
        contexts.ContextError, match="no context named 'nope' \\(known: lab, prod\\)"
    ):
        contexts.use("nope", path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("current: [", "not valid YAML (line 1)"),
        ("current: x\n", "current: no context named 'x'"),
        ("contexts: {a: {api: [ftp://x]}}\n", "contexts.a.api.0: String should match pattern"),
        ("contexts: {a: {api: []}}\n", "contexts.a.api: List should have at least 1 item"),
        ("contexts: {a: {api: [http://x], tokn: y}}\n", "contexts.a.tokn: Extra inputs"),
        ("contexts: {a: {api: [http://x], token: 7}}\n", "contexts.a.token: Input should be"),
    ],
)
def test_a_broken_file_is_one_line_naming_file_and_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(contexts.ContextError) as error:
        contexts.load(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)
    # The CLI says the same in one line, exit 2, no traceback.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    environ["EDGECTL_CONFIG"] = str(path)
    result = subprocess.run(
        [EDGECTL, "status"], capture_output=True, text=True, env=environ, timeout=30, check=False
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_version_flags() -> None:
    for tool in ("edgectl", "anycast-edge"):
        binary = str(Path(sys.executable).parent / tool)
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
        assert out.stdout.startswith(f"{tool} ") and out.stdout.split()[1][0].isdigit()
    helptext = subprocess.run(
        [str(Path(sys.executable).parent / "anycast-edge"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "╭" not in helptext and "<bool>" not in helptext  # no stray markup
