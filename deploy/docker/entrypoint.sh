#!/bin/bash
# The lab's entrypoint: `lab-entrypoint ROLE`. Every role first deletes the default route
# Docker gives each container (to the host's bridge address, even on internal networks):
# the host must never be a path between lab networks. Re-run on `docker start`: idempotent.
set -euo pipefail
role=$1
ip route del default 2>/dev/null || true
# The same for IPv6 (a container on an IPv6 network gets one too).
for _ in 1 2 3 4; do ip -6 route del default 2>/dev/null || break; done
# LAB_ROUTES: "PREFIX via GW; PREFIX via GW" (static routes the role needs).
IFS=';' read -ra routes <<<"${LAB_ROUTES:-}"
for route in "${routes[@]}"; do
  [ -n "${route// /}" ] && ip route replace $route
done
# LAB_ROUTES6: the same for IPv6 ("default via GW6; PREFIX6 via GW6").
IFS=';' read -ra routes6 <<<"${LAB_ROUTES6:-}"
for route in "${routes6[@]}"; do
  [ -n "${route// /}" ] && ip -6 route replace $route
done
# Until duplicate address detection is over (bounded): a tentative IPv6 address cannot be
# bound, and the agent binds its IPv6 BGP source at start.
for _ in $(seq 1 50); do
  [ -z "$(ip -6 addr show tentative 2>/dev/null)" ] && break
  sleep 0.1
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
  # LAB_VIPS: more VIPs, IPv4 (/32) or IPv6 (/128), space-separated.
  for vip in ${LAB_VIPS:-}; do
    case "$vip" in
    *:*) ip -6 addr replace "$vip/128" dev lo nodad ;;
    *) ip addr replace "$vip/32" dev lo ;;
    esac
  done
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
  # One process per lab service: web's on IPv4 port 8080, app's on IPv6 port 8081. Each
  # fails its health check while /run/lab/fail-SERVICE exists (`python -m deploy.lab
  # chaos fail-service SERVICE`; `chaos heal` removes it).
  mkdir -p /run/lab
  rm -f /run/lab/fail-*
  pids=()
  python -m deploy.backend.named_backend --host 0.0.0.0 --port 8080 --name "${LAB_NAME:?}" \
    --fail-file /run/lab/fail-web & pids+=($!)
  python -m deploy.backend.named_backend --host :: --port 8081 --name "${LAB_NAME}-app" \
    --fail-file /run/lab/fail-app & pids+=($!)
  trap 'kill "${pids[@]}" 2>/dev/null' TERM INT
  wait -n
  echo "a backend process exited" >&2
  kill "${pids[@]}" 2>/dev/null || true
  exit 1
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
