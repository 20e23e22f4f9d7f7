"""Runs ExaBGP with one more API command: `shutdown-sessions TEXT`.

    python -m bgp.exabgp_main /path/to/bin/exabgp exabgp.conf

ExaBGP 5.0.15's `shutdown` closes its sessions with no NOTIFICATION at all, and
`neighbor X teardown 2` sends a Cease with its own fixed text and then reconnects. RFC
8203 lets a Cease Administrative Shutdown carry a short message naming the reason, which
routers log and show (`show bgp neighbors`, `birdc show protocols all`).
`shutdown-sessions TEXT` ends every established session with Cease 6/2 carrying TEXT and
does not reconnect; the driver sends it when the agent stops, then stops ExaBGP.

The rest is ExaBGP's own entry point, run unchanged from its script.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

# RFC 8203: at most 128 octets (RFC 9003 allows 255; 128 is what every router accepts).
MAX_SHUTDOWN_MESSAGE_BYTES = 128
_message: list[str] = [""]


def shutdown_text(text: str) -> str:
    """ASCII (ExaBGP encodes the data as ASCII), at most 128 bytes."""
    return text.encode("ascii", "replace").decode()[:MAX_SHUTDOWN_MESSAGE_BYTES]


def install() -> None:
    from exabgp.bgp.message import Notify
    from exabgp.reactor import peer
    from exabgp.reactor.api.command.command import Command

    class NotifyWithMessage(Notify):  # type: ignore[misc]
        def __init__(self, code: int, subcode: int, data: Any = None) -> None:
            if data is None and code == 6 and subcode in (2, 4) and _message[0]:
                data = _message[0]
            super().__init__(code, subcode, data)

    peer.Notify = NotifyWithMessage

    @Command.register("shutdown-sessions", False)  # type: ignore[untyped-decorator]
    def shutdown_sessions(self: Any, reactor: Any, service: str, line: str, use_json: bool) -> bool:
        _message[0] = shutdown_text(line.partition(" ")[2].strip())
        for key in reactor.established_peers():
            reactor._peers[key].teardown(2, restart=False)
        reactor.processes.answer_done(service)
        return True


def main() -> None:
    if len(sys.argv) < 3:
        sys.stderr.write("usage: python -m bgp.exabgp_main EXABGP_SCRIPT CONFIG...\n")
        sys.exit(2)
    script = sys.argv[1]
    install()
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
