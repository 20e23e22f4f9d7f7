# anycast-edge: `make lab` and `make test` work on a fresh Debian machine (as root).
# `make lab` (the docker-compose lab) installs and starts Docker when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Debian packages the tests and benchmarks need (installed when missing).
DEB_TEST := chromium frr bird2 haproxy nginx-light wrk etcd-server etcd-client iproute2 nftables procps psmisc util-linux keepalived prometheus
PYTEST_ARGS ?=

.PHONY: all venv deps lint test test-unit test-integration test-e2e lab lab-down lab-status demo bench-proxy clean

all: test

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

deps:
	@scripts/ensure-debian-packages.sh $(DEB_TEST)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: deps venv lint
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/pytest -q tests/unit

test-integration: deps venv
	$(BIN)/pytest -q tests/integration

# The docker-compose lab, end to end (brings it up once, always takes it down; a few min).
test-e2e: venv
	$(BIN)/pytest -q -p no:cacheprovider tests/e2e

# The docker-compose lab: client, FRR routers, two sites of real edges, GSLB on etcd.
# Builds what is missing (Docker itself, the base image, the wheelhouse, the images).
lab: venv
	$(PY) -m deploy.lab up

lab-down: venv
	$(PY) -m deploy.lab down

lab-status: venv
	$(PY) -m deploy.lab status

# A local demo without Docker: one agent on loopback in front of two backends.
demo: venv
	$(PY) -m deploy.demo.run_demo

bench-proxy: deps venv
	$(PY) -m bench.proxy

# 100,000 L4 and 100,000 L7 flows with every close pattern: fds, flows and RSS before/after.
.PHONY: bench-soak
bench-soak: deps venv
	$(PY) -m bench.soak

# BGP numbers with real FRR, BIRD 2 + ExaBGP in network namespaces (root; ~2 min, bounded).
.PHONY: bench-bgp
bench-bgp: deps venv
	$(PY) -m bench.bgp

# Control-plane numbers: write->watch, heartbeat load, etcd leader kill (bounded).
.PHONY: bench-api
bench-api: deps venv
	$(PY) -m bench.api

# Flow sharing within a site (netns, real FRR + three real agents): broken connections per
# planned change with forwarding off/on, sync lag, map size and memory (root; a few min).
.PHONY: bench-flows
bench-flows: deps venv
	$(PY) -m bench.flows

# Lab numbers: drains, node kill/freeze with and without BFD, weight change -> core FIB,
# site share (brings the lab up and down; a few minutes, bounded).
.PHONY: bench-lab
bench-lab: venv
	$(PY) -m bench.lab

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache bench-results .lab

# Active-passive failover gap (kill, freeze, link cut) against keepalived 2.2 in network
# namespaces, with a real 3-member etcd (root; a few minutes, bounded).
.PHONY: bench-ap
bench-ap: deps venv
	$(PY) -m bench.ap
