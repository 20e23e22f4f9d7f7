#!/bin/bash
# One member of the lab's 3-member etcd cluster (Debian's etcd-server), on the management
# network only. LAB_NAME and LAB_ADDRESS name this member; LAB_CLUSTER lists them all.
set -euo pipefail
ip route del default 2>/dev/null || true
export ETCD_UNSUPPORTED_ARCH=${ETCD_UNSUPPORTED_ARCH:-}
exec etcd --name "${LAB_NAME:?}" --data-dir /var/lib/etcd/lab \
  --listen-peer-urls "http://${LAB_ADDRESS:?}:2380" \
  --initial-advertise-peer-urls "http://${LAB_ADDRESS}:2380" \
  --listen-client-urls "http://${LAB_ADDRESS}:2379,http://127.0.0.1:2379" \
  --advertise-client-urls "http://${LAB_ADDRESS}:2379" \
  --initial-cluster "${LAB_CLUSTER:?}" --initial-cluster-state new \
  --initial-cluster-token anycast-edge-lab \
  --heartbeat-interval 100 --election-timeout 1000 --log-level warn
