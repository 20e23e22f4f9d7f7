#!/bin/bash
# The lab's Prometheus (Debian's package): scrapes the edges on the site networks and the
# APIs on mgmt; the host reaches its UI at 198.18.100.50:9090 through the mgmt bridge.
# Like every lab role, it first drops Docker's default route: the host is never a path.
set -euo pipefail
ip route del default 2>/dev/null || true
for _ in 1 2 3 4; do ip -6 route del default 2>/dev/null || break; done
mkdir -p /var/lib/prometheus/lab
exec prometheus --config.file /etc/prometheus/prometheus.yml \
  --storage.tsdb.path /var/lib/prometheus/lab --storage.tsdb.retention.time 1d \
  --web.listen-address 0.0.0.0:9090 --log.level warn
