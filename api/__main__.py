"""`python -m api --config gslb.yaml`: serve the GSLB API with uvicorn.

Bad configuration: one line on stderr naming the field, exit status 2, nothing started.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from api.app import create_app
from api.auth import TokenTable
from api.settings import ConfigError, Settings, check_files, load_settings
from api.store import open_store
from contract import logs


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m api", description="anycast-edge GSLB API")
    parser.add_argument("--config", type=Path, required=True, help="gslb.yaml")
    parser.add_argument("--host", help="override `host` from the config")
    parser.add_argument("--port", type=int, help="override `port` from the config")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    return parser.parse_args(argv)


def _configure_logging(settings: Settings) -> None:
    # The agent's line format (contract.logs): ts, level, logger, msg, component, fields.
    logs.configure(logging.INFO, settings.log_format, {"component": "api"})


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        settings: Settings = load_settings(args.config)
        tokens = TokenTable.from_settings(
            settings, str(args.config)
        )  # resolves token_env now, not per request
        check_files(settings, str(args.config))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    _configure_logging(settings)
    # httpx logs every request at INFO: with etcd that is every store call (the gateway logs
    # them itself, at DEBUG).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(open_store(settings.store), settings, tokens, pace_gc=True)
    tls = settings.tls
    uvicorn.run(
        app,
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
        # Access logs show method, path and status only; headers (tokens) are never logged.
        access_log=False,
        log_level="info",
        log_config=None,  # uvicorn's loggers go through the root handler (and its format)
        timeout_graceful_shutdown=2,
        timeout_keep_alive=settings.keep_alive_s,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
