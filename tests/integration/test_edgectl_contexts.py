"""The real `edgectl` against the real API through a context: no flag needed, and flags and
EDGECTL_* variables still win over the context."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgectl import contexts
from tests.integration.conftest import VIEWER, ApiUnderTest

EDGECTL = str(Path(sys.executable).parent / "edgectl")


def _edgectl(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    environ.update(EDGECTL_CONFIG=str(config), **env)
    return subprocess.run(
        [EDGECTL, *args], capture_output=True, text=True, env=environ, timeout=60, check=False
    )


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_the_current_context_is_used_and_flags_win(api: ApiUnderTest, tmp_path: Path) -> None:
    config = tmp_path / "edgectl.yaml"
    contexts.put(
        "here", contexts.Context(api=[api.url], token=VIEWER), make_current=True, path=config
    )
    contexts.put(
        "wrong",
        contexts.Context(api=[api.url], token="not-a-token"),
        make_current=False,
        path=config,
    )
    assert _edgectl(config, "status").returncode == 0
    listed = _edgectl(config, "context", "list")
    assert listed.returncode == 0 and "* here" in listed.stdout and VIEWER not in listed.stdout
    assert _edgectl(config, "context", "use", "wrong").returncode == 0
    refused = _edgectl(config, "status")
    assert refused.returncode == 5 and "unauthorized" in refused.stderr
    assert _edgectl(config, "--token", VIEWER, "status").returncode == 0
    assert _edgectl(config, "status", EDGECTL_TOKEN=VIEWER).returncode == 0
    # --api wins over the context's URL too: a dead port is "API unavailable".
    dead = _edgectl(config, "--api", "http://127.0.0.1:9", "--token", VIEWER, "status")
    assert dead.returncode == 1 and "127.0.0.1:9" in dead.stderr
