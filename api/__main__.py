"""`python -m api --config gslb.yaml`: serve the GSLB API with uvicorn.

Bad configuration: one line on stderr naming the field, exit status 2, nothing started.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import uvicorn

from api.app import create_app
from api.auth import TokenTable
from api.settings import ConfigError, Settings, check_files, load_settings
from api.store import open_store


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m api", description="anycast-edge GSLB API")
    parser.add_argument("--config", type=Path, required=True, help="gslb.yaml")
    parser.add_argument("--host", help="override `host` from the config")
    parser.add_argument("--port", type=int, help="override `port` from the config")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    return parser.parse_args(argv)


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


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
    app = create_app(open_store(settings.store), settings, tokens)
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
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
