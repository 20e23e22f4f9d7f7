"""`python -m tests.support.store_relay NETNS PORT...`: one node's store relay (see
`tests.support.vip_lab.StoreRelay`) in a process of its own, so that relaying the node's
etcd traffic never waits for the GIL of the test or bench process (its observer samples
the kernels every 10 ms, its prober opens a connection every 20 ms).

Commands on stdin, one a line, each answered `ok` on stdout once in force: `cut` (bytes
vanish from now on, nothing is closed), `heal`. Prints `ready` once listening; ends at EOF.
"""

from __future__ import annotations

import sys

from tests.support.vip_lab import Node, StoreRelay


def main() -> None:
    netns, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
    node = Node(netns, netns, "", "", "")
    relay = StoreRelay(ports)
    relay.add(node)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "cut":
            node.store_cut.set()
        elif command == "heal":
            node.store_cut.clear()
        print("ok" if command in ("cut", "heal") else f"unknown {command!r}", flush=True)
    relay.close()


if __name__ == "__main__":
    main()
