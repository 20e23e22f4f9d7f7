#!/usr/bin/env bash
# Make this machine lab-ready, idempotently (see docs: DESIGN.md "The lab").
#   - a user with a working Docker: nothing is installed or started, only the wheelhouse;
#   - a bare Debian machine (root): installs docker.io, docker-compose and debootstrap,
#     starts dockerd (--ip-forward=false, host forwarding off: the host must never route
#     between lab networks), builds debian:bookworm-slim locally when it cannot be had.
# Then builds the wheelhouse (.lab/wheelhouse): the project's dependencies as wheels, so
# that images install them with `pip --no-index` (pip inside `docker build` may not reach
# the package index).
# Usage: scripts/lab-docker.sh [--no-wheelhouse]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE_DIR=/run/anycast-edge-lab
DOCKERD_LOG=/var/log/anycast-edge-dockerd.log
BASE_IMAGE=debian:bookworm-slim

say() { echo "lab: $*"; }

docker_ok() { docker info >/dev/null 2>&1; }

ensure_packages() {
  local want=()
  command -v docker >/dev/null 2>&1 || want+=(docker.io)
  command -v dockerd >/dev/null 2>&1 || want+=(docker.io)
  command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || want+=(docker-compose)
  command -v debootstrap >/dev/null 2>&1 || want+=(debootstrap)
  [ ${#want[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    say "missing: ${want[*]} (install them, or run as root)" >&2
    exit 1
  fi
  say "installing Debian packages: ${want[*]}"
  scripts/ensure-debian-packages.sh $(printf '%s\n' "${want[@]}" | sort -u)
}

start_dockerd() {
  docker_ok && return 0
  if [ "$(id -u)" -ne 0 ]; then
    say "no Docker engine answers and we are not root: start one (dockerd) first" >&2
    exit 1
  fi
  # dockerd turns ip_forward on by itself unless told not to; the lab's routers forward
  # inside their own namespaces, the host never does.
  sysctl -qw net.ipv4.ip_forward=0
  # The same for IPv6: the lab's networks have IPv6 subnets, the host routes none of them.
  sysctl -qw net.ipv6.conf.all.forwarding=0
  mkdir -p "$STATE_DIR"
  say "starting dockerd (--ip-forward=false; log: $DOCKERD_LOG)"
  setsid dockerd --ip-forward=false --pidfile "$STATE_DIR/dockerd.pid" \
    >>"$DOCKERD_LOG" 2>&1 </dev/null &
  echo "started-by-lab" >"$STATE_DIR/dockerd.owner"
  for _ in $(seq 1 120); do
    docker_ok && { say "dockerd is up"; return 0; }
    sleep 0.5
  done
  say "dockerd did not come up in 60 s; see $DOCKERD_LOG" >&2
  exit 1
}

ensure_base_image() {
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  if docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    say "pulled $BASE_IMAGE"
    return 0
  fi
  say "building $BASE_IMAGE locally with debootstrap (about 30-60 s)"
  local dir
  dir=$(mktemp -d /var/tmp/ae-bookworm.XXXXXX)
  trap 'rm -rf "$dir"' RETURN
  debootstrap --variant=minbase bookworm "$dir" http://deb.debian.org/debian >/dev/null
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | docker import - "$BASE_IMAGE" >/dev/null
  say "built $BASE_IMAGE"
}

build_wheelhouse() {
  local house="$ROOT/.lab/wheelhouse" stamp
  mkdir -p "$house"
  stamp=$(sha256sum pyproject.toml | cut -c1-16)
  if [ -f "$house/.stamp" ] && [ "$(cat "$house/.stamp")" = "$stamp" ]; then
    return 0
  fi
  local py=${PYTHON:-python3}
  [ -x "$ROOT/.venv/bin/python" ] && py="$ROOT/.venv/bin/python"
  say "building the wheelhouse (.lab/wheelhouse)"
  "$py" - >"$house/requirements.txt" <<'EOF'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
EOF
  "$py" -m pip wheel -q --wheel-dir "$house" -r "$house/requirements.txt" 2> >(grep -v "^WARNING: Location" >&2)
  echo "$stamp" >"$house/.stamp"
}

ensure_packages
start_dockerd
ensure_base_image
if [ "${1:-}" != "--no-wheelhouse" ]; then build_wheelhouse; fi
say "ready"
