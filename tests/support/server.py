"""Serve an ASGI app with uvicorn on a loopback port from a background thread.

Tests and benchmarks use it to run the real app over real sockets, and to stop and restart
an API instance on the same port (to prove clients keep their last known good state).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from tests.support.etcd_cluster import free_port


class ThreadedServer:
    def __init__(self, make_app: Callable[[], FastAPI], port: int | None = None) -> None:
        """`make_app` is called at every start: an app (and its store) per server life."""
        self._make_app = make_app
        self.port = port or free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        config = uvicorn.Config(
            self._make_app(),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name=f"uvicorn-{self.port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                thread.join(5)
                raise RuntimeError(f"uvicorn on port {self.port} did not start")
            time.sleep(0.01)
        self._server, self._thread = server, thread

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> ThreadedServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
