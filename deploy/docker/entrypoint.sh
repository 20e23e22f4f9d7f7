#!/bin/bash
# The lab's entrypoint: `lab-entrypoint ROLE`. Every role first deletes the default route
# Docker gives each container (to the host's bridge address, even on internal networks):
# the host must never be a path between lab networks. Re-run on `docker start`: idempotent.
set -euo pipefail
role=$1
ip route del default 2>/dev/null || true
# LAB_ROUTES: "PREFIX via GW; PREFIX via GW" (static routes the role needs).
IFS=';' read -ra routes <<<"${LAB_ROUTES:-}"
for route in "${routes[@]}"; do
  [ -n "${route// /}" ] && ip route replace $route
done

case "$role" in
router)
  conf=/opt/anycast-edge/deploy/frr/${LAB_FRR:?LAB_FRR names the router\'s config directory}
  install -d -o frr -g frr /run/frr
  rm -f /run/frr/*.pid
  pids=()
  /usr/lib/frr/zebra -f "$conf/zebra.conf" -i /run/frr/zebra.pid -z /run/frr/zserv.api \
    --vty_socket /run/frr & pids+=($!)
  for _ in $(seq 1 100); do [ -S /run/frr/zserv.api ] && break; sleep 0.1; done
  /usr/lib/frr/bfdd -f "$conf/bfdd.conf" -i /run/frr/bfdd.pid -z /run/frr/zserv.api \
    --vty_socket /run/frr --bfdctl /run/frr/bfdd.sock & pids+=($!)
  /usr/lib/frr/bgpd -f "$conf/bgpd.conf" -i /run/frr/bgpd.pid -z /run/frr/zserv.api \
    --vty_socket /run/frr & pids+=($!)
  trap 'kill "${pids[@]}" 2>/dev/null' TERM INT
  wait -n
  echo "an FRR daemon exited" >&2
  kill "${pids[@]}" 2>/dev/null || true
  exit 1
  ;;
edge)
  ip addr replace "${LAB_VIP:?}/32" dev lo
  # A restarted container keeps its files: stale ExaBGP/bfdd pid files and sockets go.
  rm -rf /run/anycast-edge && mkdir -p /var/lib/anycast-edge /run/anycast-edge
  exec anycast-edge run --config "${LAB_NODE_CONFIG:?}"
  ;;
edge-ap)
  # An active-passive node (site-c): no anycast VIP on lo, the group's VIP is the agent's
  # to claim on the segment. Docker numbers a container's interfaces in no promised order:
  # the segment's is found by its address and written into the config's vip_group.
  dev=$(ip -o -4 addr show to "${LAB_SEGMENT_ADDRESS:?}" | awk '{sub(/@.*/, "", $2); print $2; exit}')
  if [ -z "$dev" ]; then
    echo "no interface holds ${LAB_SEGMENT_ADDRESS}" >&2
    exit 2
  fi
  rm -rf /run/anycast-edge && mkdir -p /var/lib/anycast-edge /run/anycast-edge
  sed "s/@SEGMENT_IF@/$dev/" "${LAB_NODE_CONFIG:?}" >/run/anycast-edge/node.yaml
  exec anycast-edge run --config /run/anycast-edge/node.yaml
  ;;
backend)
  exec python -m deploy.backend.named_backend --host 0.0.0.0 --port 8080 --name "${LAB_NAME:?}"
  ;;
api)
  exec python -m api --config "${LAB_API_CONFIG:?}"
  ;;
client)
  exec sleep infinity
  ;;
*)
  echo "unknown role $role" >&2
  exit 2
  ;;
esac
