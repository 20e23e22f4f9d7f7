"""The layout holds what the project says it holds: checked, not described.

* every `make bench-<name>` target runs `bench.<name>`, which writes bench-results/<name>.json;
* the import contracts exist and import-linter keeps them, and forbidding a standard-library
  module means something (grimp records stdlib imports when external packages are included);
* the pure cores named in the contract exist, and the packages import on their own;
* systemd's stop timeout is above the longest SIGTERM drain the shipped configs allow.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import tomllib
from pathlib import Path

import grimp
import pytest
import yaml
from setuptools import find_packages

from edge.agent import sigterm_stop_bound_s
from edge.config import parse_config
from tests.support.procs import BIN, ROOT

PACKAGES = ["contract", "edge", "bgp", "api", "edgectl"]
MAKEFILE = (ROOT / "Makefile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONTRACTS = {c["name"]: c for c in PYPROJECT["tool"]["importlinter"]["contracts"]}
BENCH_TARGETS = re.findall(r"^bench-([a-z]+):", MAKEFILE, flags=re.MULTILINE)


@pytest.mark.parametrize("name", PACKAGES)
def test_package_imports(name: str) -> None:
    assert importlib.import_module(name).__doc__


def test_there_are_bench_targets() -> None:
    assert {"proxy", "bgp", "api", "lab"} <= set(BENCH_TARGETS)


@pytest.mark.parametrize("name", BENCH_TARGETS)
def test_each_bench_target_runs_its_module_which_writes_its_json(name: str) -> None:
    recipe = MAKEFILE.split(f"\nbench-{name}:", 1)[1].split("\n\n", 1)[0]
    assert f"-m bench.{name}" in recipe, f"make bench-{name} does not run bench.{name}"
    source = (ROOT / "bench" / f"{name}.py").read_text()
    assert re.search(rf"""["'](?:bench-results/)?{name}\.json["']""", source), (
        f"bench/{name}.py does not write bench-results/{name}.json"
    )
    assert "bench-results" in source


def test_import_contracts_are_configured_and_kept() -> None:
    assert PYPROJECT["tool"]["importlinter"]["include_external_packages"] is True
    pure = CONTRACTS["pure cores do no I/O"]
    assert {"asyncio", "socket", "subprocess", "httpx"} <= set(pure["forbidden_modules"])
    for module in pure["source_modules"]:
        importlib.import_module(module)  # a renamed module must not silently drop out
    assert (
        "edge.agent"
        in CONTRACTS["extensions and the admin endpoint do not import the agent"][
            "forbidden_modules"
        ]
    )
    result = subprocess.run(
        [str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout


def test_forbidding_a_stdlib_module_is_meaningful() -> None:
    """With include_external_packages, grimp records stdlib imports (as their top-level
    package), so the pure-core contract would catch `import asyncio` in edge.state."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=True)
    assert "asyncio" in graph.find_modules_directly_imported_by("edge.proxy.common")
    assert "socket" in graph.find_modules_directly_imported_by("edge.proxy.common")
    assert not graph.find_shortest_chain(importer="edge.state", imported="asyncio")


def test_the_wheel_ships_every_package_and_no_test_tooling() -> None:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(where=str(ROOT), include=include))
    assert set(PACKAGES) <= shipped  # a package without __init__.py would be left out
    assert not any(name.startswith("tests") for name in shipped)
    assert not Path(ROOT / "bgp" / "netlab.py").exists()


SHIPPED_NODE_CONFIGS = sorted(
    [ROOT / "deploy" / "examples" / "node.yaml", *(ROOT / "deploy" / "lab").glob("edge-*.yaml")]
)


@pytest.mark.parametrize("path", SHIPPED_NODE_CONFIGS, ids=lambda p: p.name)
def test_systemd_stop_timeout_is_above_the_longest_sigterm_drain(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = (ROOT / "deploy" / "systemd" / "anycast-edge.service").read_text()
    (timeout_s,) = (float(v) for v in re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE))
    data = yaml.safe_load(path.read_text())
    if token_env := (data.get("control_plane") or {}).get("token_env"):
        monkeypatch.setenv(token_env, "a-token-for-the-check")
    config = parse_config(data)
    # The bound includes edge.agent.STOP_MARGIN_S: at the bound, systemd still waits long
    # enough; so do the default deadlines.
    assert sigterm_stop_bound_s(config) <= timeout_s
    bgp_defaults = {k: v for k, v in (data.get("bgp") or {}).items() if k != "drain_deadline_s"}
    defaults = parse_config(
        {**data, "drain": {}, **({"bgp": bgp_defaults} if bgp_defaults else {})}
    )
    assert sigterm_stop_bound_s(defaults) <= timeout_s
